//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func sorted(s []int64) []int64 {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// percentile is the nearest-rank percentile of sorted samples.
func percentile(s []int64, p float64) int64 {
	if len(s) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// connectStats summarises one mode over all rounds.
type connectStats struct {
	samples       int
	p50, p90, p99 float64 // µs, over the pooled samples
	roundP50      []float64
	roundP99      []float64
	rates         []float64
	cpuPerConn    []float64 // µs, per round
	foreign       []float64 // per round
	errors        int
	accepted      int
	origMissed    int
	notAccepted   int
	ctGrowth      int
}

func summarise(rounds []connectRound) connectStats {
	var st connectStats
	var all []int64
	for _, r := range rounds {
		all = append(all, r.samples...)
		s := sorted(r.samples)
		st.roundP50 = append(st.roundP50, us(percentile(s, 50)))
		st.roundP99 = append(st.roundP99, us(percentile(s, 99)))
		st.rates = append(st.rates, r.rate)
		st.cpuPerConn = append(st.cpuPerConn, float64(r.cpuPerConn)/1e3)
		st.foreign = append(st.foreign, r.foreign)
		st.errors += r.errors
		st.notAccepted += r.notAccepted
		st.accepted += r.accepted
		st.origMissed += r.origMissed
		st.ctGrowth += r.ctGrowth
	}
	slices.Sort(all)
	st.samples = len(all)
	st.p50, st.p90, st.p99 = us(percentile(all, 50)), us(percentile(all, 90)), us(percentile(all, 99))
	return st
}

func us(ns int64) float64 { return float64(ns) / 1e3 }

func mean(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	var sum float64
	for _, x := range v {
		sum += x
	}
	return sum / float64(len(v))
}

// ratio is added(eBPF) / added(iptables); it means nothing when iptables added nothing.
func ratio(ebpf, ipt float64) (float64, bool) {
	if ipt <= 0 {
		return 0, false
	}
	return ebpf / ipt, true
}

func verdict(ok bool) string {
	if ok {
		return "**met**"
	}
	return "**not met**"
}

// spread renders the range of per-round values.
func spread(v []float64, format string) string {
	if len(v) == 0 {
		return ""
	}
	return fmt.Sprintf(format+"–"+format, slices.Min(v), slices.Max(v))
}

func (b *bench) report(res *results, f facts, took time.Duration) string {
	var w strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&w, format, args...) }

	cms, tms := b.selected(connectModes), b.selected(throughputModes)
	st := map[string]connectStats{}
	for _, m := range cms {
		st[m.key] = summarise(res.connect[m.key])
	}
	a, haveA := st["a"]

	p("# Capture benchmark\n\n")
	p("What capturing a pod's outbound connections costs: Sluice's eBPF programs against the\n")
	p("iptables `REDIRECT` rule of Istio's in-pod mode, measured side by side in one run.\n")
	p("This file is written by `make bench`; rerun it rather than editing the numbers.\n\n")

	p("| | |\n|---|---|\n")
	p("| date | %s |\n", f.date)
	p("| kernel | Linux %s |\n", f.kernel)
	p("| CPU | %d × %s |\n", f.cpus, f.cpu)
	p("| Go | %s |\n", f.goVersion)
	p("| iptables | %s |\n", f.iptables)
	p("| command | `make bench`, i.e. `%s` |\n", f.command)
	slice := b.opts.duration / time.Duration(b.opts.rounds)
	p("| settings | per mode %d connect() samples, %s of connection rate, %s of throughput, in %d rounds (per round: %d samples, %s, %s) |\n",
		b.opts.rounds*max(1, b.opts.conns/b.opts.rounds), b.opts.duration, b.opts.duration, b.opts.rounds,
		max(1, b.opts.conns/b.opts.rounds), slice, slice)
	p("| run took | %s |\n", took.Round(time.Second))
	p("| other processes | used %.0f%% of the CPU time during the rounds kept (%.0f%% over the whole run, waits included); rounds measured again because they took more than %.0f%%: %d connect, %d throughput |\n\n",
		100*keptForeign(res), 100*res.foreign, 100*b.opts.quiet, res.connectRedone, res.throughputRedone)
	if kept := keptForeign(res); kept > 0.05 {
		p("**Other processes used %.0f%% of the CPU time during the rounds kept**, so the rates and tail\n", 100*kept)
		p("latencies below carry their noise; the CPU time per connection is less affected. Rerun on a\n")
		p("quiet machine for figures to quote.\n\n")
	}

	p("## Connect latency\n\n")
	p("Time of one blocking connect(2) until it returns connected, in µs, over all rounds' samples;\n")
	p("\"added\" is the mode minus the baseline (a), the cost of capture itself.\n\n")
	p("| mode | client connects to | samples | p50 | p90 | p99 | added p50 | added p99 |\n")
	p("|---|---|--:|--:|--:|--:|--:|--:|\n")
	for _, m := range cms {
		s := st[m.key]
		added50, added99 := "—", "—"
		if haveA && m.key != "a" {
			added50 = fmt.Sprintf("%+.1f", s.p50-a.p50)
			added99 = fmt.Sprintf("%+.1f", s.p99-a.p99)
		}
		target := b.target(m).String()
		if m.capture != captureNone {
			target += " → 127.0.0.1:15001"
		}
		p("| (%s) %s | %s | %d | %.1f | %.1f | %.1f | %s | %s |\n",
			m.key, m.title, target, s.samples, s.p50, s.p90, s.p99, added50, added99)
	}
	p("\n")

	p("## Connection rate\n\n")
	p("Two threads connecting and resetting as fast as they can. conn/s is the median of the rounds,\n")
	p("with the lowest and highest round. \"CPU/conn\" is the benchmark process's CPU time (connecting\n")
	p("and accepting threads, kernel work included) per connection, median of the rounds: other\n")
	p("processes taking CPU away move it much less than the rate (\"others' CPU\" is their share of\n")
	p("the machine while the mode ran). \"Lost\": connects that succeeded but were never accepted (the\n")
	p("accept queue overflowed); \"failed\": connects that returned an error. \"No orig dst\": accepted\n")
	p("connections SO_ORIGINAL_DST had no answer for, mostly because the client had already reset them:\n")
	p("conntrack keeps the entry after a reset, Sluice's programs forget the connection when it closes.\n\n")
	p("| mode | conn/s | rounds' range | CPU/conn µs | lost | failed | no orig dst | others' CPU |\n")
	p("|---|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, m := range cms {
		s := st[m.key]
		noOrig := "—"
		if m.capture != captureNone && s.accepted > 0 {
			noOrig = fmt.Sprintf("%.1f%%", 100*float64(s.origMissed)/float64(s.accepted))
		}
		p("| (%s) %s | %.0f | %s | %.1f | %d | %d | %s | %.0f%% |\n",
			m.key, m.title, median(s.rates), spread(s.rates, "%.0f"), median(s.cpuPerConn),
			s.notAccepted, s.errors, noOrig, 100*mean(s.foreign))
	}
	p("\n")

	_, haveB := st["b"]
	_, haveC := st["c"]
	if haveA && haveB && haveC {
		goals(p, a, st["b"], st["c"])
	} else {
		p("## Goals\n\nNot judged: -modes left out (a), (b) or (c).\n\n")
	}

	// Throughput.
	p("## Local-hop throughput\n\n")
	p("One connection per round from the client pod to the in-pod listener, 64 KiB writes for %s,\n", slice)
	p("read and discarded with a 64 KiB read loop. Gbit/s is the median of the rounds, with their range;\n")
	p("\"through TCP\" is the share of the bytes the client's TCP stack carried (tcpi_bytes_acked):\n")
	p("near 0%% when sk_msg hands the data straight to the listener's socket.\n\n")
	p("| mode | client connects to | Gbit/s | rounds' range | through TCP | sockets in local_hop | others' CPU |\n|---|---|--:|--:|--:|--:|--:|\n")
	gbps := map[string]float64{}
	tcpShare := map[string]float64{}
	localHop := map[string]string{}
	for _, m := range tms {
		var g []float64
		var app, tcp uint64
		var foreign, hop []float64
		for _, r := range res.throughput[m.key] {
			g = append(g, r.gbps)
			foreign = append(foreign, r.foreign)
			hop = append(hop, float64(r.accelSockets))
			app += r.bytes
			tcp += r.tcpBytes
		}
		gbps[m.key] = median(g)
		share := 0.0
		if app > 0 {
			share = 100 * float64(tcp) / float64(app)
		}
		tcpShare[m.key] = share
		localHop[m.key] = "—"
		if m.capture == captureEBPF || m.capture == captureEBPFAccel {
			localHop[m.key] = spread(hop, "%.0f")
			if slices.Min(hop) == slices.Max(hop) {
				localHop[m.key] = fmt.Sprintf("%.0f", hop[0])
			}
		}
		p("| (%s) %s | %s | %.2f | %s | %.1f%% | %s | %.0f%% |\n", m.key, m.title, b.target(m), median(g),
			spread(g, "%.2f"), share, localHop[m.key], 100*mean(foreign))
	}
	if gbps["t2"] > 0 && gbps["t3"] > 0 {
		p("\nsk_msg acceleration: %.2f× the unaccelerated eBPF-captured hop (%.2f against %.2f Gbit/s).\n",
			gbps["t3"]/gbps["t2"], gbps["t3"], gbps["t2"])
		p("The node agent does not offer it: redirected data meets no flow control, so an application\n")
		p("writing faster than ztunnel reads queues without bound in kernel memory (docs/capture-design.md).\n")
		if tcpShare["t3"] > 50 {
			p("**Acceleration did not take effect**: sockops put the hop's sockets into local_hop (%s per round),\n", localHop["t3"])
			p("yet the client's TCP stack still carried %.1f%% of the bytes, so the sk_msg program's redirect\n", tcpShare["t3"])
			p("found no peer and passed the data to TCP: the accelerated figure measures sk_msg's overhead,\n")
			p("not its short-cut.\n")
		}
	}
	p("\n")

	p("## Method\n\n")
	p("- A lab (`test/lab`) with one node and two pods, `client` (%s) and `server` (%s), wired by\n", b.client.IP, b.server.IP)
	p("  the real CNI chain (bridge + host-local). In the client pod a listener on 127.0.0.1:15001\n")
	p("  stands in for ztunnel's in-pod outbound port: SO_MARK 0x539 like ztunnel, plain TCP (no\n")
	p("  MPTCP), one thread doing blocking accept4 and asking every accepted socket for\n")
	p("  SO_ORIGINAL_DST, as a proxy must, then closing it. The server pod has the same listener on\n")
	p("  :8080, unmarked.\n")
	p("- Modes: (a0) connect to the server pod over the veth, for context; (a) connect straight to\n")
	p("  127.0.0.1:15001 with nothing capturing: the same listener and path a captured connection\n")
	p("  ends on, so (b) − (a) and (c) − (a) are the cost of capture alone; (b) connect to the server\n")
	p("  pod, captured by Sluice (`bpf.Load` with an instance of its own, programs attached to the\n")
	p("  cgroup2 root as the node agent does, the client pod's netns enrolled, Accelerate off, the\n")
	p("  default); (c) the same connect captured by\n")
	p("  `iptables %s`\n", strings.Join(iptablesRule, " "))
	p("  in the client pod's network namespace (iptables-nft; conntrack as it comes, since it is part\n")
	p("  of what REDIRECT costs).\n")
	p("- Each capture exists only while its mode is measured: the BPF instance is detached and\n")
	p("  unpinned afterwards, and the nat chains deleted (`-F`, `-X`), which turns conntrack off in the\n")
	p("  namespace again. The client pod's conntrack entry count grows only in mode (c) (entries added\n")
	p("  per mode over the run: %s; negative is expiry).\n", ctGrowthLine(st))
	p("- Each mode starts with a probe connection that must reach the expected listener (and, when\n")
	p("  captured, report the server pod as its original destination), then %d warm-up connects;\n", warmup)
	p("  afterwards every successful connect must have been accepted by that listener and none by the\n")
	p("  other, or the run fails.\n")
	p("- Latency: one thread in the client pod's netns makes a socket, times connect(2) (blocking,\n")
	p("  until it returns connected), and closes with SO_LINGER 0 (RST: no TIME_WAIT, no port\n")
	p("  exhaustion), one connection after another. It is pinned to CPU 0 and the accepting threads\n")
	p("  to the last CPU: sharing a CPU, the woken acceptor can preempt the connecting thread inside\n")
	p("  connect(2), and where the scheduler happened to put them would decide the numbers.\n")
	p("  Rate: two such loops at once, unpinned, counting successful connects. Sockets are made\n")
	p("  with raw system calls on threads inside the pod's netns, so no Go poller or scheduler time\n")
	p("  is in the figures: they are the kernel's connect path.\n")
	p("- Rounds: each round gives every mode its share of the samples and of the time, so bursts of\n")
	p("  noise spread over all modes. The order changes from round to round as a balanced Latin\n")
	p("  square (every mode follows every other equally often: tearing a capture down leaves work to\n")
	p("  kernel threads, which must not always land on the same successor), and each mode waits for\n")
	p("  the machine to go idle first. Latency percentiles pool the rounds' samples, rates are the\n")
	p("  median of the rounds. Other processes' share of the CPU is read from\n")
	p("  /proc/stat less this process's own time (getrusage); a round in which it passed %.0f%% for any\n", 100*b.opts.quiet)
	p("  mode is measured again, all modes together (at most one redo per round over the run), and\n")
	p("  each round first waits for the CPUs to be that quiet (at most two minutes over the run).\n")
	p("- Throughput: a fresh connection per mode and round, captured as in (b) and (c); eBPF without\n")
	p("  and with acceleration are two instances loaded one after the other, each uninstalled before\n")
	p("  the next. The writer is pinned to CPU 0, the reader to the last CPU.\n")
	p("- The machine is shared and small: figures move by 10%% or more between runs, more when other\n")
	p("  processes run (see the table at the top). Compare modes within one run, not across runs.\n")
	return w.String()
}

