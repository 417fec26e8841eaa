//go:build linux

package bpf

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testutil"
)

// fixture is one enrolled "pod" namespace wired by a veth to a "peer" namespace, with a
// capture instance of its own. The node's namespace is a third one, with no links, unless
// the test makes the peer the node.
type fixture struct {
	cfg       Config
	cap       *Capture
	pod, peer *testNS
	cookie    uint64
}

const (
	podIP  = "10.99.0.2"
	peerIP = "10.99.0.1"
)

func newFixture(t *testing.T, cfg Config) *fixture { return newFixtureNode(t, cfg, false) }

// newFixtureNode is newFixture with the peer as the node when peerIsNode: the pod's
// default route leads there, as a pod's leads to its node.
func newFixtureNode(t *testing.T, cfg Config, peerIsNode bool) *fixture {
	t.Helper()
	testutil.RequireRoot(t)
	short := fmt.Sprintf("sb%d", time.Now().UnixNano()%100000)
	f := &fixture{pod: newNS(t, short+"-pod"), peer: newNS(t, short+"-peer")}
	wire(t, f.pod, f.peer, podIP, peerIP)
	if peerIsNode {
		cfg.NodeNetns = f.peer.path()
		f.pod.defaultRoute(t, peerIP)
	} else {
		cfg.NodeNetns = newNS(t, short+"-node").path()
	}
	cfg.Instance = "test-" + short
	f.cfg = cfg
	f.load(t)
	t.Cleanup(func() {
		if f.cap != nil {
			f.cap.Close()
		}
		if err := Uninstall(f.cfg); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	var err error
	if f.cookie, err = f.cap.Enroll(f.pod.path(), []netip.Addr{mustAddr(podIP)}); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	return f
}

func (f *fixture) load(t *testing.T) {
	t.Helper()
	c, err := Load(f.cfg)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	f.cap = c
}

// proxy stands in for ztunnel's outbound listener: it reports the original destination,
// then forwards to it on a socket carrying ztunnel's mark, copying with read/write loops
// (splice would bypass sk_msg).
func (f *fixture) proxy(t *testing.T) {
	ln := f.pod.listen(t, "127.0.0.1:15001")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				orig, err := OriginalDst(c.(*net.TCPConn))
				if err != nil {
					fmt.Fprintf(c, "proxy error %v\n", err)
					return
				}
				fmt.Fprintf(c, "proxy %s\n", orig)
				up, err := f.pod.dial("tcp", orig.String(), DefaultMark)
				if err != nil {
					return
				}
				defer up.Close()
				go copyLoop(up, c)
				copyLoop(c, up)
			}()
		}
	}()
}

func copyLoop(dst, src net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if tc, ok := dst.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			return
		}
	}
}

func TestOutboundCapture(t *testing.T) {
	f := newFixture(t, Config{})
	f.proxy(t)
	serveName(f.peer.listen(t, peerIP+":8080"), "server")
	serveName(f.pod.listen(t, "127.0.0.1:9999"), "local")

	cases := []struct {
		name, network, addr string
		mark                int
		want                []string // lines the client reads, prefix-matched
		peer                string   // what getpeername must say
	}{
		{"pod IP", "tcp4", peerIP + ":8080", 0, []string{"proxy " + peerIP + ":8080", "server " + podIP + ":"}, peerIP + ":8080"},
		{"service IP", "tcp4", "10.96.0.10:80", 0, []string{"proxy 10.96.0.10:80"}, "10.96.0.10:80"},
		{"IPv4-mapped IPv6", "tcp6", "[::ffff:" + peerIP + "]:8080", 0, []string{"proxy " + peerIP + ":8080", "server " + podIP + ":"}, peerIP + ":8080"},
		{"loopback stays local", "tcp4", "127.0.0.1:9999", 0, []string{"local 127.0.0.1:"}, "127.0.0.1:9999"},
		{"ztunnel's marked socket goes direct", "tcp4", peerIP + ":8080", DefaultMark, []string{"server " + podIP + ":"}, peerIP + ":8080"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := f.pod.dial(tc.network, tc.addr, tc.mark)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			if got := netip.MustParseAddrPort(c.RemoteAddr().String()); netip.AddrPortFrom(got.Addr().Unmap(), got.Port()).String() != tc.peer {
				t.Errorf("getpeername = %s, want %s", got, tc.peer)
			}
			for _, w := range tc.want {
				if got := readLine(t, c); !strings.HasPrefix(got, w) {
					t.Errorf("got %q, want prefix %q", got, w)
				}
			}
		})
	}
	// nginx's proxy_bind, curl --interface, Java's Socket(host, port, localAddr, 0): the
	// captured connection then reaches 15001 on loopback from the pod's address, which
	// inbound capture (sk_lookup) must leave alone.
	t.Run("application bound to its pod address", func(t *testing.T) {
		var c net.Conn
		err := f.pod.do(func() (err error) {
			d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(podIP)}}
			c, err = d.Dial("tcp4", peerIP+":8080")
			return err
		})
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		if got := readLine(t, c); !strings.HasPrefix(got, "proxy "+peerIP+":8080") {
			t.Errorf("got %q, want the proxy", got)
		}
	})
}

