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
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/cni/agent"
	"github.com/sluicemesh/sluice/cni/install"
	"github.com/sluicemesh/sluice/test/lab"
	"github.com/sluicemesh/sluice/test/passthrough"
)

const ambient = "istio.io/dataplane-mode"

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root and CI runs as root")
	}
	t.Skip("needs root")
}

// node is one lab node's Sluice services.
type node struct {
	n     lab.Node
	cfg   agent.Config
	agent *agent.Agent
	stop  context.CancelFunc
	done  chan error
	proxy *passthrough.Proxy
}

func (nd *node) startAgent(t *testing.T) {
	t.Helper()
	a, err := agent.New(nd.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	nd.agent, nd.stop, nd.done = a, cancel, make(chan error, 1)
	go func() { nd.done <- a.Run(ctx) }()
	select {
	case <-a.Ready():
	case err := <-nd.done:
		t.Fatalf("agent on %s: %v", nd.n.Name, err)
	case <-time.After(10 * time.Second):
		t.Fatalf("agent on %s not ready", nd.n.Name)
	}
}

func (nd *node) stopAgent(t *testing.T) {
	t.Helper()
	if nd.stop == nil {
		return
	}
	nd.stop()
	if err := <-nd.done; err != nil {
		t.Errorf("agent on %s: %v", nd.n.Name, err)
	}
	nd.stop = nil
}

type world struct {
	lab   *lab.Lab
	nodes []*node
}

// setup builds a two-node lab. With agentInstalls, the lab's CNI config starts without
// Sluice and each node agent chains its plugin in, as the DaemonSet does on a real node.
func setup(t *testing.T, agentInstalls bool) *world {
	t.Helper()
	requireRoot(t)
	ctx := context.Background()
	bin := t.TempDir()
	if err := lab.BuildPlugins(ctx, bin); err != nil {
		t.Fatalf("build CNI plugins: %v", err)
	}
	pluginBin := filepath.Join(t.TempDir(), "sluice-cni")
	build := exec.Command("go", "build", "-o", pluginBin, "github.com/sluicemesh/sluice/cni/cmd/sluice-cni")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build sluice-cni: %v\n%s", err, out)
	}
	labCfg := lab.Config{Name: fmt.Sprintf("cap%d", time.Now().UnixNano()%100000), Nodes: 2, CNIBinDir: bin}
	if !agentInstalls {
		if err := copyFile(pluginBin, filepath.Join(bin, "sluice-cni")); err != nil {
			t.Fatal(err)
		}
		labCfg.ExtraPlugins = []map[string]any{{"type": "sluice-cni", "agentSocket": "${NODE_DIR}/cni.sock", "stateFile": "${NODE_DIR}/mesh-state.json", "timeout": "3s"}}
	}
	l, err := lab.Up(ctx, labCfg)
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	w := &world{lab: l}
	t.Cleanup(func() {
		for _, nd := range w.nodes {
			nd.stopAgent(t)
		}
		if err := l.Down(context.Background()); err != nil {
			t.Errorf("lab down: %v", err)
		}
		for _, nd := range w.nodes {
			if err := bpf.Uninstall(nd.cfg.Capture); err != nil {
				t.Errorf("uninstall BPF of %s: %v", nd.n.Name, err)
			}
		}
	})
	if err := l.LabelNamespace("mesh", ambient, "ambient"); err != nil {
		t.Fatal(err)
	}
	if err := l.LabelNamespace("plain", "team", "legacy"); err != nil {
		t.Fatal(err)
	}
	for _, n := range l.Nodes() {
		nd := &node{n: n, cfg: agent.Config{
			NodeName:      n.Name,
			Source:        &agent.LocalSource{Dir: l.RegistryDir(), NodeName: n.Name, Interval: 50 * time.Millisecond},
			Capture:       bpf.Config{Instance: n.Name},
			CNISocket:     filepath.Join(n.Dir, "cni.sock"),
			MeshStateFile: filepath.Join(n.Dir, "mesh-state.json"),
			ZtunnelSocket: filepath.Join(n.Dir, "ztunnel.sock"),
			StateDir:      filepath.Join(n.Dir, "agent"),
			NetnsDirs:     []string{lab.NetnsDir},
			HostAddrs:     []netip.Addr{n.Gateway, n.IP},
			PodWait:       3 * time.Second,
		}}
		if agentInstalls {
			nd.cfg.Installer = &install.Installer{BinDir: bin, ConfDir: n.ConfDir, PluginBinary: pluginBin,
				PluginConfig: map[string]any{"agentSocket": nd.cfg.CNISocket, "stateFile": nd.cfg.MeshStateFile, "timeout": "3s"}}
		}
		nd.startAgent(t)
		nd.proxy = &passthrough.Proxy{ZDSPath: nd.cfg.ZtunnelSocket, PinDir: nd.cfg.Capture.PinDir()}
		pctx, cancel := context.WithCancel(context.Background())
		go nd.proxy.Run(pctx)
		t.Cleanup(cancel)
		w.nodes = append(w.nodes, nd)
	}
	return w
}

