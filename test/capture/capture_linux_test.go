//go:build linux

// Package capture_test runs the whole capture layer as a node would: the lab's real CNI
// chain (bridge, host-local, sluice-cni), one node agent per node, and the passthrough
// stand-in for ztunnel's in-pod listeners.
package capture_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/cni/agent"
	"github.com/sluicemesh/sluice/test/lab"
	"github.com/sluicemesh/sluice/test/meshlab"
	"github.com/sluicemesh/sluice/test/passthrough"
)

const ambient = meshlab.AmbientLabel

// node is a lab node with its agent and the passthrough stand-in for ztunnel.
type node struct {
	*meshlab.Node
	proxy *passthrough.Proxy
}

type world struct {
	*meshlab.World
	lab   *lab.Lab
	nodes []*node
}

// setup builds a two-node lab with agents and a passthrough stand-in per node. With
// agentInstalls, each agent chains its plugin into the node's CNI config itself.
func setup(t *testing.T, agentInstalls bool) *world {
	t.Helper()
	mw := meshlab.Up(t, meshlab.Options{AgentInstalls: agentInstalls})
	w := &world{World: mw, lab: mw.Lab}
	if err := w.lab.LabelNamespace("mesh", ambient, "ambient"); err != nil {
		t.Fatal(err)
	}
	if err := w.lab.LabelNamespace("plain", "team", "legacy"); err != nil {
		t.Fatal(err)
	}
	for _, n := range mw.Nodes {
		nd := &node{Node: n, proxy: &passthrough.Proxy{ZDSPath: n.ZDSSocket(), PinDir: n.PinDir()}}
		pctx, cancel := context.WithCancel(context.Background())
		go nd.proxy.Run(pctx)
		t.Cleanup(cancel)
		w.nodes = append(w.nodes, nd)
	}
	return w
}

func (w *world) addPod(t *testing.T, ns, name string, node int, labels map[string]string) *lab.Pod {
	t.Helper()
	return w.AddPod(t, lab.PodSpec{Name: name, Namespace: ns, Node: node, Labels: labels})
}

// dialMapped connects an AF_INET6 socket to ::ffff:<ip>, which Go's dialer would turn
// into IPv4 before the kernel saw it.
func dialMapped(t *testing.T, p *lab.Pod, ap netip.AddrPort) net.Conn {
	t.Helper()
	var c net.Conn
	err := p.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.Connect(fd, &unix.SockaddrInet6{Port: int(ap.Port()), Addr: netip.AddrFrom16(ap.Addr().As16()).As16()}); err != nil {
			unix.Close(fd)
			return err
		}
		f := os.NewFile(uintptr(fd), "mapped")
		defer f.Close()
		c, err = net.FileConn(f)
		return err
	})
	if err != nil {
		t.Fatalf("dial [::ffff:%s]:%d: %v", ap.Addr(), ap.Port(), err)
	}
	return c
}

func waitEvent(t *testing.T, p *passthrough.Proxy, what string, match func(passthrough.Event) bool) passthrough.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	e, err := p.WaitEvent(ctx, match)
	if err != nil {
		t.Fatalf("no captured connection: %s (events: %+v)", what, p.Events())
	}
	return e
}

func countEvents(p *passthrough.Proxy, match func(passthrough.Event) bool) int {
	n := 0
	for _, e := range p.Events() {
		if match(e) {
			n++
		}
	}
	return n
}

func from(p *lab.Pod, dir string, orig netip.AddrPort) func(passthrough.Event) bool {
	return func(e passthrough.Event) bool {
		return e.Pod == p.Namespace+"/"+p.Name && e.Direction == dir && e.Original == orig
	}
}

