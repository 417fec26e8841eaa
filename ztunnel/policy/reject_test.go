package policy

import (
	"errors"
	"strings"
	"testing"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

// Every rejected policy is reported, naming policy and field, and fails closed.
func TestRejectedPoliciesFailClosed(t *testing.T) {
	allowBar := ap("allow-bar", `
selector:
  matchLabels:
    app: db
rules:
- from:
  - source:
      namespaces: ["bar"]`)
	tests := []struct {
		name   string
		docs   string
		errs   []string // each must appear in some error, in order of the errors
		effect string   // every error must contain it
		checks []check
	}{
		{
			name: "ALLOW with a bad CIDR matches nothing, other ALLOWs still grant",
			docs: docs(allowBar, ap("allow-net", `
selector:
  matchLabels:
    app: db
rules:
- from:
  - source:
      ipBlocks: ["10.0.0.0/8", "10.0.0.300"]`)),
			errs:   []string{`AuthorizationPolicy foo/allow-net: spec.rules[0].from[0].source.ipBlocks[1]: "10.0.0.300" is not an IP address or CIDR`},
			effect: "matches nothing",
			checks: []check{
				denied(dbWorkload, conn("baz/x", "10.0.0.1", 80), ""),
				allowed(dbWorkload, conn("bar/x", "10.0.0.1", 80), "foo/allow-bar"),
				allowed(webWorkload, conn("baz/x", "10.0.0.1", 80), ""),
			},
		},
		{
			name: "a rejected ALLOW alone makes its workloads default-deny",
			docs: ap("allow-ports", `
selector:
  matchLabels:
    app: db
rules:
- to:
  - operation:
      ports: ["http"]`),
			errs:   []string{`spec.rules[0].to[0].operation.ports[0]: "http" is not a port number`},
			effect: "matches nothing",
			checks: []check{
				denied(dbWorkload, conn("bar/x", "10.0.0.1", 80), ""),
				allowed(webWorkload, conn("bar/x", "10.0.0.1", 80), ""),
			},
		},
		{
			name: "DENY with a bad port is deny-all for the workloads it selects",
			docs: docs(allowBar, ap("deny-port", `
selector:
  matchLabels:
    app: db
action: DENY
rules:
- to:
  - operation:
      ports: ["70000"]`)),
			errs:   []string{`foo/deny-port: spec.rules[0].to[0].operation.ports[0]: "70000" is not a port number`},
			effect: "deny-all",
			checks: []check{
				denied(dbWorkload, conn("bar/x", "10.0.0.1", 80), "foo/deny-port"),
				allowed(webWorkload, conn("bar/x", "10.0.0.1", 80), ""),
			},
		},
		{
			name: "principal with the spiffe scheme",
			docs: ap("p", `
action: DENY
rules:
- from:
  - source:
      principals: ["spiffe://cluster.local/ns/bar/sa/evil"]`),
			errs:   []string{`spec.rules[0].from[0].source.principals[0]: "spiffe://cluster.local/ns/bar/sa/evil": write principals without "spiffe://", such as "cluster.local/ns/bar/sa/evil"`},
			effect: "deny-all",
			checks: []check{denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/p")},
		},
		{
			name: "wildcard in the middle",
			docs: ap("p", `
rules:
- from:
  - source:
      principals: ["cluster.local/*/sa/web"]
      namespaces: ["*bar*"]`),
			errs: []string{
				`source.principals[0]: "cluster.local/*/sa/web": "*" may only stand alone, at the start or at the end`,
				`source.namespaces[0]: "*bar*"`,
			},
			effect: "matches nothing",
			checks: []check{denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "")},
		},
		{
			name: "empty value",
			docs: ap("p", `
rules:
- from:
  - source:
      namespaces: [""]`),
			errs:   []string{`spec.rules[0].from[0].source.namespaces[0]: empty value`},
			effect: "matches nothing",
		},
		{
			name: "empty source and operation",
			docs: ap("p", `
action: DENY
rules:
- from:
  - source: {}
  to:
  - operation: {}`),
			errs:   []string{`spec.rules[0].from[0].source: must not be empty`, `spec.rules[0].to[0].operation: must not be empty`},
			effect: "deny-all",
			checks: []check{denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/p")},
		},
		{
			name: "serviceAccounts mixed with principals, and wildcards",
			docs: ap("p", `
rules:
- from:
  - source:
      serviceAccounts: ["bar/*", "a/b/c"]
      principals: ["cluster.local/ns/bar/sa/web"]`),
			errs: []string{
				`serviceAccounts[0]: "bar/*": wildcards are not allowed`,
				`serviceAccounts[1]: "a/b/c": want "namespace/serviceaccount"`,
				`spec.rules[0].from[0].source: serviceAccounts cannot be set with principals or namespaces`,
			},
			effect: "matches nothing",
		},
		{
			name: "conditions: unknown key, missing values, bad IP, deprecated key, unbracketed header",
			docs: ap("p", `
action: DENY
rules:
- when:
  - key: source.serviceAccountz
    values: ["x"]
  - key: destination.port
  - key: source.ip
    notValues: ["nope"]
  - key: destination.labels[app]
    values: ["x"]
  - key: request.headers
    values: ["x"]`),
			errs: []string{
				`spec.rules[0].when[0].key: unknown attribute "source.serviceAccountz"`,
				`spec.rules[0].when[1]: at least one of values or notValues must be set`,
				`spec.rules[0].when[2].notValues[0]: "nope" is not an IP address or CIDR`,
				`spec.rules[0].when[3].key: "destination.labels[app]" was only supported by the removed v1alpha1 RBAC API`,
				`spec.rules[0].when[4].key: "request.headers": write the name in brackets`,
			},
			effect: "deny-all",
			checks: []check{denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/p")},
		},
		{
			name: "DENY with a wildcard selector fails closed over its whole namespace",
			docs: ap("p", `
selector:
  matchLabels:
    app: "db-*"
action: DENY
rules:
- from:
  - source:
      namespaces: ["bar"]`),
			errs:   []string{`spec.selector.matchLabels["app"]: wildcard not allowed in label value match`},
			effect: "deny-all",
			checks: []check{
				denied(dbWorkload, conn("baz/x", "10.0.0.1", 80), "foo/p"),
				denied(webWorkload, conn("baz/x", "10.0.0.1", 80), "foo/p"),
				allowed(barDB, conn("baz/x", "10.0.0.1", 80), ""),
			},
		},
		{
			name: "selector and targetRefs together",
			docs: ap("p", `
selector:
  matchLabels:
    app: db
targetRefs:
- kind: Service
  name: db
action: DENY
rules:
- from:
  - source:
      namespaces: ["bar"]`),
			errs:   []string{`AuthorizationPolicy foo/p: spec: only one of selector, targetRef and targetRefs may be set`},
			effect: "deny-all",
			checks: []check{
				denied(dbWorkload, conn("baz/x", "10.0.0.1", 80), "foo/p"),
				allowed(webWorkload, conn("baz/x", "10.0.0.1", 80), ""),
			},
		},
		{
			name: "provider without CUSTOM",
			docs: ap("p", `
provider:
  name: opa
rules:
- {}`),
			errs:   []string{`spec.provider: only valid with action CUSTOM`},
			effect: "matches nothing",
			checks: []check{denied(dbWorkload, conn("baz/x", "10.0.0.1", 80), "")},
		},
		{
			name: "AUDIT is reported and changes no decision",
			docs: ap("audit", `
action: AUDIT
rules:
- {}`),
			errs:   []string{`AuthorizationPolicy foo/audit: spec.action: AUDIT is not supported by Sluice's ztunnel; remove the policy`},
			effect: "no effect",
			checks: []check{allowed(dbWorkload, conn("", "10.0.0.1", 80), "")},
		},
		{
			name: "CUSTOM denies what it would send to the provider",
			docs: ap("ext", `
action: CUSTOM
provider:
  name: my-ext-authz
rules:
- to:
  - operation:
      ports: ["9000"]`),
			errs:   []string{`spec.action: CUSTOM is not supported by Sluice's ztunnel, which cannot call extension provider "my-ext-authz"`},
			effect: "connections its rules match are denied",
			checks: []check{
				denied(dbWorkload, conn("bar/x", "10.0.0.1", 9000), "foo/ext"),
				allowed(dbWorkload, conn("bar/x", "10.0.0.1", 80), ""),
			},
		},
		{
			name: "CUSTOM on HTTP paths denies every connection",
			docs: ap("ext", `
action: CUSTOM
provider:
  name: my-ext-authz
rules:
- to:
  - operation:
      paths: ["/admin/*"]`),
			errs:   []string{`CUSTOM is not supported`},
			effect: "connections its rules match are denied",
			checks: []check{denied(dbWorkload, conn("bar/x", "10.0.0.1", 80), "foo/ext")},
		},
		{
			name: "CUSTOM without a provider is deny-all",
			docs: ap("ext", `
action: CUSTOM
rules:
- to:
  - operation:
      ports: ["9000"]`),
			errs:   []string{`spec.provider.name: CUSTOM requires an extension provider`, `CUSTOM is not supported`},
			effect: "deny-all",
			checks: []check{denied(dbWorkload, conn("bar/x", "10.0.0.1", 80), "foo/ext")},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, errs := compileDocsErrs(t, tt.docs)
			if len(errs) != len(tt.errs) {
				t.Fatalf("got %d errors, want %d:\n%s", len(errs), len(tt.errs), errorsText(errs))
			}
			for i, want := range tt.errs {
				if !strings.Contains(errs[i].Error(), want) {
					t.Errorf("error %d = %q\nwant it to contain %q", i, errs[i], want)
				}
				if !strings.Contains(errs[i].Error(), tt.effect) {
					t.Errorf("error %d = %q\nwant the effect %q", i, errs[i], tt.effect)
				}
				var pe *PolicyError
				if !errors.As(errs[i], &pe) || pe.Name == "" {
					t.Errorf("error %d is not a *PolicyError naming the policy: %#v", i, errs[i])
				}
			}
			runChecks(t, s, tt.checks)
		})
	}
}

// A DENY whose spec cannot be decoded (a misspelt field, a port not in quotes) must not
// vanish, and a misspelt ALLOW field must not widen the rule.
func TestUnreadableSpecsFailClosed(t *testing.T) {
	tests := []struct {
		name   string
		doc    string
		err    string
		checks []check
	}{
		{"misspelt field in a DENY", ap("d", `
selector:
  matchLabels:
    app: db
action: DENY
rules:
- from:
  - source:
      notPrincipal: ["*"]`), `unknown field "notPrincipal"`, []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/d"),
			allowed(webWorkload, conn("bar/web", "10.0.0.1", 80), ""),
		}},
		{"misspelt field in an ALLOW does not widen it", ap("a", `
selector:
  matchLabels:
    app: db
rules:
- from:
  - source:
      principles: ["cluster.local/ns/bar/sa/web"]`), `unknown field "principles"`, []check{
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 80), ""),
			allowed(webWorkload, conn("baz/web", "10.0.0.1", 80), ""),
		}},
		{"unquoted port", ap("a", `
rules:
- to:
  - operation:
      ports: [8080]`), `quote it`, []check{
			denied(dbWorkload, conn("bar/web", "10.0.0.1", 8080), ""),
		}},
		{"misspelt action", ap("d", `
action: DENNY
rules:
- from:
  - source:
      namespaces: ["bar"]`), `spec:`, []check{
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 80), "foo/d"),
		}},
		{"spec that is not an object", ap("d", `just a string`), `spec:`, []check{
			denied(dbWorkload, conn("baz/web", "10.0.0.1", 80), "foo/d"),
			denied(webWorkload, conn("baz/web", "10.0.0.1", 80), "foo/d"),
			allowed(barDB, conn("baz/web", "10.0.0.1", 80), ""),
		}},
		{"unreadable waypoint policy is still the waypoint's", ap("w", `
targetRefs:
- kind: Service
  name: db
rules:
- to:
  - operation:
      port: ["80"]`), "", []check{
			allowed(dbWorkload, conn("baz/web", "10.0.0.1", 80), ""),
		}},
	}
	// A misspelt DENY is taken for a waypoint's (and left to it) only if it names a target.
	for name, ref := range map[string]string{
		"empty targetRefs":                 "targetRefs: []",
		"a null targetRef in targetRefs":   "targetRefs: [null]",
		"targetRefs without kind and name": "targetRefs: [{}]",
		"a targetRef without a name":       `targetRef: {kind: Service, name: ""}`,
	} {
		tests = append(tests, struct {
			name   string
			doc    string
			err    string
			checks []check
		}{"misspelt DENY with " + name + " is enforced", ap("d", ref+`
action: DENY
rules:
- from:
  - source:
      notPrincipal: ["*"]`), `unknown field "notPrincipal"`, []check{denied(dbWorkload, conn("bar/web", "10.0.0.1", 80), "foo/d")}})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, errs := compileDocsErrs(t, tt.doc)
			if tt.err == "" {
				if len(errs) != 0 {
					t.Errorf("unexpected errors:\n%s", errorsText(errs))
				}
			} else if len(errs) != 1 || !strings.Contains(errs[0].Error(), tt.err) {
				t.Errorf("errors:\n%s\nwant one containing %q", errorsText(errs), tt.err)
			}
			runChecks(t, s, tt.checks)
		})
	}
}

