// Package workload derives the names Istio's telemetry uses for a pod (workload,
// canonical service and revision), so Sluice's metrics carry the same labels and existing
// dashboards work unchanged.
package workload

import (
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Name is the pod's workload: its Deployment for ReplicaSet-owned pods (the ReplicaSet
// name without its pod-template hash), otherwise its controller, otherwise the pod itself.
func Name(pod *corev1.Pod) string {
	for _, ref := range pod.OwnerReferences {
		if ref.Controller == nil || !*ref.Controller {
			continue
		}
		switch ref.Kind {
		case "ReplicaSet":
			if hash := pod.Labels["pod-template-hash"]; hash != "" {
				if name, ok := strings.CutSuffix(ref.Name, "-"+hash); ok {
					return name
				}
			}
			return ref.Name
		case "Job":
			// CronJob-owned jobs end in a numeric schedule suffix; Istio keeps the job name.
			return ref.Name
		default:
			return ref.Name
		}
	}
	if pod.GenerateName != "" {
		return strings.TrimSuffix(pod.GenerateName, "-")
	}
	return pod.Name
}

// CanonicalService follows Istio: service.istio.io/canonical-name, then
// app.kubernetes.io/name, then app, then the workload name.
func CanonicalService(pod *corev1.Pod) string {
	for _, l := range []string{"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"} {
		if v := pod.Labels[l]; v != "" {
			return v
		}
	}
	return Name(pod)
}

// CanonicalRevision follows Istio: service.istio.io/canonical-revision, then
// app.kubernetes.io/version, then version, then "latest".
func CanonicalRevision(pod *corev1.Pod) string {
	for _, l := range []string{"service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"} {
		if v := pod.Labels[l]; v != "" {
			return v
		}
	}
	return "latest"
}

// ServiceAccount is the pod's service account, "default" when unset, as the API server
// would fill it in.
func ServiceAccount(pod *corev1.Pod) string {
	if pod.Spec.ServiceAccountName != "" {
		return pod.Spec.ServiceAccountName
	}
	return "default"
}

// Labels that decide ambient membership, as Istio's.
const (
	DataplaneModeLabel   = "istio.io/dataplane-mode"
	DataplaneModeAmbient = "ambient"
	DataplaneModeNone    = "none"
)

// Ambient decides membership as Istio's ambient mode does: the namespace carries
// istio.io/dataplane-mode=ambient (or the pod itself does) and the pod does not opt out
// with =none. Host-network pods are never in the mesh: their network namespace is the
// node's.
func Ambient(pod *corev1.Pod, ns *corev1.Namespace) bool {
	if pod == nil || pod.Spec.HostNetwork {
		return false
	}
	switch pod.Labels[DataplaneModeLabel] {
	case DataplaneModeNone:
		return false
	case DataplaneModeAmbient:
		return true
	}
	return NamespaceAmbient(ns)
}

// NamespaceAmbient reports whether a namespace opts its pods into the mesh.
func NamespaceAmbient(ns *corev1.Namespace) bool {
	return ns != nil && ns.Labels[DataplaneModeLabel] == DataplaneModeAmbient
}
