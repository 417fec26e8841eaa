package proxy

import (
	"net/netip"
	"testing"

	"github.com/sluicemesh/sluice/cni/zds"
	"github.com/sluicemesh/sluice/ztunnel/identity"
	"github.com/sluicemesh/sluice/ztunnel/policy"
	"github.com/sluicemesh/sluice/ztunnel/state"
)

// Which workload, and so which identity, a served pod is: the config's entry for its UID;
// an entry found by its address only if it can be the same pod; else what the node agent
// said. An address reused by a new pod before the config caught up must not lend the new
// pod the old pod's identity.
func TestServedPodIdentity(t *testing.T) {
	ip := netip.MustParseAddr("10.244.0.7")
	db := &state.Workload{UID: "u1", Name: "db", Namespace: "prod", ServiceAccount: "db", IPs: []netip.Addr{ip}, Protocol: state.HBONE}
	byIPOnly := &state.Workload{Name: "db", Namespace: "prod", ServiceAccount: "db", IPs: []netip.Addr{ip}, Labels: map[string]string{"app": "db"}, Protocol: state.HBONE}
	for _, tc := range []struct {
		name   string
		config *state.Workload
		uid    string
		agent  zds.Workload
		want   string
	}{
		{"by UID", db, "u1", zds.Workload{Name: "db", Namespace: "prod", ServiceAccount: "db"},
			"spiffe://cluster.local/ns/prod/sa/db"},
		{"address reused by a new pod", db, "u2", zds.Workload{Name: "evil", Namespace: "dev", ServiceAccount: "evil"},
			"spiffe://cluster.local/ns/dev/sa/evil"},
		{"config without UIDs, agent agrees", byIPOnly, "u1", zds.Workload{Name: "db", Namespace: "prod", ServiceAccount: "db"},
			"spiffe://cluster.local/ns/prod/sa/db"},
		{"config without UIDs, agent disagrees", byIPOnly, "u2", zds.Workload{Name: "evil", Namespace: "dev", ServiceAccount: "evil"},
			"spiffe://cluster.local/ns/dev/sa/evil"},
		{"config without UIDs, another pod of the same namespace and account", byIPOnly, "u2",
			zds.Workload{Name: "db-2", Namespace: "prod", ServiceAccount: "db", Labels: map[string]string{"app": "db-2"}},
			"spiffe://cluster.local/ns/prod/sa/db"},
		{"config without a service account means default", &state.Workload{Name: "web", Namespace: "prod", IPs: []netip.Addr{ip}, Labels: map[string]string{"app": "web"}, Protocol: state.HBONE},
			"u3", zds.Workload{Name: "web", Namespace: "prod", ServiceAccount: "default"},
			"spiffe://cluster.local/ns/prod/sa/default"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			snap, errs := state.NewSnapshot(1, "cluster.local", []*state.Workload{tc.config}, nil, &policy.Set{})
			if len(errs) > 0 {
				t.Fatal(errs)
			}
			ps := &podServer{uid: tc.uid, info: tc.agent, ips: []netip.Addr{ip}}
			w := ps.workload(snap)
			if got := w.Identity().String(); got != tc.want {
				t.Errorf("identity %s, want %s", got, tc.want)
			}
			if want := tc.agent.Name; want != "" && w.Name != want {
				t.Errorf("served as workload %q (labels %v), want %q: the pod took another's entry", w.Name, w.Labels, want)
			}
			if tc.config.Name == w.Name && w.Labels["app"] != tc.config.Labels["app"] {
				t.Errorf("labels %v, want the config's %v: its entry was not used", w.Labels, tc.config.Labels)
			}
		})
	}
}

// ztunnel asks for a certificate for each identity its pods have, follows config changes,
// and lets go of identities no pod has any more.
func TestServedIdentitiesFollowPodsAndConfig(t *testing.T) {
	config := func(version uint64, bSA string) *state.Snapshot {
		snap, errs := state.NewSnapshot(version, "cluster.local", []*state.Workload{
			{UID: "u-b", Name: "b", Namespace: "mesh", ServiceAccount: bSA, IPs: []netip.Addr{netip.MustParseAddr("10.244.0.2")}},
			{UID: "u-c", Name: "c", Namespace: "mesh", ServiceAccount: "sa-c", IPs: []netip.Addr{netip.MustParseAddr("10.244.0.3")}},
		}, nil, &policy.Set{})
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		return snap
	}
	store := &state.Store{}
	store.Replace(config(1, "sa-b"))
	ids := &identity.Manager{}
	p := New(Config{Store: store, Identity: ids})
	wanted := func() map[string]bool {
		out := map[string]bool{}
		for _, c := range ids.Snapshot() {
			out[c.Identity.String()] = !c.Forgotten
		}
		return out
	}
	id := func(sa string) string { return "spiffe://cluster.local/ns/mesh/sa/" + sa }

	p.mu.Lock()
	p.pods["u-b"] = &podServer{uid: "u-b"}
	p.pods["u-c"] = &podServer{uid: "u-c"}
	p.mu.Unlock()
	p.syncIdentities()
	if w := wanted(); !w[id("sa-b")] || !w[id("sa-c")] {
		t.Fatalf("wanted %v, want sa-b and sa-c", w)
	}
	p.mu.Lock()
	delete(p.pods, "u-c")
	p.mu.Unlock()
	p.syncIdentities()
	if w := wanted(); !w[id("sa-b")] || w[id("sa-c")] {
		t.Fatalf("after c left: wanted %v, want sa-b only", w)
	}
	store.Replace(config(2, "sa-b2")) // the config gives b another service account
	if w := wanted(); !w[id("sa-b2")] || w[id("sa-b")] {
		t.Fatalf("after the config change: wanted %v, want sa-b2 only", w)
	}
}
