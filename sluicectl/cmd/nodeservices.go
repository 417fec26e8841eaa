//go:build linux

package cmd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/test/lab"
)

// Binaries `make build` puts next to sluicectl.
const (
	agentBinary     = "sluice-agent"
	sluicectlBinary = "sluicectl"
	ztunnelBinary   = "ztunnel"
)

// Where each node's services keep their sockets and logs, under the node's directory.
const (
	agentMetricsAddr = "127.0.0.1:15014" // inside the node's netns: every node can use it
	agentStartWait   = 30 * time.Second
	podCaptureWait   = 20 * time.Second
)

// nodePaths are the files of one node's services.
type nodePaths struct {
	cniSocket, meshState, ztunnelSocket, agentState, agentLog, ztunnelLog string
}

func pathsOf(n lab.Node) nodePaths {
	return nodePaths{
		cniSocket:     filepath.Join(n.Dir, "cni.sock"),
		meshState:     filepath.Join(n.Dir, "mesh-state.json"),
		ztunnelSocket: filepath.Join(n.Dir, "ztunnel.sock"),
		agentState:    filepath.Join(n.Dir, "agent"),
		agentLog:      filepath.Join(n.Dir, "agent.log"),
		ztunnelLog:    filepath.Join(n.Dir, "ztunnel.log"),
	}
}

// pinDir is where node n's agent pins its BPF objects: one instance per node.
func pinDir(n lab.Node) string { return bpf.Config{Instance: n.Name}.PinDir() }

// defaultSluiceBinDir is the directory of the running sluicectl, where `make build` also
// puts sluice-agent and sluice-cni.
func defaultSluiceBinDir() string {
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	if resolved, err := filepath.EvalSymlinks(exe); err == nil {
		exe = resolved
	}
	return filepath.Dir(exe)
}

// findBinary returns dir/name if it is an executable file, else an error that says how
// to build it.
func findBinary(dir, name string) (string, error) {
	p := filepath.Join(dir, name)
	fi, err := os.Stat(p)
	if err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
		return p, nil
	}
	return "", fmt.Errorf("%s not found in %s: build it with `make build` (go build -o bin/ ./cni/cmd/... ./sluicectl/) or point --sluice-bin at the directory holding it", name, dir)
}

// sluiceCNIBinPath returns the CNI plugin search path for a lab with sluice-cni: the
// given directories (or the lab's bridge and host-local, built if needed) followed by
// the directory holding sluice-cni, so nothing has to be copied around.
func sluiceCNIBinPath(ctx context.Context, cniBin, sluiceBin string) (string, error) {
	if cniBin == "" {
		cniBin = lab.DefaultCNIBinDir()
		if err := lab.BuildPlugins(ctx, cniBin); err != nil {
			return "", err
		}
	}
	for d := range strings.SplitSeq(cniBin, ":") {
		if _, err := findBinary(d, sluicePluginType); d != "" && err == nil {
			return cniBin, nil
		}
	}
	if _, err := findBinary(sluiceBin, sluicePluginType); err != nil {
		return "", fmt.Errorf("--with-sluice: %w", err)
	}
	return cniBin + ":" + sluiceBin, nil
}

// startAgent starts node n's sluice-agent in the node's netns and host cgroup, detached
// so that it outlives sluicectl (`lab down` kills it with the cgroup), and waits until it
// serves the CNI socket.
func startAgent(ctx context.Context, l *lab.Lab, n lab.Node, agentBin string) error {
	p := pathsOf(n)
	args := []string{
		"--node-name", n.Name,
		"--pods-dir", l.RegistryDir(),
		"--cni-socket", p.cniSocket,
		"--mesh-state-file", p.meshState,
		"--ztunnel-socket", p.ztunnelSocket,
		"--state-dir", p.agentState,
		"--bpf-instance", n.Name,
		"--metrics-addr", agentMetricsAddr,
	}
	exited, err := startDetached(n, p.agentLog, agentBin, args...)
	if err != nil {
		return fmt.Errorf("start sluice-agent on %s: %w", n.Name, err)
	}
	return waitForFile(ctx, p.cniSocket, agentStartWait, exited, "sluice-agent on "+n.Name, p.agentLog)
}

// startPassthroughProcess starts the ztunnel stand-in for node n as a detached
// `sluicectl lab passthrough` in the node's netns and host cgroup.
func startPassthroughProcess(l *lab.Lab, n lab.Node, sluiceBin string) error {
	exe, err := findBinary(sluiceBin, sluicectlBinary)
	if err != nil {
		if exe, err = os.Executable(); err != nil {
			return err
		}
	}
	p := pathsOf(n)
	exited, err := startDetached(n, p.ztunnelLog, exe, "lab", "passthrough",
		"--name", l.Name(), "--state-dir", l.StateDir(), "--node", n.Name)
	if err != nil {
		return fmt.Errorf("start the ztunnel stand-in on %s: %w", n.Name, err)
	}
	// It connects to the agent by itself and retries; only an immediate exit (bad
	// flags, no lab state) is worth reporting here.
	select {
	case err := <-exited:
		return fmt.Errorf("the ztunnel stand-in on %s exited at once (%v); its log %s:\n%s", n.Name, err, p.ztunnelLog, tailFile(p.ztunnelLog, 20))
	case <-time.After(200 * time.Millisecond):
		return nil
	}
}

