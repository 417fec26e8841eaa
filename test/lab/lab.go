//go:build linux

package lab

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
)

const (
	fabricBridge = "br0"
	// lockTimeout bounds waiting for another process's change to the same lab in calls
	// that take no context.
	lockTimeout = time.Minute
)

// Lab is a running lab. Its methods are safe for concurrent use, also with other
// processes working on the same lab through Open: changes are serialised by a file lock
// and written to the state file before the objects they describe are made.
type Lab struct {
	cfg Config
	log *slog.Logger

	mu sync.Mutex // guards st
	st *state
}

// Up creates a lab: the fabric, cfg.Nodes nodes with their routes, cgroups and CNI
// configs, and the registry. It fails if a lab of that name exists (see Cleanup). On
// error everything created so far is removed again. With an empty cfg.CNIBinDir it first
// builds the CNI plugins (BuildPlugins), which needs the Go toolchain.
func Up(ctx context.Context, cfg Config) (_ *Lab, err error) {
	cfg, err = cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, stateFileName)); err == nil {
		return nil, fmt.Errorf("lab %s already exists (state in %s); remove it with `sluicectl lab down --name %s` or lab.Cleanup", cfg.Name, cfg.StateDir, cfg.Name)
	}
	if cfg.CNIBinDir == "" {
		cfg.CNIBinDir = DefaultCNIBinDir()
		if err := BuildPlugins(ctx, cfg.CNIBinDir); err != nil {
			return nil, fmt.Errorf("lab %s: %w", cfg.Name, err)
		}
	}
	if err := checkPlugins(cfg); err != nil {
		return nil, fmt.Errorf("lab %s: %w", cfg.Name, err)
	}
	if err := checkCgroup2(filepath.Dir(cfg.CgroupRoot)); err != nil {
		return nil, fmt.Errorf("lab %s: %w", cfg.Name, err)
	}
	// Down removes StateDir and kills everything in CgroupRoot: both must be the lab's
	// own, never a directory that held something before.
	if err := checkFresh(cfg); err != nil {
		return nil, fmt.Errorf("lab %s: %w", cfg.Name, err)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return nil, fmt.Errorf("lab %s: create state dir: %w", cfg.Name, err)
	}
	unlock, err := lockState(ctx, cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("lab %s: %w", cfg.Name, err)
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(cfg.StateDir, stateFileName)); err == nil {
		return nil, fmt.Errorf("lab %s was created by another process just now", cfg.Name)
	}

	l := &Lab{cfg: cfg, log: cfg.Logger, st: planState(cfg)}
	if err := writeState(cfg.StateDir, l.st); err != nil {
		return nil, fmt.Errorf("lab %s: %w", cfg.Name, err)
	}
	defer func() {
		if err != nil {
			// Undo with a fresh context: ctx may be why we failed.
			tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
			defer cancel()
			err = errors.Join(err, l.teardown(tctx, l.st))
		}
	}()
	start := time.Now()
	if err := l.build(); err != nil {
		return nil, fmt.Errorf("lab %s: %w", cfg.Name, err)
	}
	l.log.Info("lab up", "name", cfg.Name, "nodes", cfg.Nodes, "state", cfg.StateDir, "took", time.Since(start).Round(time.Millisecond))
	return l, nil
}

func checkFresh(cfg Config) error {
	if _, err := os.Stat(cfg.CgroupRoot); !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("cgroup %s already exists (stat: %v); the lab must create its CgroupRoot: remove leftovers with lab.Cleanup / `sluicectl lab down --name %s`, or choose another", cfg.CgroupRoot, err, cfg.Name)
	}
	entries, err := os.ReadDir(cfg.StateDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("state dir: %w", err)
	}
	for _, e := range entries {
		if e.Name() != lockFileName {
			return fmt.Errorf("state dir %s is not empty (has %s); the lab must own it: remove leftovers with lab.Cleanup / `sluicectl lab down --name %s`, or choose another", cfg.StateDir, e.Name(), cfg.Name)
		}
	}
	return nil
}

// planState names everything Up will create, before it exists.
func planState(cfg Config) *state {
	st := &state{
		Version: stateVersion,
		Config:  cfg,
		Fabric: Fabric{
			NetnsPath:  netnsPath(cfg.fabricName()),
			IP:         cfg.fabricIP(),
			CgroupPath: filepath.Join(cfg.CgroupRoot, cfg.fabricName()),
		},
		Namespaces: map[string]*namespace{},
	}
	for i := range cfg.Nodes {
		name := cfg.nodeName(i)
		cidr := cfg.podCIDR(i)
		st.Nodes = append(st.Nodes, Node{
			Name:           name,
			Index:          i,
			NetnsPath:      netnsPath(name),
			IP:             cfg.nodeIP(i),
			PodCIDR:        cidr,
			Gateway:        cidr.Addr().Next(),
			CgroupPath:     filepath.Join(cfg.CgroupRoot, name),
			HostCgroupPath: filepath.Join(cfg.CgroupRoot, name+"-host"),
			Dir:            cfg.nodeDir(name),
			ConfDir:        filepath.Join(cfg.nodeDir(name), "net.d"),
		})
	}
	return st
}

