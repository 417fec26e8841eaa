//go:build linux

// Command capture is the capture benchmark behind `make bench`: it measures, in one run and
// on one machine, what putting a pod's outbound connections under capture costs, for
// Sluice's eBPF programs and for the iptables REDIRECT rule of Istio's in-pod mode, and
// writes the numbers with the method to docs/bench/capture.md.
//
// It needs root. Everything it makes (a one-node lab with two pods, BPF programs pinned
// under /sys/fs/bpf/sluice/capbench*, the iptables rule inside the client pod's network
// namespace) is removed before it exits, also on failure or interrupt, and leftovers of a
// run that crashed are removed at the start of the next.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/test/bench/benchutil"
	"github.com/sluicemesh/sluice/test/lab"
)

const labName = "capbench"

type options struct {
	out      string
	duration time.Duration
	conns    int
	rounds   int
	modes    map[string]bool // empty: all
	quiet    float64
	verbose  bool
}

func main() {
	var o options
	flag.StringVar(&o.out, "out", "docs/bench/capture.md", "write the report here (- for standard output)")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "connection-rate time and throughput time per mode, split over the rounds")
	flag.IntVar(&o.conns, "conns", 30000, "connect() latency samples per mode, split over the rounds")
	flag.IntVar(&o.rounds, "rounds", 10, "rounds; each measures every mode once, in a rotated order")
	flag.Float64Var(&o.quiet, "quiet", 0.10, "measure a round again when other processes used more than this share of the CPU during it (0: never)")
	modes := flag.String("modes", "", "comma-separated modes to run (a0,a,b,c,t0,t1,t2,t3), for investigating one; default all")
	flag.BoolVar(&o.verbose, "v", false, "log lab and BPF details")
	flag.Parse()

	level := slog.LevelInfo
	if o.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if *modes != "" {
		o.modes = map[string]bool{}
		for k := range strings.SplitSeq(*modes, ",") {
			o.modes[strings.TrimSpace(k)] = true
		}
	}
	if o.duration <= 0 || o.conns <= 0 || o.rounds <= 0 {
		log.Error("-duration, -conns and -rounds must be positive")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o, log)
	stop()
	if err != nil {
		log.Error("capture benchmark failed", "err", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options, log *slog.Logger) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("the capture benchmark needs root (network namespaces, BPF, iptables); run `sudo make bench`")
	}
	if err := cleanupLeftovers(); err != nil {
		return fmt.Errorf("remove leftovers of an earlier run: %w", err)
	}
	// Whatever happens below, no BPF instance of ours stays attached.
	defer func() { err = errors.Join(err, uninstallAll()) }()

	quiet := log
	if !o.verbose {
		quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	l, err := lab.Up(ctx, lab.Config{Name: labName, Nodes: 1, Logger: quiet})
	if err != nil {
		return err
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		err = errors.Join(err, l.Down(dctx))
	}()
	client, err := l.AddPod(ctx, lab.PodSpec{Name: "client", Namespace: "bench", Node: 0})
	if err != nil {
		return err
	}
	server, err := l.AddPod(ctx, lab.PodSpec{Name: "server", Namespace: "bench", Node: 0})
	if err != nil {
		return err
	}
	b := &bench{
		opts:       o,
		log:        log,
		quiet:      quiet,
		node:       l.Nodes()[0],
		client:     client,
		server:     server,
		serverAddr: netip.AddrPortFrom(server.IP, 8080),
		proxyAddr:  netip.MustParseAddrPort("127.0.0.1:15001"),
	}
	if b.proxy, err = listen(client, "client:15001", b.proxyAddr, true); err != nil {
		return err
	}
	defer func() { err = errors.Join(err, b.proxy.Close()) }()
	if b.app, err = listen(server, "server:8080", netip.AddrPortFrom(netip.IPv4Unspecified(), 8080), false); err != nil {
		return err
	}
	defer func() { err = errors.Join(err, b.app.Close()) }()

	log.Info("lab up", "client", client.IP, "server", server.IP, "rounds", o.rounds,
		"duration", o.duration, "conns", o.conns)
	start := time.Now()
	res, err := b.run(ctx)
	if err != nil {
		return err
	}
	report := b.report(res, machineFacts(ctx, start), time.Since(start))
	return benchutil.WriteReport(o.out, report, log, start)
}

// cleanupLeftovers removes what a crashed run left: the lab (netns, cgroups, state) and
// the pinned BPF instances. It touches only names this benchmark owns.
func cleanupLeftovers() error {
	return errors.Join(lab.Cleanup(labName), uninstallAll())
}

func uninstallAll() error {
	var errs []error
	for _, inst := range bpfInstances {
		errs = append(errs, bpf.Uninstall(bpf.Config{Instance: inst}))
	}
	return errors.Join(errs...)
}

// facts describes the machine and the run for the report.
type facts struct {
	date, kernel, cpu, goVersion, iptables, command string
	cpus                                            int
}

func machineFacts(ctx context.Context, start time.Time) facts {
	f := facts{
		date:      start.UTC().Format("2006-01-02 15:04 MST"),
		goVersion: goVersion(),
		cpus:      numCPU(),
		kernel:    kernelRelease(),
		cpu:       cpuModel(),
		iptables:  iptablesVersion(ctx),
	}
	f.command = strings.Join(append([]string{"go run ./test/bench/capture"}, os.Args[1:]...), " ")
	return f
}
