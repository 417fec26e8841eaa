package policy

import (
	"strings"
	"testing"
)

type check struct {
	dst    Workload
	c      Conn
	allow  bool
	policy string // deciding policy; "" for a default decision
}

func allowed(dst Workload, c Conn, policy string) check { return check{dst, c, true, policy} }
func denied(dst Workload, c Conn, policy string) check  { return check{dst, c, false, policy} }

func runChecks(t *testing.T, s *Set, checks []check) {
	t.Helper()
	for i, ck := range checks {
		d := s.Authorize(ck.dst, ck.c)
		if d.Allow != ck.allow || d.Policy != ck.policy {
			t.Errorf("check %d: %s/%v from %q (%s) port %d: got %v, want allow=%v policy=%q",
				i, ck.dst.Namespace, ck.dst.Labels, ck.c.SrcIdentity, ck.c.SrcIP, ck.c.DstPort, d, ck.allow, ck.policy)
		}
		if d.Reason == "" {
			t.Errorf("check %d: decision without a reason: %+v", i, d)
		}
	}
}

func TestAuthorizeSourceFields(t *testing.T) {
	const pol = "foo/p"
	tests := []struct {
		name   string
		spec   string
		checks []check
	}{
		{"principals exact", `
rules:
- from:
  - source:
      principals: ["cluster.local/ns/bar/sa/web"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("bar/other", "10.0.0.1", 80), ""),
			denied(dbWorkload, conn("spiffe://other.td/ns/bar/sa/web", "10.0.0.1", 80), ""),
			denied(dbWorkload, conn("", "10.0.0.1", 80), ""),
		}},
		{"principals prefix", `
rules:
- from:
  - source:
      principals: ["cluster.local/ns/bar/*"]`, []check{
			allowed(dbWorkload, conn("bar/anything", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 80), ""),
		}},
		{"principals suffix", `
rules:
- from:
  - source:
      principals: ["*/sa/web"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			allowed(dbWorkload, conn("spiffe://other.td/ns/baz/sa/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("bar/api", "10.0.0.1", 80), ""),
			denied(dbWorkload, conn("", "10.0.0.1", 80), ""),
		}},
		{"principals star is any authenticated peer", `
rules:
- from:
  - source:
      principals: ["*"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			allowed(dbWorkload, conn("spiffe://x/y", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("", "10.0.0.1", 80), ""),
		}},
		{"notPrincipals matches plaintext, as in Istio", `
rules:
- from:
  - source:
      notPrincipals: ["cluster.local/ns/bar/sa/evil"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("bar/evil", "10.0.0.1", 80), ""),
			allowed(dbWorkload, conn("", "10.0.0.1", 80), pol),
		}},
		{"namespaces", `
rules:
- from:
  - source:
      namespaces: ["bar", "team-*"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			allowed(dbWorkload, conn("team-a/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("foo/web", "10.0.0.1", 80), ""),
			denied(dbWorkload, conn("", "10.0.0.1", 80), ""),
			// An identity that is not Istio's ns/sa form has no namespace.
			denied(dbWorkload, conn("spiffe://cluster.local/bar", "10.0.0.1", 80), ""),
		}},
		{"notNamespaces", `
rules:
- from:
  - source:
      notNamespaces: ["bar"]`, []check{
			allowed(dbWorkload, conn("foo/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
			allowed(dbWorkload, conn("", "10.0.0.1", 80), pol),
		}},
		{"serviceAccounts, bare name is in the policy's namespace", `
rules:
- from:
  - source:
      serviceAccounts: ["bar/web", "api"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			allowed(dbWorkload, conn("foo/api", "10.0.0.1", 80), pol),
			allowed(dbWorkload, conn("spiffe://other.td/ns/foo/sa/api", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("bar/api", "10.0.0.1", 80), ""),
			denied(dbWorkload, conn("", "10.0.0.1", 80), ""),
		}},
		{"notServiceAccounts", `
rules:
- from:
  - source:
      notServiceAccounts: ["bar/evil"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("bar/evil", "10.0.0.1", 80), ""),
			allowed(dbWorkload, conn("", "10.0.0.1", 80), pol),
		}},
		{"trustDomains", `
rules:
- from:
  - source:
      trustDomains: ["cluster.local", "*.example.com"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			allowed(dbWorkload, conn("spiffe://east.example.com/ns/bar/sa/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("spiffe://evil.td/ns/bar/sa/web", "10.0.0.1", 80), ""),
			denied(dbWorkload, conn("", "10.0.0.1", 80), ""),
		}},
		{"notTrustDomains", `
rules:
- from:
  - source:
      notTrustDomains: ["evil.td"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("spiffe://evil.td/ns/bar/sa/web", "10.0.0.1", 80), ""),
		}},
		{"ipBlocks: CIDR, single address, IPv6, IPv4-mapped source", `
rules:
- from:
  - source:
      ipBlocks: ["10.0.0.0/24", "192.168.1.7", "fd00::/64"]`, []check{
			allowed(dbWorkload, conn("", "10.0.0.200", 80), pol),
			allowed(dbWorkload, conn("", "::ffff:10.0.0.9", 80), pol),
			allowed(dbWorkload, conn("bar/web", "192.168.1.7", 80), pol),
			allowed(dbWorkload, conn("", "fd00::1", 80), pol),
			denied(dbWorkload, conn("", "10.0.1.1", 80), ""),
			denied(dbWorkload, conn("", "192.168.1.8", 80), ""),
			denied(dbWorkload, conn("", "fd01::1", 80), ""),
		}},
		{"ipBlocks ignore host bits after the prefix length", `
rules:
- from:
  - source:
      ipBlocks: ["10.0.0.77/24"]`, []check{
			allowed(dbWorkload, conn("", "10.0.0.1", 80), pol),
		}},
		{"notIpBlocks", `
rules:
- from:
  - source:
      notIpBlocks: ["10.0.0.0/24"]`, []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.5", 80), ""),
			allowed(dbWorkload, conn("bar/web", "10.0.9.5", 80), pol),
		}},
		{"fields of one source are ANDed", `
rules:
- from:
  - source:
      namespaces: ["bar"]
      ipBlocks: ["10.0.0.0/24"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("bar/web", "10.9.0.1", 80), ""),
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 80), ""),
		}},
		{"sources are ORed", `
rules:
- from:
  - source:
      namespaces: ["bar"]
  - source:
      ipBlocks: ["10.0.0.0/24"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.9.0.1", 80), pol),
			allowed(dbWorkload, conn("", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("baz/web", "10.9.0.1", 80), ""),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := compileDocs(t, ap("p", tt.spec))
			runChecks(t, s, tt.checks)
		})
	}
}

func TestAuthorizeOperationsAndConditions(t *testing.T) {
	const pol = "foo/p"
	tests := []struct {
		name   string
		spec   string
		checks []check
	}{
		{"ports", `
rules:
- to:
  - operation:
      ports: ["8080", "9090"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 8080), pol),
			allowed(dbWorkload, conn("", "10.0.0.1", 9090), pol),
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 22), ""),
		}},
		{"notPorts", `
rules:
- to:
  - operation:
      notPorts: ["22"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 8080), pol),
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 22), ""),
		}},
		{"from AND to", `
rules:
- from:
  - source:
      namespaces: ["bar"]
  to:
  - operation:
      ports: ["5432"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 5432), pol),
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 5432), ""),
		}},
		{"rules are ORed", `
rules:
- from:
  - source:
      namespaces: ["bar"]
- to:
  - operation:
      ports: ["80"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 5432), pol),
			allowed(dbWorkload, conn("", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("", "10.0.0.1", 5432), ""),
		}},
		{"when source.ip", `
rules:
- when:
  - key: source.ip
    values: ["10.0.0.0/24"]
    notValues: ["10.0.0.13"]`, []check{
			allowed(dbWorkload, conn("", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("", "10.0.0.13", 80), ""),
			denied(dbWorkload, conn("", "10.0.7.1", 80), ""),
		}},
		{"when source.namespace", `
rules:
- when:
  - key: source.namespace
    values: ["bar"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 80), ""),
			denied(dbWorkload, conn("", "10.0.0.1", 80), ""),
		}},
		{"when source.principal notValues", `
rules:
- when:
  - key: source.principal
    notValues: ["cluster.local/ns/bar/sa/evil"]`, []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), pol),
			denied(dbWorkload, conn("bar/evil", "10.0.0.1", 80), ""),
		}},
		{"when destination.ip and destination.port, conditions ANDed", `
rules:
- when:
  - key: destination.ip
    values: ["10.0.1.0/24"]
  - key: destination.port
    values: ["8080"]`, []check{
			allowed(dbWorkload, conn("", "10.0.0.1", 8080), pol),
			denied(dbWorkload, conn("", "10.0.0.1", 8081), ""),
		}},
		{"when destination.ip mismatch", `
rules:
- when:
  - key: destination.ip
    notValues: ["10.0.1.1"]`, []check{
			denied(dbWorkload, conn("", "10.0.0.1", 8080), ""),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := compileDocs(t, ap("p", tt.spec))
			runChecks(t, s, tt.checks)
		})
	}
}

