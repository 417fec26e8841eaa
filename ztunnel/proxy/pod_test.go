package proxy

import (
	"net/netip"
	"testing"

	"github.com/sluicemesh/sluice/cni/zds"
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
	byIPOnly := &state.Workload{Name: "db", Namespace: "prod", ServiceAccount: "db", IPs: []netip.Addr{ip}, Protocol: state.HBONE}
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
	} {
		t.Run(tc.name, func(t *testing.T) {
			snap, errs := state.NewSnapshot(1, "cluster.local", []*state.Workload{tc.config}, nil, &policy.Set{})
			if len(errs) > 0 {
				t.Fatal(errs)
			}
			ps := &podServer{uid: tc.uid, info: tc.agent, ips: []netip.Addr{ip}}
			if got := ps.workload(snap).Identity().String(); got != tc.want {
				t.Errorf("identity %s, want %s", got, tc.want)
			}
		})
	}
}
