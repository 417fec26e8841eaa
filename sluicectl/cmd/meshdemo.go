//go:build linux

package cmd

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sluicemesh/sluice/test/lab"
)

// MeshDemoLabName is the lab `sluicectl lab mesh-demo` builds unless --name says otherwise.
const MeshDemoLabName = "meshdemo"

const (
	ztunnelMetricsAddr = "127.0.0.1:15020"
	ztunnelAdminAddr   = "127.0.0.1:15000"
	// meshDemoPolicy is the registry file the demo writes its AuthorizationPolicy to;
	// the ztunnels read the registry as their local config.
	meshDemoPolicy  = "policies/deny-demo.yaml"
	policyApplyWait = 15 * time.Second
	// meshDemoHeldPort is a line echo in every pod, for a connection held open across
	// the policy change.
	meshDemoHeldPort = 8081
)

// The policy the demo applies: the same YAML a user would give Istio.
const meshDemoDenyPolicy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-demo
  namespace: demo
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["demo"]
    to:
    - operation:
        ports: ["8080", "8081"]
`

func newLabMeshDemoCommand(o *labOptions) *cobra.Command {
	return newDemoCommand(o, MeshDemoLabName, RunMeshDemo, &cobra.Command{
		Use:   "mesh-demo",
		Short: "Show the mesh end to end: two nodes running the real ztunnel, a connection over HBONE with mutual TLS, an AuthorizationPolicy, metrics",
		Long: `Build a 2-node lab with a node agent and the real ztunnel on each node and a pod per
