//go:build linux

package lab

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"
)

const (
	sluiceModule  = "github.com/sluicemesh/sluice"
	pluginsModule = "github.com/containernetworking/plugins"
	stampFileName = ".built-from"
)

// pluginPackages are the reference plugins the lab chain starts with, by binary name.
var pluginPackages = map[string]string{
	"bridge":     pluginsModule + "/plugins/main/bridge",
	"host-local": pluginsModule + "/plugins/ipam/host-local",
}

// DefaultCNIBinDir is where BuildPlugins puts the plugins when given no directory:
// sluice/cni-bin/<plugins version> under the user's cache directory ($XDG_CACHE_HOME or
// ~/.cache), outside the source tree.
func DefaultCNIBinDir() string {
	base, err := os.UserCacheDir()
	if err != nil {
		base = filepath.Join(os.TempDir(), "sluice-cache")
	}
	return filepath.Join(base, "sluice", "cni-bin", pluginsVersion())
}

// pluginsVersion is the version of the plugins module that go.mod requires: the one this
// binary was linked with, or, for binaries without module information (test binaries),
// what the go command says about the module around the working directory.
var pluginsVersion = sync.OnceValue(func() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == pluginsModule {
				if d.Replace != nil {
					return d.Replace.Version
				}
				return d.Version
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if goTool, err := findGo(); err == nil {
		if dir := sluiceModuleDir(ctx, goTool); dir != "" {
			if v, err := listPluginsVersion(ctx, goTool, dir); err == nil {
				return v
			}
		}
	}
	return "unknown"
})

func listPluginsVersion(ctx context.Context, goTool, modDir string) (string, error) {
	return runGo(ctx, goTool, modDir, "list", "-m", "-f", "{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}", pluginsModule)
}

// BuildPlugins builds the bridge and host-local CNI plugins into dir (DefaultCNIBinDir()
// when empty) with the Go toolchain, from the version of github.com/containernetworking/plugins
// that Sluice's go.mod requires. Run from inside the Sluice source tree it builds with
// that module's go.mod; elsewhere it installs the version this binary was linked with.
// It does nothing when dir already holds binaries built from the same version by the same
// toolchain.
func BuildPlugins(ctx context.Context, dir string) error {
	if dir == "" {
		dir = DefaultCNIBinDir()
	}
	goTool, err := findGo()
	if err != nil {
		return err
	}
	goVersion, err := runGo(ctx, goTool, "", "env", "GOVERSION")
	if err != nil {
		return err
	}
	modDir := sluiceModuleDir(ctx, goTool)
	version := pluginsVersion()
	if modDir != "" {
		if version, err = listPluginsVersion(ctx, goTool, modDir); err != nil {
			return err
		}
	} else if version == "unknown" {
		return errors.New("build CNI plugins: run from inside the Sluice source tree (no go.mod found and this binary does not record the plugins version)")
	}
	stamp := fmt.Sprintf("%s@%s %s\n", pluginsModule, version, goVersion)
	if pluginsUpToDate(dir, stamp) {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("build CNI plugins: %w", err)
	}
	tmp, err := os.MkdirTemp(dir, ".build")
	if err != nil {
		return fmt.Errorf("build CNI plugins: %w", err)
	}
	defer os.RemoveAll(tmp)
	for _, name := range slices.Sorted(maps.Keys(pluginPackages)) {
		pkg := pluginPackages[name]
		var args []string
		var env []string
		if modDir != "" {
			args = []string{"build", "-trimpath", "-o", filepath.Join(tmp, name), pkg}
		} else {
			args = []string{"install", "-trimpath", pkg + "@" + version}
			env = []string{"GOBIN=" + tmp, "GOFLAGS="}
		}
		cmd := exec.CommandContext(ctx, goTool, args...)
		cmd.Dir = modDir
		cmd.Env = append(append(os.Environ(), "CGO_ENABLED=0"), env...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build CNI plugin %s: go %s: %w\n%s", name, strings.Join(args, " "), err, out)
		}
		// Rename into place so a concurrent user never runs a half-written binary.
		if err := os.Rename(filepath.Join(tmp, name), filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("build CNI plugin %s: %w", name, err)
		}
	}
	return writeFileAtomic(filepath.Join(dir, stampFileName), []byte(stamp))
}

func pluginsUpToDate(dir, stamp string) bool {
	b, err := os.ReadFile(filepath.Join(dir, stampFileName))
	if err != nil || string(b) != stamp {
		return false
	}
	for name := range pluginPackages {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

func findGo() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	if goroot := os.Getenv("GOROOT"); goroot != "" {
		if p := filepath.Join(goroot, "bin", "go"); fileExists(p) {
			return p, nil
		}
	}
	if p := "/usr/local/go/bin/go"; fileExists(p) {
		return p, nil
	}
	return "", errors.New("build CNI plugins: no go command in PATH (sudo may have reset PATH: try `sudo env PATH=$PATH ...`), or pass a CNIBinDir that already holds bridge and host-local")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// sluiceModuleDir returns the root of the Sluice module around the working directory,
// or "" when the working directory is not inside it.
func sluiceModuleDir(ctx context.Context, goTool string) string {
	gomod, err := runGo(ctx, goTool, "", "env", "GOMOD")
	if err != nil || gomod == "" || gomod == os.DevNull {
		return ""
	}
	f, err := os.Open(gomod)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if mod, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "module "); ok {
			if strings.Trim(strings.TrimSpace(mod), `"`) == sluiceModule {
				return filepath.Dir(gomod)
			}
			return ""
		}
	}
	return ""
}

func runGo(ctx context.Context, goTool, dir string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, goTool, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return strings.TrimSpace(string(out)), nil
}
