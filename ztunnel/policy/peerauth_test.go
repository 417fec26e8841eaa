package policy

import (
	"strings"
	"testing"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

type modeCheck struct {
	dst  Workload
	port uint16
	want Mode
}

func TestModePrecedence(t *testing.T) {
	meshStrict := paIn("istio-system", "default", "mtls:\n  mode: STRICT")
	nsPermissive := paIn("foo", "default", "mtls:\n  mode: PERMISSIVE")
	nsUnset := paIn("foo", "default", "mtls: {}")
	nsStrict := paIn("foo", "default", "mtls:\n  mode: STRICT")
	tests := []struct {
		name   string
		docs   string
		checks []modeCheck
	}{
		{"default is PERMISSIVE", "", []modeCheck{{dbWorkload, 80, ModePermissive}}},
		{"mesh STRICT", meshStrict, []modeCheck{
			{dbWorkload, 80, ModeStrict}, {barDB, 80, ModeStrict}, {rootDB, 80, ModeStrict},
		}},
		{"namespace overrides mesh", docs(meshStrict, nsPermissive), []modeCheck{
			{dbWorkload, 80, ModePermissive}, {barDB, 80, ModeStrict},
		}},
		{"namespace UNSET inherits mesh", docs(meshStrict, nsUnset), []modeCheck{
			{dbWorkload, 80, ModeStrict},
		}},
		{"a spec without mtls inherits too", docs(meshStrict, paIn("foo", "default", "{}")), []modeCheck{
			{dbWorkload, 80, ModeStrict},
		}},
		{"workload overrides namespace", docs(nsStrict, paIn("foo", "db", `
selector:
  matchLabels:
    app: db
mtls:
  mode: PERMISSIVE`)), []modeCheck{
			{dbWorkload, 80, ModePermissive}, {webWorkload, 80, ModeStrict},
		}},
		{"workload UNSET with a port exception under a STRICT namespace", docs(nsStrict, paIn("foo", "db", `
selector:
  matchLabels:
    app: db
mtls:
  mode: UNSET
portLevelMtls:
  8080:
    mode: DISABLE
  9090:
    mode: PERMISSIVE
  9443: {}`)), []modeCheck{
			{dbWorkload, 8080, ModeDisable}, {dbWorkload, 9090, ModePermissive},
			{dbWorkload, 9443, ModeStrict}, {dbWorkload, 80, ModeStrict},
			{webWorkload, 8080, ModeStrict},
		}},
		{"STRICT port on a PERMISSIVE workload", docs(paIn("foo", "db", `
selector:
  matchLabels:
    app: db
mtls:
  mode: PERMISSIVE
portLevelMtls:
  5432:
    mode: STRICT`)), []modeCheck{
			{dbWorkload, 5432, ModeStrict}, {dbWorkload, 80, ModePermissive},
		}},
		{"workload policies select within their namespace", docs(paIn("bar", "db", `
selector:
  matchLabels:
    app: db
mtls:
  mode: STRICT`)), []modeCheck{
			{dbWorkload, 80, ModePermissive}, {barDB, 80, ModeStrict},
		}},
		{"root namespace policies with a selector are ignored", docs(paIn("istio-system", "db", `
selector:
  matchLabels:
    app: db
mtls:
  mode: STRICT`)), []modeCheck{
			{dbWorkload, 80, ModePermissive}, {rootDB, 80, ModePermissive},
		}},
		{"DISABLE is reported as DISABLE", paIn("foo", "default", "mtls:\n  mode: DISABLE"), []modeCheck{
			{dbWorkload, 80, ModeDisable},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := compileDocs(t, tt.docs)
			for i, c := range tt.checks {
				if got := s.Mode(c.dst, c.port); got != c.want {
					t.Errorf("check %d: Mode(%s %v, %d) = %v, want %v", i, c.dst.Namespace, c.dst.Labels, c.port, got, c.want)
				}
			}
		})
	}
}

func TestModeConflictsOldestWins(t *testing.T) {
	t0 := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	pa := func(name string, created time.Time, labels map[string]string, mode securityv1beta1.PeerAuthentication_MutualTLS_Mode) PeerAuthentication {
		p := PeerAuthentication{Name: name, Namespace: "foo", CreationTimestamp: created, Spec: &securityv1beta1.PeerAuthentication{
			Mtls: &securityv1beta1.PeerAuthentication_MutualTLS{Mode: mode},
		}}
		if labels != nil {
			p.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: labels}
		}
		return p
	}
	db := map[string]string{"app": "db"}
	tests := []struct {
		name string
		pas  []PeerAuthentication
		want Mode
	}{
		{"namespace level, oldest wins", []PeerAuthentication{
			pa("b-new", t0.Add(time.Hour), nil, mtlsPermissive), pa("z-old", t0, nil, mtlsStrict),
		}, ModeStrict},
		{"namespace level, no timestamps: by name", []PeerAuthentication{
			pa("b", time.Time{}, nil, mtlsStrict), pa("a", time.Time{}, nil, mtlsPermissive),
		}, ModePermissive},
		{"workload level, oldest wins", []PeerAuthentication{
			pa("new", t0.Add(time.Hour), db, mtlsStrict), pa("old", t0, map[string]string{"version": "v1"}, mtlsPermissive),
		}, ModePermissive},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, errs := Compile("", nil, tt.pas)
			if len(errs) > 0 {
				t.Fatal(errorsText(errs))
			}
			if got := s.Mode(dbWorkload, 80); got != tt.want {
				t.Errorf("Mode = %v, want %v", got, tt.want)
			}
		})
	}
	s, _ := Compile("", nil, tests[0].pas)
	if n := strings.Join(s.Notes(), "\n"); !strings.Contains(n, "only foo/z-old applies") {
		t.Errorf("notes = %q", n)
	}
}

