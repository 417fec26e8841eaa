package policy

import (
	"net/netip"
	"strings"
	"testing"
)

// The tests write policies the way users do, as Istio YAML, so each case reads like the
// configuration it exercises.

func parseDocs(t *testing.T, docs string) ([]AuthorizationPolicy, []PeerAuthentication) {
	t.Helper()
	var aps []AuthorizationPolicy
	var pas []PeerAuthentication
	for _, doc := range strings.Split(docs, "\n---\n") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		switch {
		case strings.Contains(doc, "kind: AuthorizationPolicy"):
			p, err := ParseAuthorizationPolicyYAML([]byte(doc))
			if err != nil {
				t.Fatalf("parse: %v\n%s", err, doc)
			}
			aps = append(aps, p)
		case strings.Contains(doc, "kind: PeerAuthentication"):
			p, err := ParsePeerAuthenticationYAML([]byte(doc))
			if err != nil {
				t.Fatalf("parse: %v\n%s", err, doc)
			}
			pas = append(pas, p)
		default:
			t.Fatalf("test document without a known kind:\n%s", doc)
		}
	}
	return aps, pas
}

// compileDocs compiles YAML documents and fails the test on any compile error.
func compileDocs(t *testing.T, docs string) *Set {
	t.Helper()
	s, errs := compileDocsErrs(t, docs)
	for _, err := range errs {
		t.Errorf("unexpected compile error: %v", err)
	}
	return s
}

func compileDocsErrs(t *testing.T, docs string) (*Set, []error) {
	t.Helper()
	aps, pas := parseDocs(t, docs)
	return Compile("", aps, pas)
}

var (
	dbWorkload  = Workload{Namespace: "foo", Labels: map[string]string{"app": "db", "version": "v1"}}
	webWorkload = Workload{Namespace: "foo", Labels: map[string]string{"app": "web"}}
	barDB       = Workload{Namespace: "bar", Labels: map[string]string{"app": "db"}}
	rootDB      = Workload{Namespace: "istio-system", Labels: map[string]string{"app": "db"}}
)

// conn builds a connection to 10.0.1.1:port. id is "ns/sa" for a cluster.local peer, a
// full SPIFFE ID, or "" for plaintext.
func conn(id, src string, port uint16) Conn {
	if id != "" && !strings.HasPrefix(id, "spiffe://") {
		ns, sa, _ := strings.Cut(id, "/")
		id = "spiffe://cluster.local/ns/" + ns + "/sa/" + sa
	}
	return Conn{SrcIdentity: id, SrcIP: netip.MustParseAddr(src), DstIP: netip.MustParseAddr("10.0.1.1"), DstPort: port}
}

// ap is an AuthorizationPolicy document in namespace foo (or ns) with the given spec.
func ap(name, spec string) string { return apIn("foo", name, spec) }

func apIn(ns, name, spec string) string {
	return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: " + name +
		"\n  namespace: " + ns + "\nspec:\n" + indent(spec)
}

func paIn(ns, name, spec string) string {
	return "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: " + name +
		"\n  namespace: " + ns + "\nspec:\n" + indent(spec)
}

func indent(s string) string {
	lines := strings.Split(strings.Trim(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = "  " + l
	}
	return strings.Join(lines, "\n")
}

func docs(d ...string) string { return strings.Join(d, "\n---\n") }

func errorsText(errs []error) string {
	var b strings.Builder
	for _, e := range errs {
		b.WriteString(e.Error())
		b.WriteString("\n")
	}
	return b.String()
}
