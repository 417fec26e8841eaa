//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
)

// DefaultNodeNetns is the node's network namespace unless Config.NodeNetns says otherwise:
// the agent's own.
const DefaultNodeNetns = "/proc/self/ns/net"

// DefaultHandshakeGrace is how long, after the connecting side is established, inbound
// capture still lets through a segment of a connection it let through as a handshake (the
// node's own, or ztunnel's delivery) that the pod has not accepted yet: that happens when
// the application answered with a SYN cookie and the completing ACK was lost, as when its
// accept queue is full. 10 s covers five retransmissions at TCP's initial 200 ms RTO. A
// longer grace gives a stalled connection's 4-tuple longer to be used by someone else.
const DefaultHandshakeGrace = 10 * time.Second

// setNode tells the programs which network namespace is the node's: the connections its
// sockets open to enrolled pods (kubelet's probes) are filed while they handshake, and
// inbound capture lets those, and only those, through to the application.
func (c *Capture) setNode() error {
	cookie, err := NetnsCookie(c.cfg.NodeNetns)
	if err != nil {
		return fmt.Errorf("node network namespace %s: %w", c.cfg.NodeNetns, err)
	}
	v := sockopsNodeConfig{Netns: cookie, HandshakeGraceNs: uint64(c.cfg.HandshakeGrace.Nanoseconds())}
	if err := c.sockops.SluiceNode.Put(uint32(0), v); err != nil {
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
	gone, err := deleteWhere(c.sockops.PodAddrs, func(a sockopsAddr, owner uint64) bool {
		return owner == cookie && !keep[a]
	})
	if err != nil {
		return gone, fmt.Errorf("forget pod addresses: %w", err)
	}
	return gone, nil
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
	for _, m := range []*ebpf.Map{c.sockops.ProbeHandshakes, c.sockops.DeliveryHandshakes} {
		_, err := deleteWhere(m, func(k sockopsFlowKey, _ uint64) bool { return gone[k.Local] })
		if err != nil {
			errs = append(errs, fmt.Errorf("forget filed handshakes: %w", err))
		}
	}
	return errors.Join(errs...)
}

// deleteWhere deletes the entries of m that match, and returns their keys. An entry gone
// meanwhile is not an error.
func deleteWhere[K comparable, V any](m *ebpf.Map, match func(K, V) bool) ([]K, error) {
	var (
		key  K
		val  V
		gone []K
	)
	it := m.Iterate()
	for it.Next(&key, &val) {
		if match(key, val) {
			gone = append(gone, key)
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list entries: %w", err)
	}
	var errs []error
	for _, k := range gone {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	return gone, errors.Join(errs...)
}
