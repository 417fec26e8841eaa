//go:build linux

// Package meshlab brings up the lab with Sluice's node agents, for tests that need the
// whole capture layer underneath them (capture tests with the passthrough stand-in,
// ztunnel tests with the real proxy).
package meshlab

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/cni/agent"
	"github.com/sluicemesh/sluice/cni/install"
	"github.com/sluicemesh/sluice/internal/testutil"
	"github.com/sluicemesh/sluice/test/lab"
)

// AmbientLabel is the label that puts a namespace (or pod) in the mesh.
const AmbientLabel = "istio.io/dataplane-mode"

// Options shape the lab.
type Options struct {
	// Nodes defaults to 2.
	Nodes int
	// AgentInstalls leaves Sluice out of the lab's CNI config; each node agent chains
	// its plugin in, as the DaemonSet does on a real node.
	AgentInstalls bool
}

// Node is one lab node and its node agent.
type Node struct {
	lab.Node
	AgentConfig agent.Config
	Agent       *agent.Agent
	stop        context.CancelFunc
	done        chan error
}

// PinDir is where this node's capture programs are pinned.
func (n *Node) PinDir() string { return n.AgentConfig.Capture.PinDir() }

// ZDSSocket is where ztunnel (or a stand-in) connects to this node's agent.
func (n *Node) ZDSSocket() string { return n.AgentConfig.ZtunnelSocket }

// StartAgent runs the node agent in this process until StopAgent.
func (n *Node) StartAgent(t testing.TB) {
	t.Helper()
	a, err := agent.New(n.AgentConfig)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.Agent, n.stop, n.done = a, cancel, make(chan error, 1)
	go func() { n.done <- a.Run(ctx) }()
	select {
	case <-a.Ready():
	case err := <-n.done:
		t.Fatalf("agent on %s: %v", n.Name, err)
	case <-time.After(10 * time.Second):
		t.Fatalf("agent on %s not ready", n.Name)
	}
}

// StopAgent stops the node agent; capture stays pinned in place.
func (n *Node) StopAgent(t testing.TB) {
	t.Helper()
	if n.stop == nil {
		return
	}
	n.stop()
	if err := <-n.done; err != nil {
		t.Errorf("agent on %s: %v", n.Name, err)
	}
	n.stop = nil
}

// World is a lab with node agents.
type World struct {
	Lab   *lab.Lab
	Nodes []*Node
}

// Up builds the CNI plugins and Sluice's plugin, brings up a lab and starts a node agent
// per node. Everything is removed when the test ends.
func Up(t testing.TB, opts Options) *World {
	t.Helper()
	testutil.RequireRoot(t)
	if opts.Nodes == 0 {
		opts.Nodes = 2
	}
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
	labCfg := lab.Config{Name: fmt.Sprintf("ml%d", time.Now().UnixNano()%1000000), Nodes: opts.Nodes, CNIBinDir: bin}
	if !opts.AgentInstalls {
		b, err := os.ReadFile(pluginBin)
		if err == nil {
			err = os.WriteFile(filepath.Join(bin, "sluice-cni"), b, 0o755)
		}
		if err != nil {
			t.Fatal(err)
		}
		labCfg.ExtraPlugins = []map[string]any{{"type": "sluice-cni", "agentSocket": "${NODE_DIR}/cni.sock", "stateFile": "${NODE_DIR}/mesh-state.json", "timeout": "3s"}}
	}
	l, err := lab.Up(ctx, labCfg)
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	w := &World{Lab: l}
	t.Cleanup(func() {
		for _, n := range w.Nodes {
			n.StopAgent(t)
		}
		if err := l.Down(context.Background()); err != nil {
			t.Errorf("lab down: %v", err)
		}
		for _, n := range w.Nodes {
			if err := bpf.Uninstall(n.AgentConfig.Capture); err != nil {
				t.Errorf("uninstall BPF of %s: %v", n.Name, err)
			}
		}
	})
	for _, ln := range l.Nodes() {
		n := &Node{Node: ln, AgentConfig: agent.Config{
			NodeName:      ln.Name,
			Source:        &agent.LocalSource{Dir: l.RegistryDir(), NodeName: ln.Name, Interval: 50 * time.Millisecond},
			Capture:       bpf.Config{Instance: ln.Name, NodeNetns: ln.NetnsPath},
			CNISocket:     filepath.Join(ln.Dir, "cni.sock"),
			MeshStateFile: filepath.Join(ln.Dir, "mesh-state.json"),
			ZtunnelSocket: filepath.Join(ln.Dir, "ztunnel.sock"),
			StateDir:      filepath.Join(ln.Dir, "agent"),
			NetnsDirs:     []string{lab.NetnsDir},
			PodWait:       3 * time.Second,
		}}
		if opts.AgentInstalls {
			n.AgentConfig.Installer = &install.Installer{BinDir: bin, ConfDir: ln.ConfDir, PluginBinary: pluginBin,
				PluginConfig: map[string]any{"agentSocket": n.AgentConfig.CNISocket, "stateFile": n.AgentConfig.MeshStateFile, "timeout": "3s"}}
		}
		n.StartAgent(t)
		w.Nodes = append(w.Nodes, n)
	}
	return w
}

// AddPod adds a pod or fails the test.
func (w *World) AddPod(t testing.TB, spec lab.PodSpec) *lab.Pod {
	t.Helper()
	p, err := w.Lab.AddPod(context.Background(), spec)
	if err != nil {
		t.Fatalf("add pod %s/%s: %v", spec.Namespace, spec.Name, err)
	}
	return p
}

// WaitFor polls cond for up to 10 seconds.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting until %s", what)
}

// Serve answers each connection on port with "<pod name> <client address>\n" and then
// echoes (testutil.ServeGreeting).
func Serve(t testing.TB, p *lab.Pod, port int) {
	t.Helper()
	ln, err := p.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	testutil.ServeGreeting(ln, p.Name)
}

// Dialer is anything that dials from a network namespace (a pod or a node).
type Dialer interface {
	Dial(context.Context, string, string) (net.Conn, error)
}

// Dial connects from d or fails the test.
func Dial(t testing.TB, d Dialer, addr string) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.Dial(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	return c
}

// Greeting reads the first line a Serve server sends.
func Greeting(t testing.TB, c net.Conn) string {
	t.Helper()
	line, err := ReadLine(c, 5*time.Second)
	if err != nil {
		t.Fatalf("read greeting from %s: %v (got %q)", c.RemoteAddr(), err, line)
	}
	return line
}

// ReadLine reads up to a newline (testutil.ReadLine).
func ReadLine(c net.Conn, timeout time.Duration) (string, error) {
	return testutil.ReadLine(c, timeout)
}
