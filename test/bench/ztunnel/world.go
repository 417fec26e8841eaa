//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/test/lab"
)

const (
	labName      = "ztbench"
	trustDomain  = "cluster.local"
	ambientLabel = "istio.io/dataplane-mode"
	// Namespaces: the Sluice pair lives in an ambient one, the pair for direct traffic
	// and the other tunnels in one the mesh leaves alone.
	meshNS  = "mesh"
	plainNS = "plain"
)

// Ports of the applications in the server pods.
const (
	iperfPort  = 5201
	fortioPort = 8080
	holdPort   = 9000
)

// apps are the server applications, in the order of the tunnels' port offsets.
var apps = []struct {
	name string
	port uint16
}{{"iperf3", iperfPort}, {"fortio", fortioPort}, {"hold", holdPort}}

// Tunnel listener bases: the client-side tunnel listens on 127.0.0.1:<client base + i>
// in the client pod, the server-side one on <server pod>:<server base + i>, for apps[i].
const (
	stunnelClientBase = 2100
	stunnelServerBase = 2200
	haproxyClientBase = 2300
	haproxyServerBase = 2400
	relayClientBase   = 2500
	relayServerBase   = 2600
)

// world is everything the benchmark runs on: the lab with its node agents and ztunnels,
// the four pods, the servers in the server pods and the other tunnels.
type world struct {
	tools  tools
	work   string // temporary directory: binaries, certificates, configs, logs
	bin    string
	caDir  string
	lab    *lab.Lab
	nodes  []lab.Node
	agents []*proc

	clientPlain, serverPlain, clientMesh, serverMesh *lab.Pod

	ztunnels  []*proc // node0 (outbound side), node1 (inbound side)
	stunnels  []*proc // client pod, server pod
	haproxies []*proc
	relays    []*proc // HAProxy without TLS: the floor of any two-proxy path
	// ztBin is the ztunnel binary the ztunnels run (restarts pick it up); refBin, when
	// set, is ztunnel built at -ztunnel-ref, and refName names that ref.
	ztBin, refBin, refName string
	servers                []*proc // iperf3 and fortio in the server pods
	holdPlain              *holdServer
	holdMesh               *holdServer
	ztunnelConfig          string
	// haproxySockets are HAProxy's stats sockets, client side first.
	haproxySockets []string
}

// procs lists the processes to stop before the lab goes, in order.
func (w *world) procs() []*proc {
	var all []*proc
	all = append(all, w.stunnels...)
	all = append(all, w.haproxies...)
	all = append(all, w.relays...)
	all = append(all, w.servers...)
	return append(all, w.ztunnels...)
}

// close stops what the world started and removes the lab and the agents' BPF pins,
// carrying on past errors. The agents stay up until the lab goes: it deletes the pods
// first, through them, and then kills what is left in its cgroups.
func (w *world) close(ctx context.Context) error {
	var errs []error
	for _, p := range w.procs() {
		errs = append(errs, p.stop())
	}
	for _, h := range []*holdServer{w.holdPlain, w.holdMesh} {
		if h != nil {
			errs = append(errs, h.close())
		}
	}
	if w.lab != nil {
		errs = append(errs, w.lab.Down(ctx))
	}
	for _, a := range w.agents {
		errs = append(errs, a.stop()) // normally gone with the lab's cgroups
	}
	errs = append(errs, uninstallBPF())
	if w.work != "" {
		errs = append(errs, os.RemoveAll(w.work))
	}
	return errors.Join(errs...)
}

// uninstallBPF removes the pins of this benchmark's node agents, also those a crashed run
// left: instances are named <lab>-node<i>, and lab names hold no '-'.
func uninstallBPF() error {
	entries, err := os.ReadDir(bpf.DefaultPinRoot)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), labName+"-node") {
			if err := bpf.Uninstall(bpf.Config{Instance: e.Name()}); err != nil {
				errs = append(errs, fmt.Errorf("remove BPF pins of %s: %w", e.Name(), err))
			}
		}
	}
	return errors.Join(errs...)
}

// cleanupLeftovers removes what a crashed run left: the lab (its cgroups hold every
// process a run starts, so they die with it), the BPF pins and the temporary directory.
func cleanupLeftovers() error {
	errs := []error{lab.Cleanup(labName), uninstallBPF()}
	old, _ := filepath.Glob(filepath.Join(os.TempDir(), workPrefix+"*"))
	for _, d := range old {
		errs = append(errs, os.RemoveAll(d))
	}
	return errors.Join(errs...)
}

// workPrefix names the temporary directory of a run.
const workPrefix = "ztbench-"

