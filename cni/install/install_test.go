package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// calicoList is a primary conflist with fields we know nothing about, a number too big
// for float64 and characters encoding/json likes to escape; all must survive.
const calicoList = `{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "x-vendor-serial": 12345678901234567890,
  "plugins": [
    {"type": "calico", "log_level": "info", "datastore_type": "kubernetes", "mtu": 1440,
     "ipam": {"type": "calico-ipam", "assign_ipv4": "true"}, "policy": {"type": "k8s"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}, "note": "a<b && c>d"}
  ]
}`

const flannelConf = `{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "type": "flannel",
  "delegate": {"hairpinMode": true, "isDefaultGateway": true},
  "x-ratio": 0.30000000000000004
}`

type installEnv struct {
	in      *Installer
	confDir string
	binDir  string
	src     []byte
}

func newInstallEnv(t *testing.T, files map[string]string) *installEnv {
	t.Helper()
	root := t.TempDir()
	e := &installEnv{
		confDir: filepath.Join(root, "net.d"),
		binDir:  filepath.Join(root, "bin"),
		src:     []byte("#!/bin/sh\necho fake sluice-cni\n"),
	}
	for _, d := range []string{e.confDir, e.binDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range files {
		writeFile(t, filepath.Join(e.confDir, name), content)
	}
	srcPath := filepath.Join(root, "sluice-cni-image-copy")
	writeFile(t, srcPath, string(e.src))
	e.in = &Installer{
		BinDir:       e.binDir,
		ConfDir:      e.confDir,
		PluginBinary: srcPath,
		PluginConfig: map[string]any{"agentSocket": "/run/sluice/cni.sock", "excludeNamespaces": []string{"kube-system"}},
		Logger:       slog.New(slog.NewTextHandler(t.Output(), nil)),
	}
	return e
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (e *installEnv) read(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.confDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// files lists ConfDir, so tests notice stray temp files and leftovers.
func (e *installEnv) files(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(e.confDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	return names
}

// decode parses JSON keeping numbers as written, so a comparison sees lost precision.
func decode(t *testing.T, s string) any {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, s)
	}
	return v
}

func assertJSONEqual(t *testing.T, got, want string) {
	t.Helper()
	if g, w := decode(t, got), decode(t, want); !reflect.DeepEqual(g, w) {
		t.Errorf("config\n%s\nwant (as JSON)\n%s", got, want)
	}
}

// plugins returns the plugin entries of a conflist.
func plugins(t *testing.T, s string) []map[string]any {
	t.Helper()
	var l struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal([]byte(s), &l); err != nil {
		t.Fatal(err)
	}
	return l.Plugins
}

func types(ps []map[string]any) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p["type"].(string))
	}
	return out
}

func TestInstallChainsIntoConflist(t *testing.T) {
	e := newInstallEnv(t, map[string]string{"10-calico.conflist": calicoList})
	if err := e.in.Install(); err != nil {
		t.Fatal(err)
	}

	got := e.read(t, "10-calico.conflist")
	want := strings.Replace(calicoList, `"note": "a<b && c>d"}`,
		`"note": "a<b && c>d"}, {"type": "sluice-cni", "agentSocket": "/run/sluice/cni.sock", "excludeNamespaces": ["kube-system"]}`, 1)
	assertJSONEqual(t, got, want)
	if !strings.Contains(got, "12345678901234567890") || !strings.Contains(got, "a<b && c>d") {
		t.Errorf("user values not kept verbatim:\n%s", got)
	}

	bin := filepath.Join(e.binDir, "sluice-cni")
	b, err := os.ReadFile(bin)
	if err != nil || !bytes.Equal(b, e.src) {
		t.Errorf("binary = %q, %v; want a copy of the source", b, err)
	}
	if fi, err := os.Stat(bin); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("binary mode = %v, %v; want 0755", fi.Mode(), err)
	}
	if names := e.files(t); len(names) != 1 {
		t.Errorf("conf dir holds %v, want only the conflist", names)
	}
}

