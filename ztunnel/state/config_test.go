package state

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/ztunnel/policy"
)

const sample = `
trustDomain: example.org
workloads:
- {uid: u-a, name: a, namespace: mesh, serviceAccount: sa-a, ips: [10.244.0.2], labels: {app: a}}
- {uid: u-b, name: b, namespace: mesh, serviceAccount: sa-b, ips: [10.244.1.2], labels: {app: b}}
- {uid: u-dup, name: dup, namespace: mesh, ips: [10.244.1.2, "fd00::5"]}
- {uid: u-old, name: old, namespace: plain, ips: [10.244.0.9], protocol: TCP}
services:
- {name: b, namespace: mesh, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: b}}
- {name: b2, namespace: mesh, vips: [10.96.0.10, "fd00::10"], ports: [{port: 80, targetPort: 8080}], selector: {app: b}}
policies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: only-a, namespace: mesh}
  spec:
    selector: {matchLabels: {app: b}}
    action: ALLOW
    rules:
    - from: [{source: {principals: ["example.org/ns/mesh/sa/sa-a"]}}]
`

func TestParseLocalConfig(t *testing.T) {
	snap, warnings, err := ParseLocalConfig(7, []byte(sample))
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 2 || !strings.Contains(warnings[0].Error(), "already belongs to mesh/b") || !strings.Contains(warnings[1].Error(), "VIP 10.96.0.10 already belongs to mesh/b") {
		t.Errorf("warnings = %v, want one about the duplicate address and one about the duplicate VIP", warnings)
	}
	if b2, ok := snap.ServiceByVIP(netip.MustParseAddr("fd00::10")); !ok || b2.Name != "b2" {
		t.Errorf("fd00::10 = %v, want b2: a clash on one VIP must not make its others unknown (plain TCP)", b2)
	}
	b, ok := snap.WorkloadByIP(netip.MustParseAddr("10.244.1.2"))
	if !ok || b.Name != "b" {
		t.Fatalf("10.244.1.2 = %v, want b (the first claim wins)", b)
	}
	if dup, ok := snap.WorkloadByIP(netip.MustParseAddr("fd00::5")); !ok || dup.Name != "dup" || dup.Protocol != HBONE {
		t.Errorf("fd00::5 = %v, want dup: a clash on one address must not make its others unknown (plain TCP)", dup)
	}
	if got := b.Identity().String(); got != "spiffe://example.org/ns/mesh/sa/sa-b" {
		t.Errorf("identity %s", got)
	}
	if w, _ := snap.WorkloadByUID("u-old"); w.Protocol != TCP {
		t.Errorf("protocol of old = %s", w.Protocol)
	}
	svc, ok := snap.ServiceByVIP(netip.MustParseAddr("10.96.0.10"))
	if !ok || len(snap.Endpoints(svc)) != 1 {
		t.Fatalf("service b endpoints = %v", snap.Endpoints(svc))
	}
	dst := policy.Workload{Namespace: "mesh", Labels: b.Labels}
	conn := func(id string) policy.Conn {
		return policy.Conn{SrcIdentity: id, SrcIP: netip.MustParseAddr("10.244.0.2"), DstIP: netip.MustParseAddr("10.244.1.2"), DstPort: 8080}
	}
	if d := snap.Policy.Authorize(dst, conn("spiffe://example.org/ns/mesh/sa/sa-a")); !d.Allow {
		t.Errorf("sa-a denied: %s", d)
	}
	if d := snap.Policy.Authorize(dst, conn("spiffe://example.org/ns/mesh/sa/other")); d.Allow {
		t.Errorf("other allowed: %s", d)
	}
}

func TestParseLocalConfigRejects(t *testing.T) {
	for name, doc := range map[string]string{
		"unknown field":         "workload: []",
		"bad address":           "workloads: [{name: a, namespace: n, ips: [10.0.0.300]}]",
		"policy without a name": "policies: [{kind: AuthorizationPolicy, spec: {}}]",
		"unsupported kind":      "policies: [{kind: Sidecar, metadata: {name: x}}]",
	} {
		if _, _, err := ParseLocalConfig(1, []byte(doc)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestEmptySnapshotAllows(t *testing.T) {
	snap, _ := NewSnapshot(1, "", nil, nil, nil)
	d := snap.Policy.Authorize(policy.Workload{Namespace: "x"}, policy.Conn{SrcIP: netip.MustParseAddr("10.0.0.1")})
	if !d.Allow || snap.Policy.Mode(policy.Workload{Namespace: "x"}, 80) != policy.ModePermissive {
		t.Errorf("a mesh with no policies must allow (got %s) and be PERMISSIVE", d)
	}
}