func TestCaptureEndToEnd(t *testing.T) {
	w := setup(t, false)
	n0, n1 := w.nodes[0], w.nodes[1]
	a := w.addPod(t, "mesh", "a", 0, nil)
	b := w.addPod(t, "mesh", "b", 1, nil)
	c := w.addPod(t, "plain", "c", 0, nil)
	d := w.addPod(t, "mesh", "d", 0, map[string]string{ambient: "none"})
	for _, p := range []*lab.Pod{b, c, d} {
		meshlab.Serve(t, p, 8080)
	}
	bAddr := b.AddrPort(8080)
	meshlab.WaitFor(t, "ztunnel stand-ins serve the enrolled pods", func() bool {
		return n0.proxy.Serving(a.UID) && n1.proxy.Serving(b.UID) && !n0.proxy.Serving(d.UID)
	})

	t.Run("pod to pod across nodes is captured at both ends", func(t *testing.T) {
		conn := meshlab.Dial(t, a, bAddr.String())
		defer conn.Close()
		if got := conn.RemoteAddr().String(); got != bAddr.String() {
			t.Errorf("application's getpeername = %s, want %s", got, bAddr)
		}
		if got := meshlab.Greeting(t, conn); !strings.HasPrefix(got, "b ") {
			t.Errorf("greeting %q, want b's", got)
		}
		waitEvent(t, n0.proxy, "a's outbound at 15001", from(a, "outbound", bAddr))
		in := waitEvent(t, n1.proxy, "b's inbound at 15006", from(b, "inbound", bAddr))
		if in.Client.Addr() != a.IP {
			t.Errorf("b's inbound listener saw client %s, want a (%s)", in.Client, a.IP)
		}
		// The stand-in's own upstream connection (marked, like ztunnel's) is not captured
		// again: one outbound event per application connection.
		if n := countEvents(n0.proxy, from(a, "outbound", bAddr)); n != 1 {
			t.Errorf("%d outbound captures for one connection", n)
		}
	})

	t.Run("service IP keeps its original destination", func(t *testing.T) {
		svc := netip.MustParseAddrPort("10.96.0.10:80")
		conn := meshlab.Dial(t, a, svc.String())
		defer conn.Close()
		waitEvent(t, n0.proxy, "a to a service IP", from(a, "outbound", svc))
	})

	t.Run("IPv4-mapped IPv6 connect is captured", func(t *testing.T) {
		conn := dialMapped(t, a, bAddr)
		defer conn.Close()
		if got := meshlab.Greeting(t, conn); !strings.HasPrefix(got, "b ") {
			t.Errorf("greeting %q, want b's", got)
		}
		if n := countEvents(n0.proxy, from(a, "outbound", bAddr)); n != 2 {
			t.Errorf("mapped connect: %d outbound captures to b in total, want 2", n)
		}
	})

	t.Run("pods outside the mesh go direct", func(t *testing.T) {
		before := len(n0.proxy.Events())
		conn := meshlab.Dial(t, c, d.AddrPort(8080).String())
		defer conn.Close()
		if got := meshlab.Greeting(t, conn); !strings.HasPrefix(got, "d "+c.IP.String()) {
			t.Errorf("plain pod to opted-out pod: greeting %q, want d seeing c directly", got)
		}
		if after := len(n0.proxy.Events()); after != before {
			t.Errorf("a connection between pods outside the mesh was captured: %+v", n0.proxy.Events()[before:])
		}
		// Plaintext into a mesh pod from outside the mesh is captured inbound.
		conn2 := meshlab.Dial(t, c, bAddr.String())
		defer conn2.Close()
		meshlab.Greeting(t, conn2)
		waitEvent(t, n1.proxy, "c's plaintext into b", func(e passthrough.Event) bool {
			return e.Direction == "inbound" && e.Client.Addr() == c.IP && e.Original == bAddr
		})
	})

	t.Run("the node reaches pods directly (kubelet probes)", func(t *testing.T) {
		conn := meshlab.Dial(t, w.lab.Node(1), bAddr.String())
		defer conn.Close()
		if got := meshlab.Greeting(t, conn); !strings.HasPrefix(got, "b "+w.lab.Node(1).Gateway.String()) {
			t.Errorf("probe greeting %q, want b answering the node's address directly", got)
		}
	})

	t.Run("labels take effect on running pods", func(t *testing.T) {
		if err := w.lab.LabelPod("mesh", "a", ambient, "none"); err != nil {
			t.Fatal(err)
		}
		meshlab.WaitFor(t, "a is released", func() bool { return !n0.proxy.Serving(a.UID) })
		before := countEvents(n0.proxy, from(a, "outbound", bAddr))
		conn := meshlab.Dial(t, a, bAddr.String())
		meshlab.Greeting(t, conn)
		conn.Close()
		if n := countEvents(n0.proxy, from(a, "outbound", bAddr)); n != before {
			t.Error("opted-out pod still captured")
		}
		if err := w.lab.LabelPod("mesh", "a", ambient, ""); err != nil {
			t.Fatal(err)
		}
		meshlab.WaitFor(t, "a is enrolled again", func() bool { return n0.proxy.Serving(a.UID) })

		// Removing the namespace label releases every pod in it.
		if err := w.lab.LabelNamespace("mesh", ambient, ""); err != nil {
			t.Fatal(err)
		}
		meshlab.WaitFor(t, "the namespace is released", func() bool { return !n0.proxy.Serving(a.UID) && !n1.proxy.Serving(b.UID) })
		conn = meshlab.Dial(t, a, bAddr.String())
		if got := meshlab.Greeting(t, conn); !strings.HasPrefix(got, "b "+a.IP.String()) {
			t.Errorf("after unlabelling: greeting %q, want b seeing a directly", got)
		}
		conn.Close()
		if err := w.lab.LabelNamespace("mesh", ambient, "ambient"); err != nil {
			t.Fatal(err)
		}
		meshlab.WaitFor(t, "the namespace is enrolled again", func() bool { return n0.proxy.Serving(a.UID) && n1.proxy.Serving(b.UID) })
	})

	t.Run("kernel metrics count the bytes", func(t *testing.T) {
		before := scrape(t, n0.Agent, a, "outbound")
		conn := meshlab.Dial(t, a, bAddr.String())
		greeting := meshlab.Greeting(t, conn)
		const payload = 100000
		go func() {
			conn.Write(make([]byte, payload))
			conn.(*net.TCPConn).CloseWrite()
		}()
		if n, err := io.Copy(io.Discard, conn); err != nil || n != payload {
			t.Fatalf("echo: %d bytes, %v", n, err)
		}
		conn.Close()
		want := map[string]float64{
			"sluice_pod_tcp_sent_bytes_total":         payload,
			"sluice_pod_tcp_received_bytes_total":     float64(payload + len(greeting) + 1),
			"sluice_pod_tcp_connections_opened_total": 1,
			"sluice_pod_tcp_connections_closed_total": 1,
		}
		var after map[string]float64
		meshlab.WaitFor(t, "metrics show the closed connection", func() bool {
			after = scrape(t, n0.Agent, a, "outbound")
			return after["sluice_pod_tcp_connections_closed_total"]-before["sluice_pod_tcp_connections_closed_total"] >= 1
		})
		for m, v := range want {
			if got := after[m] - before[m]; got != v {
				t.Errorf("%s grew by %v, want %v", m, got, v)
			}
		}
	})

	t.Run("agent restart keeps capture and open connections", func(t *testing.T) {
		conn := meshlab.Dial(t, a, bAddr.String())
		defer conn.Close()
		meshlab.Greeting(t, conn)
		n0.StopAgent(t)
		// With no agent, capture is still pinned in place.
		before := countEvents(n0.proxy, from(a, "outbound", bAddr))
		c2 := meshlab.Dial(t, a, bAddr.String())
		meshlab.Greeting(t, c2)
		c2.Close()
		if countEvents(n0.proxy, from(a, "outbound", bAddr)) != before+1 {
			t.Error("connection made while the agent was down was not captured")
		}
		n0.StartAgent(t)
		meshlab.WaitFor(t, "the restarted agent hands a to ztunnel again", func() bool { return n0.proxy.Serving(a.UID) })
		if _, err := conn.Write([]byte("still-open\n")); err != nil {
			t.Fatal(err)
		}
		if got := meshlab.Greeting(t, conn); got != "still-open" {
			t.Errorf("connection across the restart echoed %q", got)
		}
		c3 := meshlab.Dial(t, a, bAddr.String())
		meshlab.Greeting(t, c3)
		c3.Close()
		if countEvents(n0.proxy, from(a, "outbound", bAddr)) != before+2 {
			t.Error("new connection after the restart was not captured")
		}
	})

	t.Run("CNI fails closed while the agent is down", func(t *testing.T) {
		n1.StopAgent(t)
		if _, err := w.lab.AddPod(context.Background(), lab.PodSpec{Name: "e", Namespace: "mesh", Node: 1}); err == nil {
			t.Error("a mesh pod started with no node agent to capture it")
		} else if !strings.Contains(err.Error(), "agent") {
			t.Errorf("error does not say the agent is the problem: %v", err)
		}
		f := w.addPod(t, "plain", "f", 1, nil)
		if f.IP == (netip.Addr{}) {
			t.Error("pod outside the mesh got no address")
		}
		n1.StartAgent(t)
		e := w.addPod(t, "mesh", "e", 1, nil)
		meshlab.WaitFor(t, "the new pod is served", func() bool { return n1.proxy.Serving(e.UID) })
		if err := w.lab.DeletePod(context.Background(), "mesh", "e"); err != nil {
			t.Fatal(err)
		}
		meshlab.WaitFor(t, "the deleted pod is released", func() bool { return !n1.proxy.Serving(e.UID) })
	})
}