func TestInstallPicksLexicallyFirstValidConfig(t *testing.T) {
	e := newInstallEnv(t, map[string]string{
		"00-broken.conflist":  `{"name":"x","plugins":[]}`, // skipped by the runtime too
		"01-notes.txt":        `not a config`,
		"05-cilium.conflist":  `{"cniVersion":"1.0.0","name":"cilium","plugins":[{"type":"cilium-cni"}]}`,
		"10-calico.conflist":  calicoList,
		".05-hidden.sluice-x": `{}`,
	})
	if err := e.in.Install(); err != nil {
		t.Fatal(err)
	}
	if got := types(plugins(t, e.read(t, "05-cilium.conflist"))); !reflect.DeepEqual(got, []string{"cilium-cni", "sluice-cni"}) {
		t.Errorf("05-cilium plugins = %v", got)
	}
	if got := e.read(t, "10-calico.conflist"); got != calicoList {
		t.Errorf("10-calico.conflist was modified:\n%s", got)
	}
	if got := e.read(t, "00-broken.conflist"); got != `{"name":"x","plugins":[]}` {
		t.Errorf("00-broken.conflist was modified:\n%s", got)
	}
}

func TestInstallConvertsSingleConf(t *testing.T) {
	for _, name := range []string{"10-flannel.conf", "10-flannel.json"} {
		t.Run(name, func(t *testing.T) {
			e := newInstallEnv(t, map[string]string{name: flannelConf})
			if err := e.in.Install(); err != nil {
				t.Fatal(err)
			}
			if names := e.files(t); !reflect.DeepEqual(names, []string{"10-flannel.conflist"}) {
				t.Fatalf("conf dir holds %v, want the single file replaced by 10-flannel.conflist", names)
			}
			assertJSONEqual(t, e.read(t, "10-flannel.conflist"), `{
  "name": "cbr0", "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}, "x-ratio": 0.30000000000000004},
    {"type": "sluice-cni", "agentSocket": "/run/sluice/cni.sock", "excludeNamespaces": ["kube-system"], "sluiceConvertedFrom": "`+name+`"}
  ]}`)

			// Uninstall gives back the single file, value for value.
			if err := e.in.Uninstall(); err != nil {
				t.Fatal(err)
			}
			if names := e.files(t); !reflect.DeepEqual(names, []string{name}) {
				t.Fatalf("after uninstall conf dir holds %v, want %s back", names, name)
			}
			assertJSONEqual(t, e.read(t, name), flannelConf)
		})
	}
}

func TestInstallIsIdempotent(t *testing.T) {
	for _, start := range []string{"10-calico.conflist", "10-flannel.conf"} {
		t.Run(start, func(t *testing.T) {
			content := calicoList
			if strings.HasSuffix(start, ".conf") {
				content = flannelConf
			}
			e := newInstallEnv(t, map[string]string{start: content})
			if err := e.in.Install(); err != nil {
				t.Fatal(err)
			}
			listName := strings.TrimSuffix(start, filepath.Ext(start)) + ".conflist"
			first := e.read(t, listName)
			fi1, _ := os.Stat(filepath.Join(e.confDir, listName))

			if err := e.in.Install(); err != nil {
				t.Fatal(err)
			}
			if second := e.read(t, listName); second != first {
				t.Errorf("second install changed the file:\n%s\nwas\n%s", second, first)
			}
			// An unchanged file is not rewritten, so the runtime's watcher stays quiet.
			if fi2, _ := os.Stat(filepath.Join(e.confDir, listName)); !os.SameFile(fi1, fi2) {
				t.Errorf("second install replaced an unchanged file")
			}

			// New settings update our entry in place; there is still one entry.
			e.in.PluginConfig = map[string]any{"agentSocket": "/other.sock", "timeout": "2s"}
			if err := e.in.Install(); err != nil {
				t.Fatal(err)
			}
			ps := plugins(t, e.read(t, listName))
			last := ps[len(ps)-1]
			if n := strings.Count(e.read(t, listName), `"sluice-cni"`); n != 1 {
				t.Errorf("%d sluice-cni entries, want 1", n)
			}
			if last["agentSocket"] != "/other.sock" || last["timeout"] != "2s" || last["excludeNamespaces"] != nil {
				t.Errorf("our entry = %v, want exactly the new settings", last)
			}
			if _, converted := last[convertedFromKey]; converted != strings.HasSuffix(start, ".conf") {
				t.Errorf("conversion marker lost or invented: %v", last)
			}
		})
	}
}

