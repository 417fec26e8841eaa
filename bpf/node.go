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
	_, err := c.deletePodAddrs(cookie, keep)
	return err
}

// deletePodAddrs forgets the addresses recorded for the pod with netns cookie, except
// those in keep, and returns the ones it forgot.
func (c *Capture) deletePodAddrs(cookie uint64, keep map[sockopsAddr]bool) ([]sockopsAddr, error) {
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
		return nil, fmt.Errorf("list pod addresses: %w", err)
	}
	var errs []error
	for _, k := range stale {
		if err := c.sockops.PodAddrs.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("forget pod address: %w", err))
		}
	}
	return stale, errors.Join(errs...)
}

// forgetHandshakesTo drops the filed handshakes (the node's and ztunnel's) to any of
// addrs. Each socket forgets its own when its handshake ends; this is for a pod leaving
// capture, so that nothing filed for it outlives it whatever happened to the socket.
func (c *Capture) forgetHandshakesTo(addrs []sockopsAddr) error {
	if len(addrs) == 0 {
		return nil
	}
	gone := map[sockopsAddr]bool{}
	for _, a := range addrs {
		gone[a] = true
	}
	var errs []error
	for _, m := range []*ebpf.Map{c.sockops.NodeHandshakes, c.sockops.DeliveryHandshakes} {
		var (
			key   sockopsFlowKey
			val   uint64
			stale []sockopsFlowKey
		)
		it := m.Iterate()
		for it.Next(&key, &val) {
			if gone[key.Local] {
				stale = append(stale, key)
			}
		}
		if err := it.Err(); err != nil {
			errs = append(errs, fmt.Errorf("list filed handshakes: %w", err))
		}
		for _, k := range stale {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("forget filed handshake: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}