// setUp builds the world. On error the caller still calls close, which removes whatever
// was made.
func (b *bench) setUp(ctx context.Context, w *world) error {
	var err error
	if w.work, err = os.MkdirTemp("", workPrefix); err != nil {
		return err
	}
	w.bin = filepath.Join(w.work, "bin")
	if err := buildSluice(ctx, w.bin); err != nil {
		return err
	}
	w.ztBin = filepath.Join(w.bin, "ztunnel")
	if b.opts.ref != "" {
		w.refName = b.opts.ref
		w.refBin = filepath.Join(w.bin, "ztunnel-ref")
		if err := buildZtunnelAt(ctx, b.opts.ref, w.refBin, filepath.Join(w.work, "ref-src")); err != nil {
			return err
		}
	}
	cniBin := lab.DefaultCNIBinDir()
	if err := lab.BuildPlugins(ctx, cniBin); err != nil {
		return fmt.Errorf("build the CNI plugins: %w", err)
	}
	w.lab, err = lab.Up(ctx, lab.Config{
		Name: labName, Nodes: 2, Logger: b.quiet,
		CNIBinDir: cniBin + ":" + w.bin,
		ExtraPlugins: []map[string]any{{
			"type": "sluice-cni", "agentSocket": "${NODE_DIR}/cni.sock", "stateFile": "${NODE_DIR}/mesh-state.json",
		}},
	})
	if err != nil {
		return err
	}
	w.nodes = w.lab.Nodes()
	for _, n := range w.nodes {
		a, err := startAgent(ctx, w, n)
		if err != nil {
			return err
		}
		w.agents = append(w.agents, a)
	}
	w.caDir = filepath.Join(w.work, "ca")
	authority, err := ca.LoadOrCreate(w.caDir, trustDomain)
	if err != nil {
		return err
	}
	w.ztunnelConfig = filepath.Join(w.work, "ztunnel.yaml")
	if err := w.writeZtunnelConfig(); err != nil {
		return err
	}
	for _, n := range w.nodes {
		z, err := startZtunnel(ctx, w, n)
		if err != nil {
			return err
		}
		w.ztunnels = append(w.ztunnels, z)
	}
	if err := w.lab.LabelNamespace(meshNS, ambientLabel, "ambient"); err != nil {
		return err
	}
	add := func(ns, name string, node int) (*lab.Pod, error) {
		return w.lab.AddPod(ctx, lab.PodSpec{Name: name, Namespace: ns, Node: node, ServiceAccount: name,
			Labels: map[string]string{"app": name}})
	}
	if w.clientPlain, err = add(plainNS, "client", 0); err != nil {
		return err
	}
	if w.serverPlain, err = add(plainNS, "server", 1); err != nil {
		return err
	}
	if w.clientMesh, err = add(meshNS, "client", 0); err != nil {
		return err
	}
	if w.serverMesh, err = add(meshNS, "server", 1); err != nil {
		return err
	}
	if err := w.writeZtunnelConfig(w.clientPlain, w.serverPlain, w.clientMesh, w.serverMesh); err != nil {
		return err
	}
	for _, n := range w.nodes {
		if err := waitZtunnelConfig(ctx, n, 4); err != nil {
			return err
		}
	}
	for _, p := range []*lab.Pod{w.serverPlain, w.serverMesh} {
		if err := startServers(ctx, w, p); err != nil {
			return err
		}
	}
	if w.holdPlain, err = startHoldServer(ctx, w, w.serverPlain); err != nil {
		return err
	}
	if w.holdMesh, err = startHoldServer(ctx, w, w.serverMesh); err != nil {
		return err
	}
	return startPeers(ctx, w, authority)
}

// staticBuild is the environment of the builds: static binaries, as `make build` makes
// and as they ship. Both builds use -trimpath, so that the one at -ztunnel-ref, from
// another directory, finds what it shares with this checkout in the build cache.
var staticBuild = append(os.Environ(), "CGO_ENABLED=0")

// buildSluice builds the node agent, the CNI plugin and ztunnel from this checkout, so
// that the benchmark measures the code as it is.
func buildSluice(ctx context.Context, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", dir+"/",
		"./cni/cmd/sluice-agent", "./cni/cmd/sluice-cni", "./ztunnel/cmd/ztunnel")
	cmd.Env = staticBuild
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build sluice-agent, sluice-cni and ztunnel (run from the repository's root): %w\n%s", err, out)
	}
	return nil
}

