//go:build linux

package cmd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sluicemesh/sluice/test/lab"
	"github.com/sluicemesh/sluice/test/passthrough"
)

// DemoLabName is the lab `sluicectl lab demo` builds unless --name says otherwise; it is
// not the default lab's name, so the demo never removes a lab someone made by hand.
const DemoLabName = "demo"

// What the demo builds: pods app-<node>-0 in an ambient namespace and in one outside the
// mesh, an echo server in every pod, and a stand-in for a ClusterIP service.
const (
	demoAmbientNS = "demo"
	demoLegacyNS  = "legacy"
	demoEchoPort  = 8080
	dataplaneNone = "none"
)

// demoServiceAddr is a ClusterIP-like address. With no kube-proxy in the lab the fabric
// (the world outside the nodes) owns it, so connections to it have an answer.
var demoServiceAddr = netip.MustParseAddrPort("10.96.0.10:80")

const demoServiceName = "service 10.96.0.10 (in the fabric)"

// DemoOptions configure RunDemo and RunMeshDemo. The zero value of a field means its default.
type DemoOptions struct {
	Name     string // lab name; default DemoLabName
	StateDir string // default /run/sluice-lab/<Name>
	// CNIBinDir and SluiceBinDir are as in LabUpOptions.
	CNIBinDir    string
	SluiceBinDir string
	// Keep leaves the lab running at the end (the capture demo moves its ztunnel
	// stand-ins out of this process into one detached process per node).
	Keep   bool
	Out    io.Writer    // the narrative; nil discards
	Logger *slog.Logger // nil discards
}

func newLabDemoCommand(o *labOptions) *cobra.Command {
	return newDemoCommand(o, DemoLabName, RunDemo, &cobra.Command{
		Use:   "demo",
		Short: "Show eBPF capture end to end: a 2-node lab with node agents, pods in and out of the mesh, and connections between them",
		Long: `Build a 2-node lab with a node agent and a ztunnel stand-in on each node, pods in an
ambient namespace ("demo") and in one outside the mesh ("legacy"), make connections
between them and tell, for each, whether eBPF captured it, to which in-pod listener
(15001 outbound, 15006 inbound) and with which original destination, and who answered.
Then read the kernel's per-pod counters from the agents, take a pod out of the mesh and
try again. Exits non-zero if anything was not as expected, so it doubles as a smoke test.
Needs root and the binaries of "make build" next to sluicectl.`,
	})
}

// newDemoCommand completes c (use and help text) into the command that runs a demo: run
// gets DemoOptions from the flags, with the lab named name unless --name says otherwise.
func newDemoCommand(o *labOptions, name string, run func(context.Context, DemoOptions) error, c *cobra.Command) *cobra.Command {
	var opts DemoOptions
	c.Args = cobra.NoArgs
	c.RunE = func(c *cobra.Command, _ []string) error {
		opts.Name, opts.StateDir, opts.Out = name, o.stateDir, o.stdout
		// The narrative is the output; progress logs only with -v.
		opts.Logger = slog.New(slog.DiscardHandler)
		if o.verbose {
			opts.Logger = o.logger()
		}
		if c.Flags().Changed("name") {
			opts.Name = o.name
		}
		return run(c.Context(), opts)
	}
	f := c.Flags()
	f.BoolVar(&opts.Keep, "keep", false, "leave the lab running at the end")
	f.StringVar(&opts.CNIBinDir, "cni-bin", "", "CNI plugin directory (default: build bridge and host-local into "+lab.DefaultCNIBinDir()+")")
	f.StringVar(&opts.SluiceBinDir, "sluice-bin", "", "directory holding sluice-agent, sluice-cni and ztunnel (default: sluicectl's own directory)")
	return c
}

