//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// DeliveryMarkBit is set, besides the mark, on ztunnel's sockets that deliver a
// connection to the application (from the client's address). The application's accepted
// socket inherits it (tcp_fwmark_accept), which tells the kernel counters it is the
// application's connection, not ztunnel's.
const DeliveryMarkBit = 0x1000

// Defaults match Istio's in-pod ztunnel, so tooling and habits carry over.
const (
	DefaultPinRoot      = "/sys/fs/bpf/sluice"
	DefaultInstance     = "default"
	DefaultMark         = 0x539
	DefaultMarkMask     = 0xfff
	DefaultOutboundPort = 15001
	DefaultInboundPort  = 15006
	DefaultHBONEPort    = 15008
	DefaultDNSPort      = 15053
)

const (
	cfgCaptureDNS = 1 << 0
	cfgAccelerate = 1 << 1
)

// Config says where and how to capture. The zero value is the production default.
type Config struct {
	// PinRoot is the bpffs directory holding every instance (default /sys/fs/bpf/sluice).
	PinRoot string
	// Instance names this agent's pin directory under PinRoot (default "default"). The lab
	// runs one instance per simulated node on one kernel.
	Instance string
	// CgroupPath is the cgroup2 directory the cgroup programs attach to; every pod's
	// cgroup must be below it (default: the cgroup2 mount root).
	CgroupPath string
	// NodeNetns is the node's network namespace (default DefaultNodeNetns, the loader's
	// own). The connections its sockets open to enrolled pods (kubelet's probes) are not
	// captured.
	NodeNetns string
	// HandshakeGrace: see DefaultHandshakeGrace (the default).
	HandshakeGrace time.Duration
	// Mark and MarkMask identify ztunnel's own sockets (SO_MARK), which are never captured
	// (default 0x539/0xfff).
	Mark, MarkMask uint32
	// Ports of ztunnel's in-pod listeners (defaults 15001, 15006, 15008, 15053).
	OutboundPort, InboundPort, HBONEPort, DNSPort uint16
	// CaptureDNS steers UDP and TCP port 53 from enrolled pods to DNSPort.
	CaptureDNS bool
	// Accelerate short-cuts the application <-> ztunnel loopback hop with sk_msg.
	Accelerate bool
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

func (c Config) withDefaults() (Config, error) {
	if c.PinRoot == "" {
		c.PinRoot = DefaultPinRoot
	}
	if c.Instance == "" {
		c.Instance = DefaultInstance
	}
	if c.Mark == 0 {
		c.Mark, c.MarkMask = DefaultMark, DefaultMarkMask
	}
	if c.MarkMask == 0 {
		c.MarkMask = 0xffffffff
	}
	if c.OutboundPort == 0 {
		c.OutboundPort = DefaultOutboundPort
	}
	if c.InboundPort == 0 {
		c.InboundPort = DefaultInboundPort
	}
	if c.HBONEPort == 0 {
		c.HBONEPort = DefaultHBONEPort
	}
	if c.DNSPort == 0 {
		c.DNSPort = DefaultDNSPort
	}
	if c.NodeNetns == "" {
		c.NodeNetns = DefaultNodeNetns
	}
	if c.HandshakeGrace == 0 {
		c.HandshakeGrace = DefaultHandshakeGrace
	}
	if c.HandshakeGrace < 0 || c.HandshakeGrace > time.Minute {
		return c, fmt.Errorf("capture: HandshakeGrace %v: want more than 0 and at most a minute (default %v)", c.HandshakeGrace, DefaultHandshakeGrace)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.CgroupPath == "" {
		p, err := Cgroup2Root()
		if err != nil {
			return c, err
		}
		c.CgroupPath = p
	}
	return c, nil
}

// PinDir is the directory holding this instance's maps and links.
func (c Config) PinDir() string {
	root, inst := c.PinRoot, c.Instance
	if root == "" {
		root = DefaultPinRoot
	}
	if inst == "" {
		inst = DefaultInstance
	}
	return filepath.Join(root, inst)
}

// Capture is a loaded and attached set of capture programs. Close releases this process's
// handles; the pinned programs keep capturing until Uninstall.
type Capture struct {
	cfg    Config
	log    *slog.Logger
	pinDir string

	connect  connectObjects
	sockopt  sockoptObjects
	sockops  sockopsObjects
	sklookup sklookupObjects
	skmsg    skmsgObjects
}

// cgroupAttachment is one program attached to the cgroup, pinned under links/<name>.
type cgroupAttachment struct {
	name   string
	attach ebpf.AttachType
	prog   *ebpf.Program
}

// Load loads the programs, creates or reuses the pinned maps, writes the configuration
// and attaches the cgroup programs, swapping the program inside an existing pinned link
// so that a restart leaves no gap.
func Load(cfg Config) (*Capture, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := CheckKernel(); err != nil {
		return nil, err
	}
	c := &Capture{cfg: cfg, log: cfg.Logger, pinDir: cfg.PinDir()}
	if err := c.load(); err != nil {
		return nil, errors.Join(err, c.Close())
	}
	c.log.Info("capture programs loaded", "pinDir", c.pinDir, "cgroup", cfg.CgroupPath,
		"captureDNS", cfg.CaptureDNS, "accelerate", cfg.Accelerate)
	return c, nil
}

func (c *Capture) load() error {
	cfg := c.cfg
	for _, dir := range []string{c.pinDir, c.linkDir(), c.netnsDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create pin directory (is bpffs mounted at %s?): %w", cfg.PinRoot, err)
		}
	}
	objects := []struct {
		name string
		spec func() (*ebpf.CollectionSpec, error)
		into any
	}{
		{"connect", loadConnect, &c.connect},
		{"sockopt", loadSockopt, &c.sockopt},
		{"sockops", loadSockops, &c.sockops},
		{"sk_lookup", loadSklookup, &c.sklookup},
		{"sk_msg", loadSkmsg, &c.skmsg},
	}
	specs := make([]*ebpf.CollectionSpec, len(objects))
	for i, o := range objects {
		var err error
		if specs[i], err = o.spec(); err != nil {
			return fmt.Errorf("read %s programs: %w", o.name, err)
		}
	}
	if err := c.replaceStalePins(specs); err != nil {
		return err
	}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: c.pinDir}}
	for i, o := range objects {
		if err := specs[i].LoadAndAssign(o.into, opts); err != nil {
			return fmt.Errorf("load %s programs: %w", o.name, verifierError(err))
		}
	}
	if err := c.writeConfig(); err != nil {
		return err
	}
	if err := c.setNode(); err != nil {
		return err
	}
	// Pins of maps an earlier agent used and nothing uses now: host_addrs (the node's
	// addresses were exempt as sources), ztunnel_handshakes and node_handshakes (now
	// delivery_handshakes and probe_handshakes, whose values are states).
	for _, old := range []string{"host_addrs", "ztunnel_handshakes", "node_handshakes"} {
		if err := os.Remove(filepath.Join(c.pinDir, old)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove the pin of an old map: %w", err)
		}
	}
	// Pods enrolled by an earlier agent keep their pinned sk_lookup links; give them the
	// program just loaded, then swap the cgroup programs: while programs of both
	// versions run, they may read different maps (a transient one replaced above),
	// which captures a handshake at worst. Nothing may stop the load between the two.
	errs := []error{c.updateNetnsLinks()}
	for _, a := range c.cgroupAttachments() {
		errs = append(errs, c.attachCgroup(a))
	}
	// sk_msg is attached to the local_hop map itself; attaching again replaces the
	// program in place. Sockets only enter local_hop when Accelerate is on.
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  c.sockops.LocalHop.FD(),
		Program: c.skmsg.SluiceSkMsg,
		Attach:  ebpf.AttachSkMsgVerdict,
	}); err != nil {
		errs = append(errs, fmt.Errorf("attach sk_msg to local_hop: %w", err))
	}
	return errors.Join(errs...)
}

