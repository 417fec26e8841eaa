//go:build linux

package lab

import (
	"crypto/rand"
	"fmt"
	"maps"
	"path/filepath"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"
)

// The registry is the lab's stand-in for the Kubernetes API: one YAML manifest per
// object under StateDir/registry, replaced atomically on every change, for node agents
// and controllers running in local mode to watch. Manifests are derived from the state
// file, never edited in place.
const (
	registryNodes      = "nodes"
	registryNamespaces = "namespaces"
	registryPods       = "pods"
)

func nodeManifestPath(reg, node string) string {
	return filepath.Join(reg, registryNodes, node+".yaml")
}

func namespaceManifestPath(reg, ns string) string {
	return filepath.Join(reg, registryNamespaces, ns+".yaml")
}

func podManifestPath(reg, ns, name string) string {
	return filepath.Join(reg, registryPods, ns+"_"+name+".yaml")
}

func writeManifest(path string, obj any) error {
	b, err := yaml.Marshal(obj)
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return writeFileAtomic(path, b)
}

func writeNodeManifest(st *state, n Node) error {
	obj := &corev1.Node{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Node"},
		ObjectMeta: metav1.ObjectMeta{
			Name:              n.Name,
			UID:               types.UID(newUID()),
			ResourceVersion:   st.nextResourceVersion(),
			CreationTimestamp: metav1.Now(),
			Labels: map[string]string{
				"kubernetes.io/hostname": n.Name,
				"kubernetes.io/os":       "linux",
			},
		},
		Spec: corev1.NodeSpec{
			PodCIDR:  n.PodCIDR.String(),
			PodCIDRs: []string{n.PodCIDR.String()},
		},
		Status: corev1.NodeStatus{
			Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: n.IP.String()},
				{Type: corev1.NodeHostName, Address: n.Name},
			},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}},
		},
	}
	return writeManifest(nodeManifestPath(st.Config.registryDir(), n.Name), obj)
}

func writeNamespaceManifest(st *state, name string) error {
	ns := st.Namespaces[name]
	labels := maps.Clone(ns.Labels)
	if labels == nil {
		labels = map[string]string{}
	}
	labels["kubernetes.io/metadata.name"] = name // as the API server does
	obj := &corev1.Namespace{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
		ObjectMeta: metav1.ObjectMeta{
			Name:              name,
			UID:               types.UID(ns.UID),
			ResourceVersion:   st.nextResourceVersion(),
			CreationTimestamp: metav1.NewTime(ns.CreatedAt),
			Labels:            labels,
		},
		Status: corev1.NamespaceStatus{Phase: corev1.NamespaceActive},
	}
	return writeManifest(namespaceManifestPath(st.Config.registryDir(), name), obj)
}

// writePodManifest writes p as the API server would show it: Pending until the CNI chain
// gave it an address, Running after.
func writePodManifest(st *state, p *Pod) error {
	node := st.Nodes[p.Node]
	obj := &corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{
			Name:              p.Name,
			Namespace:         p.Namespace,
			UID:               types.UID(p.UID),
			ResourceVersion:   st.nextResourceVersion(),
			CreationTimestamp: metav1.NewTime(p.CreatedAt),
			Labels:            maps.Clone(p.Labels),
		},
		Spec: corev1.PodSpec{
			NodeName:           p.NodeName,
			ServiceAccountName: p.ServiceAccount,
			HostNetwork:        p.HostNetwork,
			Containers:         []corev1.Container{{Name: "app", Image: "sluice-lab/app"}},
		},
		Status: corev1.PodStatus{
			Phase:  corev1.PodPending,
			HostIP: node.IP.String(),
		},
	}
	if p.IP.IsValid() {
		obj.Status.Phase = corev1.PodRunning
		obj.Status.PodIP = p.IP.String()
		obj.Status.PodIPs = []corev1.PodIP{{IP: p.IP.String()}}
		obj.Status.HostIPs = []corev1.HostIP{{IP: node.IP.String()}}
		obj.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	}
	return writeManifest(podManifestPath(st.Config.registryDir(), p.Namespace, p.Name), obj)
}

// newUID returns a random (version 4) UUID, the form Kubernetes UIDs take.
func newUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