func (w *world) addPod(t *testing.T, ns, name string, node int, labels map[string]string) *lab.Pod {
	t.Helper()
	p, err := w.lab.AddPod(context.Background(), lab.PodSpec{Name: name, Namespace: ns, Node: node, Labels: labels})
	if err != nil {
		t.Fatalf("add pod %s/%s: %v", ns, name, err)
	}
	return p
}

// serve answers each connection with "<name> <client address>\n" and echoes the rest.
func serve(t *testing.T, p *lab.Pod, port int) {
	t.Helper()
	ln, err := p.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				fmt.Fprintf(c, "%s %s\n", p.Name, c.RemoteAddr())
				io.Copy(c, c)
			}()
		}
	}()
}

// exchange dials from a pod (or any dialer) and returns the server's greeting line.
func greet(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var line []byte
	b := make([]byte, 1)
	for {
		if _, err := c.Read(b); err != nil {
			t.Fatalf("read greeting from %s: %v (got %q)", c.RemoteAddr(), err, line)
		}
		if b[0] == '\n' {
			return string(line)
		}
		line = append(line, b[0])
	}
}

func dial(t *testing.T, dialer interface {
	Dial(context.Context, string, string) (net.Conn, error)
}, addr string) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := dialer.Dial(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	return c
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

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting until %s", what)
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
		serve(t, p, 8080)
	}
	bAddr := b.AddrPort(8080)
	waitFor(t, "ztunnel stand-ins serve the enrolled pods", func() bool {
		return n0.proxy.Serving(a.UID) && n1.proxy.Serving(b.UID) && !n0.proxy.Serving(d.UID)
	})

	t.Run("pod to pod across nodes is captured at both ends", func(t *testing.T) {
		conn := dial(t, a, bAddr.String())
		defer conn.Close()
		if got := conn.RemoteAddr().String(); got != bAddr.String() {
			t.Errorf("application's getpeername = %s, want %s", got, bAddr)
		}
		if got := greet(t, conn); !strings.HasPrefix(got, "b ") {
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
		conn := dial(t, a, svc.String())
		defer conn.Close()
		waitEvent(t, n0.proxy, "a to a service IP", from(a, "outbound", svc))
	})

	t.Run("IPv4-mapped IPv6 connect is captured", func(t *testing.T) {
		conn := dialMapped(t, a, bAddr)
		defer conn.Close()
		if got := greet(t, conn); !strings.HasPrefix(got, "b ") {
			t.Errorf("greeting %q, want b's", got)
		}
		if n := countEvents(n0.proxy, from(a, "outbound", bAddr)); n != 2 {
			t.Errorf("mapped connect: %d outbound captures to b in total, want 2", n)
		}
	})

	t.Run("pods outside the mesh go direct", func(t *testing.T) {
		before := len(n0.proxy.Events())
		conn := dial(t, c, d.AddrPort(8080).String())
		defer conn.Close()
		if got := greet(t, conn); !strings.HasPrefix(got, "d "+c.IP.String()) {
			t.Errorf("plain pod to opted-out pod: greeting %q, want d seeing c directly", got)
		}
		if after := len(n0.proxy.Events()); after != before {
			t.Errorf("a connection between pods outside the mesh was captured: %+v", n0.proxy.Events()[before:])
		}
		// Plaintext into a mesh pod from outside the mesh is captured inbound.
		conn2 := dial(t, c, bAddr.String())
		defer conn2.Close()
		greet(t, conn2)
		waitEvent(t, n1.proxy, "c's plaintext into b", func(e passthrough.Event) bool {
			return e.Direction == "inbound" && e.Client.Addr() == c.IP && e.Original == bAddr
		})
	})

	t.Run("the node reaches pods directly (kubelet probes)", func(t *testing.T) {
		conn := dial(t, w.lab.Node(1), bAddr.String())
		defer conn.Close()
		if got := greet(t, conn); !strings.HasPrefix(got, "b "+w.lab.Node(1).Gateway.String()) {
			t.Errorf("probe greeting %q, want b answering the node's address directly", got)
		}
	})

	t.Run("labels take effect on running pods", func(t *testing.T) {
		if err := w.lab.LabelPod("mesh", "a", ambient, "none"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "a is released", func() bool { return !n0.proxy.Serving(a.UID) })
		before := countEvents(n0.proxy, from(a, "outbound", bAddr))
		conn := dial(t, a, bAddr.String())
		greet(t, conn)
		conn.Close()
		if n := countEvents(n0.proxy, from(a, "outbound", bAddr)); n != before {
			t.Error("opted-out pod still captured")
		}
		if err := w.lab.LabelPod("mesh", "a", ambient, ""); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "a is enrolled again", func() bool { return n0.proxy.Serving(a.UID) })

		// Removing the namespace label releases every pod in it.
		if err := w.lab.LabelNamespace("mesh", ambient, ""); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the namespace is released", func() bool { return !n0.proxy.Serving(a.UID) && !n1.proxy.Serving(b.UID) })
		conn = dial(t, a, bAddr.String())
		if got := greet(t, conn); !strings.HasPrefix(got, "b "+a.IP.String()) {
			t.Errorf("after unlabelling: greeting %q, want b seeing a directly", got)
		}
		conn.Close()
		if err := w.lab.LabelNamespace("mesh", ambient, "ambient"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the namespace is enrolled again", func() bool { return n0.proxy.Serving(a.UID) && n1.proxy.Serving(b.UID) })
	})

	t.Run("kernel metrics count the bytes", func(t *testing.T) {
		before := scrape(t, n0.agent, a, "outbound")
		conn := dial(t, a, bAddr.String())
		greeting := greet(t, conn)
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
		waitFor(t, "metrics show the closed connection", func() bool {
			after = scrape(t, n0.agent, a, "outbound")
			return after["sluice_pod_tcp_connections_closed_total"]-before["sluice_pod_tcp_connections_closed_total"] >= 1
		})
		for m, v := range want {
			if got := after[m] - before[m]; got != v {
				t.Errorf("%s grew by %v, want %v", m, got, v)
			}
		}
	})

	t.Run("agent restart keeps capture and open connections", func(t *testing.T) {
		conn := dial(t, a, bAddr.String())
		defer conn.Close()
		greet(t, conn)
		n0.stopAgent(t)
		// With no agent, capture is still pinned in place.
		before := countEvents(n0.proxy, from(a, "outbound", bAddr))
		c2 := dial(t, a, bAddr.String())
		greet(t, c2)
		c2.Close()
		if countEvents(n0.proxy, from(a, "outbound", bAddr)) != before+1 {
			t.Error("connection made while the agent was down was not captured")
		}
		n0.startAgent(t)
		waitFor(t, "the restarted agent hands a to ztunnel again", func() bool { return n0.proxy.Serving(a.UID) })
		if _, err := conn.Write([]byte("still-open\n")); err != nil {
			t.Fatal(err)
		}
		if got := greet(t, conn); got != "still-open" {
			t.Errorf("connection across the restart echoed %q", got)
		}
		c3 := dial(t, a, bAddr.String())
		greet(t, c3)
		c3.Close()
		if countEvents(n0.proxy, from(a, "outbound", bAddr)) != before+2 {
			t.Error("new connection after the restart was not captured")
		}
	})

	t.Run("CNI fails closed while the agent is down", func(t *testing.T) {
		n1.stopAgent(t)
		if _, err := w.lab.AddPod(context.Background(), lab.PodSpec{Name: "e", Namespace: "mesh", Node: 1}); err == nil {
			t.Error("a mesh pod started with no node agent to capture it")
		} else if !strings.Contains(err.Error(), "agent") {
			t.Errorf("error does not say the agent is the problem: %v", err)
		}
		f := w.addPod(t, "plain", "f", 1, nil)
		if f.IP == (netip.Addr{}) {
			t.Error("pod outside the mesh got no address")
		}
		n1.startAgent(t)
		e := w.addPod(t, "mesh", "e", 1, nil)
		waitFor(t, "the new pod is served", func() bool { return n1.proxy.Serving(e.UID) })
		if err := w.lab.DeletePod(context.Background(), "mesh", "e"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the deleted pod is released", func() bool { return !n1.proxy.Serving(e.UID) })
	})
}

func TestAgentChainsPluginIntoNodeConfig(t *testing.T) {
	w := setup(t, true)
	n0 := w.nodes[0]
	a := w.addPod(t, "mesh", "a", 0, nil)
	b := w.addPod(t, "mesh", "b", 0, nil)
	serve(t, b, 8080)
	waitFor(t, "the pod created through the installed plugin is served", func() bool { return n0.proxy.Serving(a.UID) })
	conn := dial(t, a, b.AddrPort(8080).String())
	defer conn.Close()
	greet(t, conn)
	waitEvent(t, n0.proxy, "a's outbound", from(a, "outbound", b.AddrPort(8080)))

	if err := n0.cfg.Installer.Uninstall(); err != nil {
		t.Fatal(err)
	}
	conf, err := os.ReadFile(filepath.Join(n0.n.ConfDir, "10-lab.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(conf), "sluice-cni") {
		t.Errorf("uninstall left the plugin chained:\n%s", conf)
	}
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o755)
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