// Policies built in Go (by a Kubernetes watcher, say) are validated the same way.
func TestCompileGoStructs(t *testing.T) {
	deny := AuthorizationPolicy{Name: "deny-evil", Namespace: "foo", Spec: &securityv1beta1.AuthorizationPolicy{
		Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "db"}},
		Action:   securityv1beta1.AuthorizationPolicy_DENY,
		Rules: []*securityv1beta1.Rule{{
			From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Principals: []string{"cluster.local/ns/bar/sa/evil"}}}},
		}},
	}}
	unscoped := AuthorizationPolicy{Name: "lost", Spec: &securityv1beta1.AuthorizationPolicy{
		Action: securityv1beta1.AuthorizationPolicy_DENY,
		Rules:  []*securityv1beta1.Rule{{To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Ports: []string{"22"}}}}}},
	}}
	nilSpec := AuthorizationPolicy{Name: "nothing", Namespace: "bar"}
	badAction := AuthorizationPolicy{Name: "odd", Namespace: "baz", Spec: &securityv1beta1.AuthorizationPolicy{Action: 42}}

	s, errs := Compile("", []AuthorizationPolicy{deny, unscoped, nilSpec, badAction}, nil)
	text := errorsText(errs)
	for _, want := range []string{
		`AuthorizationPolicy /lost: metadata.namespace: must not be empty; the policy cannot be scoped; enforced as deny-all`,
		`AuthorizationPolicy baz/odd: spec.action: unknown action 42; enforced as deny-all`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("errors:\n%s\nwant %q", text, want)
		}
	}
	if len(errs) != 2 {
		t.Errorf("got %d errors, want 2:\n%s", len(errs), text)
	}
	baz := Workload{Namespace: "baz"}
	runChecks(t, s, []check{
		// The unscoped DENY is enforced mesh-wide as deny-all.
		denied(webWorkload, conn("bar/web", "10.0.0.1", 80), "/lost"),
		denied(dbWorkload, conn("bar/evil", "10.0.0.1", 80), "/lost"),
		denied(barDB, conn("foo/web", "10.0.0.1", 22), "/lost"),
		denied(baz, conn("foo/web", "10.0.0.1", 80), "/lost"),
	})

	s, errs = Compile("", []AuthorizationPolicy{deny, nilSpec, badAction}, nil)
	if len(errs) != 1 {
		t.Fatalf("errors:\n%s", errorsText(errs))
	}
	runChecks(t, s, []check{
		denied(dbWorkload, conn("bar/evil", "10.0.0.1", 80), "foo/deny-evil"),
		allowed(dbWorkload, conn("bar/web", "10.0.0.1", 80), ""),
		// A nil spec is spec {}: allow-nothing.
		denied(barDB, conn("foo/web", "10.0.0.1", 80), ""),
		denied(baz, conn("foo/web", "10.0.0.1", 80), "baz/odd"),
	})
}

func TestPolicyErrorFormat(t *testing.T) {
	e := &PolicyError{Kind: "AuthorizationPolicy", Namespace: "foo", Name: "p", Field: "spec.x", Problem: "bad", Effect: "deny-all"}
	if got, want := e.Error(), "AuthorizationPolicy foo/p: spec.x: bad; deny-all"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	e.Field = ""
	if got, want := e.Error(), "AuthorizationPolicy foo/p: bad; deny-all"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