// buildZtunnelAt builds ztunnel as it was at the git revision ref, from a temporary
// worktree in dir, so that a change can be measured against what it changes in one run.
func buildZtunnelAt(ctx context.Context, ref, out, dir string) error {
	add := exec.CommandContext(ctx, "git", "worktree", "add", "--detach", dir, ref)
	if b, err := add.CombinedOutput(); err != nil {
		return fmt.Errorf("git worktree add %s: %w\n%s", ref, err, b)
	}
	defer exec.Command("git", "worktree", "remove", "--force", dir).Run()
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out, "./ztunnel/cmd/ztunnel")
	build.Dir, build.Env = dir, staticBuild
	if b, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build ztunnel at %s: %w\n%s", ref, err, b)
	}
	return nil
}

// startAgent starts node n's sluice-agent as `sluicectl lab up --with-sluice` does: in
// the node's netns and host cgroup, local mode on the lab's registry, one BPF instance
// per node; it waits until the agent serves the CNI socket.
func startAgent(ctx context.Context, w *world, n lab.Node) (*proc, error) {
	cniSocket := filepath.Join(n.Dir, "cni.sock")
	cmd := n.Command(filepath.Join(w.bin, "sluice-agent"),
		"--node-name", n.Name,
		"--pods-dir", w.lab.RegistryDir(),
		"--cni-socket", cniSocket,
		"--mesh-state-file", filepath.Join(n.Dir, "mesh-state.json"),
		"--ztunnel-socket", filepath.Join(n.Dir, "ztunnel.sock"),
		"--state-dir", filepath.Join(n.Dir, "agent"),
		"--bpf-instance", n.Name,
		"--metrics-addr", "127.0.0.1:15014",
	)
	p, err := startProc("sluice-agent on "+n.Name, cmd, filepath.Join(w.work, "agent-"+n.Name+".log"))
	if err != nil {
		return nil, err
	}
	return p, waitFor(ctx, 30*time.Second, p, "sluice-agent on "+n.Name+" to serve "+cniSocket, func() (bool, error) {
		_, err := os.Stat(cniSocket)
		return err == nil, nil
	})
}

// startZtunnel starts node n's ztunnel binary in the node's netns and host cgroup,
// local mode (the YAML config and CA of the world), and waits until it is ready.
func startZtunnel(ctx context.Context, w *world, n lab.Node) (*proc, error) {
	mk := func() *exec.Cmd {
		return n.Command(w.ztBin,
			"--config", w.ztunnelConfig,
			"--zds-socket", filepath.Join(n.Dir, "ztunnel.sock"),
			"--bpf-instance", n.Name,
			"--ca-dir", w.caDir,
			"--node-name", n.Name,
			"--admin-addr", "127.0.0.1:15000",
			"--metrics-addr", "127.0.0.1:15020",
			"--readiness-addr", "127.0.0.1:15021",
		)
	}
	name := "ztunnel on " + n.Name
	return spawn(ctx, name, mk, filepath.Join(w.work, "ztunnel-"+n.Name+".log"), func(ctx context.Context, p *proc) error {
		return waitFor(ctx, 20*time.Second, p, name+" to be ready", func() (bool, error) {
			body, err := httpGet(ctx, n, "127.0.0.1:15021", "/healthz/ready")
			return err == nil && strings.TrimSpace(body) == "ready", nil
		})
	})
}

// writeZtunnelConfig writes ztunnel's local config with pods as workloads: HBONE for the
// ambient namespace, as the controller will describe them. The file is replaced whole so
// ztunnel never reads half of it.
func (w *world) writeZtunnelConfig(pods ...*lab.Pod) error {
	var b strings.Builder
	fmt.Fprintf(&b, "trustDomain: %s\nworkloads:", trustDomain)
	if len(pods) == 0 {
		b.WriteString(" []")
	}
	b.WriteString("\n")
	for _, p := range pods {
		proto := "TCP"
		if p.Namespace == meshNS {
			proto = "HBONE"
		}
		fmt.Fprintf(&b, "- {uid: %q, name: %s, namespace: %s, serviceAccount: %s, node: %s, ips: [%s], protocol: %s, labels: {app: %s}}\n",
			p.UID, p.Name, p.Namespace, p.ServiceAccount, p.NodeName, p.IP, proto, p.Name)
	}
	tmp := w.ztunnelConfig + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, w.ztunnelConfig)
}