node in an ambient namespace. Connect the pods across the nodes and show what each ztunnel
logged (identities, HBONE), apply an Istio AuthorizationPolicy that denies the connection,
remove it again, and read ztunnel's istio_tcp_* metrics. Exits non-zero if anything was
not as expected, so it doubles as a smoke test. Needs root and the binaries of
"make build" next to sluicectl.`,
	})
}

// RunMeshDemo runs the mesh demo and removes its lab afterwards (unless Keep), also when
// a step fails.
func RunMeshDemo(ctx context.Context, opts DemoOptions) (err error) {
	if opts, err = opts.withDefaults(MeshDemoLabName); err != nil {
		return err
	}
	d := &demo{opts: opts, out: opts.Out}
	start := time.Now()
	fmt.Fprintf(d.out, "Sluice mesh demo: lab %q, 2 nodes, each with a node agent and ztunnel, namespace %s (istio.io/dataplane-mode=ambient)\n",
		opts.Name, demoAmbientNS)

	cfg := lab.Config{Name: opts.Name, StateDir: opts.StateDir, Logger: opts.Logger}
	d.header("Bring up the lab: nodes, a node agent and ztunnel per node, a pod per node")
	if err := labDown(ctx, cfg); err != nil {
		return fmt.Errorf("remove an earlier mesh demo lab: %w", err)
	}
	l, err := LabUp(ctx, LabUpOptions{
		Name: opts.Name, StateDir: opts.StateDir, Nodes: 2, PodsPerNode: 1, Namespace: demoAmbientNS,
		Ambient: true, WithSluice: true, Ztunnel: true,
		CNIBinDir: opts.CNIBinDir, SluiceBinDir: opts.SluiceBinDir, Logger: opts.Logger,
	})
	if l != nil {
		d.l = l
		defer func() {
			for _, s := range d.servers {
				s.Close()
			}
			if opts.Keep {
				d.printf("\nlab %s stays up: `sluicectl lab status --name %s`, `sluicectl lab down --name %s`\n", opts.Name, opts.Name, opts.Name)
			} else if derr := labDownWithin(ctx, cfg, time.Minute); derr != nil {
				err = errors.Join(err, fmt.Errorf("remove lab %s: %w", opts.Name, derr))
			}
			fmt.Fprintf(d.out, "\n(took %v)\n", time.Since(start).Round(100*time.Millisecond))
		}()
	}
	if err != nil {
		return err
	}
	client, cok := l.Pod(demoAmbientNS, "app-0-0")
	server, sok := l.Pod(demoAmbientNS, "app-1-0")
	if !cok || !sok {
		return errors.New("the lab lacks demo/app-0-0 or demo/app-1-0")
	}
	for _, p := range []*lab.Pod{client, server} {
		d.printf("%-14s on %s  %s  captured, served by that node's ztunnel\n", p, p.NodeName, p.IP)
	}
	for _, p := range l.Pods() {
		ln, err := listenNoMPTCP(p.Do, fmt.Sprintf(":%d", demoEchoPort))
		if err != nil {
			return fmt.Errorf("echo server in %s: %w", p, err)
		}
		d.servers = append(d.servers, ln)
		go serveEcho(ln, p.String())
		held, err := listenNoMPTCP(p.Do, fmt.Sprintf(":%d", meshDemoHeldPort))
		if err != nil {
			return fmt.Errorf("line echo in %s: %w", p, err)
		}
		d.servers = append(d.servers, held)
		go serveLineEcho(held)
	}

	// Each ztunnel polls the lab's registry: connect once both know both pods as HBONE
	// workloads, or the first connection would pass through in plain TCP as one to a
	// destination outside the mesh does.
	if err := waitMeshConfig(ctx, l, client, server); err != nil {
		return err
	}
	to := server.AddrPort(demoEchoPort)
	cc := connCase{from: client.String(), dial: client.Dial, to: to}

	d.header(fmt.Sprintf("Connect %s -> %s %s, across the nodes", client, server, to))
	r := d.exchange(ctx, cc)
	switch {
	case r.err != nil:
		d.fail(fmt.Sprintf("the connection failed: %v", r.err))
	case r.answer != server.String() || r.sawFrom.Addr() != client.IP:
		d.fail(fmt.Sprintf("answered by %q, which saw the client as %s; want %s seeing %s", r.answer, r.sawFrom, server, client.IP))
	default:
		d.printf("answered by %s, which saw the client as %s: the client pod's own IP, kept through the tunnel\n", r.answer, r.sawFrom)
	}
	clientNode, serverNode := l.Node(client.Node), l.Node(server.Node)
	d.showAccessLog(ctx, clientNode, to, "direction=outbound", "protocol=HBONE", "outcome=ok")
	d.showAccessLog(ctx, serverNode, to, "direction=inbound", "src.identity=spiffe://", "outcome=ok")

	// A connection open before the policy: ztunnel judges open connections again on every
	// policy change (Istio does not), so the policy ends this one too.
	heldTo := server.AddrPort(meshDemoHeldPort)
	held, err := openHeld(ctx, client, heldTo)
	if err != nil {
		d.fail(fmt.Sprintf("connection to %s: %v", heldTo, err))
	} else {
		defer held.Close()
		fmt.Fprintln(d.out)
		d.printf("and a connection to %s that stays open, echoing a line every 200 ms\n", heldTo)
	}

	d.header("Deny both with an Istio AuthorizationPolicy (namespace demo, ports 8080 and 8081)")
	policyPath := filepath.Join(l.RegistryDir(), meshDemoPolicy)
	if err := os.MkdirAll(filepath.Dir(policyPath), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(policyPath, []byte(meshDemoDenyPolicy), 0o644); err != nil {
		return err
	}
	d.printf("wrote %s:\n\n%s\n", policyPath, indent(meshDemoDenyPolicy, "     "))
	if held != nil {
		closed, err := waitHeldClosed(ctx, held)
		switch {
		case closed != nil:
			d.printf("the connection opened before the policy was closed by ztunnel: %v\n", closed)
			d.showAccessLog(ctx, serverNode, heldTo, "direction=inbound", "outcome=closed")
		case err != nil:
			d.fail(fmt.Sprintf("the connection to %s opened before the policy: %v", heldTo, err))
		default:
			d.fail(fmt.Sprintf("the connection to %s opened before the policy was still open %v after it was written", heldTo, policyApplyWait))
		}
	}
	if r, ok := d.waitFor(ctx, cc, false); ok {
		d.printf("new connections are refused: %v\n", r.err)
		d.showAccessLog(ctx, serverNode, to, "direction=inbound", "outcome=denied")
		d.showAccessLog(ctx, clientNode, to, "direction=outbound", "outcome=error")
	} else {
		d.fail(fmt.Sprintf("the connection still went through %v after the policy was written", policyApplyWait))
	}

	d.header("Remove the policy")
	if err := os.Remove(policyPath); err != nil {
		return err
	}
	if r, ok := d.waitFor(ctx, cc, true); ok {
		d.printf("the connection goes through again, answered by %s\n", r.answer)
	} else {
		d.fail(fmt.Sprintf("the connection was still refused %v after the policy was removed", policyApplyWait))
	}

	d.header(fmt.Sprintf("istio_tcp_* metrics from the server side's ztunnel (%s, %s/metrics)", server.NodeName, ztunnelMetricsAddr))
	d.showZtunnelMetrics(ctx, serverNode)

	if len(d.failures) > 0 {
		return fmt.Errorf("the mesh demo found %d problem(s):\n  %s", len(d.failures), strings.Join(d.failures, "\n  "))
	}
	fmt.Fprintf(d.out, "\n   all as expected\n")
	return nil
}

// waitMeshConfig waits until every node's ztunnel lists each of pods as an HBONE
// workload (admin /config_dump).
func waitMeshConfig(ctx context.Context, l *lab.Lab, pods ...*lab.Pod) error {
	deadline := time.Now().Add(policyApplyWait)
	for _, n := range l.Nodes() {
		for {
			known, err := ztunnelKnows(ctx, n, pods)
			if known {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("ztunnel on %s did not list %v as HBONE workloads within %v (last error: %v); see %s",
					n.Name, pods, policyApplyWait, err, pathsOf(n).ztunnelLog)
			}
			if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
				return err
			}
		}
	}
	return nil
}

// ztunnelKnows reads node n's ztunnel config dump and reports whether it has every one
// of pods as an HBONE workload.
func ztunnelKnows(ctx context.Context, n lab.Node, pods []*lab.Pod) (bool, error) {
	body, err := getInNode(ctx, n, ztunnelAdminAddr, "/config_dump")
	if err != nil {
		return false, err
	}
	var dump struct {
		Workloads []struct {
			IPs      []netip.Addr `json:"ips"`
			Protocol string       `json:"protocol"`
		} `json:"workloads"`
	}
	if err := json.Unmarshal(body, &dump); err != nil {
		return false, err
	}
	hbone := map[netip.Addr]bool{}
	for _, w := range dump.Workloads {
		for _, ip := range w.IPs {
			hbone[ip] = w.Protocol == "HBONE"
		}
	}
	for _, p := range pods {
		if !hbone[p.IP] {
			return false, nil
		}
	}
	return true, nil
}

// labDownWithin removes the lab even when ctx has ended (an interrupted demo cleans up
// too), but gives up after limit rather than hang.
func labDownWithin(ctx context.Context, cfg lab.Config, limit time.Duration) error {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), limit)
	defer cancel()
	return labDown(dctx, cfg)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// waitFor repeats the connection until it succeeds (want true) or fails (want false),
// for as long as a policy change may take to reach both ztunnels.
func (d *demo) waitFor(ctx context.Context, cc connCase, want bool) (connResult, bool) {
	deadline := time.Now().Add(policyApplyWait)
	for {
		r := d.exchange(ctx, cc)
		if (r.err == nil) == want {
			return r, true
		}
		if time.Now().After(deadline) || sleepCtx(ctx, 200*time.Millisecond) != nil {
			return r, false
		}
	}
}

// showAccessLog prints, from node n's ztunnel log, the newest access-log line for a
// connection to dst that contains every one of want, and fails the demo when there is none.
func (d *demo) showAccessLog(ctx context.Context, n lab.Node, dst netip.AddrPort, want ...string) {
	fields := []string{"direction", "src.addr", "src.identity", "dst.addr", "dst.identity", "protocol", "outcome", "reason", "error"}
	path := pathsOf(n).ztunnelLog
	match := append([]string{`msg="connection complete"`, "dst.addr=" + dst.String()}, want...)
	var line string
	// The line is written when the connection closes, which may be just after the client
	// saw it end.
	for deadline := time.Now().Add(5 * time.Second); ; {
		if line = lastLogLine(path, match...); line != "" || time.Now().After(deadline) || sleepCtx(ctx, 100*time.Millisecond) != nil {
			break
		}
	}
	if line == "" {
		d.fail(fmt.Sprintf("no access-log line with %s for %s in %s", strings.Join(want, " "), dst, path))
		return
	}
	d.printf("ztunnel on %s logged:\n", n.Name)
	for _, f := range fields {
		if v, ok := logField(line, f); ok {
			d.printf("    %-13s %s\n", f, v)
		}
	}
}

// lastLogLine is the newest line of the file at path that contains every one of parts.
func lastLogLine(path string, parts ...string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	var last string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
lines:
	for sc.Scan() {
		for _, p := range parts {
			if !strings.Contains(sc.Text(), p) {
				continue lines
			}
		}
		last = sc.Text()
	}
	return last
}

// logField reads key=value (value possibly quoted) from a log/slog text line.
func logField(line, key string) (string, bool) {
	i := strings.Index(line, " "+key+"=")
	if i < 0 {
		return "", false
	}
	v := line[i+len(key)+2:]
	if strings.HasPrefix(v, `"`) {
		if end := strings.Index(v[1:], `"`); end >= 0 {
			return v[1 : end+1], true
		}
		return v, true
	}
	if end := strings.IndexByte(v, ' '); end >= 0 {
		v = v[:end]
	}
	return v, true
}

