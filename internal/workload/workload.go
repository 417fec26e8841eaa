// Package workload derives the names Istio's telemetry uses for a pod (workload,
// canonical service and revision), so Sluice's metrics carry the same labels and existing
// dashboards work unchanged.
//
// The rules read a Pod, a plain struct rather than corev1.Pod: ztunnel reads manifests
// without k8s.io/api, whose generated code and package initialisation cost each ztunnel
// 2.5 MB of resident memory. Components that watch the API server convert with
// internal/kubeworkload.
package workload

import "strings"

// Pod is what the rules read from a Kubernetes pod.
type Pod struct {
	Name, GenerateName string
	Labels             map[string]string
	// ControllerKind and ControllerName name the owner reference marked controller, when
	// the pod has one.
	ControllerKind, ControllerName string
	ServiceAccountName             string
	HostNetwork                    bool
}

// Name is the pod's workload: its Deployment for ReplicaSet-owned pods (the ReplicaSet
// name without its pod-template hash), otherwise its controller, otherwise the pod itself.
func Name(pod Pod) string {
	switch {
	case pod.ControllerKind == "ReplicaSet":
		if hash := pod.Labels["pod-template-hash"]; hash != "" {
			if name, ok := strings.CutSuffix(pod.ControllerName, "-"+hash); ok {
				return name
			}
		}
		return pod.ControllerName
	case pod.ControllerName != "":
		// Jobs too: CronJob-owned jobs end in a numeric schedule suffix, and Istio keeps
		// the job name.
		return pod.ControllerName
	case pod.GenerateName != "":
		return strings.TrimSuffix(pod.GenerateName, "-")
	}
	return pod.Name
}

// CanonicalService follows Istio: service.istio.io/canonical-name, then
// app.kubernetes.io/name, then app, then the workload name.
func CanonicalService(pod Pod) string {
	for _, l := range []string{"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"} {
		if v := pod.Labels[l]; v != "" {
			return v
		}
	}
	return Name(pod)
}

// CanonicalRevision follows Istio: service.istio.io/canonical-revision, then
// app.kubernetes.io/version, then version, then "latest".
func CanonicalRevision(pod Pod) string {
	for _, l := range []string{"service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"} {
		if v := pod.Labels[l]; v != "" {
			return v
		}
	}
	return "latest"
}

// ServiceAccount is the pod's service account, "default" when unset, as the API server
// would fill it in.
func ServiceAccount(pod Pod) string {
	if pod.ServiceAccountName != "" {
		return pod.ServiceAccountName
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
func Ambient(pod Pod, namespaceLabels map[string]string) bool {
	if pod.HostNetwork {
		return false
	}
	switch pod.Labels[DataplaneModeLabel] {
	case DataplaneModeNone:
		return false
	case DataplaneModeAmbient:
		return true
	}
	return NamespaceAmbient(namespaceLabels)
}

// NamespaceAmbient reports whether a namespace with these labels opts its pods into the
// mesh.
func NamespaceAmbient(namespaceLabels map[string]string) bool {
	return namespaceLabels[DataplaneModeLabel] == DataplaneModeAmbient
}
