package state

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/ztunnel/policy"
)

const manifests = `apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata:
  name: cart-7d9f8c-x1
  namespace: shop
  uid: u-cart
  labels: {app: cart, version: v2, pod-template-hash: 7d9f8c}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: cart-7d9f8c, uid: rs, controller: true}]
spec: {nodeName: n1, serviceAccountName: cart, containers: [{name: c, image: x}]}
status: {podIP: 10.244.0.5, podIPs: [{ip: 10.244.0.5}], phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, uid: u-legacy, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {podIPs: [{ip: 10.244.0.6}], phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop, uid: u-pending}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: cart}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Node
metadata: {name: n1}
`

const policies = `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
`

func TestParseDir(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "cluster.yaml"), []byte(manifests), 0o644)
	os.MkdirAll(filepath.Join(dir, "policies"), 0o755)
	os.WriteFile(filepath.Join(dir, "policies", "strict.yaml"), []byte(policies), 0o644)
	os.WriteFile(filepath.Join(dir, "README.md"), []byte("not a manifest"), 0o644)

	snap, warnings, err := ParseDir(1, dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 0 {
		t.Errorf("warnings: %v", warnings)
	}
	cart, ok := snap.WorkloadByIP(netip.MustParseAddr("10.244.0.5"))
	if !ok {
		t.Fatal("cart pod missing")
	}
	if cart.Protocol != HBONE || cart.WorkloadName != "cart" || cart.CanonicalRevision != "v2" ||
		cart.Identity().String() != "spiffe://cluster.local/ns/shop/sa/cart" {
		t.Errorf("cart = %+v (identity %s)", cart, cart.Identity())
	}
	if legacy, _ := snap.WorkloadByUID("u-legacy"); legacy == nil || legacy.Protocol != TCP {
		t.Errorf("opted-out pod should be plain TCP: %+v", legacy)
	}
	if _, ok := snap.WorkloadByUID("u-pending"); ok {
		t.Error("a pod without an address became a workload")
	}
	svc, ok := snap.ServiceByVIP(netip.MustParseAddr("10.96.0.20"))
	if !ok || len(snap.Endpoints(svc)) != 1 {
		t.Fatalf("service cart: %+v", svc)
	}
	if p, _ := svc.Target(80); p != 8080 {
		t.Errorf("target port %d", p)
	}
	if m := snap.Policy.Mode(policy.Workload{Namespace: "shop"}, 8080); m != policy.ModeStrict {
		t.Errorf("PeerAuthentication from a subfolder not applied: %s", m)
	}

	os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte("kind: AuthorizationPolicy\nspec: {}\n"), 0o644)
	if _, _, err := ParseDir(2, dir); err == nil || !strings.Contains(err.Error(), "metadata.name") {
		t.Errorf("an unidentifiable policy must reject the whole directory, got %v", err)
	}
}

// Objects local mode cannot use are skipped with a warning naming them; the rest of the
// directory still applies.
func TestParseDirSkipsWhatItCannotUse(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "odd.yaml"), []byte(`apiVersion: v1
kind: Pod
metadata: {name: host, namespace: shop, uid: u-host}
spec: {hostNetwork: true}
status: {podIP: 10.0.0.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: shop, uid: u-done}
status: {podIP: 10.244.0.7, phase: Succeeded}

---
apiVersion: v1
kind: Pod
metadata: {name: job-x1, generateName: job-, namespace: shop, uid: u-job,
  ownerReferences: [{kind: Job, name: nightly, controller: true}, {kind: ConfigMap, name: other}]}
status: {podIP: 10.244.0.9, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP}
  - {name: big, port: 70000}
  - {name: grpc, port: 9090, targetPort: 9091}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
`), 0o644)
	snap, warnings, err := ParseDir(1, dir)
	if err != nil {
		t.Fatal(err)
	}
	joined := fmt.Sprint(warnings)
	for _, want := range []string{`named targetPort "http"`, "port 70000", "between 1 and 65535"} {
		if !strings.Contains(joined, want) {
			t.Errorf("warnings %q lack %q", joined, want)
		}
	}
	for _, uid := range []string{"u-host", "u-done"} {
		if _, ok := snap.WorkloadByUID(uid); ok {
			t.Errorf("%s became a workload", uid)
		}
	}
	if job, _ := snap.WorkloadByUID("u-job"); job == nil || job.WorkloadName != "nightly" || job.ServiceAccount != "default" {
		t.Errorf("job pod = %+v, want workload nightly (its controller) with the default service account", job)
	}
	web, ok := snap.ServiceByVIP(netip.MustParseAddr("10.96.0.30"))
	if !ok {
		t.Fatal("service web missing")
	}
	if p, _ := web.Target(80); p != 80 {
		t.Errorf("named targetPort: target %d, want the service port 80", p)
	}
	if p, _ := web.Target(9090); p != 9091 {
		t.Errorf("target of 9090 is %d, want 9091", p)
	}
	if _, ok := web.Target(53); ok {
		t.Error("a UDP port was kept")
	}
	if len(snap.Services()) != 1 {
		t.Errorf("services %v: the headless one has no address to capture", snap.Services())
	}
}