// withDefaults fills in what opts leaves empty (the lab name with name) and checks that
// the demo can run.
func (opts DemoOptions) withDefaults(name string) (DemoOptions, error) {
	if opts.Name == "" {
		opts.Name = name
	}
	if opts.Out == nil {
		opts.Out = io.Discard
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if os.Geteuid() != 0 {
		return opts, errors.New("the demo needs root (network namespaces, cgroups, eBPF): run it with sudo")
	}
	return opts, nil
}

// demo is one run of RunDemo.
type demo struct {
	opts     DemoOptions
	out      io.Writer
	l        *lab.Lab
	proxies  []*demoProxy // by node index
	servers  []net.Listener
	failures []string
	step     int
}

// demoProxy is one node's ztunnel stand-in, run in this process so the demo can read
// what it captured.
type demoProxy struct {
	*passthrough.Proxy
	cancel  context.CancelFunc
	done    chan struct{}
	logFile *os.File
}

// RunDemo runs the demo (see `sluicectl lab demo --help`) and returns an error if any
// expectation failed or the lab could not be built. Unless opts.Keep, it removes the
// lab again, also on failure.
func RunDemo(ctx context.Context, opts DemoOptions) (err error) {
	if opts, err = opts.withDefaults(DemoLabName); err != nil {
		return err
	}
	d := &demo{opts: opts, out: opts.Out}
	start := time.Now()
	fmt.Fprintf(d.out, "Sluice capture demo: lab %q, 2 nodes, namespace %s (istio.io/dataplane-mode=ambient) and %s (not in the mesh)\n",
		opts.Name, demoAmbientNS, demoLegacyNS)

	cfg := lab.Config{Name: opts.Name, StateDir: opts.StateDir, Logger: opts.Logger}
	d.header("Clean up an earlier demo")
	stateDir := opts.StateDir
	if stateDir == "" {
		stateDir = filepath.Join(lab.DefaultStateBase, opts.Name)
	}
	_, statErr := os.Stat(stateDir)
	if err := labDown(ctx, cfg); err != nil {
		return fmt.Errorf("remove the earlier demo lab: %w", err)
	}
	if statErr == nil {
		d.printf("removed lab %s, left by an earlier run\n", opts.Name)
	} else {
		d.printf("no earlier lab %s\n", opts.Name)
	}

	d.header("Bring up the lab: nodes, a node agent and ztunnel stand-in per node, pods")
	l, err := LabUp(ctx, LabUpOptions{
		Name: opts.Name, StateDir: opts.StateDir, Nodes: 2, PodsPerNode: 1,
		Namespace: demoAmbientNS, Ambient: true,
		CNIBinDir: opts.CNIBinDir, WithSluice: true, SluiceBinDir: opts.SluiceBinDir,
		StartZtunnel: d.startProxy, Logger: opts.Logger,
	})
	defer func() {
		err = errors.Join(err, d.finish(ctx, err))
		fmt.Fprintf(d.out, "\n(took %.1fs)\n", time.Since(start).Seconds())
	}()
	if err != nil {
		return err
	}
	d.l = l
	if err := d.addLegacyPods(ctx); err != nil {
		return err
	}
	if err := d.waitServed(ctx); err != nil {
		return err
	}
	d.printLab()

	d.header("Start an echo server on :8080 in every pod, and a service at " + demoServiceAddr.String())
	if err := d.startServers(); err != nil {
		return err
	}
	d.printf("each answers with its name and the client address it saw\n")

	d.header("Connections")
	a0, _ := l.Pod(demoAmbientNS, "app-0-0")
	a1, _ := l.Pod(demoAmbientNS, "app-1-0")
	g0, _ := l.Pod(demoLegacyNS, "app-0-0")
	g1, _ := l.Pod(demoLegacyNS, "app-1-0")
	node1 := l.Node(1)
	d.connect(ctx, connCase{
		what: "mesh pod to mesh pod on the other node", from: a0.String(), dial: a0.Dial,
		to: a1.AddrPort(demoEchoPort), toName: a1.String(),
		want: []wantEvent{{0, "outbound", a0.String()}, {1, "inbound", a1.String()}}, answer: a1.String(),
	})
	d.connect(ctx, connCase{
		what: "mesh pod to a service address", from: a0.String(), dial: a0.Dial,
		to: demoServiceAddr, toName: "service",
		want: []wantEvent{{0, "outbound", a0.String()}}, answer: demoServiceName,
	})
	d.connect(ctx, connCase{
		what: "pod outside the mesh to a mesh pod", from: g0.String(), dial: g0.Dial,
		to: a1.AddrPort(demoEchoPort), toName: a1.String(),
		want: []wantEvent{{1, "inbound", a1.String()}}, answer: a1.String(),
	})
	d.connect(ctx, connCase{
		what: "node to its own mesh pod: the kubelet probe path", from: "node " + node1.Name, dial: node1.Dial,
		to: a1.AddrPort(demoEchoPort), toName: a1.String(),
		answer: a1.String(),
	})

	d.header("Kernel counters, scraped from each node agent's " + agentMetricsAddr + "/metrics")
	d.showMetrics(ctx, map[string]uint64{
		metricKey(a0.Name, "outbound"): 2, // to a1 and to the service
		metricKey(a1.Name, "inbound"):  3, // from a0, g0 and the node
	})

	d.header(fmt.Sprintf("Take %s out of the mesh: label it %s=%s", a0, dataplaneModeLabel, dataplaneNone))
	if err := d.optOut(ctx, a0); err != nil {
		d.fail(err.Error())
	} else {
		d.connect(ctx, connCase{
			what: "opted-out pod to the service address", from: a0.String(), dial: a0.Dial,
			to: demoServiceAddr, toName: "service", answer: demoServiceName,
		})
		d.connect(ctx, connCase{
			what: "pod outside the mesh to the opted-out pod", from: g1.String(), dial: g1.Dial,
			to: a0.AddrPort(demoEchoPort), toName: a0.String(), answer: a0.String(),
		})
	}

	if len(d.failures) > 0 {
		return fmt.Errorf("demo: %d expectation(s) failed:\n  %s", len(d.failures), strings.Join(d.failures, "\n  "))
	}
	return nil
}

func (d *demo) header(title string) {
	d.step++
	fmt.Fprintf(d.out, "\n== %d. %s\n", d.step, title)
}

func (d *demo) printf(format string, args ...any) {
	fmt.Fprintf(d.out, "   "+format, args...)
}

func (d *demo) fail(msg string) {
	d.failures = append(d.failures, msg)
	d.printf("FAIL  %s\n", msg)
}

// startProxy is LabUpOptions.StartZtunnel: it runs node n's passthrough in this process.
func (d *demo) startProxy(ctx context.Context, _ *lab.Lab, n lab.Node) error {
	logFile, err := os.OpenFile(pathsOf(n).ztunnelLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	p := &demoProxy{
		Proxy: &passthrough.Proxy{
			ZDSPath: pathsOf(n).ztunnelSocket,
			PinDir:  pinDir(n),
			Logger:  slog.New(slog.NewTextHandler(logFile, nil)).With("node", n.Name),
		},
		cancel: cancel, done: make(chan struct{}), logFile: logFile,
	}
	go func() {
		defer close(p.done)
		if err := p.Run(pctx); err != nil {
			p.Logger.Error("passthrough stopped", "err", err)
		}
	}()
	for len(d.proxies) <= n.Index {
		d.proxies = append(d.proxies, nil)
	}
	d.proxies[n.Index] = p
	return nil
}

func (d *demo) stopProxies() {
	for _, p := range d.proxies {
		if p == nil {
			continue
		}
		p.cancel()
		<-p.done
		p.logFile.Close()
	}
	d.proxies = nil
}

func (d *demo) addLegacyPods(ctx context.Context) error {
	for _, n := range d.l.Nodes() {
		spec := lab.PodSpec{Name: fmt.Sprintf("app-%d-0", n.Index), Namespace: demoLegacyNS, Node: n.Index,
			Labels: map[string]string{"app": fmt.Sprintf("app-%d-0", n.Index)}}
		if _, err := d.l.AddPod(ctx, spec); err != nil {
			return err
		}
	}
	return nil
}

// waitServed waits until each node's stand-in serves every mesh pod of the node, i.e.
// has its listeners open and the inbound one registered for sk_lookup.
func (d *demo) waitServed(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, podCaptureWait)
	defer cancel()
	for _, p := range d.l.Pods() {
		if p.Namespace != demoAmbientNS {
			continue
		}
		for !d.proxies[p.Node].Serving(p.UID) {
			select {
			case <-ctx.Done():
				n := d.l.Node(p.Node)
				return fmt.Errorf("the ztunnel stand-in on %s was not handed pod %s within %v; see %s and %s",
					n.Name, p, podCaptureWait, pathsOf(n).agentLog, pathsOf(n).ztunnelLog)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	return nil
}

func (d *demo) printLab() {
	l := d.l
	tw := newTable(d.out)
	fmt.Fprintln(tw, "   NODE\tIP\tPOD CIDR\tAGENT LOG\tBPF PINS")
	for _, n := range l.Nodes() {
		fmt.Fprintf(tw, "   %s\t%s\t%s\t%s\t%s\n", n.Name, n.IP, n.PodCIDR, pathsOf(n).agentLog, pinDir(n))
	}
	tw.Flush()
	fmt.Fprintln(d.out)
	namespaces := l.Namespaces()
	tw = newTable(d.out)
	fmt.Fprintln(tw, "   POD\tNODE\tIP\tMESH")
	for _, p := range l.Pods() {
		mode := "no"
		if meshMode(namespaces[p.Namespace], p) == dataplaneModeAmbient {
			mode = "ambient: enrolled, served on 15001/15006"
		}
		fmt.Fprintf(tw, "   %s\t%s\t%s\t%s\n", p, l.Node(p.Node).Name, p.IP, mode)
	}
	tw.Flush()
}

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0) }

// optOut labels p istio.io/dataplane-mode=none and waits until its node's agent has
// taken it out of capture: the stand-in no longer serves it and the agent counts one
// enrolled pod less.
func (d *demo) optOut(ctx context.Context, p *lab.Pod) error {
	n := d.l.Node(p.Node)
	before, err := enrolledPods(ctx, n)
	if err != nil {
		return err
	}
	start := time.Now()
	if err := d.l.LabelPod(p.Namespace, p.Name, dataplaneModeLabel, dataplaneNone); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for {
		now, err := enrolledPods(ctx, n)
		if err == nil && now == before-1 && !d.proxies[p.Node].Serving(p.UID) {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the agent on %s did not unenroll %s within 15s of the label change (enrolled pods %d, then %d; see %s)", n.Name, p, before, now, pathsOf(n).agentLog)
		case <-time.After(50 * time.Millisecond):
		}
	}
	d.printf("the agent on %s saw the label and unenrolled the pod in %s: sk_lookup detached, its netns cookie\n", n.Name, time.Since(start).Round(time.Millisecond))
	d.printf("left the enrolled map, and the stand-in closed the pod's listeners (enrolled pods on %s: %d -> %d)\n", n.Name, before, before-1)
	return nil
}

// finish prints the logs if something failed, then removes the lab, or with Keep hands
// the pods to detached stand-ins so the lab works without this process.
func (d *demo) finish(ctx context.Context, runErr error) error {
	for _, ln := range d.servers {
		ln.Close()
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	if d.l != nil && (runErr != nil || len(d.failures) > 0) {
		d.header("Logs of the node services (last lines)")
		for _, n := range d.l.Nodes() {
			p := pathsOf(n)
			fmt.Fprintf(d.out, "   %s:\n%s\n   %s:\n%s\n", p.agentLog, tailFile(p.agentLog, 15), p.ztunnelLog, tailFile(p.ztunnelLog, 15))
		}
	}
	name, demoName := "", ""
	if d.opts.Name != lab.DefaultName {
		name = " --name " + d.opts.Name
	}
	if d.opts.Name != DemoLabName {
		demoName = " --name " + d.opts.Name
	}
	if d.opts.Keep && d.l != nil {
		d.header("Keep the lab")
		// Back in the mesh, so the kept lab starts where the demo did.
		if _, ok := d.l.Pod(demoAmbientNS, "app-0-0"); ok {
			if err := d.l.LabelPod(demoAmbientNS, "app-0-0", dataplaneModeLabel, ""); err != nil {
				return err
			}
		}
		d.stopProxies()
		for _, n := range d.l.Nodes() {
			if err := startPassthroughProcess(d.l, n, d.sluiceBinDir()); err != nil {
				return err
			}
		}
		if err := waitPodsCaptured(ctx, d.l); err != nil {
			return err
		}
		d.printf("lab %s stays up with %s/app-0-0 back in the mesh; the ztunnel stand-ins now run as processes\n", d.opts.Name, demoAmbientNS)
		d.printf("on the nodes (`sluicectl lab passthrough`); the echo servers and the service are gone with this process\n")
		d.explore(name, "")
		return nil
	}
	d.header("Tear down")
	d.stopProxies()
	err := labDown(ctx, lab.Config{Name: d.opts.Name, StateDir: d.opts.StateDir, Logger: d.opts.Logger})
	if err != nil {
		return err
	}
	d.printf("removed lab %s: pods, node agents, stand-ins, network namespaces, cgroups and BPF pins\n", d.opts.Name)
	if runErr != nil || len(d.failures) > 0 {
		d.printf("to look into a failure, run `sluicectl lab demo%s --keep` and remove the lab after with `sluicectl lab down%s`\n", demoName, name)
		return nil
	}
	d.explore(name, demoName)
	return nil
}

func (d *demo) sluiceBinDir() string {
	if d.opts.SluiceBinDir != "" {
		return d.opts.SluiceBinDir
	}
	return defaultSluiceBinDir()
}

// explore prints commands to look around a kept lab.
// With demoName set the lab is gone and the commands are for the next run.
func (d *demo) explore(name, demoName string) {
	intro := "explore it:"
	if !d.opts.Keep {
		intro = "to explore, keep the lab with `sluicectl lab demo" + demoName + " --keep`, then:"
	}
	target := "10.244.1.2:8080"
	if d.l != nil {
		if p, ok := d.l.Pod(demoAmbientNS, "app-1-0"); ok && p.IP.IsValid() {
			target = p.AddrPort(demoEchoPort).String()
		}
	}
	logDir := lab.DefaultStateBase + "/" + d.opts.Name + "/nodes/" + d.opts.Name + "-node0"
	if d.l != nil {
		logDir = d.l.Node(0).Dir
	}
	d.printf("%s\n", intro)
	for _, c := range []string{
		"sluicectl lab status" + name,
		"sluicectl lab exec" + name + " " + demoAmbientNS + "/app-0-0 -- curl -sS -m 2 " + target + "   # captured twice",
		"cat " + logDir + "/ztunnel.log   # what the stand-in captured",
		"sluicectl lab exec" + name + " node0 -- curl -s " + agentMetricsAddr + "/metrics",
		"sluicectl lab down" + name,
	} {
		d.printf("  %s\n", c)
	}
}
