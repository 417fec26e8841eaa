package lab

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
)

// Defaults for the fields of Config left empty.
const (
	DefaultName       = "sluice"
	DefaultStateBase  = "/run/sluice-lab"
	DefaultCgroupBase = "/sys/fs/cgroup/unified"
)

var (
	// DefaultNodeNet is the underlay between nodes: the fabric is .1, node i is .(10+i).
	DefaultNodeNet = netip.MustParsePrefix("172.30.0.0/24")
	// DefaultPodNet is cut into one /24 per node: node i gets 10.244.i.0/24.
	DefaultPodNet = netip.MustParsePrefix("10.244.0.0/16")
)

// maxNodes keeps node addresses inside the default /24 underlay (.10 to .209).
const maxNodes = 200

// Config describes a lab. The zero value of every field means its default.
type Config struct {
	// Name prefixes every network namespace of the lab and names its state and cgroup
	// directories. Lowercase letters and digits only (no '-'), at most 32: that way the
	// prefix "<Name>-" belongs to this lab alone, which is what lets Cleanup find leftovers
	// without a state file. Default "sluice".
	Name string `json:"name"`

	// Nodes is the number of nodes, 1 to 200. Default 1.
	Nodes int `json:"nodes"`

	// NodeNet is the underlay subnet: the fabric gets the first host address (.1), node i
	// gets .(10+i). Default 172.30.0.0/24.
	NodeNet netip.Prefix `json:"nodeNet"`

	// PodNet is split into /24s, node i taking the i-th: 10.244.i.0/24 with the default
	// 10.244.0.0/16. The bridge (gateway) of node i is the first address of its /24.
	PodNet netip.Prefix `json:"podNet"`

	// CNIBinDir holds the CNI plugins: bridge, host-local and the types in ExtraPlugins.
	// Several directories may be joined with ':'. Empty means DefaultCNIBinDir(), which Up
	// fills by calling BuildPlugins.
	CNIBinDir string `json:"cniBinDir"`

	// ExtraPlugins are chained after the bridge plugin, in order, e.g.
	// {"type": "sluice-cni", "agentSocket": "${NODE_DIR}/cni.sock"}. In string values
	// "${NODE}" becomes the node's name and "${NODE_DIR}" its directory under StateDir, so
	// one list can point every node at its own agent.
	ExtraPlugins []map[string]any `json:"extraPlugins,omitempty"`

	// StateDir holds the state file, the manifest registry, IPAM and CNI cache data and
	// each node's CNI config. Default /run/sluice-lab/<Name>.
	StateDir string `json:"stateDir"`

	// CgroupRoot is the cgroup2 directory the lab creates and owns. Default
	// /sys/fs/cgroup/unified/<Name>.
	CgroupRoot string `json:"cgroupRoot"`

	// Logger receives progress at debug level and problems while tearing down at warn.
	// Nil discards.
	Logger *slog.Logger `json:"-"`
}

var labNameRE = regexp.MustCompile(`^[a-z0-9]{1,32}$`)

// withDefaults returns cfg with every empty field filled in, or an error naming the bad
// field.
func (cfg Config) withDefaults() (Config, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if !labNameRE.MatchString(cfg.Name) {
		return cfg, fmt.Errorf("lab name %q: use 1 to 32 lowercase letters and digits (no '-', it separates the name from the rest of each netns name)", cfg.Name)
	}
	if cfg.Nodes == 0 {
		cfg.Nodes = 1
	}
	if cfg.Nodes < 1 || cfg.Nodes > maxNodes {
		return cfg, fmt.Errorf("lab %s: %d nodes; choose 1 to %d", cfg.Name, cfg.Nodes, maxNodes)
	}
	if !cfg.NodeNet.IsValid() {
		cfg.NodeNet = DefaultNodeNet
	}
	if !cfg.PodNet.IsValid() {
		cfg.PodNet = DefaultPodNet
	}
	if err := cfg.checkNets(); err != nil {
		return cfg, fmt.Errorf("lab %s: %w", cfg.Name, err)
	}
	if cfg.StateDir == "" {
		cfg.StateDir = filepath.Join(DefaultStateBase, cfg.Name)
	}
	if cfg.CgroupRoot == "" {
		cfg.CgroupRoot = filepath.Join(DefaultCgroupBase, cfg.Name)
	}
	if !filepath.IsAbs(cfg.StateDir) || !filepath.IsAbs(cfg.CgroupRoot) {
		return cfg, fmt.Errorf("lab %s: StateDir %q and CgroupRoot %q must be absolute paths", cfg.Name, cfg.StateDir, cfg.CgroupRoot)
	}
	for i, p := range cfg.ExtraPlugins {
		if t, _ := p["type"].(string); t == "" {
			return cfg, fmt.Errorf("lab %s: ExtraPlugins[%d] has no \"type\"", cfg.Name, i)
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg, nil
}

func (cfg Config) checkNets() error {
	nn, pn := cfg.NodeNet.Masked(), cfg.PodNet.Masked()
	if !nn.Addr().Is4() || !pn.Addr().Is4() {
		return errors.New("NodeNet and PodNet must be IPv4 prefixes")
	}
	if nn.Bits() > 24 {
		return fmt.Errorf("NodeNet %s: need at least a /24 for node addresses .10 and up", nn)
	}
	if pn.Bits() > 24 || 1<<(24-pn.Bits()) < cfg.Nodes {
		return fmt.Errorf("PodNet %s has room for %d per-node /24s, %d nodes need one each", pn, 1<<max(0, 24-pn.Bits()), cfg.Nodes)
	}
	if nn.Overlaps(pn) {
		return fmt.Errorf("NodeNet %s overlaps PodNet %s", nn, pn)
	}
	return nil
}

// addrAt returns the address n above the base of p.
func addrAt(p netip.Prefix, n int) netip.Addr {
	b := p.Masked().Addr().As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func (cfg Config) fabricIP() netip.Addr       { return addrAt(cfg.NodeNet, 1) }
func (cfg Config) nodeIP(i int) netip.Addr    { return addrAt(cfg.NodeNet, 10+i) }
func (cfg Config) podCIDR(i int) netip.Prefix { return netip.PrefixFrom(addrAt(cfg.PodNet, i<<8), 24) }
func (cfg Config) nodeName(i int) string      { return fmt.Sprintf("%s-node%d", cfg.Name, i) }
func (cfg Config) fabricName() string         { return cfg.Name + "-fabric" }
func (cfg Config) registryDir() string        { return filepath.Join(cfg.StateDir, "registry") }
func (cfg Config) nodeDir(name string) string { return filepath.Join(cfg.StateDir, "nodes", name) }

// netnsPrefix is what every netns name of the lab starts with, and no other lab's does.
func (cfg Config) netnsPrefix() string { return cfg.Name + "-" }

// binPath splits CNIBinDir into the search path libcni wants.
func (cfg Config) binPath() []string {
	var dirs []string
	for d := range strings.SplitSeq(cfg.CNIBinDir, ":") {
		if d != "" {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

// dns1123Label matches Kubernetes names of namespaces and pods.
var dns1123Label = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

func checkObjectName(kind, name string) error {
	if len(name) > 63 || !dns1123Label.MatchString(name) {
		return fmt.Errorf("%s name %q: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit", kind, name)
	}
	return nil
}