func TestRejectedPeerAuthenticationIsStrict(t *testing.T) {
	tests := []struct {
		name   string
		doc    string
		err    string
		checks []modeCheck
	}{
		{"portLevelMtls without a selector", paIn("foo", "default", `
mtls:
  mode: PERMISSIVE
portLevelMtls:
  8080:
    mode: DISABLE`), "PeerAuthentication foo/default: spec.portLevelMtls: requires a selector", []modeCheck{
			{dbWorkload, 8080, ModeStrict}, {webWorkload, 80, ModeStrict}, {barDB, 80, ModePermissive},
		}},
		{"port 0", paIn("foo", "db", `
selector:
  matchLabels:
    app: db
mtls:
  mode: PERMISSIVE
portLevelMtls:
  0:
    mode: PERMISSIVE`), "spec.portLevelMtls[0]: port must be between 1 and 65535", []modeCheck{
			{dbWorkload, 80, ModeStrict}, {webWorkload, 80, ModePermissive},
		}},
		{"misspelt mode", paIn("foo", "default", `
mtls:
  mode: STRICTT`), "spec:", []modeCheck{
			{dbWorkload, 80, ModeStrict},
		}},
		{"misspelt field keeps the selector", paIn("foo", "db", `
selector:
  matchLabels:
    app: db
mtl:
  mode: PERMISSIVE`), `unknown field "mtl"`, []modeCheck{
			{dbWorkload, 80, ModeStrict}, {webWorkload, 80, ModePermissive},
		}},
		{"wildcard selector covers the namespace", paIn("foo", "db", `
selector:
  matchLabels:
    app: "*"
mtls:
  mode: PERMISSIVE`), "wildcard not allowed", []modeCheck{
			{dbWorkload, 80, ModeStrict}, {webWorkload, 80, ModeStrict},
		}},
		{"widened to its namespace, it beats the namespace's own older policy", paIn("foo", "allow-legacy", `
mtls:
  mode: PERMISSIVE`) + "\n---\n" + paIn("foo", "db", `
selector:
  matchLabels:
    app: "*"
mtls:
  mode: STRICT`), "wildcard not allowed", []modeCheck{
			{dbWorkload, 80, ModeStrict}, {webWorkload, 80, ModeStrict}, {barDB, 80, ModePermissive},
		}},
	}
	// A STRICT policy whose selector cannot be read or used applies, STRICT, to every pod
	// of its namespace at workload level: a valid workload-level policy there (PERMISSIVE,
	// with a port-level DISABLE) must not weaken it.
	dbLegacy := paIn("foo", "db-legacy", `
selector:
  matchLabels:
    app: db
mtls:
  mode: PERMISSIVE
portLevelMtls:
  8080:
    mode: DISABLE`)
	for _, sel := range []struct{ name, selector, err string }{
		{"a wildcard", "matchLabels:\n    app: \"*\"", "wildcard not allowed"},
		{"an unquoted number", "matchLabels:\n    version: 2", "spec:"},
		{"a misspelt matchLabels", "matchLabel:\n    app: db", "unknown field"},
	} {
		tests = append(tests, struct {
			name   string
			doc    string
			err    string
			checks []modeCheck
		}{"a selector with " + sel.name + " beats the workload-level policies of its namespace",
			dbLegacy + "\n---\n" + paIn("foo", "strict-some", "selector:\n  "+sel.selector+"\nmtls:\n  mode: STRICT"), sel.err,
			[]modeCheck{{dbWorkload, 80, ModeStrict}, {dbWorkload, 8080, ModeStrict}, {webWorkload, 80, ModeStrict}, {barDB, 80, ModePermissive}}})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, errs := compileDocsErrs(t, tt.doc)
			if len(errs) != 1 || !strings.Contains(errs[0].Error(), tt.err) || !strings.Contains(errs[0].Error(), "enforced as STRICT") {
				t.Errorf("errors:\n%s\nwant one containing %q and the STRICT effect", errorsText(errs), tt.err)
			}
			for i, c := range tt.checks {
				if got := s.Mode(c.dst, c.port); got != c.want {
					t.Errorf("check %d: Mode(%s %v, %d) = %v, want %v", i, c.dst.Namespace, c.dst.Labels, c.port, got, c.want)
				}
			}
		})
	}
}

