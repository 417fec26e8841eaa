package agent

import (
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestInMesh(t *testing.T) {
	ns := func(mode string) *corev1.Namespace {
		n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ns"}}
		if mode != "" {
			n.Labels = map[string]string{"istio.io/dataplane-mode": mode}
		}
		return n
	}
	pod := func(mode string, hostNet bool) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns"}, Spec: corev1.PodSpec{HostNetwork: hostNet}}
		if mode != "" {
			p.Labels = map[string]string{"istio.io/dataplane-mode": mode}
		}
		return p
	}
	cases := []struct {
		name string
		pod  *corev1.Pod
		ns   *corev1.Namespace
		want bool
	}{
		{"ambient namespace", pod("", false), ns("ambient"), true},
		{"unlabelled namespace", pod("", false), ns(""), false},
		{"pod opts out", pod("none", false), ns("ambient"), false},
		{"pod opts in", pod("ambient", false), ns(""), true},
		{"host network never", pod("", true), ns("ambient"), false},
		{"other mode", pod("", false), ns("sidecar"), false},
		{"unknown namespace", pod("", false), nil, false},
		{"no pod", nil, ns("ambient"), false},
	}
	for _, tc := range cases {
		if got := InMesh(tc.pod, tc.ns); got != tc.want {
			t.Errorf("%s: InMesh = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestLocalSourceReportsChanges(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("namespaces/demo.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n")
	write("pods/a.yaml", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: demo\n  uid: u-a\nspec:\n  nodeName: n1\n")
	write("pods/b.yaml", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: b\n  namespace: demo\nspec:\n  nodeName: n2\n")
	write("pods/broken.yaml", "kind: Pod\nmetadata: [not, a, map\n")

	s := &LocalSource{Dir: dir, NodeName: "n1"}
	var mu sync.Mutex
	var changed []string
	record := func(k string) { mu.Lock(); changed = append(changed, k); mu.Unlock() }
	take := func() []string {
		mu.Lock()
		defer mu.Unlock()
		out := changed
		changed = nil
		slices.Sort(out)
		return out
	}

	if err := s.scan(record); err == nil {
		t.Error("a malformed manifest should be reported")
	}
	if got := take(); !slices.Equal(got, []string{"demo/a"}) {
		t.Fatalf("first scan changed %v, want only this node's pod demo/a", got)
	}
	if !s.Synced() {
		t.Error("not synced after a scan")
	}
	if p, ok := s.Pod("demo/a"); !ok || p.UID != "u-a" {
		t.Fatalf("Pod(demo/a) = %v, %v", p, ok)
	}
	os.Remove(filepath.Join(dir, "pods/broken.yaml"))

	s.scan(record)
	if got := take(); len(got) != 0 {
		t.Errorf("unchanged directory reported %v", got)
	}

	// Labelling the namespace is a change to each of its pods.
	write("namespaces/demo.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    istio.io/dataplane-mode: ambient\n")
	s.scan(record)
	if got := take(); !slices.Equal(got, []string{"demo/a"}) {
		t.Errorf("namespace label change reported %v, want [demo/a]", got)
	}
	if ns, _ := s.Namespace("demo"); ns.Labels["istio.io/dataplane-mode"] != "ambient" {
		t.Errorf("namespace labels not updated: %v", ns.Labels)
	}

	os.Remove(filepath.Join(dir, "pods/a.yaml"))
	s.scan(record)
	if got := take(); !slices.Equal(got, []string{"demo/a"}) {
		t.Errorf("deletion reported %v, want [demo/a]", got)
	}
	if _, ok := s.Pod("demo/a"); ok {
		t.Error("deleted pod still returned")
	}
}

// A multi-document file is read whole, as ztunnel reads it: a pod in its second document
// is captured like one in a file of its own.
func TestLocalSourceReadsMultiDocumentFiles(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "all.yaml"), []byte(`apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, uid: u-cart}
spec: {nodeName: n1}
`), 0o644)
	s := &LocalSource{Dir: dir, NodeName: "n1"}
	if err := s.scan(func(string) {}); err != nil {
		t.Fatal(err)
	}
	pod, ok := s.Pod("shop/cart")
	ns, _ := s.Namespace("shop")
	if !ok || !InMesh(pod, ns) {
		t.Fatalf("pod from the second document: %v in mesh %v", ok, ok && InMesh(pod, ns))
	}
}

// While a namespace's manifest does not parse, its pods stay in the mesh: a typo must not
// take them out of capture.
func TestLocalSourceKeepsObjectsWhileAFileFails(t *testing.T) {
	dir := t.TempDir()
	nsFile := filepath.Join(dir, "ns.yaml")
	os.WriteFile(nsFile, []byte("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "pod.yaml"), []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: cart, namespace: shop}\nspec: {nodeName: n1}\n"), 0o644)
	gone := filepath.Join(dir, "gone.yaml")
	os.WriteFile(gone, []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: gone, namespace: shop}\nspec: {nodeName: n1}\n"), 0o644)
	s := &LocalSource{Dir: dir, NodeName: "n1"}
	if err := s.scan(func(string) {}); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(nsFile, []byte("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: [broken\n"), 0o644)
	os.Remove(gone)
	var changed []string
	if err := s.scan(func(k string) { changed = append(changed, k) }); err == nil {
		t.Error("the broken namespace file was not reported")
	}
	pod, _ := s.Pod("shop/cart")
	ns, _ := s.Namespace("shop")
	if !InMesh(pod, ns) {
		t.Error("the pod left the mesh while its namespace's manifest was broken")
	}
	// Only what the broken file held is kept: a pod removed meanwhile goes.
	if _, ok := s.Pod("shop/gone"); ok || !slices.Equal(changed, []string{"shop/gone"}) {
		t.Errorf("changes %v, want only the removed pod shop/gone", changed)
	}
}