// startZtunnelProcess starts the real ztunnel for node n, detached in the node's netns
// and host cgroup, in local mode: its config is the lab's registry of manifests, and its
// certificates come from a CA kept in the lab's state directory (shared by all nodes).
func startZtunnelProcess(l *lab.Lab, n lab.Node, sluiceBin string) error {
	exe, err := findBinary(sluiceBin, ztunnelBinary)
	if err != nil {
		return err
	}
	p := pathsOf(n)
	exited, err := startDetached(n, p.ztunnelLog, exe,
		"--config", l.RegistryDir(),
		"--zds-socket", p.ztunnelSocket,
		"--bpf-instance", n.Name,
		"--ca-dir", filepath.Join(l.StateDir(), "ca"),
		"--node-name", n.Name,
		"--admin-addr", "127.0.0.1:15000",
		"--metrics-addr", ":15020",
		"--readiness-addr", ":15021")
	if err != nil {
		return fmt.Errorf("start ztunnel on %s: %w", n.Name, err)
	}
	select {
	case err := <-exited:
		return fmt.Errorf("ztunnel on %s exited at once (%v); its log %s:\n%s", n.Name, err, p.ztunnelLog, tailFile(p.ztunnelLog, 20))
	case <-time.After(300 * time.Millisecond):
		return nil
	}
}

// startDetached starts name in node n's netns and host cgroup, in its own session, with
// stdout and stderr appended to logPath. The channel receives the process's exit.
func startDetached(n lab.Node, logPath, name string, args ...string) (<-chan error, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child has its own copy
	cmd := n.Command(name, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = new(syscall.SysProcAttr)
	}
	cmd.SysProcAttr.Setsid = true // no SIGINT from sluicectl's terminal
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- waitProcess(cmd) }() // reaps it if it dies while we run
	return exited, nil
}

func waitProcess(cmd *exec.Cmd) error {
	err := cmd.Wait()
	if err == nil {
		return errors.New("exit status 0")
	}
	return err
}

// waitForFile waits until path exists, failing early if the process that should make it
// exits, and pointing at its log either way.
func waitForFile(ctx context.Context, path string, timeout time.Duration, exited <-chan error, who, logPath string) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("%s exited (%v) before serving %s; its log %s:\n%s", who, err, path, logPath, tailFile(logPath, 20))
		case <-ctx.Done():
			return fmt.Errorf("%s did not serve %s within %v; see its log %s:\n%s", who, path, timeout, logPath, tailFile(logPath, 20))
		case <-tick.C:
		}
	}
}

// tailFile returns the last n lines of path, indented, for error messages.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "    (" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}

// waitPodsCaptured waits until ztunnel's listeners (15001 and 15006) are open in every
// pod of l that its labels put in the mesh, so that the first connection a user makes
// after `lab up` is already served.
func waitPodsCaptured(ctx context.Context, l *lab.Lab) error {
	namespaces := l.Namespaces()
	ctx, cancel := context.WithTimeout(ctx, podCaptureWait)
	defer cancel()
	for _, p := range l.Pods() {
		if meshMode(namespaces[p.Namespace], p) != dataplaneModeAmbient {
			continue
		}
		for {
			ok, err := podListening(p, bpf.DefaultOutboundPort, bpf.DefaultInboundPort)
			if err != nil {
				return fmt.Errorf("pod %s: %w", p, err)
			}
			if ok {
				break
			}
			select {
			case <-ctx.Done():
				n := l.Node(p.Node)
				return fmt.Errorf("pod %s is enrolled but nothing listens on ports %d/%d in it after %v: is the ztunnel stand-in connected to the agent? see %s and %s",
					p, bpf.DefaultOutboundPort, bpf.DefaultInboundPort, podCaptureWait, pathsOf(n).ztunnelLog, pathsOf(n).agentLog)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}

// podListening reports whether TCP listeners on every one of ports exist in p's netns.
func podListening(p *lab.Pod, ports ...uint16) (bool, error) {
	var tables [][]byte
	err := p.Do(func() error {
		// /proc/thread-self/net shows the netns of this (locked) thread.
		for _, f := range []string{"tcp", "tcp6"} {
			b, err := os.ReadFile("/proc/thread-self/net/" + f)
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			tables = append(tables, b)
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	listening := map[uint16]bool{}
	for _, t := range tables {
		sc := bufio.NewScanner(bytes.NewReader(t))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) < 4 || f[3] != "0A" { // 0A: TCP_LISTEN
				continue
			}
			_, portHex, ok := strings.Cut(f[1], ":")
			if port, err := strconv.ParseUint(portHex, 16, 16); ok && err == nil {
				listening[uint16(port)] = true
			}
		}
	}
	for _, port := range ports {
		if !listening[port] {
			return false, nil
		}
	}
	return true, nil
}

// labDown removes the lab named in cfg (also what a crash left) and the BPF pins of its
// nodes' agents, carrying on past errors.
func labDown(ctx context.Context, cfg lab.Config) error {
	name := cfg.Name
	if name == "" {
		name = lab.DefaultName
	}
	instances := map[string]bool{}
	if l, err := lab.Open(cfg); err == nil {
		for _, n := range l.Nodes() {
			instances[n.Name] = true
		}
	}
	// Pins of a lab whose state is gone: instances are named <lab>-node<i>, and lab
	// names hold no '-', so the prefix is this lab's alone.
	entries, _ := os.ReadDir(bpf.DefaultPinRoot)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), name+"-node") {
			instances[e.Name()] = true
		}
	}
	// Pods first (their CNI DEL goes to the still running agents), then the agents die
	// with the cgroups, then their pinned programs go.
	err := lab.CleanupConfig(ctx, cfg)
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	for inst := range instances {
		if err := bpf.Uninstall(bpf.Config{Instance: inst}); err != nil {
			errs = append(errs, fmt.Errorf("remove BPF pins of %s: %w", inst, err))
		}
	}
	return errors.Join(errs...)
}
