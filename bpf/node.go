//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// DefaultNodeNetns is the node's network namespace unless Config.NodeNetns says otherwise:
// the agent's own.
const DefaultNodeNetns = "/proc/self/ns/net"

// setNode tells the programs which network namespace is the node's: the connections its
// sockets open to enrolled pods (kubelet's probes) are filed while they handshake, and
// inbound capture lets those, and only those, through to the application.
func (c *Capture) setNode() error {
	cookie, err := NetnsCookie(c.cfg.NodeNetns)
	if err != nil {
		return fmt.Errorf("node network namespace %s: %w", c.cfg.NodeNetns, err)
	}
	if err := c.sockops.SluiceNode.Put(uint32(0), sockopsNodeConfig{Netns: cookie}); err != nil {
		return fmt.Errorf("write node config: %w", err)
	}
	return nil
}

// putPodAddrs records addrs as the addresses of the pod with netns cookie. The new ones
// are written before the old ones go, so the node's probes never miss a pod in between.
func (c *Capture) putPodAddrs(cookie uint64, addrs []netip.Addr) error {
	keep := map[sockopsAddr]bool{}
	for _, a := range addrs {
		k := toAddr(a.Unmap())
		keep[k] = true
		if err := c.sockops.PodAddrs.Put(k, cookie); err != nil {
			return fmt.Errorf("record pod address %s: %w", a, err)
		}
	}
	return c.deletePodAddrs(cookie, keep)
}

// deletePodAddrs forgets the addresses recorded for the pod with netns cookie, except
// those in keep.
func (c *Capture) deletePodAddrs(cookie uint64, keep map[sockopsAddr]bool) error {
	var (
		key   sockopsAddr
		owner uint64
		stale []sockopsAddr
	)
	it := c.sockops.PodAddrs.Iterate()
	for it.Next(&key, &owner) {
		if owner == cookie && !keep[key] {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list pod addresses: %w", err)
	}
	var errs []error
	for _, k := range stale {
		if err := c.sockops.PodAddrs.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("forget pod address: %w", err))
		}
	}
	return errors.Join(errs...)
}
