//go:build linux

// Package passthrough stands in for ztunnel's in-pod listeners until ztunnel exists: it
// takes pod network namespaces from the node agent over the real zds protocol, listens on
// 15001 (outbound) and 15006 (inbound) inside each, reports every captured connection
// with its original destination, and forwards it in plain TCP. It is what the capture
// tests and the local demo use to show capture working end to end; it carries no TLS and
// enforces nothing, so it is not a product component.
package passthrough

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/cni/zds"
	"github.com/sluicemesh/sluice/internal/netnsexec"
)

// Event is one captured connection.
type Event struct {
	Pod       string         // namespace/name
	Direction string         // "outbound" or "inbound"
	Client    netip.AddrPort // the connecting socket as the proxy saw it
	Original  netip.AddrPort // where the client was going
}

// Proxy serves the pods one node agent hands it.
type Proxy struct {
	// ZDSPath is the node agent's ztunnel socket.
	ZDSPath string
	// PinDir is the agent's BPF pin directory, where inbound listeners are registered.
	PinDir string
	// Logger defaults to slog.Default().
	Logger *slog.Logger

	mu     sync.Mutex
	pods   map[string]*pod
	events []Event
	notify chan struct{}
}

type pod struct {
	name      string
	netns     *os.File
	ips       []netip.Addr
	listeners []net.Listener
}

// Run serves until ctx ends.
func (p *Proxy) Run(ctx context.Context) error {
	p.mu.Lock()
	if p.pods == nil {
		p.pods = map[string]*pod{}
	}
	p.mu.Unlock()
	if p.Logger == nil {
		p.Logger = slog.Default()
	}
	c := &zds.Client{Path: p.ZDSPath, Logger: p.Logger}
	err := c.Run(ctx, p)
	p.mu.Lock()
	for uid, pd := range p.pods {
		pd.close(p.PinDir)
		delete(p.pods, uid)
	}
	p.mu.Unlock()
	return err
}

// Events returns the connections captured so far.
func (p *Proxy) Events() []Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Event(nil), p.events...)
}

// WaitEvent waits for a captured connection matching match.
func (p *Proxy) WaitEvent(ctx context.Context, match func(Event) bool) (Event, error) {
	for {
		p.mu.Lock()
		for _, e := range p.events {
			if match(e) {
				p.mu.Unlock()
				return e, nil
			}
		}
		if p.notify == nil {
			p.notify = make(chan struct{})
		}
		ch := p.notify
		p.mu.Unlock()
		select {
		case <-ctx.Done():
			return Event{}, ctx.Err()
		case <-ch:
		}
	}
}

// Serving reports whether the proxy has the pod with this UID.
func (p *Proxy) Serving(uid string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.pods[uid]
	return ok
}

func (p *Proxy) record(e Event) {
	p.mu.Lock()
	p.events = append(p.events, e)
	if p.notify != nil {
		close(p.notify)
		p.notify = nil
	}
	p.mu.Unlock()
	p.Logger.Info("captured", "pod", e.Pod, "direction", e.Direction, "client", e.Client, "original", e.Original)
}

// Add implements zds.Handler: open the pod's listeners inside its namespace.
func (p *Proxy) Add(uid string, w zds.Workload, netns *os.File) error {
	pd := &pod{name: w.Namespace + "/" + w.Name, netns: netns}
	for _, s := range w.IPs {
		if a, err := netip.ParseAddr(s); err == nil {
			pd.ips = append(pd.ips, a)
		}
	}
	out, err := listenIn(netns, "127.0.0.1:15001")
	if err != nil {
		netns.Close()
		return err
	}
	in, err := listenIn(netns, "0.0.0.0:15006")
	if err != nil {
		out.Close()
		netns.Close()
		return err
	}
	pd.listeners = []net.Listener{out, in}
	for _, ip := range pd.ips {
		if err := bpf.RegisterInboundListener(p.PinDir, ip, in.(*net.TCPListener)); err != nil {
			pd.close(p.PinDir)
			return err
		}
	}
	p.mu.Lock()
	if old := p.pods[uid]; old != nil {
		old.close(p.PinDir)
	}
	p.pods[uid] = pd
	p.mu.Unlock()
	go p.serve(pd, out, "outbound")
	go p.serve(pd, in, "inbound")
	return nil
}

func (p *Proxy) Keep(string, zds.Workload) error { return nil }
func (p *Proxy) SnapshotDone() error             { return nil }

func (p *Proxy) Delete(uid string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pd := p.pods[uid]; pd != nil {
		pd.close(p.PinDir)
		delete(p.pods, uid)
	}
	return nil
}

func (pd *pod) close(pinDir string) {
	for _, ip := range pd.ips {
		if len(pd.listeners) > 1 {
			bpf.UnregisterInboundListener(pinDir, ip, pd.listeners[1].(*net.TCPListener))
		}
	}
	for _, l := range pd.listeners {
		l.Close()
	}
	pd.netns.Close()
}

func (p *Proxy) serve(pd *pod, ln net.Listener, dir string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go p.handle(pd, c, dir)
	}
}

func (p *Proxy) handle(pd *pod, c net.Conn, dir string) {
	defer c.Close()
	client := netip.MustParseAddrPort(c.RemoteAddr().String())
	var orig netip.AddrPort
	if dir == "outbound" {
		var err error
		if orig, err = bpf.OriginalDst(c.(*net.TCPConn)); err != nil {
			p.Logger.Warn("no original destination", "pod", pd.name, "err", err)
			return
		}
	} else {
		// sk_lookup keeps the packet's destination: the accepted socket's local address is
		// where the client was going.
		orig = netip.MustParseAddrPort(c.LocalAddr().String())
	}
	orig = netip.AddrPortFrom(orig.Addr().Unmap(), orig.Port())
	p.record(Event{Pod: pd.name, Direction: dir, Client: client, Original: orig})
	up, err := dialIn(pd.netns, orig.String())
	if err != nil {
		p.Logger.Info("upstream unreachable", "pod", pd.name, "original", orig, "err", err)
		return
	}
	defer up.Close()
	done := make(chan struct{})
	go func() { copyClientToUpstream(up, c); close(done) }()
	copyUpstreamToClient(c, up)
	<-done
}

func copyClientToUpstream(up, c net.Conn) { copyLoop(up, c) }
func copyUpstreamToClient(c, up net.Conn) { copyLoop(c, up) }

// copyLoop reads and writes instead of io.Copy: splice(2) would bypass data that sk_msg
// acceleration put on the socket's queue.
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

func listenIn(netns *os.File, addr string) (net.Listener, error) {
	var ln net.Listener
	err := netnsexec.Do(netns, func() (err error) {
		lc := net.ListenConfig{Control: markSocket}
		lc.SetMultipathTCP(false) // MPTCP listeners cannot be registered with sk_lookup
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	return ln, err
}

func dialIn(netns *os.File, addr string) (net.Conn, error) {
	var c net.Conn
	err := netnsexec.Do(netns, func() (err error) {
		d := net.Dialer{Timeout: 3 * time.Second, Control: markSocket}
		c, err = d.Dial("tcp", addr)
		return err
	})
	return c, err
}

// markSocket sets ztunnel's mark, so the proxy's own sockets are never captured.
func markSocket(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, bpf.DefaultMark)
	})
	return errors.Join(err, serr)
}