// showZtunnelMetrics prints the istio_tcp_connections_opened_total series node n's
// ztunnel reports as the destination.
func (d *demo) showZtunnelMetrics(ctx context.Context, n lab.Node) {
	body, err := getInNode(ctx, n, ztunnelMetricsAddr, "/metrics")
	if err != nil {
		d.fail(fmt.Sprintf("scrape ztunnel on %s: %v (see %s)", n.Name, err, pathsOf(n).ztunnelLog))
		return
	}
	found := 0
	for line := range strings.Lines(string(body)) {
		if strings.HasPrefix(line, "istio_tcp_connections_opened_total{") && strings.Contains(line, `reporter="destination"`) {
			found++
			d.printf("%s", line)
		}
	}
	if found == 0 {
		d.fail(fmt.Sprintf("ztunnel on %s reported no istio_tcp_connections_opened_total with reporter=\"destination\"", n.Name))
	}
}

// serveLineEcho sends every line of each connection back.
func serveLineEcho(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			io.Copy(c, c)
		}()
	}
}

// openHeld connects from pod p to to and checks that a line comes back.
func openHeld(ctx context.Context, p *lab.Pod, to netip.AddrPort) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := p.Dial(dctx, "tcp", to.String())
	if err != nil {
		return nil, err
	}
	if err := echoLine(c); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func echoLine(c net.Conn) error {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "ping\n" {
		return fmt.Errorf("echo answered %q", line)
	}
	return nil
}

// waitHeldClosed echoes a line on c every 200 ms until the connection is closed or reset,
// and returns how (closed). A line that does not come back in time is not a close: it
// is returned as err, as is ctx ending. Both are nil if c still worked after
// policyApplyWait.
func waitHeldClosed(ctx context.Context, c net.Conn) (closed, err error) {
	for deadline := time.Now().Add(policyApplyWait); time.Now().Before(deadline); {
		if err := echoLine(c); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil, fmt.Errorf("no echo within 2s, yet not closed: %w", err)
			}
			return err, nil
		}
		if err := sleepCtx(ctx, 200*time.Millisecond); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

func indent(s, prefix string) string {
	var b strings.Builder
	for line := range strings.Lines(s) {
		b.WriteString(prefix + line)
	}
	return b.String()
}