// transientMaps hold nothing a running pod depends on across an agent restart: Load
// rewrites the configuration, and a lost handshake entry only makes that handshake
// captured (it fails closed).
var transientMaps = map[string]bool{"sluice_config": true, "sluice_node": true, "delivery_handshakes": true, "probe_handshakes": true}

// replaceStalePins removes the pin of a transient map an earlier agent left in a shape
// this one's programs cannot use (a field added to its value, say), so that loading makes
// it afresh instead of failing. A stateful map in an old shape fails the load before any
// pin is touched. (An older agent cannot load over the new shapes: rolling back needs
// `sluice-agent --uninstall` first, which unpins everything.)
func (c *Capture) replaceStalePins(specs []*ebpf.CollectionSpec) error {
	stale := map[string]bool{}
	for _, spec := range specs {
		for name, ms := range spec.Maps {
			m, err := ebpf.LoadPinnedMap(filepath.Join(c.pinDir, name), nil)
			if err != nil {
				continue // none, or not a map we can read: loading reports it
			}
			err = ms.Compatible(m)
			m.Close()
			switch {
			case err == nil:
			case transientMaps[name]:
				stale[name] = true
			default:
				return fmt.Errorf("map %s pinned by an earlier agent cannot be reused (%w); uninstall capture (sluice-agent --uninstall) and start again", name, err)
			}
		}
	}
	var errs []error
	for name := range stale {
		c.log.Info("replacing a map pinned in an older shape", "map", name)
		if err := os.Remove(filepath.Join(c.pinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove stale pin of %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

func (c *Capture) linkDir() string  { return filepath.Join(c.pinDir, "links") }
func (c *Capture) netnsDir() string { return filepath.Join(c.pinDir, "netns") }

func (c *Capture) cgroupAttachments() []cgroupAttachment {
	return []cgroupAttachment{
		{"connect4", ebpf.AttachCGroupInet4Connect, c.connect.SluiceConnect4},
		{"connect6", ebpf.AttachCGroupInet6Connect, c.connect.SluiceConnect6},
		{"sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, c.connect.SluiceSendmsg4},
		{"sendmsg6", ebpf.AttachCGroupUDP6Sendmsg, c.connect.SluiceSendmsg6},
		{"recvmsg4", ebpf.AttachCGroupUDP4Recvmsg, c.connect.SluiceRecvmsg4},
		{"recvmsg6", ebpf.AttachCGroupUDP6Recvmsg, c.connect.SluiceRecvmsg6},
		{"getpeername4", ebpf.AttachCgroupInet4GetPeername, c.connect.SluiceGetpeername4},
		{"getpeername6", ebpf.AttachCgroupInet6GetPeername, c.connect.SluiceGetpeername6},
		{"getsockopt", ebpf.AttachCGroupGetsockopt, c.sockopt.SluiceGetsockopt},
		{"sockops", ebpf.AttachCGroupSockOps, c.sockops.SluiceSockops},
	}
}

func (c *Capture) writeConfig() error {
	var flags uint32
	if c.cfg.CaptureDNS {
		flags |= cfgCaptureDNS
	}
	if c.cfg.Accelerate {
		flags |= cfgAccelerate
	}
	v := sockopsConfig{
		Flags:        flags,
		Mark:         c.cfg.Mark,
		MarkMask:     c.cfg.MarkMask,
		OutboundPort: c.cfg.OutboundPort,
		InboundPort:  c.cfg.InboundPort,
		HbonePort:    c.cfg.HBONEPort,
		DnsPort:      c.cfg.DNSPort,
	}
	if err := c.sockops.SluiceConfig.Put(uint32(0), v); err != nil {
		return fmt.Errorf("write capture config: %w", err)
	}
	return nil
}

// attachCgroup attaches a to the cgroup, or swaps a's program into the link an earlier
// agent pinned.
func (c *Capture) attachCgroup(a cgroupAttachment) error {
	pin := filepath.Join(c.linkDir(), a.name)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		if err := l.Update(a.prog); err != nil {
			return fmt.Errorf("update pinned cgroup %s link: %w", a.name, err)
		}
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("load pinned cgroup %s link %s: %w", a.name, pin, err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: c.cfg.CgroupPath, Attach: a.attach, Program: a.prog})
	if err != nil {
		return fmt.Errorf("attach cgroup %s to %s: %w", a.name, c.cfg.CgroupPath, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin cgroup %s link: %w", a.name, err)
	}
	return nil
}

func (c *Capture) updateNetnsLinks() error {
	entries, err := os.ReadDir(c.netnsDir())
	if err != nil {
		return fmt.Errorf("read pinned netns links: %w", err)
	}
	var errs []error
	for _, e := range entries {
		pin := filepath.Join(c.netnsDir(), e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("load pinned sk_lookup link %s: %w", pin, err))
			continue
		}
		if err := l.Update(c.sklookup.SluiceSkLookup); err != nil {
			errs = append(errs, fmt.Errorf("update sk_lookup link %s: %w", pin, err))
		}
		l.Close()
	}
	return errors.Join(errs...)
}

// Close releases this process's handles on programs and maps. Pinned links keep every
// program attached; use Uninstall to remove capture.
func (c *Capture) Close() error {
	return errors.Join(
		c.connect.Close(),
		c.sockopt.Close(),
		c.sockops.Close(),
		c.sklookup.Close(),
		c.skmsg.Close(),
	)
}

// Uninstall detaches every program of the instance in cfg and removes its pins. It
// continues past errors and reports them all.
func Uninstall(cfg Config) error {
	dir := cfg.PinDir()
	var errs []error
	for _, sub := range []string{"links", "netns"} {
		entries, err := os.ReadDir(filepath.Join(dir, sub))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		for _, e := range entries {
			errs = append(errs, unpinLink(filepath.Join(dir, sub, e.Name())))
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
	}
	return errors.Join(errs...)
}

func unpinLink(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		// Not a link we can load: remove the pin anyway so the program goes.
		return errors.Join(fmt.Errorf("load pinned link %s: %w", pin, err), os.Remove(pin))
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin %s: %w", pin, err)
	}
	return nil
}

func cookiePin(dir string, cookie uint64) string {
	return filepath.Join(dir, strconv.FormatUint(cookie, 10))
}

// verifierError expands a verifier rejection into the full log, which is what anyone
// debugging it needs.
func verifierError(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("%+v", ve)
	}
	return err
}
