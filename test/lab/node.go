//go:build linux

package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Node is one node: a network namespace on the underlay whose cni0 bridge is the gateway
// of its pods.
type Node struct {
	Name      string       `json:"name"`  // also its netns name and spec.nodeName of its pods
	Index     int          `json:"index"` // position in Lab.Nodes, as in PodSpec.Node
	NetnsPath string       `json:"netns"`
	IP        netip.Addr   `json:"ip"`      // underlay address on eth0
	PodCIDR   netip.Prefix `json:"podCIDR"` // host-local allocates pod addresses here
	Gateway   netip.Addr   `json:"gateway"` // cni0's address, the pods' default route
	// CgroupPath is the parent of the node's pod cgroups: attach per-node cgroup programs
	// here.
	CgroupPath string `json:"cgroup"`
	// HostCgroupPath holds the processes Node.Command starts (agents, ztunnel), outside
	// the pods' subtree. Down kills them.
	HostCgroupPath string `json:"hostCgroup"`
	// Dir is the node's own directory in the lab's state (sockets, agent state).
	Dir string `json:"dir"`
	// ConfDir is the node's CNI config directory; AddPod runs the first .conflist in it.
	ConfDir string `json:"confDir"`
}

// Fabric is the underlay: a network namespace holding the bridge all nodes plug into. It
// routes to every pod subnet, so it also serves as a host outside the cluster.
type Fabric struct {
	NetnsPath string     `json:"netns"`
	IP        netip.Addr `json:"ip"` // on the bridge; the nodes' default gateway
	// CgroupPath holds the processes Fabric.Command starts. Down kills them.
	CgroupPath string `json:"cgroup"`
}

func (l *Lab) buildNode(n Node, fabricBridgeIndex int) error {
	if _, err := createNetns(n.Name); err != nil {
		return err
	}
	// Make the veth in the fabric and its peer straight in the node as eth0: nothing
	// passes through the root namespace.
	nodeNS, err := netns.GetFromPath(n.NetnsPath)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer nodeNS.Close()
	err = withNetlink(l.st.Fabric.NetnsPath, func(h *netlink.Handle) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: fmt.Sprintf("node%d", n.Index), MasterIndex: fabricBridgeIndex},
			PeerName:      "eth0",
			PeerNamespace: netlink.NsFd(nodeNS),
		}
		if err := h.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", veth.Name, err)
		}
		return h.LinkSetUp(veth)
	})
	if err != nil {
		return fmt.Errorf("fabric: %w", err)
	}
	err = withNetlink(n.NetnsPath, func(h *netlink.Handle) error {
		eth0, err := h.LinkByName("eth0")
		if err != nil {
			return err
		}
		addr := netip.PrefixFrom(n.IP, l.cfg.NodeNet.Bits())
		if err := h.AddrAdd(eth0, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
			return fmt.Errorf("address %s on eth0: %w", addr, err)
		}
		if err := h.LinkSetUp(eth0); err != nil {
			return fmt.Errorf("set eth0 up: %w", err)
		}
		for _, peer := range l.st.Nodes {
			if peer.Index == n.Index {
				continue
			}
			r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: ipNet(peer.PodCIDR), Gw: peer.IP.AsSlice()}
			if err := h.RouteAdd(r); err != nil {
				return fmt.Errorf("route %s via %s: %w", peer.PodCIDR, peer.IP, err)
			}
		}
		r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: l.st.Fabric.IP.AsSlice()}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("default route via %s: %w", l.st.Fabric.IP, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := sysctlIn(n.NetnsPath, "net.ipv4.ip_forward", "1"); err != nil {
		return err
	}
	for _, dir := range []string{n.CgroupPath, n.HostCgroupPath} {
		if err := makeCgroup(dir); err != nil {
			return err
		}
	}
	conf, err := nodeConflist(l.cfg, n)
	if err != nil {
		return fmt.Errorf("CNI config: %w", err)
	}
	if err := writeFileAtomic(filepath.Join(n.ConfDir, conflistName), conf); err != nil {
		return fmt.Errorf("CNI config: %w", err)
	}
	return writeNodeManifest(l.st, n)
}

// Do runs fn on a locked OS thread inside the node's network namespace.
func (n Node) Do(fn func() error) error { return doIn(n.NetnsPath, fn) }

// Dial connects from the node's network namespace (addr: an IP literal and port).
func (n Node) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return dialIn(ctx, n.NetnsPath, network, addr)
}

// Listen opens a listener in the node's network namespace.
func (n Node) Listen(network, addr string) (net.Listener, error) {
	return listenIn(n.NetnsPath, network, addr)
}

// Command returns a command that runs in the node's network namespace ("host network")
// and in HostCgroupPath, where Down finds and kills it. It needs nsenter (util-linux).
// Keep cmd.SysProcAttr and add to it rather than replacing it: it carries the cgroup.
func (n Node) Command(name string, args ...string) *exec.Cmd {
	return commandIn(n.NetnsPath, n.HostCgroupPath, name, args...)
}

// Do runs fn on a locked OS thread inside the fabric's network namespace.
func (f Fabric) Do(fn func() error) error { return doIn(f.NetnsPath, fn) }

// Dial connects from the fabric's network namespace.
func (f Fabric) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return dialIn(ctx, f.NetnsPath, network, addr)
}

// Listen opens a listener in the fabric's network namespace.
func (f Fabric) Listen(network, addr string) (net.Listener, error) {
	return listenIn(f.NetnsPath, network, addr)
}

// Command returns a command that runs in the fabric's network namespace and cgroup. It
// needs nsenter (util-linux).
func (f Fabric) Command(name string, args ...string) *exec.Cmd {
	return commandIn(f.NetnsPath, f.CgroupPath, name, args...)
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
