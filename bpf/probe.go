//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The probe source addresses. A connection the node itself opens to a pod enrolled on it
// (kubelet's probes, above all) leaves from one of these, and inbound capture lets that
// source, and no other from outside the pod, reach the application directly. They are
// Istio's addresses for the same purpose, so NetworkPolicies written for Istio's ambient
// mode (which must allow them for probes to pass) keep working.
var (
	ProbeSourceV4 = netip.MustParseAddr("169.254.7.127")
	ProbeSourceV6 = netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
)

// DefaultNodeNetns is the node's network namespace unless Config.NodeNetns says otherwise:
// the agent's own.
const DefaultNodeNetns = "/proc/self/ns/net"

// setNode tells the programs which network namespace is the node's and gives that
// namespace the probe source addresses, on its loopback device (replies from pods reach
// them through the pods' default routes, which lead to the node).
func (c *Capture) setNode() error {
	cookie, err := NetnsCookie(c.cfg.NodeNetns)
	if err != nil {
		return fmt.Errorf("node network namespace %s: %w", c.cfg.NodeNetns, err)
	}
	if err := c.addProbeSources(); err != nil {
		return err
	}
	v := sockopsNodeConfig{Netns: cookie, Probe4: toAddr(ProbeSourceV4), Probe6: toAddr(ProbeSourceV6)}
	if err := c.sockops.SluiceNode.Put(uint32(0), v); err != nil {
		return fmt.Errorf("write node config: %w", err)
	}
	return nil
}

// probeSourceAddrs are the addresses as the node's loopback device carries them: scope
// host, so the kernel never picks them as the source of anything else.
func probeSourceAddrs() []*netlink.Addr {
	var out []*netlink.Addr
	for _, a := range []netip.Addr{ProbeSourceV4, ProbeSourceV6} {
		out = append(out, &netlink.Addr{
			IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())},
			Scope: unix.RT_SCOPE_HOST,
		})
	}
	return out
}

func (c *Capture) addProbeSources() error {
	return onNodeLoopback(c.cfg.NodeNetns, func(h *netlink.Handle, lo netlink.Link) error {
		for _, a := range probeSourceAddrs() {
			err := h.AddrReplace(lo, a)
			if err != nil && a.IP.To4() == nil {
				// A node without IPv6: its probes are IPv4, and an IPv6 one would be
				// captured (refused under STRICT), never let through.
				c.log.Warn("no IPv6 probe source on the node: IPv6 probes of enrolled pods will be captured", "addr", a.IP, "err", err)
				continue
			}
			if err != nil {
				return fmt.Errorf("add probe source %s to the node's loopback device: %w", a.IP, err)
			}
		}
		return nil
	})
}

// removeProbeSources takes the probe source addresses off the node's loopback device. A
// node namespace that is gone has none left to remove.
func removeProbeSources(nodeNetns string) error {
	if _, err := os.Stat(nodeNetns); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return onNodeLoopback(nodeNetns, func(h *netlink.Handle, lo netlink.Link) error {
		var errs []error
		for _, a := range probeSourceAddrs() {
			if err := h.AddrDel(lo, a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("remove probe source %s: %w", a.IP, err))
			}
		}
		return errors.Join(errs...)
	})
}

func onNodeLoopback(nodeNetns string, fn func(*netlink.Handle, netlink.Link) error) error {
	ns, err := netns.GetFromPath(nodeNetns)
	if err != nil {
		return fmt.Errorf("open node network namespace %s: %w", nodeNetns, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in node network namespace %s: %w", nodeNetns, err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("node loopback device: %w", err)
	}
	return fn(h, lo)
}

// putPodAddrs records addrs as the addresses of the pod with netns cookie, replacing
// what was recorded for it before.
func (c *Capture) putPodAddrs(cookie uint64, addrs []netip.Addr) error {
	if err := c.deletePodAddrs(cookie); err != nil {
		return err
	}
	for _, a := range addrs {
		if err := c.sockops.PodAddrs.Put(toAddr(a.Unmap()), cookie); err != nil {
			return fmt.Errorf("record pod address %s: %w", a, err)
		}
	}
	return nil
}

// deletePodAddrs forgets the addresses recorded for the pod with netns cookie.
func (c *Capture) deletePodAddrs(cookie uint64) error {
	var (
		key   sockopsAddr
		owner uint64
		mine  []sockopsAddr
	)
	it := c.sockops.PodAddrs.Iterate()
	for it.Next(&key, &owner) {
		if owner == cookie {
			mine = append(mine, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list pod addresses: %w", err)
	}
	var errs []error
	for _, k := range mine {
		if err := c.sockops.PodAddrs.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("forget pod address: %w", err))
		}
	}
	return errors.Join(errs...)
}