func (l *Lab) build() error {
	st := l.st
	if _, err := createNetns(l.cfg.fabricName()); err != nil {
		return err
	}
	fabricPrefix := netip.PrefixFrom(st.Fabric.IP, l.cfg.NodeNet.Bits())
	var brIndex int
	err := withNetlink(st.Fabric.NetnsPath, func(h *netlink.Handle) error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: fabricBridge}}
		if err := h.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge %s: %w", fabricBridge, err)
		}
		if err := h.AddrAdd(br, &netlink.Addr{IPNet: ipNet(fabricPrefix)}); err != nil {
			return fmt.Errorf("address %s on %s: %w", fabricPrefix, fabricBridge, err)
		}
		brIndex = br.Index
		return h.LinkSetUp(br)
	})
	if err != nil {
		return fmt.Errorf("fabric: %w", err)
	}
	for _, dir := range []string{l.cfg.CgroupRoot, st.Fabric.CgroupPath} {
		if err := makeCgroup(dir); err != nil {
			return err
		}
	}
	for _, dir := range []string{registryNodes, registryNamespaces, registryPods} {
		if err := os.MkdirAll(filepath.Join(l.cfg.registryDir(), dir), 0o755); err != nil {
			return fmt.Errorf("create registry: %w", err)
		}
	}
	for _, n := range st.Nodes {
		if err := l.buildNode(n, brIndex); err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
	}
	// The fabric routes each pod subnet to its node, so pods reach it (and it them)
	// with their own addresses.
	return withNetlink(st.Fabric.NetnsPath, func(h *netlink.Handle) error {
		for _, n := range st.Nodes {
			r := &netlink.Route{Dst: ipNet(n.PodCIDR), Gw: n.IP.AsSlice()}
			if err := h.RouteAdd(r); err != nil {
				return fmt.Errorf("fabric: route %s via %s: %w", n.PodCIDR, n.IP, err)
			}
		}
		return nil
	})
}

// Open returns the lab that an earlier Up (maybe in another process) created with the
// same Name and StateDir; other fields of cfg except Logger are taken from the state.
func Open(cfg Config) (*Lab, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	st, err := readState(cfg.StateDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("lab %s does not exist (no state in %s); create it with `sluicectl lab up --name %s`", cfg.Name, cfg.StateDir, cfg.Name)
	}
	if err != nil {
		return nil, err
	}
	st.Config.Logger = cfg.Logger
	return &Lab{cfg: st.Config, log: cfg.Logger, st: st}, nil
}

// Down removes the lab: CNI DEL for every pod, then processes in its cgroups, cgroups,
// network namespaces and state. It carries on past errors and returns them joined; what
// it could not remove stays in the state file for a later Down or Cleanup.
func (l *Lab) Down(ctx context.Context) error {
	if _, err := os.Stat(l.cfg.StateDir); errors.Is(err, fs.ErrNotExist) {
		return nil // already down
	}
	unlock, err := lockState(ctx, l.cfg.StateDir)
	if err != nil {
		return fmt.Errorf("lab %s down: %w", l.cfg.Name, err)
	}
	defer unlock()
	st, err := readState(l.cfg.StateDir)
	if errors.Is(err, fs.ErrNotExist) {
		st, err = l.snapshot(), nil // someone else removed the state; clean what we know
	}
	if err != nil {
		return fmt.Errorf("lab %s down: %w", l.cfg.Name, err)
	}
	st.Config.Logger = l.log
	err = l.teardown(ctx, st)
	l.mu.Lock()
	l.st = st
	l.mu.Unlock()
	if err != nil {
		return fmt.Errorf("lab %s down: %w", l.cfg.Name, err)
	}
	l.log.Info("lab down", "name", l.cfg.Name)
	return nil
}

// Cleanup removes what a lab named name left behind with the default StateDir and
// CgroupRoot, whether or not its state file survived: it is Down for a lab whose process
// is gone. Finding nothing is not an error.
func Cleanup(name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return CleanupConfig(ctx, Config{Name: name})
}

// CleanupConfig is Cleanup for a lab made with a non-default StateDir or CgroupRoot.
func CleanupConfig(ctx context.Context, cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	var stateErr error
	st, err := readState(cfg.StateDir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			stateErr = err // still clean up by name below
		}
		st = &state{Version: stateVersion, Config: cfg, Namespaces: map[string]*namespace{}}
	}
	st.Config.Logger = cfg.Logger
	l := &Lab{cfg: st.Config, log: cfg.Logger, st: st}
	if _, err := os.Stat(cfg.StateDir); err == nil {
		unlock, err := lockState(ctx, cfg.StateDir)
		if err != nil {
			return fmt.Errorf("lab %s cleanup: %w", cfg.Name, err)
		}
		defer unlock()
	}
	if err := errors.Join(stateErr, l.teardown(ctx, st)); err != nil {
		return fmt.Errorf("lab %s cleanup: %w", cfg.Name, err)
	}
	return nil
}

