//go:build linux

package cmd

// The demo's traffic: echo servers in the pods, a service in the fabric, and the
// connections between them with what the capture layer reported for each.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/test/passthrough"
)

// startServers starts an echo server in every pod and the service in the fabric. They
// live in this process: the sockets are in the pods' network namespaces.
func (d *demo) startServers() error {
	for _, p := range d.l.Pods() {
		ln, err := listenNoMPTCP(p.Do, fmt.Sprintf(":%d", demoEchoPort))
		if err != nil {
			return fmt.Errorf("echo server in %s: %w", p, err)
		}
		d.servers = append(d.servers, ln)
		go serveEcho(ln, p.String())
	}
	f := d.l.Fabric()
	err := withNetlinkIn(f.NetnsPath, func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		a := netip.PrefixFrom(demoServiceAddr.Addr(), 32)
		return h.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(32, 32)}})
	})
	if err != nil {
		return fmt.Errorf("service address %s in the fabric: %w", demoServiceAddr.Addr(), err)
	}
	ln, err := listenNoMPTCP(f.Do, demoServiceAddr.String())
	if err != nil {
		return fmt.Errorf("service %s: %w", demoServiceAddr, err)
	}
	d.servers = append(d.servers, ln)
	go serveEcho(ln, demoServiceName)
	return nil
}

func withNetlinkIn(path string, fn func(*netlink.Handle) error) error {
	nsh, err := netns.GetFromPath(path)
	if err != nil {
		return err
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return err
	}
	defer h.Delete()
	return fn(h)
}

// listenNoMPTCP listens inside a namespace (do runs its function there). Plain TCP:
// Go listens with MPTCP by default, which sk_lookup cannot steer to.
func listenNoMPTCP(do func(func() error) error, addr string) (net.Listener, error) {
	var ln net.Listener
	err := do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		var err error
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	return ln, err
}

// serveEcho answers each connection's first line with "<name> <client address>".
func serveEcho(ln net.Listener, name string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
				return
			}
			fmt.Fprintf(c, "%s|%s\n", name, c.RemoteAddr())
		}()
	}
}

// connCase is one connection the demo makes and what should happen to it.
type connCase struct {
	what   string
	from   string
	dial   func(ctx context.Context, network, addr string) (net.Conn, error)
	to     netip.AddrPort
	toName string
	want   []wantEvent // captures expected, all with original destination to
	answer string      // who should answer
}

// wantEvent is a capture expected on a node's stand-in.
type wantEvent struct {
	node      int
	direction string
	pod       string
}

// connResult is what happened.
type connResult struct {
	events   []nodeEvent
	answer   string         // who answered
	sawFrom  netip.AddrPort // the client address the server saw
	peer     netip.AddrPort // what the client's getpeername said
	err      error
	duration time.Duration
}

type nodeEvent struct {
	node int
	passthrough.Event
}

func (d *demo) connect(ctx context.Context, cc connCase) {
	marks := make([]int, len(d.proxies))
	for i, p := range d.proxies {
		marks[i] = len(p.Events())
	}
	r := d.exchange(ctx, cc)
	// A capture is recorded before the proxy dials onwards, so before any answer: the
	// events are complete now. A short pause still catches strays of failed exchanges.
	if r.err != nil {
		time.Sleep(200 * time.Millisecond)
	}
	for i, p := range d.proxies {
		for _, e := range p.Events()[marks[i]:] {
			r.events = append(r.events, nodeEvent{i, e})
		}
	}
	d.report(cc, r)
}

func (d *demo) exchange(ctx context.Context, cc connCase) (r connResult) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	start := time.Now()
	defer func() { r.duration = time.Since(start) }()
	c, err := cc.dial(ctx, "tcp", cc.to.String())
	if err != nil {
		r.err = err
		return r
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r.peer, _ = netip.ParseAddrPort(c.RemoteAddr().String())
	if _, err := fmt.Fprintf(c, "hello from %s\n", cc.from); err != nil {
		r.err = err
		return r
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		r.err = fmt.Errorf("no answer: %w", err)
		return r
	}
	name, from, _ := strings.Cut(strings.TrimSpace(line), "|")
	r.answer = name
	r.sawFrom, _ = netip.ParseAddrPort(from)
	return r
}

func (d *demo) report(cc connCase, r connResult) {
	fmt.Fprintf(d.out, "\n   %s -> %s %s   (%s)\n", cc.from, cc.toName, cc.to, cc.what)
	tw := newTable(d.out)
	if len(r.events) == 0 {
		fmt.Fprintf(tw, "      captured\tno: the connection went straight to its destination\n")
	}
	for _, e := range r.events {
		port := bpf.DefaultOutboundPort
		if e.Direction == "inbound" {
			port = bpf.DefaultInboundPort
		}
		fmt.Fprintf(tw, "      captured\t%-8s by :%d in %s\toriginal destination %s\n", e.Direction, port, e.Pod, e.Original)
	}
	if r.err != nil {
		fmt.Fprintf(tw, "      answered\tnobody: %v\n", r.err)
	} else {
		fmt.Fprintf(tw, "      answered\tby %s, which saw the client as %s%s\n", r.answer, r.sawFrom, d.describe(r.sawFrom.Addr(), cc.to.Addr()))
		fmt.Fprintf(tw, "      client sees\tpeer %s (getpeername)\n", r.peer)
	}
	tw.Flush()

	var problems []string
	got := slices.Clone(r.events)
	for _, w := range cc.want {
		i := slices.IndexFunc(got, func(e nodeEvent) bool {
			return e.node == w.node && e.Direction == w.direction && e.Pod == w.pod && e.Original == cc.to
		})
		if i < 0 {
			problems = append(problems, fmt.Sprintf("not captured %s in %s (want :%d, original destination %s)", w.direction, w.pod, listenerPort(w.direction), cc.to))
			continue
		}
		got = slices.Delete(got, i, i+1)
	}
	for _, e := range got {
		problems = append(problems, fmt.Sprintf("unexpected capture: %s in %s, original destination %s", e.Direction, e.Pod, e.Original))
	}
	switch {
	case r.err != nil:
		problems = append(problems, fmt.Sprintf("no answer (want one from %s): %v", cc.answer, r.err))
	case r.answer != cc.answer:
		problems = append(problems, fmt.Sprintf("answered by %q, want %q", r.answer, cc.answer))
	case r.peer != cc.to:
		problems = append(problems, fmt.Sprintf("client's getpeername says %s, want %s (the redirect must not show)", r.peer, cc.to))
	}
	if len(problems) == 0 {
		fmt.Fprintf(d.out, "      ok (%.1fms)\n", float64(r.duration.Microseconds())/1000)
		return
	}
	for _, p := range problems {
		d.failures = append(d.failures, fmt.Sprintf("%s -> %s: %s", cc.from, cc.to, p))
		fmt.Fprintf(d.out, "      FAIL  %s\n", p)
	}
}

func listenerPort(direction string) uint16 {
	if direction == "inbound" {
		return bpf.DefaultInboundPort
	}
	return bpf.DefaultOutboundPort
}

// describe names the owner of a client address as the server saw it.
func (d *demo) describe(a, server netip.Addr) string {
	if a == server {
		return " (itself: its in-pod proxy)"
	}
	for _, p := range d.l.Pods() {
		if p.IP == a {
			return " (" + p.String() + ")"
		}
	}
	for _, n := range d.l.Nodes() {
		if n.Gateway == a || n.IP == a {
			return " (node " + n.Name + ")"
		}
	}
	return ""
}
