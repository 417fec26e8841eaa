//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/netnsexec"
)

// Marks on ztunnel's sockets. The low 12 bits (0x539, as Istio) tell the capture layer
// "never capture this socket". Delivery sockets also carry deliveryMark: with
// tcp_fwmark_accept the application's accepted socket inherits it, and a policy-routing
// rule sends its replies (addressed to the client, who is not here) back to ztunnel over
// loopback, which is what makes delivering with the client's own source address work.
const (
	SocketMark   = bpf.DefaultMark
	deliveryBit  = bpf.DeliveryMarkBit
	deliveryMark = deliveryBit | SocketMark
	// deliveryTable is the routing table holding "local default dev lo".
	deliveryTable = 15006
)

// PodNetns is one pod's network namespace, with the socket factory for it. Every socket
// ztunnel opens for the pod is made inside it, so the pod's address stays the source and
// destination on the wire.
type PodNetns struct {
	f *os.File
}

// NewPodNetns takes ownership of f (from zds).
func NewPodNetns(f *os.File) *PodNetns { return &PodNetns{f: f} }

// Close releases the namespace handle.
func (p *PodNetns) Close() error { return p.f.Close() }

// run executes fn on a thread inside the pod's namespace (see netnsexec.Do).
func (p *PodNetns) run(fn func() error) error { return netnsexec.Do(p.f, fn) }

// Listen opens a TCP listener inside the pod: marked, SO_REUSEPORT so a new ztunnel can
// take over the port during a restart, and without MPTCP (Go's default), because an MPTCP
// listener cannot be registered for sk_lookup.
func (p *PodNetns) Listen(addr string) (*net.TCPListener, error) {
	var ln net.Listener
	err := p.run(func() (err error) {
		lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
			return setsockopts(rc, func(fd int) error {
				return errors.Join(
					unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, SocketMark),
					unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1))
			})
		}}
		lc.SetMultipathTCP(false)
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s in the pod: %w", addr, err)
	}
	return ln.(*net.TCPListener), nil
}

// Dial connects from inside the pod with ztunnel's mark (so the capture layer lets it
// go).
func (p *PodNetns) Dial(ctx context.Context, addr netip.AddrPort) (*net.TCPConn, error) {
	return p.dial(ctx, addr, netip.AddrPort{}, SocketMark)
}

// DialFrom connects to addr inside the pod with src as the source address
// (IP_TRANSPARENT), so the application sees the real client.
func (p *PodNetns) DialFrom(ctx context.Context, src, addr netip.AddrPort) (*net.TCPConn, error) {
	return p.dial(ctx, addr, netip.AddrPortFrom(src.Addr(), 0), deliveryMark)
}

func (p *PodNetns) dial(ctx context.Context, addr, src netip.AddrPort, mark int) (*net.TCPConn, error) {
	var c net.Conn
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return setsockopts(rc, func(fd int) error {
			err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, mark)
			if src.IsValid() {
				err = errors.Join(err, unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1))
			}
			return err
		})
	}}
	if src.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(src)
	}
	if dl, ok := ctx.Deadline(); ok {
		d.Deadline = dl
	} else {
		d.Timeout = 10 * time.Second
	}
	// The socket must be created in the pod; connecting may continue anywhere. Creating
	// and connecting in one call inside run keeps it simple; the connect is bounded.
	err := p.run(func() (err error) {
		c, err = d.DialContext(ctx, "tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func setsockopts(rc syscall.RawConn, fn func(fd int) error) error {
	var inner error
	if err := rc.Control(func(fd uintptr) { inner = fn(int(fd)) }); err != nil {
		return err
	}
	return inner
}

// prepareDelivery sets up the pod's namespace so that delivery with the client's source
// address works: accepted sockets inherit the SYN's mark (tcp_fwmark_accept), and
// packets carrying deliveryBit are routed to the local table via loopback. Idempotent.
func (p *PodNetns) prepareDelivery() error {
	return p.run(func() error {
		if err := os.WriteFile("/proc/sys/net/ipv4/tcp_fwmark_accept", []byte("1"), 0o644); err != nil {
			return fmt.Errorf("set tcp_fwmark_accept in the pod: %w", err)
		}
		// When a ztunnel hands over to its successor (both listen with SO_REUSEPORT), the
		// connections waiting in the old listener's queue move to the new one instead of
		// being reset.
		if err := os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte("1"), 0o644); err != nil {
			return fmt.Errorf("set tcp_migrate_req in the pod: %w", err)
		}
		h, err := netlink.NewHandleAt(netns.None())
		if err != nil {
			return err
		}
		defer h.Close()
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			dst := &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}
			if family == netlink.FAMILY_V6 {
				dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
			}
			route := &netlink.Route{LinkIndex: lo.Attrs().Index, Dst: dst, Table: deliveryTable, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
			if err := h.RouteReplace(route); err != nil && family == netlink.FAMILY_V4 {
				return fmt.Errorf("add local route table %d in the pod: %w", deliveryTable, err)
			}
			rule := netlink.NewRule()
			rule.Family = family
			rule.Mark = deliveryBit
			mask := uint32(deliveryBit)
			rule.Mask = &mask
			rule.Table = deliveryTable
			rule.Priority = 100
			if err := h.RuleAdd(rule); err != nil && !errors.Is(err, unix.EEXIST) && family == netlink.FAMILY_V4 {
				return fmt.Errorf("add delivery routing rule in the pod: %w", err)
			}
		}
		return nil
	})
}