func TestInstallCollapsesDuplicateEntries(t *testing.T) {
	e := newInstallEnv(t, map[string]string{"10-x.conflist": `{"cniVersion":"1.0.0","name":"x","plugins":[
		{"type":"bridge"},{"type":"sluice-cni","old":1},{"type":"portmap"},{"type":"sluice-cni","old":2}]}`})
	if err := e.in.Install(); err != nil {
		t.Fatal(err)
	}
	ps := plugins(t, e.read(t, "10-x.conflist"))
	if got := types(ps); !reflect.DeepEqual(got, []string{"bridge", "sluice-cni", "portmap"}) {
		t.Errorf("plugins = %v, want our entry kept once, in its place", got)
	}
	if ps[1]["old"] != nil {
		t.Errorf("stale field kept: %v", ps[1])
	}
}

func TestUninstallRestoresConflist(t *testing.T) {
	e := newInstallEnv(t, map[string]string{"10-calico.conflist": calicoList})
	if err := e.in.Install(); err != nil {
		t.Fatal(err)
	}
	for i := range 2 { // the second run finds nothing to do
		if err := e.in.Uninstall(); err != nil {
			t.Fatalf("uninstall %d: %v", i+1, err)
		}
		assertJSONEqual(t, e.read(t, "10-calico.conflist"), calicoList)
		if _, err := os.Stat(filepath.Join(e.binDir, "sluice-cni")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("binary still there: %v", err)
		}
	}
}

func TestUninstallKeepsPrimarysNewerConf(t *testing.T) {
	e := newInstallEnv(t, map[string]string{"10-flannel.conf": flannelConf})
	if err := e.in.Install(); err != nil {
		t.Fatal(err)
	}
	// The primary plugin's own installer writes its file again while we are chained.
	newer := `{"name":"cbr0","cniVersion":"1.0.0","type":"flannel","delegate":{}}`
	writeFile(t, filepath.Join(e.confDir, "10-flannel.conf"), newer)
	if err := e.in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if names := e.files(t); !reflect.DeepEqual(names, []string{"10-flannel.conf"}) {
		t.Fatalf("conf dir holds %v", names)
	}
	if got := e.read(t, "10-flannel.conf"); got != newer {
		t.Errorf("primary's newer config overwritten:\n%s", got)
	}
}

func TestInstallReconvertsRewrittenConf(t *testing.T) {
	e := newInstallEnv(t, map[string]string{"10-flannel.conf": flannelConf})
	if err := e.in.Install(); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(e.confDir, "10-flannel.conf"), `{"name":"cbr0","cniVersion":"1.0.0","type":"flannel","new":true}`)
	if err := e.in.Install(); err != nil {
		t.Fatal(err)
	}
	if names := e.files(t); !reflect.DeepEqual(names, []string{"10-flannel.conflist"}) {
		t.Fatalf("conf dir holds %v", names)
	}
	if ps := plugins(t, e.read(t, "10-flannel.conflist")); len(ps) != 2 || ps[0]["new"] != true {
		t.Errorf("plugins = %v, want the rewritten flannel config chained", ps)
	}
}

func TestInstallErrors(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string
		mutate  func(*Installer)
		wantErr string
	}{
		{name: "empty conf dir", wantErr: "no CNI network config in "},
		{name: "only invalid configs", files: map[string]string{"10-x.conf": `{"name":"x"}`, "20-y.conflist": `[]`},
			wantErr: "install the primary CNI plugin first"},
		{name: "no plugin binary set", files: map[string]string{"10-calico.conflist": calicoList},
			mutate: func(in *Installer) { in.PluginBinary = "" }, wantErr: "PluginBinary"},
		{name: "plugin binary missing", files: map[string]string{"10-calico.conflist": calicoList},
			mutate: func(in *Installer) { in.PluginBinary = "/nonexistent/sluice-cni" }, wantErr: "read plugin binary"},
		{name: "conversion would overwrite a foreign conflist",
			files:   map[string]string{"10-a.conf": flannelConf, "10-a.conflist": calicoList},
			wantErr: "not written by sluice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newInstallEnv(t, tt.files)
			if tt.mutate != nil {
				tt.mutate(e.in)
			}
			err := e.in.Install()
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Install() = %v, want error mentioning %q", err, tt.wantErr)
			}
			for name, content := range tt.files {
				if got := e.read(t, name); got != content {
					t.Errorf("%s modified by a failed install:\n%s", name, got)
				}
			}
		})
	}
}

func TestUninstallWithoutConfDir(t *testing.T) {
	in := &Installer{BinDir: t.TempDir(), ConfDir: filepath.Join(t.TempDir(), "missing")}
	if err := in.Uninstall(); err != nil {
		t.Errorf("Uninstall on a bare node: %v", err)
	}
}