// goals judges the two goals from modes (a), (b) and (c).
func goals(p func(string, ...any), a, eb, ip connectStats) {
	addB50, addC50 := eb.p50-a.p50, ip.p50-a.p50
	addB99, addC99 := eb.p99-a.p99, ip.p99-a.p99
	r50, ok50 := ratio(addB50, addC50)
	r99, ok99 := ratio(addB99, addC99)
	var roundRatios []float64
	for i := range a.roundP50 {
		if r, ok := ratio(eb.roundP50[i]-a.roundP50[i], ip.roundP50[i]-a.roundP50[i]); ok {
			roundRatios = append(roundRatios, r)
		}
	}
	rateB, rateC := median(eb.rates), median(ip.rates)
	var rateRatios []float64
	for i := range eb.rates {
		rateRatios = append(rateRatios, eb.rates[i]/ip.rates[i])
	}
	p("## Goals\n\n")
	p("Goal: eBPF capture adds at most half of the connect latency that iptables adds, and sustains\n")
	p("at least the same connection rate.\n\n")
	if ok50 {
		p("- Latency, p50: %s. eBPF adds %.1f µs, iptables adds %.1f µs: ratio %.2f (goal ≤ 0.50; the rounds' own p50s give %.2f median, %s range).\n",
			verdict(r50 <= 0.5), addB50, addC50, r50, median(roundRatios), spread(roundRatios, "%.2f"))
	} else {
		p("- Latency, p50: **not met**: iptables added %.1f µs, no cost to compare against (eBPF added %.1f µs).\n", addC50, addB50)
	}
	if ok99 {
		p("- Latency, p99: %s. eBPF adds %.1f µs, iptables adds %.1f µs: ratio %.2f (goal ≤ 0.50; tails are\n",
			verdict(r99 <= 0.5), addB99, addC99, r99)
		p("  where noise lives: round by round, the median p99 adds %.1f µs with eBPF and %.1f µs with iptables).\n",
			medianDiff(eb.roundP99, a.roundP99), medianDiff(ip.roundP99, a.roundP99))
	} else {
		p("- Latency, p99: **not met**: iptables added %.1f µs, no cost to compare against (eBPF added %.1f µs).\n", addC99, addB99)
	}
	p("- Connection rate: %s. eBPF %.0f conn/s, iptables %.0f conn/s: ratio %.2f (goal ≥ 1.00; round by round %.2f median, %s range).\n",
		verdict(rateB >= rateC), rateB, rateC, rateB/rateC, median(rateRatios), spread(rateRatios, "%.2f"))
	cpuB, cpuC := median(eb.cpuPerConn), median(ip.cpuPerConn)
	p("  CPU per connection, which other load disturbs less: eBPF %.1f µs, iptables %.1f µs (baseline %.1f µs),\n", cpuB, cpuC, median(a.cpuPerConn))
	p("  so eBPF could sustain %.2f× iptables' rate on CPU alone.\n\n", cpuC/cpuB)
}

// medianDiff is the median over rounds of x − y.
func medianDiff(x, y []float64) float64 {
	var d []float64
	for i := range min(len(x), len(y)) {
		d = append(d, x[i]-y[i])
	}
	return median(d)
}

// keptForeign is the mean share of the CPU other processes used during the rounds kept.
func keptForeign(res *results) float64 {
	var v []float64
	for _, rs := range res.connect {
		for _, r := range rs {
			v = append(v, r.foreign)
		}
	}
	for _, rs := range res.throughput {
		for _, r := range rs {
			v = append(v, r.foreign)
		}
	}
	return mean(v)
}

func ctGrowthLine(st map[string]connectStats) string {
	var parts []string
	for _, m := range connectModes {
		if s, ok := st[m.key]; ok {
			parts = append(parts, fmt.Sprintf("(%s) %d", m.key, s.ctGrowth))
		}
	}
	return strings.Join(parts, ", ")
}

func goVersion() string { return runtime.Version() }
func numCPU() int       { return runtime.NumCPU() }

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func iptablesVersion(ctx context.Context) string {
	out, err := exec.CommandContext(ctx, "iptables", "-V").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}
