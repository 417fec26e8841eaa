package manifest

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestReadDir(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) {
		t.Helper()
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a/multi.yaml", "# leading comment\n---\nkind: Namespace\nmetadata: {name: x}\n---\n# only a comment\n---\nkind: Pod\nmetadata: {name: p}\n")
	write("b.json", `{"kind": "Service", "metadata": {"name": "s"}}`)
	write("c.yml", "kind: Pod\nmetadata: [broken\n")
	write("d.yaml", "- a list\n- not an object\n")
	write("notes.txt", "kind: Pod\n")

	docs, errs, err := ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range docs {
		got = append(got, d.Kind+"@"+filepath.Base(d.Where))
	}
	if want := "Namespace@multi.yaml#2 Pod@multi.yaml#4 Service@b.json#1"; strings.Join(got, " ") != want {
		t.Errorf("docs %v, want %s", got, want)
	}
	if len(errs) != 2 || !strings.Contains(errs[0].Error(), "c.yml#1") || !strings.Contains(errs[1].Error(), "d.yaml#1: not an object") {
		t.Errorf("errors %v, want c.yml#1 and d.yaml#1 named", errs)
	}

	if docs, _, err := ReadDir(filepath.Join(dir, "missing")); len(docs) != 0 || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a missing directory: %v, %v; want no documents and an error matching fs.ErrNotExist", docs, err)
	}
}

// Documents split where kubectl splits them: a comment may follow the separator, a
// "---" inside a block scalar is text, and anything else after a separator is an error,
// never a document silently dropped.
func TestReadDirSeparators(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a.yaml"), []byte(`kind: ConfigMap
metadata: {name: embedded}
data:
  inner.yaml: |
    kind: Pod
    ---
    kind: Pod
--- # the policies
kind: AuthorizationPolicy
metadata: {name: deny}
`), 0o644)
	os.WriteFile(filepath.Join(dir, "b.yaml"), []byte("kind: Pod\n--- kind: Service\n"), 0o644)
	docs, errs, err := ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if kinds := kindsOf(docs); kinds != "ConfigMap AuthorizationPolicy" {
		t.Errorf("kinds %q, want the ConfigMap (whole) and the policy after the commented separator", kinds)
	}
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "b.yaml: line 2") {
		t.Errorf("errors %v, want b.yaml's line 2 named", errs)
	}
}

// Lists nest; a bad item is reported without hiding its siblings; an object that merely
// has an "items" field is an object.
func TestReadDirNestedLists(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "x.yaml"), []byte(`kind: List
items:
- kind: List
  items:
  - {kind: AuthorizationPolicy, metadata: {name: deep}}
- null
- {kind: Widget, items: {a: 1}}
`), 0o644)
	docs, errs, err := ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if kinds := kindsOf(docs); kinds != "AuthorizationPolicy Widget" {
		t.Errorf("kinds %q, want the nested policy and the Widget", kinds)
	}
	var fe *FileError
	if len(errs) != 1 || !errors.As(errs[0], &fe) || !strings.HasSuffix(fe.Path, "x.yaml") || !strings.Contains(errs[0].Error(), "items[1]: not an object") {
		t.Errorf("errors %v, want items[1] named, as a FileError of x.yaml", errs)
	}
}

// A List, as `kubectl get -o yaml` writes it, is its items.
func TestReadDirExpandsLists(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "export.yaml"), []byte(`apiVersion: v1
kind: List
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: a, namespace: x}
- apiVersion: v1
  kind: Namespace
  metadata: {name: x}
`), 0o644)
	docs, errs, err := ReadDir(dir)
	if err != nil || len(errs) != 0 {
		t.Fatal(err, errs)
	}
	if len(docs) != 2 || docs[0].Kind != "AuthorizationPolicy" || docs[1].Kind != "Namespace" ||
		!strings.HasSuffix(docs[1].Where, "export.yaml#1 items[1]") || !strings.Contains(string(docs[0].JSON), `"name":"a"`) {
		t.Errorf("docs %+v, want the list's two items", docs)
	}
}

func TestStampNoticesChanges(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.yaml")
	os.WriteFile(p, []byte("kind: Pod\n"), 0o644)
	s1, err := Stamp(dir)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "ignored.md"), []byte("x"), 0o644)
	if s2, _ := Stamp(dir); s2 != s1 {
		t.Error("a file that is not a manifest changed the stamp")
	}
	os.Chtimes(p, time.Now().Add(time.Hour), time.Now().Add(time.Hour))
	if s3, _ := Stamp(dir); s3 == s1 {
		t.Error("a modified manifest left the stamp unchanged")
	}
}

// kindsOf lists the kinds of docs, in order, separated by spaces.
func kindsOf(docs []Doc) string {
	var kinds []string
	for _, d := range docs {
		kinds = append(kinds, d.Kind)
	}
	return strings.Join(kinds, " ")
}
