package workload

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestNames(t *testing.T) {
	yes := true
	cases := []struct {
		name                   string
		pod                    corev1.Pod
		workload, svc, rev, sa string
	}{
		{
			name: "deployment pod",
			pod: corev1.Pod{ObjectMeta: metav1.ObjectMeta{
				Name:            "reviews-v1-7d9f8c-abcde",
				Labels:          map[string]string{"pod-template-hash": "7d9f8c", "app": "reviews", "version": "v1"},
				OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "reviews-v1-7d9f8c", Controller: &yes}},
			}, Spec: corev1.PodSpec{ServiceAccountName: "bookinfo-reviews"}},
			workload: "reviews-v1", svc: "reviews", rev: "v1", sa: "bookinfo-reviews",
		},
		{
			name: "statefulset pod with canonical labels",
			pod: corev1.Pod{ObjectMeta: metav1.ObjectMeta{
				Name: "db-0",
				Labels: map[string]string{"service.istio.io/canonical-name": "database", "app": "db",
					"service.istio.io/canonical-revision": "2"},
				OwnerReferences: []metav1.OwnerReference{{Kind: "StatefulSet", Name: "db", Controller: &yes}},
			}},
			workload: "db", svc: "database", rev: "2", sa: "default",
		},
		{
			name:     "bare pod",
			pod:      corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "debug"}},
			workload: "debug", svc: "debug", rev: "latest", sa: "default",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := Name(&tc.pod); got != tc.workload {
				t.Errorf("Name = %q, want %q", got, tc.workload)
			}
			if got := CanonicalService(&tc.pod); got != tc.svc {
				t.Errorf("CanonicalService = %q, want %q", got, tc.svc)
			}
			if got := CanonicalRevision(&tc.pod); got != tc.rev {
				t.Errorf("CanonicalRevision = %q, want %q", got, tc.rev)
			}
			if got := ServiceAccount(&tc.pod); got != tc.sa {
				t.Errorf("ServiceAccount = %q, want %q", got, tc.sa)
			}
		})
	}
}
