// Package install puts the sluice-cni plugin on a node and takes it off again. The node
// agent (a DaemonSet with the host's CNI directories mounted) runs it at start and
// whenever the primary CNI plugin rewrites its config.
//
// Sluice does not bring its own network: it chains itself after whatever primary plugin
// the node has, by adding an entry to that plugin's config, the way Istio's install-cni
// does in chained mode. Every write is a temp file plus rename in the same directory, so
// the runtime, which may read the directory at any moment, never sees half a file.
package install

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
)

// Defaults for the Installer's optional fields: the standard kubelet/containerd paths.
const (
	DefaultBinDir     = "/opt/cni/bin"
	DefaultConfDir    = "/etc/cni/net.d"
	DefaultPluginName = "sluice-cni"
)

// Installer chains sluice-cni into the node's CNI config. Only PluginBinary is required,
// and only by Install.
type Installer struct {
	// BinDir is where the runtime looks for plugin binaries. Empty means DefaultBinDir.
	BinDir string
	// ConfDir holds the node's CNI network configs. Empty means DefaultConfDir.
	ConfDir string
	// PluginName is both the binary's name in BinDir and the "type" of our entry.
	// Empty means DefaultPluginName.
	PluginName string
	// PluginBinary is the path of the plugin binary to install, typically inside the
	// agent's image.
	PluginBinary string
	// PluginConfig holds the fields of our entry besides "type", e.g. "agentSocket" or
	// "excludeNamespaces". Nil means the plugin's defaults.
	PluginConfig map[string]any
	// Logger reports what was changed. Nil means slog.Default().
	Logger *slog.Logger
}

func (in *Installer) binDir() string     { return or(in.BinDir, DefaultBinDir) }
func (in *Installer) confDir() string    { return or(in.ConfDir, DefaultConfDir) }
func (in *Installer) pluginName() string { return or(in.PluginName, DefaultPluginName) }

func (in *Installer) log() *slog.Logger {
	if in.Logger != nil {
		return in.Logger
	}
	return slog.Default()
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// Install copies the plugin binary into BinDir and chains our entry into the primary
// config. It is idempotent: running it again leaves files untouched when nothing changed,
// and otherwise only updates our entry. The binary goes in first, so the runtime never
// reads a config naming a plugin it cannot find.
func (in *Installer) Install() error {
	if in.PluginBinary == "" {
		return errors.New("install sluice-cni: Installer.PluginBinary is not set")
	}
	if err := in.installBinary(); err != nil {
		return err
	}
	primary, err := in.primaryConfig()
	if err != nil {
		return err
	}
	return in.chainInto(primary)
}

// Uninstall removes our entry from every config in ConfDir, restoring a single-plugin
// file that Install had turned into a list, then deletes the binary. It is idempotent and
// does not stop at the first failure, so one bad file does not leave the rest chained.
func (in *Installer) Uninstall() error {
	var errs []error
	paths, err := confFiles(in.confDir())
	if err != nil {
		errs = append(errs, err)
	}
	for _, path := range paths {
		if isList(path) {
			errs = append(errs, in.unchainFrom(path))
		}
	}
	bin := filepath.Join(in.binDir(), in.pluginName())
	if err := os.Remove(bin); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove plugin binary: %w", err))
	} else if err == nil {
		in.log().Info("removed CNI plugin binary", "path", bin)
	}
	return errors.Join(errs...)
}

// installBinary copies PluginBinary to BinDir unless an identical copy is already there.
func (in *Installer) installBinary() error {
	data, err := os.ReadFile(in.PluginBinary)
	if err != nil {
		return fmt.Errorf("read plugin binary: %w", err)
	}
	dst := filepath.Join(in.binDir(), in.pluginName())
	if old, err := os.ReadFile(dst); err == nil && bytes.Equal(old, data) {
		if fi, err := os.Stat(dst); err == nil && fi.Mode().Perm() == 0o755 {
			return nil
		}
	}
	if err := writeAtomic(dst, data, 0o755); err != nil {
		return fmt.Errorf("install plugin binary into %s: %w", in.binDir(), err)
	}
	in.log().Info("installed CNI plugin binary", "path", dst)
	return nil
}

// primaryConfig returns the config file the runtime uses: the lexically first valid
// .conf, .conflist or .json file in ConfDir, as containerd and CRI-O pick it.
func (in *Installer) primaryConfig() (string, error) {
	dir := in.confDir()
	paths, err := confFiles(dir)
	if err != nil {
		return "", err
	}
	for _, path := range paths {
		data, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("read CNI config: %w", err)
		}
		if _, err := parseNetConf(data, isList(path)); err != nil {
			// The runtime skips it too; chaining into it would change nothing.
			in.log().Warn("skipping invalid CNI config", "path", path, "err", err)
			continue
		}
		return path, nil
	}
	return "", fmt.Errorf("no CNI network config in %s; install the primary CNI plugin first", dir)
}

