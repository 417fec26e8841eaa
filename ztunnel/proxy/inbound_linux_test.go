//go:build linux

package proxy

import (
	"net/netip"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/ztunnel/identity"
	"github.com/sluicemesh/sluice/ztunnel/policy"
	"github.com/sluicemesh/sluice/ztunnel/state"
)

// An inbound connection is authorized, then delivered, then registered for the policy
// changes to come: one that arrived while it was being delivered must still close it.
func TestInboundDeniedWhileDeliveringIsClosed(t *testing.T) {
	const b = `
workloads:
- {uid: u-b, name: b, namespace: mesh, serviceAccount: sa-b, ips: [10.244.1.2]}
`
	authorizedBy, _, err := state.ParseLocalConfig(1, []byte(b)) // no policy: allowed
	if err != nil {
		t.Fatal(err)
	}
	snap, _, err := state.ParseLocalConfig(2, []byte(b+`policies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-all, namespace: mesh}
  spec: {action: DENY, rules: [{}]}
`))
	if err != nil {
		t.Fatal(err)
	}
	store := &state.Store{}
	store.Replace(snap) // the policy that came in after the connection was authorized
	p := New(Config{Store: store, Identity: &identity.Manager{}})
	ps := &podServer{uid: "u-b", ips: []netip.Addr{netip.MustParseAddr("10.244.1.2")}}
	app, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	rec := &accessRecord{}
	conn := policy.Conn{SrcIP: netip.MustParseAddr("10.244.0.2"), DstIP: netip.MustParseAddr("10.244.1.2"), DstPort: 8080}
	done := make(chan struct{})
	go func() {
		p.carryInbound(ps, rec, proxyIn, proxyOut, conn, authorizedBy, connLabels{}, nil)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("the connection a policy now denies is still carried")
	}
	if rec.closedBy == "" {
		t.Error("the access record does not say which policy closed the connection")
	}
	for _, c := range []interface{ SetReadDeadline(time.Time) error }{app, server} {
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
	}
	if _, err := server.Read(make([]byte, 1)); err == nil {
		t.Error("the application's side is still open")
	}
	if _, err := app.Read(make([]byte, 1)); err == nil {
		t.Error("the client's side is still open")
	}
}