func TestUnknownModeNumber(t *testing.T) {
	s, errs := Compile("", nil, []PeerAuthentication{{Name: "x", Namespace: "foo", Spec: &securityv1beta1.PeerAuthentication{
		Mtls: &securityv1beta1.PeerAuthentication_MutualTLS{Mode: 9},
	}}})
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "spec.mtls.mode: unknown mode 9") {
		t.Errorf("errors:\n%s", errorsText(errs))
	}
	if m := s.Mode(dbWorkload, 80); m != ModeStrict {
		t.Errorf("Mode = %v", m)
	}
}

func TestPortLevelModeInAuthorize(t *testing.T) {
	s := compileDocs(t, docs(
		paIn("istio-system", "default", "mtls:\n  mode: STRICT"),
		paIn("foo", "db", `
selector:
  matchLabels:
    app: db
portLevelMtls:
  9100:
    mode: PERMISSIVE`)))
	runChecks(t, s, []check{
		allowed(dbWorkload, conn("", "10.0.0.1", 9100), ""),
		denied(dbWorkload, conn("", "10.0.0.1", 80), "istio-system/default"), // the workload policy is UNSET
		denied(webWorkload, conn("", "10.0.0.1", 9100), "istio-system/default"),
		allowed(webWorkload, conn("bar/x", "10.0.0.1", 9100), ""),
	})
}

func TestDisableNote(t *testing.T) {
	s := compileDocs(t, paIn("foo", "default", "mtls:\n  mode: DISABLE"))
	if n := strings.Join(s.Notes(), "\n"); !strings.Contains(n, "enforced as PERMISSIVE") {
		t.Errorf("notes = %q", n)
	}
	if !ModeDisable.AllowsPlaintext() || !ModePermissive.AllowsPlaintext() || ModeStrict.AllowsPlaintext() || Mode(0).AllowsPlaintext() {
		t.Error("AllowsPlaintext")
	}
	if s.Mode(dbWorkload, 1).String() != "DISABLE" || Mode(0).String() != "Mode(0)" {
		t.Error("String")
	}
}

func TestPeerAuthenticationWithoutNamespaceIsMeshStrict(t *testing.T) {
	s, errs := Compile("", nil, []PeerAuthentication{{Name: "lost", Spec: &securityv1beta1.PeerAuthentication{
		Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "db"}},
		Mtls:     &securityv1beta1.PeerAuthentication_MutualTLS{Mode: mtlsPermissive},
	}}})
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "PeerAuthentication /lost: metadata.namespace: must not be empty") {
		t.Errorf("errors:\n%s", errorsText(errs))
	}
	for _, w := range []Workload{dbWorkload, webWorkload, barDB} {
		if m := s.Mode(w, 80); m != ModeStrict {
			t.Errorf("Mode(%v) = %v", w, m)
		}
	}
}
