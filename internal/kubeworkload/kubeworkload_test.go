package kubeworkload

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluicemesh/sluice/internal/workload"
)

// The workload is named by the controlling owner, not by whichever owner comes first.
func TestPodTakesTheControllingOwner(t *testing.T) {
	yes := true
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews-v1-7d9f8c-abcde", Labels: map[string]string{"pod-template-hash": "7d9f8c"},
			OwnerReferences: []metav1.OwnerReference{
				{Kind: "ConfigMap", Name: "not-me"},
				{Kind: "ReplicaSet", Name: "reviews-v1-7d9f8c", Controller: &yes},
			}},
		Spec: corev1.PodSpec{ServiceAccountName: "reviews", HostNetwork: true},
	}
	got := Pod(p)
	if got.ControllerKind != "ReplicaSet" || got.ControllerName != "reviews-v1-7d9f8c" || !got.HostNetwork || got.ServiceAccountName != "reviews" {
		t.Fatalf("Pod = %+v", got)
	}
	if name := workload.Name(got); name != "reviews-v1" {
		t.Errorf("workload name %q, want reviews-v1", name)
	}
	if NamespaceLabels(nil) != nil {
		t.Error("an unknown namespace has labels")
	}
}