// teardown removes everything st lists, and every netns with the lab's prefix. The
// caller holds the state lock. Pods whose kernel objects are gone leave st; when nothing
// failed the state directory goes too, else st is written back for the next attempt.
func (l *Lab) teardown(ctx context.Context, st *state) error {
	var errs []error
	var kept []*Pod
	for _, p := range st.Pods {
		var n Node // zero when the state is damaged: CNI DEL is then skipped
		if p.Node >= 0 && p.Node < len(st.Nodes) {
			n = st.Nodes[p.Node]
		}
		gone, err := l.teardownPod(ctx, n, p)
		if err != nil {
			l.log.Warn("lab: tearing down pod", "pod", p.Namespace+"/"+p.Name, "err", err)
			errs = append(errs, err)
		}
		if !gone {
			kept = append(kept, p)
		}
	}
	st.Pods = kept
	cfg := st.Config
	if err := removeCgroupTree(cfg.CgroupRoot); err != nil {
		errs = append(errs, err)
	}
	for _, n := range st.Nodes {
		errs = append(errs, deleteNetns(n.NetnsPath))
	}
	if st.Fabric.NetnsPath != "" {
		errs = append(errs, deleteNetns(st.Fabric.NetnsPath))
	}
	leftovers, err := listNetns(cfg.netnsPrefix())
	errs = append(errs, err)
	for _, p := range leftovers {
		l.log.Debug("lab: removing leftover netns", "netns", p)
		errs = append(errs, deleteNetns(p))
	}
	if err := errors.Join(errs...); err != nil {
		if _, serr := os.Stat(cfg.StateDir); serr == nil {
			errs = append(errs, writeState(cfg.StateDir, st))
		}
		return errors.Join(errs...)
	}
	if err := os.RemoveAll(cfg.StateDir); err != nil {
		return fmt.Errorf("remove state dir: %w", err)
	}
	return nil
}

// snapshot returns a deep enough copy of the in-memory state.
func (l *Lab) snapshot() *state {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := *l.st
	st.Nodes = slices.Clone(st.Nodes)
	st.Pods = nil
	for _, p := range l.st.Pods {
		st.Pods = append(st.Pods, p.clone())
	}
	return &st
}

// change runs fn on the current state under the lab's lock and saves the result, so
// concurrent changes from other goroutines and processes are not lost.
func (l *Lab) change(ctx context.Context, fn func(*state) error) error {
	unlock, err := lockState(ctx, l.cfg.StateDir)
	if err != nil {
		return err
	}
	defer unlock()
	st, err := readState(l.cfg.StateDir)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("lab %s is down (no state in %s)", l.cfg.Name, l.cfg.StateDir)
	}
	if err != nil {
		return err
	}
	st.Config.Logger = l.log
	if err := fn(st); err != nil {
		return err
	}
	if err := writeState(l.cfg.StateDir, st); err != nil {
		return err
	}
	l.mu.Lock()
	l.st = st
	l.mu.Unlock()
	return nil
}

// Name returns the lab's name.
func (l *Lab) Name() string { return l.cfg.Name }

// Config returns the lab's configuration with defaults filled in.
func (l *Lab) Config() Config { return l.cfg }

// StateDir returns the directory holding the lab's state.
func (l *Lab) StateDir() string { return l.cfg.StateDir }

// RegistryDir returns the directory of Kubernetes manifests (nodes/, namespaces/, pods/)
// that node agents and the controller watch in local mode.
func (l *Lab) RegistryDir() string { return l.cfg.registryDir() }

// Fabric returns the underlay namespace.
func (l *Lab) Fabric() Fabric {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.st.Fabric
}

// Nodes returns the nodes in index order.
func (l *Lab) Nodes() []Node {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.st.Nodes)
}

// Node returns node i; it panics if there is none, like an index out of range.
func (l *Lab) Node(i int) Node {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.st.Nodes[i]
}

// Pods returns copies of the lab's pods as this process last saw them, in creation
// order. Pods still being created have no IP yet.
func (l *Lab) Pods() []*Pod {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*Pod, 0, len(l.st.Pods))
	for _, p := range l.st.Pods {
		out = append(out, p.clone())
	}
	return out
}

// Pod returns a copy of the pod ns/name.
func (l *Lab) Pod(ns, name string) (*Pod, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, p := l.st.pod(ns, name)
	if p == nil {
		return nil, false
	}
	return p.clone(), true
}

// Namespaces returns the names of the lab's namespaces with their labels.
func (l *Lab) Namespaces() map[string]map[string]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]map[string]string{}
	for name, ns := range l.st.Namespaces {
		labels := map[string]string{}
		for k, v := range ns.Labels {
			labels[k] = v
		}
		out[name] = labels
	}
	return out
}
