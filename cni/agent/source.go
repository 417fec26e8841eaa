package agent

import (
	"context"

	"github.com/sluicemesh/sluice/cni/cniapi"
	corev1 "k8s.io/api/core/v1"
)

// Source tells the agent which pods run on its node and how they and their namespaces
// are labelled. Kubernetes informers are one source; the local lab's registry directory is
// another.
type Source interface {
	// Run watches until ctx ends. It calls changed with a pod key ("namespace/name")
	// whenever that pod or its namespace changed, including once for every pod at start.
	Run(ctx context.Context, changed func(key string)) error
	// Synced reports whether the first full listing has been delivered.
	Synced() bool
	// Pod returns the pod on this node with the given key.
	Pod(key string) (*corev1.Pod, bool)
	// Pods lists the pods on this node.
	Pods() []*corev1.Pod
	// Namespace returns the namespace with the given name.
	Namespace(name string) (*corev1.Namespace, bool)
	// Namespaces lists every namespace.
	Namespaces() []*corev1.Namespace
}

// InMesh decides membership as Istio's ambient mode does: the namespace carries
// istio.io/dataplane-mode=ambient and the pod does not opt out with =none. Host-network
// pods are never captured: their network namespace is the node's.
func InMesh(pod *corev1.Pod, ns *corev1.Namespace) bool {
	if pod == nil || ns == nil || pod.Spec.HostNetwork {
		return false
	}
	if pod.Labels[cniapi.DataplaneModeLabel] == cniapi.DataplaneModeNone {
		return false
	}
	if pod.Labels[cniapi.DataplaneModeLabel] == cniapi.DataplaneModeAmbient {
		return true
	}
	return ns.Labels[cniapi.DataplaneModeLabel] == cniapi.DataplaneModeAmbient
}

func podKey(namespace, name string) string { return namespace + "/" + name }