// A file ztunnel cannot read might hold a DENY policy: the whole directory is refused
// (the running config stays) rather than applied without it. So is a missing directory.
func TestParseDirRefusesWhatItCannotRead(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "ok.yaml"), []byte(policies), 0o644)
	os.WriteFile(filepath.Join(dir, "deny.yaml"), []byte("kind: AuthorizationPolicy\nmetadata: {name: deny, namespace: shop\nspec: {action: DENY}\n"), 0o644)
	if _, _, err := ParseDir(1, dir); err == nil || !strings.Contains(err.Error(), "deny.yaml#1") {
		t.Errorf("ParseDir with an unreadable policy file: err %v, want one naming deny.yaml#1", err)
	}
	if _, _, err := ParseDir(1, filepath.Join(dir, "missing")); err == nil {
		t.Error("ParseDir of a missing directory gave a config")
	}
}

// A Pod, Namespace or Service that does not decode, or a workload that is invalid, keeps
// the whole config from applying: left out, a meshed pod would be reached in plain TCP.
func TestConfigWithAnUnreadableEntryIsRefused(t *testing.T) {
	for _, tc := range []struct{ name, manifest, want string }{
		{"pod", `apiVersion: v1
kind: Pod
metadata: {name: typo, namespace: shop, uid: u-typo}
spec: {hostNetwork: "yes"}
status: {podIP: 10.244.0.8, phase: Running}`, "Pod: json: cannot unmarshal"},
		{"namespace", `apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, tier: 1}}`, "Namespace: json: cannot unmarshal number"},
		{"service", `apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.30, ports: [{port: "eighty"}]}`, "Service: "},
		{"pod address", `apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: u-web}
status: {podIP: 10.244.0.07, phase: Running}`, "pod shop/web: status.podIPs"},
		{"service address", `apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}`, "service shop/web: spec.clusterIPs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			os.WriteFile(filepath.Join(dir, "shop.yaml"), []byte(tc.manifest), 0o644)
			_, _, err := ParseDir(1, dir)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "plain TCP") {
				t.Errorf("err = %v, want one containing %q that says why nothing applies", err, tc.want)
			}
		})
	}
	t.Run("service defined twice", func(t *testing.T) {
		dir := t.TempDir()
		svc := "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: %s, selector: {app: %s}, ports: [{port: 80}]}\n"
		os.WriteFile(filepath.Join(dir, "a.yaml"), []byte(fmt.Sprintf(svc, "10.96.0.10", "db")), 0o644)
		os.WriteFile(filepath.Join(dir, "b.yaml"), []byte(fmt.Sprintf(svc, "10.96.0.11", "evil")), 0o644)
		if _, _, err := ParseDir(1, dir); err == nil || !strings.Contains(err.Error(), "service shop/web is defined twice") {
			t.Errorf("err = %v", err)
		}
	})
	t.Run("local config workload", func(t *testing.T) {
		_, _, err := ParseLocalConfig(1, []byte(`
workloads:
- {uid: u-a, name: a, namespace: mesh, ips: [10.244.0.2], protocol: hbone}
- {uid: u-b, name: b, namespace: mesh, ips: [10.244.1.2]}
`))
		if err == nil || !strings.Contains(err.Error(), `workload mesh/a: protocol "hbone" is not HBONE or TCP`) {
			t.Errorf("err = %v", err)
		}
	})
}
