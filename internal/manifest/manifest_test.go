package manifest

import (
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

	if docs, errs, err := ReadDir(filepath.Join(dir, "missing")); len(docs)+len(errs) != 0 || err != nil {
		t.Errorf("a missing directory: %v %v %v, want nothing", docs, errs, err)
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
