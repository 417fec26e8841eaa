// Package kubeworkload hands client-go's pods and namespaces to internal/workload's
// rules, for the components that watch the API server. It is a package of its own so
// that ztunnel, which reads no corev1 objects, does not link k8s.io/api.
package kubeworkload

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluicemesh/sluice/internal/workload"
)

// Pod is the part of p the workload rules read.
func Pod(p *corev1.Pod) workload.Pod {
	w := workload.Pod{
		Name: p.Name, GenerateName: p.GenerateName, Labels: p.Labels,
		ServiceAccountName: p.Spec.ServiceAccountName, HostNetwork: p.Spec.HostNetwork,
	}
	if ref := metav1.GetControllerOfNoCopy(p); ref != nil {
		w.ControllerKind, w.ControllerName = ref.Kind, ref.Name
	}
	return w
}

// NamespaceLabels is ns's labels, nil when the namespace is unknown (nil).
func NamespaceLabels(ns *corev1.Namespace) map[string]string {
	if ns == nil {
		return nil
	}
	return ns.Labels
}