// confFiles lists the files in dir the runtime would consider, sorted by name. Our temp
// files carry no CNI extension, so neither the runtime nor this function picks them up.
func confFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir) // sorted by name
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("read CNI config dir: %w", err)
	}
	var paths []string
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		switch filepath.Ext(e.Name()) {
		case ".conf", ".conflist", ".json":
			paths = append(paths, filepath.Join(dir, e.Name()))
		}
	}
	return paths, nil
}

// chainInto adds or updates our entry in the config at path. A single-plugin file is
// replaced by a .conflist of the same stem, marked so that Uninstall can restore it.
func (in *Installer) chainInto(path string) error {
	data, mode, err := readConf(path)
	if err != nil {
		return err
	}
	list := isList(path)
	nc, err := parseNetConf(data, list)
	if err != nil {
		return fmt.Errorf("parse CNI config %s: %w", path, err)
	}
	entry := map[string]any{}
	for k, v := range in.PluginConfig {
		entry[k] = v
	}
	entry["type"] = in.pluginName()

	target := path
	if !list {
		target = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
		if err := in.checkConvertTarget(target, filepath.Base(path)); err != nil {
			return err
		}
		nc.toList()
		entry[convertedFromKey] = filepath.Base(path)
	}
	if err := nc.chain(in.pluginName(), entry); err != nil {
		return err
	}
	out, err := nc.encode()
	if err != nil {
		return fmt.Errorf("encode CNI config: %w", err)
	}
	if list && bytes.Equal(out, data) {
		return nil
	}
	if err := writeAtomic(target, out, mode); err != nil {
		return fmt.Errorf("write CNI config: %w", err)
	}
	if !list {
		// The list is in place first; removing the single file afterwards makes the
		// runtime switch from unchained to chained, never to nothing.
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove converted CNI config: %w", err)
		}
		in.log().Info("converted CNI config to a list and chained plugin", "from", path, "to", target)
		return nil
	}
	in.log().Info("chained CNI plugin", "config", target)
	return nil
}

// checkConvertTarget refuses to overwrite a .conflist that someone else owns. One that
// Install made earlier from the same file may be replaced: the primary plugin has just
// rewritten its single config, which is the newer truth.
func (in *Installer) checkConvertTarget(target, from string) error {
	data, err := os.ReadFile(target)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read CNI config: %w", err)
	}
	if nc, err := parseNetConf(data, true); err == nil {
		if _, mark := nc.findOurs(in.pluginName()); mark == from {
			return nil
		}
	}
	return fmt.Errorf("cannot chain into %s: converting it would overwrite %s, which was not written by sluice; remove one of the two",
		filepath.Join(filepath.Dir(target), from), target)
}

// unchainFrom removes our entries from the conflist at path, if it has any.
func (in *Installer) unchainFrom(path string) error {
	data, mode, err := readConf(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	nc, err := parseNetConf(data, true)
	if err != nil {
		return nil // not a list the runtime would use, so not one we chained into
	}
	removed, from := nc.unchain(in.pluginName())
	if !removed {
		return nil
	}
	if from != "" && len(nc.plugins) == 1 {
		return in.restoreSingle(path, nc, from, mode)
	}
	out, err := nc.encode()
	if err != nil {
		return fmt.Errorf("encode CNI config: %w", err)
	}
	if err := writeAtomic(path, out, mode); err != nil {
		return fmt.Errorf("write CNI config: %w", err)
	}
	in.log().Info("unchained CNI plugin", "config", path)
	return nil
}

// restoreSingle writes nc, a list Install made from file from, back as that file and
// removes the list. If the primary plugin has meanwhile written from again, its version
// wins and only the list goes.
func (in *Installer) restoreSingle(path string, nc *netConf, from string, mode fs.FileMode) error {
	orig := filepath.Join(filepath.Dir(path), filepath.Base(from))
	if _, err := os.Stat(orig); errors.Is(err, fs.ErrNotExist) {
		if err := nc.toSingle(); err != nil {
			return fmt.Errorf("restore %s: %w", orig, err)
		}
		out, err := nc.encode()
		if err != nil {
			return fmt.Errorf("encode CNI config: %w", err)
		}
		if err := writeAtomic(orig, out, mode); err != nil {
			return fmt.Errorf("restore CNI config: %w", err)
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove converted CNI config: %w", err)
	}
	in.log().Info("unchained CNI plugin and restored single config", "config", orig, "removed", path)
	return nil
}

// readConf reads a config file and its permissions, which a rewrite keeps.
func readConf(path string) ([]byte, fs.FileMode, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, 0, fmt.Errorf("read CNI config: %w", err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, fmt.Errorf("read CNI config: %w", err)
	}
	return data, fi.Mode().Perm(), nil
}

// writeAtomic replaces path with data: a reader sees either the old file or the new one.
// The temp file is hidden and has no CNI extension, so a runtime listing the directory
// meanwhile ignores it.
func writeAtomic(path string, data []byte, mode fs.FileMode) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".sluice-tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