func TestAuthorizeL7Attributes(t *testing.T) {
	tests := []struct {
		name   string
		docs   string
		checks []check
		note   string // a Notes() entry must contain this
	}{
		{"ALLOW rule with methods never matches", ap("p", `
rules:
- from:
  - source:
      namespaces: ["bar"]
  to:
  - operation:
      methods: ["GET"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
		}, "never matches"},
		{"only the ALLOW rule with HTTP attributes is dropped", ap("p", `
rules:
- to:
  - operation:
      paths: ["/admin"]
- from:
  - source:
      namespaces: ["bar"]`), []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/p"),
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 80), ""),
		}, "spec.rules[0] uses HTTP attributes (paths)"},
		{"ALLOW with requestPrincipals", ap("p", `
rules:
- from:
  - source:
      requestPrincipals: ["*"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
		}, "requestPrincipals"},
		{"ALLOW with remoteIpBlocks is HTTP-only, as in istiod", ap("p", `
rules:
- from:
  - source:
      remoteIpBlocks: ["10.0.0.0/8"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
		}, "remoteIpBlocks"},
		{"ALLOW with a request header condition", ap("p", `
rules:
- when:
  - key: request.headers[x-user]
    values: ["alice"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
		}, "when request.headers[x-user]"},
		{"ALLOW with connection.sni", ap("p", `
rules:
- when:
  - key: connection.sni
    values: ["db.example.com"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
		}, "connection.sni"},
		{"DENY with methods and a namespace denies that namespace entirely", ap("p", `
action: DENY
rules:
- from:
  - source:
      namespaces: ["bar"]
  to:
  - operation:
      methods: ["POST"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/p"),
			allowed(dbWorkload, conn("baz/web", "10.0.0.1", 80), ""),
		}, "denies more than written"},
		{"DENY with only paths denies everything", ap("p", `
action: DENY
rules:
- to:
  - operation:
      paths: ["/admin*"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/p"),
			denied(dbWorkload, conn("", "10.0.0.1", 443), "foo/p"),
		}, "paths"},
		{"DENY with notRequestPrincipals only denies everything", ap("p", `
action: DENY
rules:
- from:
  - source:
      notRequestPrincipals: ["*"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/p"),
		}, "notRequestPrincipals"},
		{"DENY keeps its L4 port next to HTTP fields", ap("p", `
action: DENY
rules:
- to:
  - operation:
      ports: ["9090"]
      methods: ["DELETE"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 9090), "foo/p"),
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
		}, "methods"},
		{"DENY with an HTTP condition keeps its L4 source", ap("p", `
action: DENY
rules:
- from:
  - source:
      ipBlocks: ["10.0.0.0/24"]
  when:
  - key: request.auth.claims[iss]
    values: ["evil"]`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/p"),
			allowed(dbWorkload, conn("bar/web", "10.9.0.1", 80), ""),
		}, "request.auth.claims[iss]"},
		{"DENY with an HTTP-only source among others widens to all", ap("p", `
action: DENY
rules:
- from:
  - source:
      namespaces: ["bar"]
  - source:
      remoteIpBlocks: ["1.2.3.4"]`), []check{
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 80), "foo/p"),
		}, "remoteIpBlocks"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := compileDocs(t, tt.docs)
			runChecks(t, s, tt.checks)
			if !strings.Contains(strings.Join(s.Notes(), "\n"), tt.note) {
				t.Errorf("notes %q lack %q", s.Notes(), tt.note)
			}
		})
	}
}

func TestAuthorizeEvaluationOrderAndEmptyPolicies(t *testing.T) {
	tests := []struct {
		name   string
		docs   string
		checks []check
	}{
		{"no policy allows", "", []check{
			allowed(dbWorkload, conn("", "10.0.0.1", 80), ""),
		}},
		{"empty ALLOW spec is allow-nothing", ap("allow-nothing", `{}`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
			denied(webWorkload, conn("", "10.0.0.1", 80), ""),
		}},
		{"DENY without rules matches nothing", ap("d", `action: DENY`), []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
		}},
		{"ALLOW with an empty rule allows everything", ap("allow-all", `
rules:
- {}`), []check{
			allowed(dbWorkload, conn("", "10.0.0.1", 80), "foo/allow-all"),
		}},
		{"DENY with an empty rule denies everything", ap("deny-all", `
action: DENY
rules:
- {}`), []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/deny-all"),
		}},
		{"DENY wins over a matching ALLOW", docs(
			ap("allow-bar", `
rules:
- from:
  - source:
      namespaces: ["bar"]`),
			ap("deny-9090", `
action: DENY
rules:
- to:
  - operation:
      ports: ["9090"]`)), []check{
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/allow-bar"),
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 9090), "foo/deny-9090"),
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 80), ""),
		}},
		{"a mesh-wide DENY beats a namespace ALLOW", docs(
			apIn("istio-system", "deny-plaintext", `
action: DENY
rules:
- from:
  - source:
      notPrincipals: ["*"]`),
			ap("allow-all", `
rules:
- {}`)), []check{
			denied(dbWorkload, conn("", "10.0.0.1", 80), "istio-system/deny-plaintext"),
			allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/allow-all"),
		}},
		{"any one ALLOW suffices", docs(
			ap("a", `
rules:
- from:
  - source:
      namespaces: ["a"]`),
			ap("b", `
rules:
- from:
  - source:
      namespaces: ["b"]`)), []check{
			allowed(dbWorkload, conn("a/x", "10.0.0.1", 80), "foo/a"),
			allowed(dbWorkload, conn("b/x", "10.0.0.1", 80), "foo/b"),
			denied(dbWorkload, conn("c/x", "10.0.0.1", 80), ""),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := compileDocs(t, tt.docs)
			runChecks(t, s, tt.checks)
		})
	}
}

func TestAuthorizeScope(t *testing.T) {
	onlyBar := `
rules:
- from:
  - source:
      namespaces: ["bar"]`
	tests := []struct {
		name   string
		root   string
		docs   string
		checks []check
	}{
		{"namespace policy applies only in its namespace", "", ap("p", onlyBar), []check{
			denied(dbWorkload, conn("baz/x", "10.0.0.1", 80), ""),
			allowed(barDB, conn("baz/x", "10.0.0.1", 80), ""),
		}},
		{"root namespace policy is mesh-wide", "", apIn("istio-system", "p", onlyBar), []check{
			denied(dbWorkload, conn("baz/x", "10.0.0.1", 80), ""),
			denied(barDB, conn("baz/x", "10.0.0.1", 80), ""),
			denied(rootDB, conn("baz/x", "10.0.0.1", 80), ""),
			allowed(barDB, conn("bar/x", "10.0.0.1", 80), "istio-system/p"),
		}},
		{"root namespace selector matches in every namespace", "", apIn("istio-system", "p", `
selector:
  matchLabels:
    app: db
`+onlyBar), []check{
			denied(dbWorkload, conn("baz/x", "10.0.0.1", 80), ""),
			denied(barDB, conn("baz/x", "10.0.0.1", 80), ""),
			allowed(webWorkload, conn("baz/x", "10.0.0.1", 80), ""),
		}},
		{"selector is a subset match on labels", "", ap("p", `
selector:
  matchLabels:
    app: db
    version: v1
`+onlyBar), []check{
			denied(dbWorkload, conn("baz/x", "10.0.0.1", 80), ""),
			allowed(Workload{Namespace: "foo", Labels: map[string]string{"app": "db", "version": "v2"}}, conn("baz/x", "10.0.0.1", 80), ""),
			allowed(Workload{Namespace: "foo"}, conn("baz/x", "10.0.0.1", 80), ""),
		}},
		{"empty matchLabels selects every workload", "", ap("p", `
selector: {}
`+onlyBar), []check{
			denied(webWorkload, conn("baz/x", "10.0.0.1", 80), ""),
		}},
		{"custom root namespace", "mesh", docs(apIn("mesh", "p", onlyBar), apIn("istio-system", "q", "action: DENY\nrules:\n- {}")), []check{
			denied(dbWorkload, conn("baz/x", "10.0.0.1", 80), ""),
			allowed(dbWorkload, conn("bar/x", "10.0.0.1", 80), "mesh/p"),
			denied(rootDB, conn("bar/x", "10.0.0.1", 80), "istio-system/q"),
		}},
		{"targetRefs policies are for waypoints", "", ap("p", `
targetRefs:
- kind: Service
  group: ""
  name: db
action: DENY
rules:
- {}`), []check{
			allowed(dbWorkload, conn("baz/x", "10.0.0.1", 80), ""),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			aps, pas := parseDocs(t, tt.docs)
			s, errs := Compile(tt.root, aps, pas)
			if len(errs) > 0 {
				t.Fatalf("errors: %s", errorsText(errs))
			}
			runChecks(t, s, tt.checks)
		})
	}
}

func TestTargetRefNote(t *testing.T) {
	s := compileDocs(t, ap("waypoint-only", `
targetRef:
  kind: Gateway
  group: gateway.networking.k8s.io
  name: waypoint`))
	if n := strings.Join(s.Notes(), "\n"); !strings.Contains(n, "foo/waypoint-only") || !strings.Contains(n, "waypoint") {
		t.Errorf("notes = %q", n)
	}
}

func TestAuthorizeStrictPeerAuthentication(t *testing.T) {
	s := compileDocs(t, docs(
		paIn("foo", "default", "mtls:\n  mode: STRICT"),
		ap("allow-all", "rules:\n- {}"),
	))
	runChecks(t, s, []check{
		denied(dbWorkload, conn("", "10.0.0.1", 80), "foo/default"),
		allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/allow-all"),
		allowed(barDB, conn("", "10.0.0.1", 80), ""),
	})
	d := s.Authorize(dbWorkload, conn("", "10.0.0.1", 80))
	if !strings.Contains(d.Reason, "STRICT") {
		t.Errorf("reason %q should say STRICT", d.Reason)
	}
}

func TestNilSetDenies(t *testing.T) {
	var s *Set
	if d := s.Authorize(dbWorkload, conn("bar/web", "10.0.0.1", 80)); d.Allow {
		t.Errorf("nil Set allowed: %v", d)
	}
	if m := s.Mode(dbWorkload, 80); m != ModeStrict {
		t.Errorf("nil Set mode = %v", m)
	}
}

func TestDecisionReasonNamesAllowPolicies(t *testing.T) {
	s := compileDocs(t, docs(ap("a", "{}"), ap("b", "{}")))
	d := s.Authorize(dbWorkload, conn("bar/web", "10.0.0.1", 80))
	if d.Allow || !strings.Contains(d.Reason, "foo/a") || !strings.Contains(d.Reason, "foo/b") {
		t.Errorf("decision = %v", d)
	}
}
