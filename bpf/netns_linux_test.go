//go:build linux

package bpf

import (
	"context"
	"net"
	"net/netip"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testutil"
)

// testNS is a named network namespace made for one test and deleted after it.
type testNS struct {
	name   string
	handle netns.NsHandle
}

func (n *testNS) path() string { return "/run/netns/" + n.name }

func newNS(t *testing.T, name string) *testNS {
	t.Helper()
	_ = netns.DeleteNamed(name) // leftover of a crashed run
	errc := make(chan error, 1)
	var h netns.NsHandle
	go func() {
		runtime.LockOSThread() // the thread ends in the new netns: never unlock it
		var err error
		h, err = netns.NewNamed(name)
		if err == nil {
			err = netlink.LinkSetUp(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "lo"}})
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	n := &testNS{name: name, handle: h}
	t.Cleanup(func() {
		n.handle.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return n
}

// wire connects a and b with a veth pair named eth0 on both sides, addressed aIP/bIP in a
// /24.
func wire(t *testing.T, a, b *testNS, aIP, bIP string) { wireNamed(t, a, b, "eth0", aIP, bIP) }

// wireNamed is wire with the veth named name on both sides.
func wireNamed(t *testing.T, a, b *testNS, name, aIP, bIP string) {
	t.Helper()
	ha, err := netlink.NewHandleAt(a.handle)
	if err != nil {
		t.Fatal(err)
	}
	defer ha.Close()
	hb, err := netlink.NewHandleAt(b.handle)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name, PeerNamespace: netlink.NsFd(int(b.handle))}
	if err := ha.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	for _, side := range []struct {
		h  *netlink.Handle
		ip string
	}{{ha, aIP}, {hb, bIP}} {
		l, err := side.h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		addr, _ := netlink.ParseAddr(side.ip + "/24")
		if err := side.h.AddrAdd(l, addr); err != nil {
			t.Fatal(err)
		}
		if err := side.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
}

// defaultRoute sends everything off-link through gw.
func (n *testNS) defaultRoute(t *testing.T, gw string) {
	t.Helper()
	h, err := netlink.NewHandleAt(n.handle)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := h.RouteAdd(&netlink.Route{Gw: net.ParseIP(gw)}); err != nil {
		t.Fatalf("default route via %s in %s: %v", gw, n.name, err)
	}
}

// do runs fn on a thread inside the namespace. Sockets made by fn stay in the namespace
// and can be used from any goroutine afterwards.
func (n *testNS) do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread is discarded
		if err := netns.Set(n.handle); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func (n *testNS) listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	err := n.do(func() (err error) {
		// Go listens with MPTCP by default, and an MPTCP listener cannot enter a SOCKHASH
		// (EOPNOTSUPP): ztunnel's listeners turn it off too.
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen %s in %s: %v", addr, n.name, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dialTimeout connects from the namespace, giving up after timeout.
func (n *testNS) dialTimeout(network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() (err error) {
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return c, err
}

// withMark is a dialer's or listener's Control that sets SO_MARK.
func withMark(mark int) func(string, string, syscall.RawConn) error {
	return func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
		}); err != nil {
			return err
		}
		return serr
	}
}

func (n *testNS) dial(network, addr string, mark int) (net.Conn, error) {
	var c net.Conn
	if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().Is4In6() {
		return n.dialMapped(ap)
	}
	err := n.do(func() (err error) {
		d := net.Dialer{Timeout: 2 * time.Second}
		if mark != 0 {
			d.Control = withMark(mark)
		}
		c, err = d.DialContext(context.Background(), network, addr)
		return err
	})
	return c, err
}

// serveName answers every connection with name and the peer address as the server saw
// it, then echoes; it tells a test which listener a connection reached.
func serveName(ln net.Listener, name string) { testutil.ServeGreeting(ln, name) }

func readLine(t *testing.T, c net.Conn) string {
	t.Helper()
	line, err := testutil.ReadLine(c, 3*time.Second)
	if err != nil {
		t.Fatalf("read from %s: %v (got %q)", c.RemoteAddr(), err, line)
	}
	return line
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

// dialMapped connects an AF_INET6 socket to an IPv4-mapped address, which Go's dialer
// turns into IPv4 before the kernel sees it: the connect6 hook must catch this case too.
func (n *testNS) dialMapped(ap netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() error {
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.Connect(fd, &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}); err != nil {
			unix.Close(fd)
			return err
		}
		f := os.NewFile(uintptr(fd), "mapped")
		defer f.Close()
		c, err = net.FileConn(f)
		return err
	})
	return c, err
}