// waitZtunnelConfig waits until node n's ztunnel has loaded a config with want workloads
// (it polls its file every second).
func waitZtunnelConfig(ctx context.Context, n lab.Node, want int) error {
	var got int
	err := waitFor(ctx, 10*time.Second, nil, "", func() (bool, error) {
		body, err := httpGet(ctx, n, "127.0.0.1:15000", "/config_dump")
		if err != nil {
			return false, nil
		}
		var dump struct {
			Workloads []json.RawMessage `json:"workloads"`
		}
		if err := json.Unmarshal([]byte(body), &dump); err != nil {
			return false, fmt.Errorf("ztunnel on %s: config_dump: %w", n.Name, err)
		}
		got = len(dump.Workloads)
		return got == want, nil
	})
	if err != nil {
		return fmt.Errorf("ztunnel on %s knows %d workloads, want %d: %w", n.Name, got, want, err)
	}
	return nil
}

// startServers starts iperf3 and fortio's echo server in pod p and waits for their ports.
func startServers(ctx context.Context, w *world, p *lab.Pod) error {
	logBase := filepath.Join(w.work, p.Namespace+"-"+p.Name)
	ip, err := startProc("iperf3 server in "+p.String(),
		p.Command(w.tools.iperf3, "-s", "-p", strconv.Itoa(iperfPort)), logBase+"-iperf3.log")
	if err != nil {
		return err
	}
	w.servers = append(w.servers, ip)
	fo := p.Command(w.tools.fortio, "server", "-http-port", strconv.Itoa(fortioPort),
		"-grpc-port", "disabled", "-redirect-port", "disabled", "-tcp-port", "disabled", "-udp-port", "disabled",
		"-loglevel", "warning")
	fo.Dir = w.work
	fp, err := startProc("fortio server in "+p.String(), fo, logBase+"-fortio.log")
	if err != nil {
		return err
	}
	w.servers = append(w.servers, fp)
	for _, s := range []struct {
		p    *proc
		port uint16
	}{{ip, iperfPort}, {fp, fortioPort}} {
		if err := waitListening(ctx, p, s.p, s.port); err != nil {
			return err
		}
	}
	return nil
}

// waitListening waits until something listens on TCP port in pod p, failing early if
// owner (when set) exits.
func waitListening(ctx context.Context, p *lab.Pod, owner *proc, port uint16) error {
	return waitFor(ctx, 10*time.Second, owner, fmt.Sprintf("a listener on port %d in %s", port, p), func() (bool, error) {
		return podListening(p, port)
	})
}

// podListening reports whether a TCP listener on port exists in p's netns.
func podListening(p *lab.Pod, port uint16) (bool, error) {
	var tables []string
	err := p.Do(func() error {
		// /proc/thread-self/net shows the netns of this (locked) thread.
		for _, f := range []string{"tcp", "tcp6"} {
			b, err := os.ReadFile("/proc/thread-self/net/" + f)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			tables = append(tables, string(b))
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	return countSockets(tables, func(_, local, _ string) bool { return local == fmt.Sprintf(":%04X", port) }, "0A") > 0, nil
}

// countSockets counts the entries of /proc/net/tcp tables in state (hex, "01"
// established, "0A" listening) that match; match gets the local address's IP and
// ":PORT" and the remote address as the table prints them.
func countSockets(tables []string, match func(localIP, localPort, remote string) bool, state string) int {
	n := 0
	for _, t := range tables {
		for line := range strings.Lines(t) {
			f := strings.Fields(line)
			if len(f) < 4 || f[3] != state {
				continue
			}
			i := strings.LastIndexByte(f[1], ':')
			if i < 0 {
				continue
			}
			if match(f[1][:i], f[1][i:], f[2]) {
				n++
			}
		}
	}
	return n
}

// waitFor polls cond every 50 ms until it holds, it fails, owner (if set) exits, or
// timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, owner *proc, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if owner != nil {
			if err := owner.check(); err != nil {
				return fmt.Errorf("waiting for %s: %w", what, err)
			}
		}
		if time.Now().After(deadline) {
			msg := fmt.Sprintf("timed out after %v waiting for %s", timeout, what)
			if owner != nil {
				msg += fmt.Sprintf("; the log of %s (%s) ends:\n%s", owner.name, owner.logPath, tailFile(owner.logPath, 15))
			}
			return errors.New(msg)
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
}

// httpGet fetches path from addr inside node n's netns (where ztunnel's admin, metrics
// and readiness endpoints listen on loopback).
func httpGet(ctx context.Context, n lab.Node, addr, path string) (string, error) {
	return httpGetTimeout(ctx, n, addr, path, 5*time.Second)
}

func httpGetTimeout(ctx context.Context, n lab.Node, addr, path string, timeout time.Duration) (string, error) {
	client := &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return n.Dial(ctx, network, addr)
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return string(body), fmt.Errorf("GET %s%s in %s: %s", addr, path, n.Name, resp.Status)
	}
	return string(body), nil
}