func TestAgentChainsPluginIntoNodeConfig(t *testing.T) {
	w := setup(t, true)
	n0 := w.nodes[0]
	a := w.addPod(t, "mesh", "a", 0, nil)
	b := w.addPod(t, "mesh", "b", 0, nil)
	meshlab.Serve(t, b, 8080)
	meshlab.WaitFor(t, "the pod created through the installed plugin is served", func() bool { return n0.proxy.Serving(a.UID) })
	conn := meshlab.Dial(t, a, b.AddrPort(8080).String())
	defer conn.Close()
	meshlab.Greeting(t, conn)
	waitEvent(t, n0.proxy, "a's outbound", from(a, "outbound", b.AddrPort(8080)))

	if err := n0.AgentConfig.Installer.Uninstall(); err != nil {
		t.Fatal(err)
	}
	conf, err := os.ReadFile(filepath.Join(n0.ConfDir, "10-lab.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(conf), "sluice-cni") {
		t.Errorf("uninstall left the plugin chained:\n%s", conf)
	}
}

// scrape reads the agent's metrics for one pod and direction.
func scrape(t *testing.T, a *agent.Agent, p *lab.Pod, dir string) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	a.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	out := map[string]float64{}
	want := fmt.Sprintf(`direction="%s",namespace="%s",pod="%s"`, dir, p.Namespace, p.Name)
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if !strings.HasPrefix(line, "sluice_pod_tcp_") || !strings.Contains(line, want) {
			continue
		}
		name := line[:strings.IndexByte(line, '{')]
		var v float64
		fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v)
		out[name] = v
	}
	return out
}