func TestUnenrollRestoresDirect(t *testing.T) {
	f := newFixture(t, Config{})
	f.proxy(t)
	serveName(f.peer.listen(t, peerIP+":8080"), "server")
	if err := f.cap.Unenroll(f.cookie); err != nil {
		t.Fatal(err)
	}
	c, err := f.pod.dial("tcp4", peerIP+":8080", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := readLine(t, c); !strings.HasPrefix(got, "server ") {
		t.Errorf("after unenroll got %q, want the server directly", got)
	}
	// Inbound is released too: the application's own listener answers.
	serveName(f.pod.listen(t, podIP+":8080"), "app")
	in, err := f.peer.dial("tcp4", podIP+":8080", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	if got := readLine(t, in); !strings.HasPrefix(got, "app ") {
		t.Errorf("inbound after unenroll got %q, want app", got)
	}
}

func TestInboundCapture(t *testing.T) {
	f := newFixture(t, Config{})
	serveName(f.pod.listen(t, "0.0.0.0:8080"), "app")
	serveName(f.pod.listen(t, "0.0.0.0:15008"), "hbone")
	serveName(f.pod.listen(t, "0.0.0.0:15020"), "app-on-15020")
	inbound := f.pod.listen(t, "0.0.0.0:15006")
	serveName(inbound, "inbound")

	dialPod := func(port string) (string, error) {
		c, err := f.peer.dial("tcp4", podIP+":"+port, 0)
		if err != nil {
			return "", err
		}
		defer c.Close()
		return readLine(t, c), nil
	}

	// Enrolled with no listener registered: dropped, never delivered in the clear.
	if got, err := dialPod("8080"); err == nil {
		t.Fatalf("connection reached %q with no inbound listener registered; want it dropped", got)
	}
	if err := RegisterInboundListener(f.cfg.PinDir(), mustAddr(podIP), inbound.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ port, want string }{
		{"8080", "inbound " + peerIP + ":"},
		{"9090", "inbound " + peerIP + ":"}, // any port, even one nothing listens on
		{"15008", "hbone " + peerIP + ":"},
		// ztunnel's metrics port is in the node's netns: in a pod, it is the app's.
		{"15020", "inbound " + peerIP + ":"},
	} {
		got, err := dialPod(tc.port)
		if err != nil {
			t.Fatalf("port %s: %v", tc.port, err)
		}
		if !strings.HasPrefix(got, tc.want) {
			t.Errorf("port %s: got %q, want prefix %q", tc.port, got, tc.want)
		}
	}

	// The pod talking to itself over its own address is not captured.
	c, err := f.pod.dial("tcp4", podIP+":8080", DefaultMark)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := readLine(t, c); !strings.HasPrefix(got, "app ") {
		t.Errorf("pod to itself: got %q, want app", got)
	}
}

// TestNodeProbes: the node's own connections to a pod (kubelet's probes) reach the
// application; traffic that only carries the node's address, forwarded and SNATed to it as
// kube-proxy does for NodePort services, is captured.
func TestNodeProbes(t *testing.T) {
	f := newFixtureNode(t, Config{HandshakeGrace: time.Second}, true)
	serveName(f.pod.listen(t, "0.0.0.0:8080"), "app")
	inbound := f.pod.listen(t, "0.0.0.0:15006")
	serveName(inbound, "inbound")
	if err := RegisterInboundListener(f.cfg.PinDir(), mustAddr(podIP), inbound.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	greeting := func(c net.Conn, err error) string {
		t.Helper()
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		return readLine(t, c)
	}
	app, captured := "app "+peerIP+":", "inbound "+peerIP+":"
	t.Run("the node's connection", func(t *testing.T) {
		if got := greeting(f.peer.dial("tcp4", podIP+":8080", 0)); !strings.HasPrefix(got, app) {
			t.Errorf("got %q, want prefix %q", got, app)
		}
	})
	t.Run("the node's connection from a dual-stack socket", func(t *testing.T) {
		if got := greeting(f.peer.dial("tcp6", "[::ffff:"+podIP+"]:8080", 0)); !strings.HasPrefix(got, app) {
			t.Errorf("got %q, want prefix %q", got, app)
		}
	})
	t.Run("the application answers with SYN cookies", func(t *testing.T) {
		// With a cookie the pod keeps no socket of the connection until the final ACK,
		// which goes through sk_lookup again: the handshake must still be filed then.
		cmd := exec.Command("ip", "netns", "exec", f.pod.name, "sysctl", "-qw", "net.ipv4.tcp_syncookies=2")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", cmd.Args, err, out)
		}
		defer exec.Command("ip", "netns", "exec", f.pod.name, "sysctl", "-qw", "net.ipv4.tcp_syncookies=1").Run()
		c, err := f.peer.dial("tcp4", podIP+":8080", 0)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if got := readLine(t, c); !strings.HasPrefix(got, app) {
			t.Errorf("got %q, want prefix %q", got, app)
		}
		// Accepted, the connection's handshake is forgotten while it stays open.
		if n := countEntries(t, f.cap.sockops.ProbeHandshakes); n != 0 {
			t.Errorf("%d handshakes still filed for an accepted connection", n)
		}
	})
	run := func(t *testing.T, ns string, args ...string) {
		t.Helper()
		cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", cmd.Args, err, out)
		}
	}
	t.Run("a connection the pod never accepts is let through only briefly", func(t *testing.T) {
		// The application answers with a SYN cookie and the final ACK is lost (as when
		// its accept queue is full): the node's side is established, the pod holds
		// nothing. Within the grace period the next segment would still reach the
		// application; after it, the 4-tuple is captured like any other.
		run(t, f.pod.name, "sysctl", "-qw", "net.ipv4.tcp_syncookies=2")
		defer run(t, f.pod.name, "sysctl", "-qw", "net.ipv4.tcp_syncookies=1")
		drop := []string{"INPUT", "-p", "tcp", "--dport", "8080", "!", "--syn", "-j", "DROP"}
		run(t, f.pod.name, append([]string{"iptables", "-A"}, drop...)...)
		c, err := f.peer.dial("tcp4", podIP+":8080", 0)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		time.Sleep(f.cfg.HandshakeGrace + 500*time.Millisecond)
		run(t, f.pod.name, append([]string{"iptables", "-D"}, drop...)...)
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		// Captured, the segment meets ztunnel's listener, which holds no such connection
		// and resets it.
		if got, err := testutil.ReadLine(c, 3*time.Second); err == nil || strings.HasPrefix(got, "app ") {
			t.Errorf("after the grace period got %q, %v; want it captured (reset), not the app", got, err)
		}
	})
	t.Run("a probe whose source port the node's conntrack rewrites", func(t *testing.T) {
		// Its SYN no longer matches what was filed, so it is captured, and the entry,
		// which would otherwise wait for the first SYN from that port, goes once the
		// node's side is established.
		snat := []string{"POSTROUTING", "-t", "nat", "-p", "tcp", "--sport", "41000", "-j", "SNAT", "--to-source", peerIP + ":41001"}
		run(t, f.peer.name, append([]string{"iptables", "-A"}, snat...)...)
		defer run(t, f.peer.name, append([]string{"iptables", "-D"}, snat...)...)
		var c net.Conn
		err := f.peer.do(func() (err error) {
			d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(peerIP), Port: 41000}}
			c, err = d.Dial("tcp4", podIP+":8080")
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if got := readLine(t, c); !strings.HasPrefix(got, "inbound "+peerIP+":41001") {
			t.Errorf("got %q, want it captured from the rewritten port", got)
		}
		if n := countEntries(t, f.cap.sockops.ProbeHandshakes); n != 0 {
			t.Errorf("%d handshakes still filed for a connection whose SYN was never seen", n)
		}
	})
	t.Run("ztunnel's own socket on the node is not a probe", func(t *testing.T) {
		if got := greeting(f.peer.dial("tcp4", podIP+":8080", DefaultMark)); !strings.HasPrefix(got, captured) {
			t.Errorf("got %q, want it captured", got)
		}
	})
	t.Run("a refused probe leaves nothing behind", func(t *testing.T) {
		if c, err := f.peer.dial("tcp4", podIP+":9", 0); err == nil {
			c.Close()
			t.Fatal("a port nothing listens on accepted the node's connection")
		}
		// Filed handshakes are forgotten once established or failed: one left behind
		// would let a later SYN with the same addresses and ports through.
		if n := countEntries(t, f.cap.sockops.ProbeHandshakes); n != 0 {
			t.Errorf("%d handshakes of the node still filed", n)
		}
	})
	t.Run("forwarded traffic SNATed to the node's address", func(t *testing.T) {
		ext := newNS(t, strings.TrimSuffix(f.peer.name, "-peer")+"-ext")
		wireNamed(t, ext, f.peer, "ext0", "10.98.0.2", "10.98.0.1")
		ext.defaultRoute(t, "10.98.0.1")
		for _, args := range [][]string{
			{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
			{"iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"},
		} {
			cmd := exec.Command("ip", append([]string{"netns", "exec", f.peer.name}, args...)...)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%v: %v: %s", cmd.Args, err, out)
			}
		}
		if got := greeting(ext.dial("tcp4", podIP+":8080", 0)); !strings.HasPrefix(got, captured) {
			t.Errorf("got %q, want it captured", got)
		}
	})
	t.Run("after unenroll the node's connection is not filed", func(t *testing.T) {
		if err := f.cap.Unenroll(f.cookie); err != nil {
			t.Fatal(err)
		}
		if n := countEntries(t, f.cap.sockops.PodAddrs); n != 0 {
			t.Errorf("%d pod addresses still recorded after unenroll", n)
		}
		if got := greeting(f.peer.dial("tcp4", podIP+":8080", 0)); !strings.HasPrefix(got, app) {
			t.Errorf("got %q, want the app", got)
		}
		if n := countEntries(t, f.cap.sockops.ProbeHandshakes); n != 0 {
			t.Errorf("%d handshakes filed for a pod no longer enrolled", n)
		}
	})
}

// TestFiledHandshakesAreForgotten: a handshake sk_lookup lets through is forgotten however
// it ends, even when what made it one has changed meanwhile; an entry left behind would
// let a later SYN with the same addresses and ports past capture.
func TestFiledHandshakesAreForgotten(t *testing.T) {
	f := newFixtureNode(t, Config{}, true)
	inPod := func(args ...string) {
		t.Helper()
		cmd := exec.Command("ip", append([]string{"netns", "exec", f.pod.name, "iptables"}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", cmd.Args, err, out)
		}
	}
	filed := func() int { return countEntries(t, f.cap.sockops.ProbeHandshakes) }
	// The pod drops bare SYNs to 8081, so the node's connections there stay in SYN_SENT.
	inPod("-A", "INPUT", "-p", "tcp", "--dport", "8081", "--tcp-flags", "SYN,ACK", "SYN", "-j", "DROP")

	// connecting starts a connection from the node that stays in SYN_SENT for a second,
	// waits until it is filed, and returns a channel that yields its (failed) outcome.
	connecting := func(t *testing.T) <-chan error {
		t.Helper()
		done := make(chan error, 1)
		go func() {
			c, err := f.peer.dialTimeout("tcp4", podIP+":8081", time.Second)
			if err == nil {
				c.Close()
				err = nil
			}
			done <- err
		}()
		testutil.WaitFor(t, 2*time.Second, "the node's SYN_SENT handshake to be filed", func() bool { return filed() == 1 })
		return done
	}
	timedOut := func(t *testing.T, done <-chan error) {
		t.Helper()
		if err := <-done; err == nil {
			t.Fatal("connection through a dropping rule succeeded")
		}
		testutil.WaitFor(t, 2*time.Second, "the timed-out handshake to be forgotten", func() bool { return filed() == 0 })
	}

	t.Run("the pod's addresses went while connecting", func(t *testing.T) {
		done := connecting(t)
		// What Unenroll does first (it also forgets handshakes to the pod itself, which
		// this leaves to the socket).
		if _, err := f.cap.deletePodAddrs(f.cookie, nil); err != nil {
			t.Fatal(err)
		}
		timedOut(t, done)
		if err := f.cap.putPodAddrs(f.cookie, []netip.Addr{mustAddr(podIP)}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("the agent restarted while connecting", func(t *testing.T) {
		done := connecting(t)
		if err := f.cap.Close(); err != nil {
			t.Fatal(err)
		}
		f.load(t)
		timedOut(t, done)
	})
	t.Run("unenroll forgets what is filed for the pod", func(t *testing.T) {
		done := connecting(t)
		if err := f.cap.Unenroll(f.cookie); err != nil {
			t.Fatal(err)
		}
		if n := filed(); n != 0 {
			t.Errorf("%d handshakes still filed for a pod no longer enrolled", n)
		}
		<-done
		var err error
		if f.cookie, err = f.cap.Enroll(f.pod.path(), []netip.Addr{mustAddr(podIP)}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("simultaneous open", func(t *testing.T) {
		// The node's socket (port 40001) sends a SYN to pod:8081 that is dropped; the
		// pod's socket bound to 8081 (ztunnel-marked, so not captured) sends one to
		// node:40001. Each side takes the other's SYN, neither goes through
		// ACTIVE_ESTABLISHED from SYN_SENT the usual way.
		const nodePort, podPort = 40001, 8081
		nodeSide := make(chan error, 1)
		go func() {
			nodeSide <- f.peer.do(func() error {
				d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(peerIP), Port: nodePort}}
				c, err := d.Dial("tcp4", net.JoinHostPort(podIP, strconv.Itoa(podPort)))
				if err == nil {
					c.Close()
				}
				return err
			})
		}()
		testutil.WaitFor(t, 2*time.Second, "the node's handshake to be filed", func() bool { return filed() == 1 })
		err := f.pod.do(func() error {
			d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(podIP), Port: podPort},
				Control: withMark(DefaultMark)}
			c, err := d.Dial("tcp4", net.JoinHostPort(peerIP, strconv.Itoa(nodePort)))
			if err == nil {
				c.Close()
			}
			return err
		})
		if err != nil {
			t.Fatalf("the pod's side of the simultaneous open: %v", err)
		}
		if err := <-nodeSide; err != nil {
			t.Fatalf("the node's side of the simultaneous open: %v", err)
		}
		testutil.WaitFor(t, 2*time.Second, "the handshake to be forgotten", func() bool { return filed() == 0 })
		// The pod's marked socket went to the node, not to its own pod's application:
		// never filed.
		if n := countEntries(t, f.cap.sockops.DeliveryHandshakes); n != 0 {
			t.Errorf("%d ztunnel handshakes filed", n)
		}
	})
}

// TestZtunnelSocketOfAnotherPodIsCaptured: ztunnel's marked sockets are let through only
// into the pod they were made in (delivering to its application). A marked socket in
// another pod of the node (plaintext ztunnel passes through while its view of the
// destination is stale, or an application with CAP_NET_ADMIN setting the mark) meets the
// destination's capture like any other.
func TestZtunnelSocketOfAnotherPodIsCaptured(t *testing.T) {
	f := newFixtureNode(t, Config{}, true)
	other := newNS(t, strings.TrimSuffix(f.peer.name, "-peer")+"-pod2")
	wireNamed(t, other, f.peer, "eth1", "10.99.1.2", "10.99.1.1")
	other.defaultRoute(t, "10.99.1.1")
	cmd := exec.Command("ip", "netns", "exec", f.peer.name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v: %s", cmd.Args, err, out)
	}
	if _, err := f.cap.Enroll(other.path(), []netip.Addr{mustAddr("10.99.1.2")}); err != nil {
		t.Fatal(err)
	}
	serveName(f.pod.listen(t, "0.0.0.0:8080"), "app")
	inbound := f.pod.listen(t, "0.0.0.0:15006")
	serveName(inbound, "inbound")
	if err := RegisterInboundListener(f.cfg.PinDir(), mustAddr(podIP), inbound.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	c, err := other.dial("tcp4", podIP+":8080", DefaultMark)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := readLine(t, c); !strings.HasPrefix(got, "inbound 10.99.1.2:") {
		t.Errorf("got %q, want it captured by the destination pod", got)
	}
	// An address of the pod the agent never recorded (a second interface's, say) is not
	// the way around it: with no inbound listener for it, the connection is dropped.
	h, err := netlink.NewHandleAt(f.pod.handle)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	second, _ := netlink.ParseAddr("10.99.0.3/24")
	if err := h.AddrAdd(eth0, second); err != nil {
		t.Fatal(err)
	}
	if c, err := other.dial("tcp4", "10.99.0.3:8080", DefaultMark); err == nil {
		line, _ := testutil.ReadLine(c, time.Second)
		c.Close()
		t.Errorf("a marked socket of another pod reached %q at the pod's unrecorded address", line)
	}
	if n := countEntries(t, f.cap.sockops.DeliveryHandshakes); n != 0 {
		t.Errorf("%d ztunnel handshakes filed", n)
	}
	// ztunnel delivering inside the pod itself, from the client's address, is let through:
	// TestMeshEndToEnd (b's application sees a's own address).
}

func countEntries(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	it := m.Iterate()
	var k, v []byte
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestLoadOverOldPins: an agent upgraded in place finds pins of maps an earlier version
// used and this one does not, in shapes this one cannot use; they must not stop it.
func TestLoadOverOldPins(t *testing.T) {
	testutil.RequireRoot(t)
	cfg := Config{Instance: fmt.Sprintf("test-old%d", time.Now().UnixNano()%100000), NodeNetns: DefaultNodeNetns}
	t.Cleanup(func() {
		if err := Uninstall(cfg); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	if err := os.MkdirAll(cfg.PinDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	old := []string{"host_addrs", "ztunnel_handshakes", "node_handshakes"}
	for _, name := range old {
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 1, MaxEntries: 1})
		if err != nil {
			t.Fatal(err)
		}
		err = m.Pin(filepath.Join(cfg.PinDir(), name))
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	// Maps still in use whose values an earlier version had narrower.
	for name, spec := range map[string]*ebpf.MapSpec{
		"probe_handshakes": {Type: ebpf.LRUHash, KeySize: 40, ValueSize: 1, MaxEntries: 65536},
		"sluice_node":      {Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1},
	} {
		m, err := ebpf.NewMap(spec)
		if err != nil {
			t.Fatal(err)
		}
		err = m.Pin(filepath.Join(cfg.PinDir(), name))
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	c, err := Load(cfg)
	if err != nil {
		t.Fatalf("load over old pins: %v", err)
	}
	defer c.Close()
	if info, err := c.sockops.ProbeHandshakes.Info(); err != nil || info.ValueSize != 8 {
		t.Errorf("probe_handshakes = %+v, %v; want it made afresh with 8-byte values", info, err)
	}
	if info, err := c.sockops.SluiceNode.Info(); err != nil || info.ValueSize != 16 {
		t.Errorf("sluice_node = %+v, %v; want it made afresh with 16-byte values", info, err)
	}
	c.Close()

	// A stateful map in an old shape is not thrown away: the load fails, naming it.
	if err := Uninstall(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(cfg.PinDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 16, ValueSize: 4, MaxEntries: 16})
	if err != nil {
		t.Fatal(err)
	}
	err = m.Pin(filepath.Join(cfg.PinDir(), "pod_addrs"))
	m.Close()
	if err != nil {
		t.Fatal(err)
	}
	if c, err := Load(cfg); err == nil {
		c.Close()
		t.Error("loaded over a pod_addrs pinned in another shape")
	} else if !strings.Contains(err.Error(), "pod_addrs") {
		t.Errorf("load error %q does not name the map", err)
	}
	for _, name := range old {
		if _, err := os.Stat(filepath.Join(cfg.PinDir(), name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("old pin %s still there: %v", name, err)
		}
	}
}

func TestRestartKeepsCapture(t *testing.T) {
	f := newFixture(t, Config{})
	f.proxy(t)
	serveName(f.peer.listen(t, peerIP+":8080"), "server")
	c, err := f.pod.dial("tcp4", peerIP+":8080", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	readLine(t, c) // proxy
	readLine(t, c) // server

	// The agent goes away and a new one loads its programs over the pinned ones.
	if err := f.cap.Close(); err != nil {
		t.Fatal(err)
	}
	f.cap = nil
	probe, err := f.pod.dial("tcp4", peerIP+":8080", 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := readLine(t, probe); !strings.HasPrefix(got, "proxy ") {
		t.Errorf("with no agent running: got %q, want capture to persist", got)
	}
	probe.Close()
	f.load(t)

	if _, err := c.Write([]byte("still-here\n")); err != nil {
		t.Fatal(err)
	}
	if got := readLine(t, c); got != "still-here" {
		t.Errorf("open connection after restart echoed %q", got)
	}
	c2, err := f.pod.dial("tcp4", peerIP+":8080", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if got := readLine(t, c2); !strings.HasPrefix(got, "proxy ") {
		t.Errorf("new connection after restart: got %q, want captured", got)
	}
	cookies, err := f.cap.Enrolled()
	if err != nil || len(cookies) != 1 || cookies[0] != f.cookie {
		t.Errorf("enrolled after restart = %v, %v; want [%d]", cookies, err, f.cookie)
	}
}

func TestKernelMetricsMatchBytes(t *testing.T) {
	for _, accel := range []bool{false, true} {
		t.Run(fmt.Sprintf("accelerate=%v", accel), func(t *testing.T) {
			f := newFixtureNode(t, Config{Accelerate: accel}, true)
			f.proxy(t)
			serveName(f.peer.listen(t, peerIP+":8080"), "server")
			const payload = 1 << 20
			c, err := f.pod.dial("tcp4", peerIP+":8080", 0)
			if err != nil {
				t.Fatal(err)
			}
			l1, l2 := readLine(t, c), readLine(t, c)
			if n, err := f.cap.AcceleratedSockets(); err != nil || (accel && n != 2) || (!accel && n != 0) {
				t.Errorf("accelerated sockets = %d, %v; want 2 with acceleration, 0 without", n, err)
			}
			go func() {
				buf := make([]byte, payload)
				c.Write(buf)
				c.(*net.TCPConn).CloseWrite()
			}()
			n, err := io.Copy(io.Discard, c)
			if err != nil || n != payload {
				t.Fatalf("echo: %d bytes, %v", n, err)
			}
			received := uint64(payload + len(l1) + len(l2) + 2)
			// With acceleration the bytes skip TCP altogether: the kernel's own count of
			// acknowledged bytes on the application's socket stays near zero.
			if acked := tcpBytesAcked(t, c); accel && acked > payload/10 {
				t.Errorf("accelerated: TCP acknowledged %d of %d bytes; sk_msg is not redirecting", acked, payload)
			} else if !accel && acked < payload {
				t.Errorf("not accelerated: TCP acknowledged only %d of %d bytes", acked, payload)
			}
			c.Close()

			var got Counters
			deadline := time.Now().Add(3 * time.Second)
			for time.Now().Before(deadline) {
				st, err := f.cap.Stats()
				if err != nil {
					t.Fatal(err)
				}
				got = st[f.cookie].Outbound
				if got.Closed == 1 && got.BytesReceived == received {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if got.Opened != 1 || got.Closed != 1 {
				t.Errorf("connections opened/closed = %d/%d, want 1/1 (%+v)", got.Opened, got.Closed, got)
			}
			if got.BytesSent != payload || got.BytesReceived != received {
				t.Errorf("bytes sent/received = %d/%d, want %d/%d", got.BytesSent, got.BytesReceived, payload, received)
			}

			// Inbound, from the node (its probes are not captured), to the application
			// itself.
			serveName(f.pod.listen(t, podIP+":8080"), "app")
			in, err := f.peer.dial("tcp4", podIP+":8080", 0)
			if err != nil {
				t.Fatal(err)
			}
			line := readLine(t, in)
			go func() {
				in.Write(make([]byte, 5000))
				in.(*net.TCPConn).CloseWrite()
			}()
			if n, err := io.Copy(io.Discard, in); err != nil || n != 5000 {
				t.Fatalf("inbound echo: %d bytes, %v", n, err)
			}
			in.Close()
			var gotIn Counters
			for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				st, _ := f.cap.Stats()
				if gotIn = st[f.cookie].Inbound; gotIn.Closed == 1 {
					break
				}
			}
			if gotIn.Opened != 1 || gotIn.Closed != 1 || gotIn.BytesReceived != 5000 || gotIn.BytesSent != uint64(5000+len(line)+1) {
				t.Errorf("inbound counters %+v, want 1 opened and closed, 5000 received, %d sent", gotIn, 5000+len(line)+1)
			}
			if gotIn.RTTSamples == 0 || gotIn.RTTSumMicros == 0 {
				t.Errorf("no RTT samples for a connection over the wire: %+v", gotIn)
			}
		})
	}
}

// TestInboundMetricsCountDeliveries: the application's end of a connection ztunnel
// delivered inherits ztunnel's mark (tcp_fwmark_accept) and is still the application's
// inbound connection to count.
func TestInboundMetricsCountDeliveries(t *testing.T) {
	f := newFixture(t, Config{})
	cmd := exec.Command("ip", "netns", "exec", f.pod.name, "sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v: %s", cmd.Args, err, out)
	}
	serveName(f.pod.listen(t, podIP+":8080"), "app")
	// ztunnel's own end of a captured connection, accepted on its marked 15006 listener
	// (with the original destination port), is not the application's.
	var inbound net.Listener
	err := f.pod.do(func() (err error) {
		lc := net.ListenConfig{Control: withMark(DefaultMark)}
		lc.SetMultipathTCP(false)
		inbound, err = lc.Listen(context.Background(), "tcp", "0.0.0.0:15006")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer inbound.Close()
	serveName(inbound, "inbound")
	if err := RegisterInboundListener(f.cfg.PinDir(), mustAddr(podIP), inbound.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	captured, err := f.peer.dial("tcp4", podIP+":9090", 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := readLine(t, captured); !strings.HasPrefix(got, "inbound ") {
		t.Fatalf("got %q, want ztunnel's listener", got)
	}
	captured.Close()
	// ztunnel's delivery sockets carry its mark and the delivery bit.
	c, err := f.pod.dial("tcp4", podIP+":8080", DeliveryMarkBit|DefaultMark)
	if err != nil {
		t.Fatal(err)
	}
	readLine(t, c)
	c.Close()
	var got Counters
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		st, err := f.cap.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if got = st[f.cookie].Inbound; got.Closed >= 1 {
			break
		}
	}
	if got.Opened != 1 || got.Closed != 1 {
		t.Errorf("inbound connections opened/closed = %d/%d, want 1/1, the delivered one only (%+v)", got.Opened, got.Closed, got)
	}
	// Its RTT is the hop from ztunnel, not the client's: left out, as for captured
	// outbound connections.
	if got.RTTSamples != 0 {
		t.Errorf("%d RTT samples of a delivered connection counted", got.RTTSamples)
	}
}

func tcpBytesAcked(t *testing.T, c net.Conn) uint64 {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var ierr error
	rc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if ierr != nil {
		t.Fatal(ierr)
	}
	return info.Bytes_acked
}

func TestDNSCapture(t *testing.T) {
	f := newFixture(t, Config{CaptureDNS: true})
	var dns net.PacketConn
	if err := f.pod.do(func() (err error) {
		dns, err = net.ListenPacket("udp4", "127.0.0.1:15053")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer dns.Close()
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := dns.ReadFrom(buf)
			if err != nil {
				return
			}
			dns.WriteTo(append([]byte("dns:"), buf[:n]...), from)
		}
	}()
	var app net.PacketConn
	if err := f.pod.do(func() (err error) {
		app, err = net.ListenPacket("udp4", "0.0.0.0:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	server := &net.UDPAddr{IP: net.ParseIP("10.96.0.53"), Port: 53}
	if _, err := app.WriteTo([]byte("query"), server); err != nil {
		t.Fatal(err)
	}
	app.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 512)
	n, from, err := app.ReadFrom(buf)
	if err != nil {
		t.Fatalf("no DNS answer: %v", err)
	}
	if string(buf[:n]) != "dns:query" {
		t.Errorf("answer %q, want it from the in-pod DNS listener", buf[:n])
	}
	if from.String() != server.String() {
		t.Errorf("answer appears to come from %s, want %s", from, server)
	}
}
