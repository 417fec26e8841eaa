package agent

import (
	"context"

	"github.com/sluicemesh/sluice/internal/kubeworkload"
	"github.com/sluicemesh/sluice/internal/workload"
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

// InMesh decides whether the agent captures pod (see workload.Ambient). Unlike
// workload.Ambient it also needs the namespace to be known: a pod whose namespace the
// source has not seen yet is left alone until it has.
func InMesh(pod *corev1.Pod, ns *corev1.Namespace) bool {
	return pod != nil && ns != nil && workload.Ambient(kubeworkload.Pod(pod), ns.Labels)
}

func podKey(namespace, name string) string { return namespace + "/" + name }
