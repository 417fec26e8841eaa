package workload

import "testing"

func TestNames(t *testing.T) {
	cases := []struct {
		name                   string
		pod                    Pod
		workload, svc, rev, sa string
	}{
		{
			name: "deployment pod",
			pod: Pod{
				Name:           "reviews-v1-7d9f8c-abcde",
				Labels:         map[string]string{"pod-template-hash": "7d9f8c", "app": "reviews", "version": "v1"},
				ControllerKind: "ReplicaSet", ControllerName: "reviews-v1-7d9f8c",
				ServiceAccountName: "bookinfo-reviews",
			},
			workload: "reviews-v1", svc: "reviews", rev: "v1", sa: "bookinfo-reviews",
		},
		{
			name: "statefulset pod with canonical labels",
			pod: Pod{
				Name: "db-0",
				Labels: map[string]string{"service.istio.io/canonical-name": "database", "app": "db",
					"service.istio.io/canonical-revision": "2"},
				ControllerKind: "StatefulSet", ControllerName: "db",
			},
			workload: "db", svc: "database", rev: "2", sa: "default",
		},
		{
			name:     "bare pod",
			pod:      Pod{Name: "debug"},
			workload: "debug", svc: "debug", rev: "latest", sa: "default",
		},
		{
			name:     "generated name, no controller",
			pod:      Pod{Name: "web-x7k2p", GenerateName: "web-"},
			workload: "web", svc: "web", rev: "latest", sa: "default",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := Name(tc.pod); got != tc.workload {
				t.Errorf("Name = %q, want %q", got, tc.workload)
			}
			if got := CanonicalService(tc.pod); got != tc.svc {
				t.Errorf("CanonicalService = %q, want %q", got, tc.svc)
			}
			if got := CanonicalRevision(tc.pod); got != tc.rev {
				t.Errorf("CanonicalRevision = %q, want %q", got, tc.rev)
			}
			if got := ServiceAccount(tc.pod); got != tc.sa {
				t.Errorf("ServiceAccount = %q, want %q", got, tc.sa)
			}
		})
	}
}

func TestAmbient(t *testing.T) {
	ambientNS := map[string]string{DataplaneModeLabel: DataplaneModeAmbient}
	cases := []struct {
		name     string
		pod      Pod
		nsLabels map[string]string
		want     bool
	}{
		{"ambient namespace", Pod{Name: "a"}, ambientNS, true},
		{"plain namespace", Pod{Name: "a"}, map[string]string{"team": "x"}, false},
		{"unknown namespace", Pod{Name: "a"}, nil, false},
		{"pod opts in", Pod{Name: "a", Labels: ambientNS}, nil, true},
		{"pod opts out of an ambient namespace", Pod{Name: "a", Labels: map[string]string{DataplaneModeLabel: DataplaneModeNone}}, ambientNS, false},
		{"host network never", Pod{Name: "a", HostNetwork: true, Labels: ambientNS}, ambientNS, false},
	}
	for _, tc := range cases {
		if got := Ambient(tc.pod, tc.nsLabels); got != tc.want {
			t.Errorf("%s: Ambient = %v, want %v", tc.name, got, tc.want)
		}
	}
}
