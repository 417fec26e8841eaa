package policy

import (
	"strings"
	"testing"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
)

// Policies exactly as a user applies them to an Istio cluster.
func TestUserYAMLUnchanged(t *testing.T) {
	const (
		allowSleep = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep-to-httpbin
  namespace: ambient-demo
  labels:
    team: payments
  annotations:
    note: "metadata beyond name and namespace is ignored"
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/ambient-demo/sa/sleep
    to:
    - operation:
        ports: ["8000"]
`
		denyDev = `
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-dev
  namespace: ambient-demo
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["dev"]
      source_unused_key_check: null
`
		meshStrict = `
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
  creationTimestamp: "2024-05-01T10:00:00Z"
spec:
  mtls:
    mode: STRICT
`
		metricsPort = `{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
 "metadata": {"name": "httpbin-metrics", "namespace": "ambient-demo"},
 "spec": {"selector": {"matchLabels": {"app": "httpbin"}},
          "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}}`
	)

	a1, err := ParseAuthorizationPolicyYAML([]byte(allowSleep))
	if err != nil || a1.ParseError != nil {
		t.Fatalf("parse: %v %v", err, a1.ParseError)
	}
	if a1.Name != "allow-sleep-to-httpbin" || a1.Namespace != "ambient-demo" || a1.Spec.GetRules()[0].GetTo()[0].GetOperation().GetPorts()[0] != "8000" {
		t.Errorf("parsed %+v", a1)
	}
	// An unknown field inside the spec is an error; denyDev has one on purpose.
	a2, err := ParseAuthorizationPolicyYAML([]byte(denyDev))
	if err != nil {
		t.Fatal(err)
	}
	if a2.ParseError == nil || !strings.Contains(a2.ParseError.Error(), "source_unused_key_check") {
		t.Errorf("ParseError = %v", a2.ParseError)
	}
	a2, err = ParseAuthorizationPolicyYAML([]byte(strings.Replace(denyDev, "      source_unused_key_check: null\n", "", 1)))
	if err != nil || a2.ParseError != nil {
		t.Fatalf("parse: %v %v", err, a2.ParseError)
	}
	if a2.Spec.GetAction() != securityv1beta1.AuthorizationPolicy_DENY {
		t.Errorf("action = %v", a2.Spec.GetAction())
	}
	p1, err := ParsePeerAuthenticationYAML([]byte(meshStrict))
	if err != nil || p1.ParseError != nil {
		t.Fatalf("parse: %v %v", err, p1.ParseError)
	}
	if want := time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC); !p1.CreationTimestamp.Equal(want) {
		t.Errorf("creationTimestamp = %v", p1.CreationTimestamp)
	}
	p2, err := ParsePeerAuthenticationYAML([]byte(metricsPort))
	if err != nil || p2.ParseError != nil {
		t.Fatalf("parse: %v %v", err, p2.ParseError)
	}

	s, errs := Compile("", []AuthorizationPolicy{a1, a2}, []PeerAuthentication{p1, p2})
	if len(errs) > 0 {
		t.Fatal(errorsText(errs))
	}
	httpbin := Workload{Namespace: "ambient-demo", Labels: map[string]string{"app": "httpbin"}}
	other := Workload{Namespace: "ambient-demo", Labels: map[string]string{"app": "other"}}
	runChecks(t, s, []check{
		allowed(httpbin, conn("ambient-demo/sleep", "10.0.0.1", 8000), "ambient-demo/allow-sleep-to-httpbin"),
		denied(httpbin, conn("ambient-demo/curl", "10.0.0.1", 8000), ""),
		denied(httpbin, conn("ambient-demo/sleep", "10.0.0.1", 9000), ""),
		denied(httpbin, conn("dev/sleep", "10.0.0.1", 8000), "ambient-demo/deny-dev"),
		denied(httpbin, conn("", "10.0.0.1", 8000), "istio-system/default"),
		// The metrics port takes plaintext, but no ALLOW rule covers it.
		denied(httpbin, conn("", "10.0.0.1", 9090), ""),
		allowed(other, conn("ambient-demo/sleep", "10.0.0.1", 8000), ""),
		denied(other, conn("", "10.0.0.1", 8000), "istio-system/default"),
	})
	if got := s.Mode(httpbin, 9090); got != ModePermissive {
		t.Errorf("Mode(9090) = %v", got)
	}
}

func TestParseYAMLEnvelope(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		err  string
	}{
		{"wrong kind", "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: x\n", `kind "RequestAuthentication"`},
		{"wrong group", "apiVersion: networking.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\n", `apiVersion "networking.istio.io/v1"`},
		{"no name", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  namespace: x\n", "metadata.name must be set"},
		{"bad YAML", "apiVersion: [\n", "AuthorizationPolicy:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseAuthorizationPolicyYAML([]byte(tt.doc))
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("err = %v, want %q", err, tt.err)
			}
		})
	}

	p, err := ParseAuthorizationPolicyYAML([]byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-nothing\n"))
	if err != nil || p.ParseError != nil {
		t.Fatal(err, p.ParseError)
	}
	if p.Namespace != "default" || p.Spec == nil || len(p.Spec.GetRules()) != 0 {
		t.Errorf("got %+v", p)
	}

	_, err = ParsePeerAuthenticationYAML([]byte("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: x\n  creationTimestamp: yesterday\n"))
	if err == nil || !strings.Contains(err.Error(), "creationTimestamp") {
		t.Errorf("err = %v", err)
	}
}

// snake_case proto names are accepted as well, like istio.io/api's own decoder.
func TestParseProtoFieldNames(t *testing.T) {
	p, err := ParseAuthorizationPolicyYAML([]byte(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source:
        not_ip_blocks: ["10.0.0.0/8"]
`))
	if err != nil || p.ParseError != nil {
		t.Fatal(err, p.ParseError)
	}
	if got := p.Spec.GetRules()[0].GetFrom()[0].GetSource().GetNotIpBlocks(); len(got) != 1 {
		t.Errorf("notIpBlocks = %v", got)
	}
}
