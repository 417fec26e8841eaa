package agent

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func TestKubeSource(t *testing.T) {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}
	here := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "cart", Namespace: "shop", UID: "u1"}, Spec: corev1.PodSpec{NodeName: "n1"}}
	elsewhere := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: "shop", UID: "u2"}, Spec: corev1.PodSpec{NodeName: "n2"}}
	client := fake.NewClientset(ns, here, elsewhere)
	// The fake clientset ignores field selectors; the informer still lists only what the
	// selector returns from a real API server, which the e2e tests cover. Here the
	// source's own behaviour is under test: events become keys, labels are read back.
	src := &KubeSource{Client: client, NodeName: "n1", Resync: time.Hour}

	var mu sync.Mutex
	var keys []string
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go src.Run(ctx, func(k string) { mu.Lock(); keys = append(keys, k); mu.Unlock() })
	seen := func(k string) bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Contains(keys, k)
	}
	waitUntil(t, "the initial listing", func() bool { return src.Synced() && seen("shop/cart") })
	if p, ok := src.Pod("shop/cart"); !ok || p.UID != "u1" {
		t.Fatalf("Pod(shop/cart) = %v, %v", p, ok)
	}

	// Labelling the namespace is a change to each of its pods.
	mu.Lock()
	keys = nil
	mu.Unlock()
	ns = ns.DeepCopy()
	ns.Labels = map[string]string{"istio.io/dataplane-mode": "ambient"}
	if _, err := client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the namespace change to reach its pod", func() bool { return seen("shop/cart") })
	waitUntil(t, "the label to be visible", func() bool {
		n, ok := src.Namespace("shop")
		return ok && n.Labels["istio.io/dataplane-mode"] == "ambient"
	})
	p, _ := src.Pod("shop/cart")
	n, _ := src.Namespace("shop")
	if !InMesh(p, n) {
		t.Error("pod in a labelled namespace is not in the mesh")
	}

	if err := client.CoreV1().Pods("shop").Delete(ctx, "cart", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the deletion", func() bool { _, ok := src.Pod("shop/cart"); return !ok })
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}
