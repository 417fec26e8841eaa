package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/ztunnel/identity"
	"github.com/sluicemesh/sluice/ztunnel/state"
)

func TestAdminEndpoints(t *testing.T) {
	authority, err := ca.LoadOrCreate(t.TempDir(), "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	store := &state.Store{}
	snap, _, err := state.ParseLocalConfig(3, []byte("workloads: [{uid: u1, name: a, namespace: mesh, ips: [10.0.0.1]}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	store.Replace(snap)
	ids := &identity.Manager{Signer: identity.LocalSigner{CA: authority}}
	mux := adminMux(store, ids)

	get := func(h http.Handler, path string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		return rec
	}
	rec := get(mux, "/config_dump")
	var dump struct {
		Version   uint64            `json:"version"`
		Workloads []*state.Workload `json:"workloads"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &dump); err != nil {
		t.Fatalf("config_dump is not JSON: %v\n%s", err, rec.Body)
	}
	if dump.Version != 3 || len(dump.Workloads) != 1 || dump.Workloads[0].Name != "a" {
		t.Errorf("config_dump = %+v", dump)
	}
	if rec := get(mux, "/certs"); rec.Code != 200 {
		t.Errorf("/certs answered %d", rec.Code)
	}
	if rec := get(mux, "/debug/pprof/"); rec.Code != 200 || !strings.Contains(rec.Body.String(), "goroutine") {
		t.Errorf("pprof index answered %d", rec.Code)
	}

	var ready atomic.Bool
	rmux := readinessMux(&ready)
	if rec := get(rmux, "/healthz/ready"); rec.Code != http.StatusServiceUnavailable {
		t.Errorf("ready before config: %d", rec.Code)
	}
	ready.Store(true)
	if rec := get(rmux, "/healthz/ready"); rec.Code != 200 {
		t.Errorf("ready after config: %d", rec.Code)
	}
}

// Operators read the Go scheduler's latency next to the proxied latency.
func TestRegistryHasSchedulerLatency(t *testing.T) {
	mfs, err := newRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	for _, want := range []string{"go_sched_latencies_seconds", "go_goroutines", "process_resident_memory_bytes"} {
		if !slices.Contains(names, want) {
			t.Errorf("metric %s missing from %v", want, names)
		}
	}
}

// ztunnel reads manifests without k8s.io/api (see ztunnel/state/manifest.go): linking it
// again would cost every node 2.5 MB of resident memory and 7 MB of binary.
func TestNoKubernetesAPITypes(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/sluicemesh/sluice/ztunnel/cmd/ztunnel").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for line := range strings.Lines(string(out)) {
		if pkg := strings.TrimSpace(line); strings.HasPrefix(pkg, "k8s.io/") {
			t.Errorf("ztunnel links %s", pkg)
		}
	}
}
