//go:build linux

// Command ztunnel is the data-path benchmark behind `make bench-ztunnel`: in one run on
// one machine it measures what carrying pod-to-pod traffic between two nodes costs
// through Sluice's ztunnel (both nodes' real processes, HBONE with mutual TLS), against
// the same traffic sent directly and through the mutual-TLS tunnels a user might deploy
// instead (stunnel and HAProxy, same path, same cipher), and writes the numbers, the
// goals and the method to docs/bench/ztunnel.md.
//
// It needs root, iperf3, stunnel4 and haproxy (Debian packages), and fortio, which it
// installs with `go install` into the user's cache directory when missing. Everything it
// makes (a two-node lab with node agents and four pods, the processes in it, BPF pins
// under /sys/fs/bpf/sluice/ztbench-node*, a temporary directory) is removed before it
// exits, also on failure or interrupt, and leftovers of a run that crashed are removed at
// the start of the next.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/test/bench/benchutil"
)

// The load Istio publishes its ztunnel figures with: fortio at 1000 requests/s over 16
// connections, 1 KiB payload.
const (
	fortioQPS     = 1000
	fortioConns   = 16
	fortioPayload = 1024
	fortioVersion = "v1.68.2" // the newest that installs from the module proxy here
	holdDialers   = 64
)

type options struct {
	out      string
	rounds   int
	duration time.Duration
	// latency is the length of the fixed-rate fortio runs: p99 needs more requests than
	// the throughput runs need seconds.
	latency time.Duration
	holds   []int
	quiet   float64
	profile bool
	fortio  string
	verbose bool
	ref     string
}

func main() {
	var o options
	flag.StringVar(&o.out, "out", "docs/bench/ztunnel.md", "write the report here (- for standard output)")
	flag.IntVar(&o.rounds, "rounds", 3, "rounds; each measures every mode once per test, in a rotated order")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "length of each iperf3 run and maximum-rate fortio run (whole seconds)")
	flag.DurationVar(&o.latency, "latency-duration", 10*time.Second, "length of each fortio run at 1000 requests/s (whole seconds); at 3 s a p99 rests on 30 requests")
	holds := flag.String("hold", "2000,10000", "numbers of idle connections to hold through each tunnel for the memory figures")
	flag.Float64Var(&o.quiet, "quiet", 0.10, "measure a run again when other processes used more than this share of the CPU during it (0: never)")
	flag.BoolVar(&o.profile, "profile", true, "take CPU profiles of both ztunnels under iperf3 and fortio and report their top functions")
	flag.StringVar(&o.fortio, "fortio", "", "fortio binary (default: "+defaultFortio()+", installed there if missing)")
	flag.BoolVar(&o.verbose, "v", false, "log lab details")
	flag.StringVar(&o.ref, "ztunnel-ref", "", "also measure ztunnel built at this git revision (e.g. HEAD~1), as mode (b0), to compare a change with what it changes in one run")
	holdServer := flag.Int("hold-server", 0, "internal: run as the server holding idle connections on this port")
	flag.Parse()
	if *holdServer > 0 {
		if err := runHoldServer(*holdServer); err != nil {
			fmt.Fprintln(os.Stderr, "hold server:", err)
			os.Exit(1)
		}
		return
	}

	level := slog.LevelInfo
	if o.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	for f := range strings.SplitSeq(*holds, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			log.Error("-hold wants positive numbers separated by commas", "got", *holds)
			os.Exit(2)
		}
		o.holds = append(o.holds, n)
	}
	o.duration, o.latency = o.duration.Round(time.Second), o.latency.Round(time.Second)
	if o.rounds <= 0 || o.duration < time.Second || o.latency < time.Second {
		log.Error("-rounds must be positive, -duration and -latency-duration at least 1s")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o, log)
	if ctx.Err() != nil {
		err = fmt.Errorf("interrupted; everything the run made has been removed (%w)", err)
	}
	stop()
	if err != nil {
		log.Error("ztunnel benchmark failed", "err", err)
		os.Exit(1)
	}
}

// bench is one run.
type bench struct {
	opts       options
	log, quiet *slog.Logger
	w          *world
	labCgroup  string
	modes      []*mode
	waitBudget time.Duration
	redos      int
	fileLimit  uint64 // RLIMIT_NOFILE of the benchmark and everything it starts
}

func run(ctx context.Context, o options, log *slog.Logger) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("the ztunnel benchmark needs root (network namespaces, BPF, cgroups); run `sudo make bench-ztunnel`")
	}
	if _, err := os.Stat("go.mod"); err != nil {
		return errors.New("run the benchmark from the repository's root (it builds ztunnel and the node agent from there)")
	}
	t, err := findTools(ctx, o, log)
	if err != nil {
		return err
	}
	fileLimit, err := raiseFileLimit(1 << 18)
	if err != nil {
		return err
	}
	if err := cleanupLeftovers(); err != nil {
		return fmt.Errorf("remove leftovers of an earlier run: %w", err)
	}
	quiet := log
	if !o.verbose {
		quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	b := &bench{opts: o, log: log, quiet: quiet, w: &world{tools: t}, waitBudget: 45 * time.Second, fileLimit: fileLimit}
	start := time.Now()
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if cerr := b.w.close(dctx); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		}
	}()
	log.Info("setting up: building ztunnel and the node agent, lab with 2 nodes, tunnels")
	if err := b.setUp(ctx, b.w); err != nil {
		return err
	}
	b.labCgroup = b.w.lab.Config().CgroupRoot
	b.modes = b.w.modes()
	log.Info("lab up", "took", time.Since(start).Round(time.Second), "rounds", o.rounds, "duration", o.duration)
	res, err := b.run(ctx)
	if err != nil {
		return err
	}
	res.took = time.Since(start)
	report := b.report(res, machineFacts(start, t))
	return benchutil.WriteReport(o.out, report, log, start)
}

