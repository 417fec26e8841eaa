package proxy

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/sluicemesh/sluice/ztunnel/state"
)

func TestBuildUpstream(t *testing.T) {
	ip := netip.MustParseAddr
	ap := netip.MustParseAddrPort
	a := &state.Workload{Name: "a", Namespace: "mesh", ServiceAccount: "sa-a", IPs: []netip.Addr{ip("10.244.0.2")}, Labels: map[string]string{"app": "a"}}
	b1 := &state.Workload{Name: "b1", Namespace: "mesh", ServiceAccount: "sa-b", IPs: []netip.Addr{ip("10.244.1.2")}, Labels: map[string]string{"app": "b"}}
	b2 := &state.Workload{Name: "b2", Namespace: "mesh", ServiceAccount: "sa-b", IPs: []netip.Addr{ip("10.244.1.3")}, Labels: map[string]string{"app": "b"}}
	legacy := &state.Workload{Name: "old", Namespace: "plain", IPs: []netip.Addr{ip("10.244.0.9")}, Protocol: state.TCP}
	wp := &state.Workload{Name: "waypoint", Namespace: "mesh", ServiceAccount: "waypoint", IPs: []netip.Addr{ip("10.244.0.50")}}
	reviews := &state.Workload{Name: "reviews", Namespace: "mesh", ServiceAccount: "reviews", IPs: []netip.Addr{ip("10.244.1.7")},
		Waypoint: &state.Waypoint{Address: ip("10.244.0.50"), Identity: "spiffe://cluster.local/ns/mesh/sa/waypoint"}}
	svcB := &state.Service{Name: "b", Namespace: "mesh", VIPs: []netip.Addr{ip("10.96.0.10")}, Ports: []state.ServicePort{{Port: 80, TargetPort: 8080}}, Selector: map[string]string{"app": "b"}}
	svcEmpty := &state.Service{Name: "empty", Namespace: "mesh", VIPs: []netip.Addr{ip("10.96.0.11")}, Ports: []state.ServicePort{{Port: 80}}, Selector: map[string]string{"app": "nobody"}}
	svcWP := &state.Service{Name: "ratings", Namespace: "mesh", VIPs: []netip.Addr{ip("10.96.0.12")}, Ports: []state.ServicePort{{Port: 9080}},
		Selector: map[string]string{"app": "b"}, Waypoint: &state.Waypoint{Address: ip("10.244.0.50"), Identity: "spiffe://cluster.local/ns/mesh/sa/waypoint"}}
	snap, errs := state.NewSnapshot(1, "", []*state.Workload{a, b1, b2, legacy, wp, reviews}, []*state.Service{svcB, svcEmpty, svcWP}, nil)
	if len(errs) > 0 {
		t.Fatal(errs)
	}

	cases := []struct {
		name     string
		src      *state.Workload
		dst      string
		pick     int
		protocol state.Protocol
		gateway  string
		target   string
		peer     string
		waypoint bool
		err      error
	}{
		{name: "pod in the mesh", src: a, dst: "10.244.1.2:8080", protocol: state.HBONE, gateway: "10.244.1.2:15008", target: "10.244.1.2:8080", peer: "spiffe://cluster.local/ns/mesh/sa/sa-b"},
		{name: "IPv4-mapped destination", src: a, dst: "[::ffff:10.244.1.2]:8080", protocol: state.HBONE, gateway: "10.244.1.2:15008", target: "10.244.1.2:8080", peer: "spiffe://cluster.local/ns/mesh/sa/sa-b"},
		{name: "service picks an endpoint and maps the port", src: a, dst: "10.96.0.10:80", pick: 1, protocol: state.HBONE, gateway: "10.244.1.3:15008", target: "10.244.1.3:8080", peer: "spiffe://cluster.local/ns/mesh/sa/sa-b"},
		{name: "pod outside the mesh is plain TCP", src: a, dst: "10.244.0.9:5432", protocol: state.TCP, gateway: "10.244.0.9:5432", target: "10.244.0.9:5432"},
		{name: "unknown address passes through", src: a, dst: "192.0.2.10:443", protocol: state.TCP, gateway: "192.0.2.10:443", target: "192.0.2.10:443"},
		{name: "workload with a waypoint goes to the waypoint", src: a, dst: "10.244.1.7:9080", protocol: state.HBONE, gateway: "10.244.0.50:15008", target: "10.244.1.7:9080", peer: "spiffe://cluster.local/ns/mesh/sa/waypoint", waypoint: true},
		{name: "service with a waypoint keeps the service address", src: a, dst: "10.96.0.12:9080", protocol: state.HBONE, gateway: "10.244.0.50:15008", target: "10.96.0.12:9080", peer: "spiffe://cluster.local/ns/mesh/sa/waypoint", waypoint: true},
		{name: "the waypoint itself goes to the endpoint", src: wp, dst: "10.96.0.12:9080", protocol: state.HBONE, gateway: "10.244.1.2:15008", target: "10.244.1.2:9080", peer: "spiffe://cluster.local/ns/mesh/sa/sa-b"},
		{name: "service without endpoints fails", src: a, dst: "10.96.0.11:80", err: ErrNoEndpoints},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			u, err := buildUpstream(snap, tc.src, ap(tc.dst), func(int) int { return tc.pick })
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if u.Protocol != tc.protocol || u.Gateway.String() != tc.gateway || u.Target.String() != tc.target || u.ViaWaypoint != tc.waypoint {
				t.Errorf("got %s via %s to %s (waypoint %v), want %s via %s to %s (waypoint %v)",
					u.Protocol, u.Gateway, u.Target, u.ViaWaypoint, tc.protocol, tc.gateway, tc.target, tc.waypoint)
			}
			if tc.peer != "" && u.PeerIdentity.String() != tc.peer {
				t.Errorf("peer identity %s, want %s", u.PeerIdentity, tc.peer)
			}
		})
	}

	t.Run("bad service port", func(t *testing.T) {
		if _, err := buildUpstream(snap, a, ap("10.96.0.10:81"), func(int) int { return 0 }); err == nil {
			t.Error("a port the service does not have was routed")
		}
	})
}