// modes are the ways from the client pod to the server pod, in the report's order.
func (w *world) modes() []*mode {
	plain := w.serverPlain.IP.String()
	mesh := w.serverMesh.IP.String()
	hostPort := func(h string, p int) string { return h + ":" + strconv.Itoa(p) }
	ms := []*mode{
		{key: "direct", name: "(a) direct", path: "client pod → server pod, plain TCP over the veths and the nodes' link",
			client: w.clientPlain, hold: w.holdPlain,
			addr: func(i int) string { return hostPort(plain, int(apps[i].port)) }},
		{key: "sluice", name: "(b) Sluice ztunnel", path: meshPath,
			client: w.clientMesh, hold: w.holdMesh, tunnels: w.ztunnels, ztBin: w.ztBin,
			addr: func(i int) string { return hostPort(mesh, int(apps[i].port)) }},
		{key: "stunnel", name: "(c1) stunnel", path: "client → 127.0.0.1 stunnel in the client pod → mTLS → stunnel in the server pod → server",
			client: w.clientPlain, hold: w.holdPlain, tunnels: w.stunnels,
			addr: func(i int) string { return hostPort("127.0.0.1", stunnelClientBase+i) }},
		{key: "haproxy", name: "(c2) HAProxy", path: "client → 127.0.0.1 HAProxy in the client pod → mTLS → HAProxy in the server pod → server",
			client: w.clientPlain, hold: w.holdPlain, tunnels: w.haproxies,
			addr:    func(i int) string { return hostPort("127.0.0.1", haproxyClientBase+i) },
			explain: w.haproxyLimits},
		{key: "relay", name: "(d) plain relays", path: "client → 127.0.0.1 HAProxy in the client pod → plain TCP → HAProxy in the server pod → server: no TLS, the floor of any tunnel with a proxy at each end",
			client: w.clientPlain, hold: w.holdPlain, tunnels: w.relays,
			addr: func(i int) string { return hostPort("127.0.0.1", relayClientBase+i) }},
	}
	if w.refBin != "" {
		// The same ztunnels, run from the other binary while this mode is measured.
		ref := &mode{key: "ref", name: "(b0) ztunnel at " + w.refName, path: meshPath,
			client: w.clientMesh, hold: w.holdMesh, tunnels: w.ztunnels, ztBin: w.refBin,
			addr: func(i int) string { return hostPort(mesh, int(apps[i].port)) }}
		ms = append(ms[:2], append([]*mode{ref}, ms[2:]...)...)
	}
	return ms
}

const meshPath = "captured by eBPF → ztunnel's in-pod 15001 (node0's process) → HBONE (mTLS, HTTP/2 CONNECT) → ztunnel's in-pod 15008 in the server pod (node1's process) → server"

// tools are the external programs the benchmark drives, with their versions.
type tools struct {
	iperf3, stunnel, haproxy, fortio string
	versions                         map[string]string
}

func defaultFortio() string {
	base, err := os.UserCacheDir()
	if err != nil {
		base = filepath.Join(os.TempDir(), "sluice-cache")
	}
	return filepath.Join(base, "sluice", "tools", "fortio-"+fortioVersion, "fortio")
}

// findTools finds iperf3, stunnel and HAProxy, and fortio (installing it when missing),
// failing with what to install.
func findTools(ctx context.Context, o options, log *slog.Logger) (tools, error) {
	t := tools{versions: map[string]string{}}
	var missing []string
	for _, x := range []struct {
		dst          *string
		name, debian string
	}{{&t.iperf3, "iperf3", "iperf3"}, {&t.stunnel, "stunnel4", "stunnel4"}, {&t.haproxy, "haproxy", "haproxy"}} {
		p, err := exec.LookPath(x.name)
		if err != nil {
			missing = append(missing, x.debian)
			continue
		}
		*x.dst = p
	}
	if len(missing) > 0 {
		return t, fmt.Errorf("missing tools: install the Debian packages %s (`apt-get install %s`, or `make deps`)",
			strings.Join(missing, ", "), strings.Join(missing, " "))
	}
	t.fortio = o.fortio
	if t.fortio == "" {
		t.fortio = defaultFortio()
		if _, err := os.Stat(t.fortio); err != nil {
			log.Info("installing fortio", "version", fortioVersion, "into", filepath.Dir(t.fortio))
			cmd := exec.CommandContext(ctx, "go", "install", "fortio.org/fortio@"+fortioVersion)
			cmd.Env = append(os.Environ(), "GOBIN="+filepath.Dir(t.fortio))
			cmd.Dir = os.TempDir() // outside this module, whose go.mod has nothing to say
			if out, err := cmd.CombinedOutput(); err != nil {
				return t, fmt.Errorf("install fortio %s (go install fortio.org/fortio@%s): %w\n%s", fortioVersion, fortioVersion, err, out)
			}
		}
	}
	version := func(name string, args ...string) string {
		out, _ := exec.CommandContext(ctx, name, args...).CombinedOutput()
		for line := range strings.Lines(string(out)) {
			line = strings.TrimSpace(line)
			if line != "" && !strings.HasPrefix(line, "Initializing") {
				return line
			}
		}
		return "unknown"
	}
	t.versions["iperf3"] = version(t.iperf3, "--version")
	t.versions["stunnel"] = version(t.stunnel, "-version")
	t.versions["haproxy"], _, _ = strings.Cut(version(t.haproxy, "-v"), " - ")
	t.versions["fortio"] = "fortio " + version(t.fortio, "version")
	return t, nil
}
