//go:build linux

package main

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// facts describes the machine and the run for the report.
type facts struct {
	date, kernel, cpu, goVersion, command string
	// congestion is the TCP congestion control new network namespaces start with, so
	// every socket in the lab uses it. It matters: on veth paths BBR measures a minimum
	// RTT of a few microseconds and keeps a tunnel's congestion window small.
	congestion string
	cpus       int
	tools      map[string]string
}

func machineFacts(start time.Time, t tools) facts {
	f := facts{
		date:      start.UTC().Format("2006-01-02 15:04 MST"),
		goVersion: runtime.Version(),
		cpus:      runtime.NumCPU(),
		tools:     t.versions,
		command:   strings.Join(append([]string{"go run ./test/bench/ztunnel"}, os.Args[1:]...), " "),
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		f.kernel = unix.ByteSliceToString(u.Sysname[:]) + " " + unix.ByteSliceToString(u.Release[:])
	}
	f.congestion = "unknown"
	if b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control"); err == nil {
		f.congestion = strings.TrimSpace(string(b))
	}
	f.cpu = "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				f.cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	return f
}

// stat is a median with the lowest and highest value it came from.
type stat struct {
	med, lo, hi float64
	n           int
}

func statOf(v []float64) stat {
	if len(v) == 0 {
		return stat{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{med: m, lo: s[0], hi: s[len(s)-1], n: len(s)}
}

func (r *results) stat(test, mode string, f func(sample) float64) stat {
	var v []float64
	for _, s := range r.samples[test][mode] {
		v = append(v, f(s))
	}
	return statOf(v)
}

func gbps(s sample) float64 { return s.value }
func cpuPerGB(s sample) float64 {
	return s.tunnelCPU.Seconds() / (float64(s.bytes) / 1e9)
}
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
func p50(s sample) float64       { return ms(s.p50) }
func p90(s sample) float64       { return ms(s.p90) }
func p99(s sample) float64       { return ms(s.p99) }
func rate(s sample) float64      { return s.value }
func foreign(s sample) float64   { return s.use.foreign }
func cpuPerRequest(s sample) float64 {
	return s.tunnelCPU.Seconds() * 1e6 / (s.value * s.use.wall.Seconds())
}
func errorsOf(s sample) float64         { return float64(s.errors) }
func requestsOf(s sample) float64       { return float64(s.requests) }
func kb(bytes float64) float64          { return bytes / 1e3 }
func mb(bytes int64) float64            { return float64(bytes) / 1e6 }
func (s stat) rng(format string) string { return fmt.Sprintf(format+"–"+format, s.lo, s.hi) }

// figure is one number the goals compare Sluice and its peers on.
type figure struct {
	name, unit   string
	format       string
	higherBetter bool
	// value returns the figure for a mode; ok false when the mode could not be
	// measured (note says why).
	value func(mode string) (s stat, ok bool, note string)
}

func (b *bench) figures(r *results) []figure {
	fromTest := func(test string, f func(sample) float64) func(string) (stat, bool, string) {
		return func(mode string) (stat, bool, string) {
			s := r.stat(test, mode, f)
			return s, s.n > 0, ""
		}
	}
	// tunnelOnly leaves direct out of figures about the tunnel processes.
	tunnelOnly := func(f func(string) (stat, bool, string)) func(string) (stat, bool, string) {
		return func(mode string) (stat, bool, string) {
			if mode == "direct" {
				return stat{}, false, ""
			}
			return f(mode)
		}
	}
	figs := []figure{
		{"throughput, 1 stream", "Gbit/s", "%.2f", true, fromTest(testTput1, gbps)},
		{"throughput, 4 streams", "Gbit/s", "%.2f", true, fromTest(testTput4, gbps)},
		{"tunnel CPU per GB, 1 stream", "s/GB", "%.2f", false, tunnelOnly(fromTest(testTput1, cpuPerGB))},
		{"tunnel CPU per GB, 4 streams", "s/GB", "%.2f", false, tunnelOnly(fromTest(testTput4, cpuPerGB))},
		{"latency p50 at 1000 req/s", "ms", "%.3f", false, fromTest(testLat, p50)},
		{"latency p90 at 1000 req/s", "ms", "%.3f", false, fromTest(testLat, p90)},
		{"latency p99 at 1000 req/s", "ms", "%.3f", false, fromTest(testLat, p99)},
		{"maximum requests/s", "req/s", "%.0f", true, fromTest(testMax, rate)},
		{"RSS at rest, both sides", "MB", "%.1f", false, tunnelOnly(func(mode string) (stat, bool, string) {
			v, ok := r.idle[mode]
			x := mb(total(v).rss)
			return stat{med: x, lo: x, hi: x, n: 1}, ok, ""
		})},
	}
	steps, extra := b.holdPlan()
	for _, n := range steps {
		name := fmt.Sprintf("memory per held connection, %d held", n)
		if extra[n] {
			name += " (most that fit stunnel's and HAProxy's file limit)"
		}
		figs = append(figs, figure{name, "KB", "%.1f", false,
			tunnelOnly(func(mode string) (stat, bool, string) {
				h := r.holdFor(mode, n)
				switch {
				case h == nil:
					return stat{}, false, "not tried: fewer already failed"
				case h.err != nil:
					return stat{}, false, fmt.Sprintf("failed after %d connections", h.opened)
				}
				x := kb(h.perConn())
				return stat{med: x, lo: x, hi: x, n: 1}, true, ""
			})})
	}
	return figs
}

// report renders the results as Markdown.
func (b *bench) report(r *results, f facts) string {
	var w strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&w, format, a...) }
	d := b.opts.duration
	p("# ztunnel benchmark\n\n")
	p("What carrying a pod's connections to a pod on another node costs through Sluice's ztunnel, against\n")
	p("the same traffic sent directly and through stunnel and HAProxy set up as mutual-TLS tunnels on the\n")
	p("same path with the same cipher, measured side by side in one run. This file is written by\n")
	p("`make bench-ztunnel`; rerun it rather than editing the numbers.\n\n")
	p("| | |\n|---|---|\n")
	p("| date | %s |\n", f.date)
	p("| kernel | %s |\n", f.kernel)
	p("| TCP congestion control | %s (the machine's default, which the lab's namespaces inherit) |\n", f.congestion)
	p("| CPU | %d × %s |\n", f.cpus, f.cpu)
	p("| Go | %s |\n", f.goVersion)
	p("| tools | %s; %s; %s; %s |\n", f.tools["iperf3"], f.tools["stunnel"], f.tools["haproxy"], f.tools["fortio"])
	p("| command | `make bench-ztunnel`, i.e. `%s` |\n", f.command)
	steps, _ := b.holdPlan()
	p("| settings | %d round(s); every iperf3 and maximum-rate fortio run lasts %v, every run at %d requests/s %v; memory with %s idle connections held |\n",
		b.opts.rounds, d, fortioQPS, b.opts.latency, joinInts(steps))
	p("| run took | %v |\n", r.took.Round(time.Second))
	p("| other processes | used %s of the CPU during the runs kept (%s over the rounds, waits included); an upper bound, as it includes network work the kernel ran outside the lab's processes; runs measured again because they took more than %s: %d |\n\n",
		pct(r.keptForeign()), pct(r.foreign), pct(b.opts.quiet), r.redone)

	p("## Modes\n\n")
	p("Client pod on node0, server pod on node1, in every mode. \"TLS on the wire\" is read from the\n")
	p("server's ServerHello as it crossed node0's eth0 during the mode's first connection.\n\n")
	p("| mode | path | processes measured | TLS on the wire |\n|---|---|---|---|\n")
	for _, m := range b.modes {
		tls := "none (plain TCP)"
		if h, ok := r.hello[m.key]; ok {
			tls = h.String()
		}
		procs := "—"
		if !m.direct() {
			procs = fmt.Sprintf("%s, %s", m.tunnels[0].name, m.tunnels[1].name)
		}
		p("| %s | %s | %s | %s |\n", m.name, m.path, procs, tls)
	}

	direct := "direct"
	p("\n## Throughput\n\n")
	p("iperf3 from the client pod to the server pod, %v per run. Gbit/s is the median of the rounds with\n", d)
	p("the lowest and highest round; \"of direct\" compares medians. CPU s/GB is the user + system time of the\n")
	p("mode's tunnel processes, both sides together (from /proc/<pid>/stat), per 10⁹ bytes iperf3's server\n")
	p("received, median of the rounds.\n\n")
	p("| mode | 1 stream Gbit/s | range | of direct | CPU s/GB | 4 streams Gbit/s | range | of direct | CPU s/GB | others' CPU |\n")
	p("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	d1, d4 := r.stat(testTput1, direct, gbps), r.stat(testTput4, direct, gbps)
	for _, m := range b.modes {
		t1, t4 := r.stat(testTput1, m.key, gbps), r.stat(testTput4, m.key, gbps)
		c1, c4 := "—", "—"
		if !m.direct() {
			c1 = fmt.Sprintf("%.2f", r.stat(testTput1, m.key, cpuPerGB).med)
			c4 = fmt.Sprintf("%.2f", r.stat(testTput4, m.key, cpuPerGB).med)
		}
		p("| %s | %.2f | %s | %s | %s | %.2f | %s | %s | %s | %s |\n", m.name,
			t1.med, t1.rng("%.2f"), ratioPct(t1.med, d1.med), c1,
			t4.med, t4.rng("%.2f"), ratioPct(t4.med, d4.med), c4,
			pct(max(r.stat(testTput1, m.key, foreign).med, r.stat(testTput4, m.key, foreign).med)))
	}
	if r.hboneConns > 0 {
		p("\nztunnel pools HBONE connections: after the rounds it had %d open between the two pods, so the four\n", r.hboneConns)
		p("iperf3 streams (and fortio's 16 connections) shared one TLS connection as HTTP/2 streams, where\n")
		p("stunnel and HAProxy open one TLS connection per TCP connection.\n")
	}

	p("\n## Latency at %d requests/s\n\n", fortioQPS)
	p("fortio from the client pod to fortio's echo server in the server pod: %d requests/s over %d\n", fortioQPS, fortioConns)
	p("connections, each a POST of %d bytes echoed back (the setup Istio publishes its figures with),\n", fortioPayload)
	p("%v per run, histogram resolution 10 µs. Milliseconds; each percentile is the median of the\n", b.opts.latency)
	p("rounds' percentiles (range shown for p50); \"added\" is the mode's median minus direct's.\n\n")
	p("| mode | p50 | p50 range | p90 | p99 | added p50 | added p90 | added p99 | requests | errors | others' CPU |\n")
	p("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	dl50, dl90, dl99 := r.stat(testLat, direct, p50).med, r.stat(testLat, direct, p90).med, r.stat(testLat, direct, p99).med
	for _, m := range b.modes {
		s50, s90, s99 := r.stat(testLat, m.key, p50), r.stat(testLat, m.key, p90), r.stat(testLat, m.key, p99)
		added := func(v, base float64) string {
			if m.direct() {
				return "—"
			}
			return fmt.Sprintf("%+.3f", v-base)
		}
		p("| %s | %.3f | %s | %.3f | %.3f | %s | %s | %s | %s | %s | %s |\n", m.name,
			s50.med, s50.rng("%.3f"), s90.med, s99.med,
			added(s50.med, dl50), added(s90.med, dl90), added(s99.med, dl99),
			sumOf(r.samples[testLat][m.key], requestsOf), sumOf(r.samples[testLat][m.key], errorsOf),
			pct(r.stat(testLat, m.key, foreign).med))
	}

	p("\n## Maximum request rate\n\n")
	p("The same fortio load without a rate limit (-qps 0), %d connections, %v per run. The CPU per\n", fortioConns, d)
	p("request is the tunnel processes' (both sides) — on this 2-core machine fortio, its server and the\n")
	p("tunnels share the CPUs, so a cheaper tunnel leaves more to the others.\n\n")
	p("| mode | requests/s | range | of direct | tunnel CPU µs/request | p50 ms | errors | others' CPU |\n")
	p("|---|--:|--:|--:|--:|--:|--:|--:|\n")
	dm := r.stat(testMax, direct, rate)
	for _, m := range b.modes {
		s := r.stat(testMax, m.key, rate)
		c := "—"
		if !m.direct() {
			c = fmt.Sprintf("%.1f", r.stat(testMax, m.key, cpuPerRequest).med)
		}
		p("| %s | %.0f | %s | %s | %s | %.3f | %s | %s |\n", m.name, s.med, s.rng("%.0f"), ratioPct(s.med, dm.med), c,
			r.stat(testMax, m.key, p50).med, sumOf(r.samples[testMax][m.key], errorsOf), pct(r.stat(testMax, m.key, foreign).med))
	}

	p("\n## Memory\n\n")
	p("Resident set (VmRSS) of the tunnel processes. \"At rest\" is right after the run started and carried\n")
	p("one connection. For the held connections each mode's tunnels are restarted (both sides), carry one\n")
	p("connection, and their memory is read (\"before\"); then connections are opened from the client pod\n")
	p("(%d at a time) to a server in the server pod that greets each with one byte and holds it, up to\n", holdDialers)
	p("each number in turn, the earlier ones staying open. Once every greeting arrived (so each connection\n")
	p("is established end to end) and the memory stopped growing, it is read again: per connection is\n")
	p("(RSS held − RSS before) / N, both sides together. Then all are closed (\"after closing\" is read 2 s\n")
	p("later). Measured once per run, after the rounds; \"opening took\" counts from the first connection.\n")
	p("KB and MB are 10³ and 10⁶ bytes.\n\n")
	p("| mode | at rest MB (client + server side) | held | before MB | held MB | per connection KB | client side KB | server side KB | after closing MB | opening took |\n")
	p("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, m := range b.modes {
		if m.direct() {
			continue
		}
		idle := r.idle[m.key]
		rest := fmt.Sprintf("%.1f (%.1f + %.1f)", mb(total(idle).rss), mb(idle[0].rss), mb(idle[1].rss))
		for _, h := range r.holds[m.key] {
			held := strconv.Itoa(h.n)
			if h.extra {
				held += " (most that fit)"
			}
			if h.err != nil {
				p("| %s | %s | %s | %.1f | failed after %d: %s | — | — | — | %s | %v |\n", m.name, rest, held, mb(sum(h.before)),
					h.opened, oneLine(h.err.Error()), mbOr(h.afterClose), h.took.Round(time.Millisecond))
				continue
			}
			p("| %s | %s | %s | %.1f | %.1f | %.1f | %.1f | %.1f | %s | %v |\n", m.name, rest, held,
				mb(sum(h.before)), mb(sum(h.held)), kb(h.perConn()), kb(h.side(0)), kb(h.side(1)),
				mbOr(h.afterClose), h.took.Round(time.Millisecond))
		}
	}
	p("\nThe open-files limit (RLIMIT_NOFILE) of the benchmark and of everything it starts was %d", b.fileLimit)
	if b.fileLimit < 1<<18 {
		p(" (the\nhard limit of this machine, which the benchmark may not raise)")
	}
	p(". stunnel and HAProxy use a\ndescriptor for each side of every connection, so a process of theirs holds at most about %d\n", (b.fileLimit-fileMargin)/2)
	p("connections under it; ztunnel's client side holds the application's sockets and shares an HBONE\n")
	p("connection among up to 100 streams, its server side the reverse.")
	if _, extra := b.holdPlan(); len(extra) > 0 {
		p(" Every tunnel is also measured with %d, the\nmost that fit, so that one figure compares all of them.", fitting(b.fileLimit))
	}
	p("\n")
	b.reportRestMemory(&w, r)
	reportZtunnelMemory(&w, r)

	b.reportComparison(&w, r)
	b.reportGoals(&w, r)
	b.reportRef(&w, r)
	reportProfiles(&w, r)
	b.reportMethod(&w, r)
	return w.String()
}

// reportRestMemory splits each tunnel's memory at rest into what the process wrote
// (anonymous) and the mapped program and libraries (file-backed).
func (b *bench) reportRestMemory(w *strings.Builder, r *results) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("\nThe memory at rest by kind, both sides together: anonymous memory is what the process allocated\n")
	p("and wrote (heap, stacks, data); file-backed is the mapped program and shared libraries as far as\n")
	p("the process touched them (the kernel maps up to 64 KiB around each page touched), which the page\n")
	p("cache holds once for every process mapping the same file. ztunnel is one static binary;\n")
	p("stunnel and HAProxy map the system's libc and OpenSSL, which other processes may share.\n\n")
	p("| mode | at rest MB | anonymous MB | file-backed MB | program and libraries (largest mapped files) |\n")
	p("|---|--:|--:|--:|---|\n")
	for _, m := range b.modes {
		idle, ok := r.idle[m.key]
		if m.direct() || !ok {
			continue
		}
		t := total(idle)
		p("| %s | %.1f | %.1f | %.1f | %s |\n", m.name, mb(t.rss), mb(t.anon), mb(t.file), r.mapped[m.key])
	}
}

func ratioPct(v, base float64) string {
	if base == 0 {
		return "—"
	}
	return fmt.Sprintf("%.0f%%", 100*v/base)
}

func sumOf(ss []sample, f func(sample) float64) string {
	var t float64
	for _, s := range ss {
		t += f(s)
	}
	return fmt.Sprintf("%.0f", t)
}

func mbOr(v []int64) string {
	if len(v) == 0 {
		return "—"
	}
	return fmt.Sprintf("%.1f", mb(sum(v)))
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	s = strings.ReplaceAll(s, "|", "/")
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}

func joinInts(v []int) string {
	var s []string
	for _, x := range v {
		s = append(s, fmt.Sprintf("%d", x))
	}
	return strings.Join(s, " and ")
}

// verdict compares Sluice's value of a figure with a peer's.
type verdict struct {
	ahead bool
	// clear: the rounds' ranges do not overlap, so the order is not a matter of noise.
	clear bool
	text  string
}

func compare(fig figure, sl, peer stat, slOK, peerOK bool, peerNote string) verdict {
	switch {
	case !slOK:
		return verdict{text: "Sluice not measured"}
	case !peerOK:
		return verdict{ahead: true, clear: true, text: "ahead (peer " + peerNote + ")"}
	}
	// clear: every round of the one better than every round of the other.
	var ahead, clear bool
	if fig.higherBetter {
		ahead = sl.med > peer.med
		clear = sl.lo > peer.hi || sl.hi < peer.lo
	} else {
		ahead = sl.med < peer.med
		clear = sl.hi < peer.lo || sl.lo > peer.hi
	}
	ratio := "—"
	if peer.med != 0 {
		ratio = fmt.Sprintf("%.2f×", sl.med/peer.med)
	}
	switch {
	case ahead && clear:
		return verdict{true, true, "ahead, " + ratio}
	case ahead:
		return verdict{true, false, "ahead, " + ratio + " (ranges overlap)"}
	case !clear:
		return verdict{false, false, "**behind**, " + ratio + " (ranges overlap)"}
	}
	return verdict{false, true, "**behind**, " + ratio}
}

func (b *bench) reportComparison(w *strings.Builder, r *results) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("\n## Sluice against each peer\n\n")
	p("Medians; the ratio is Sluice's figure divided by the peer's (for throughput and request rate higher\n")
	p("is better, for everything else lower). \"Ranges overlap\" means some round of the one was as good as\n")
	p("some round of the other, so the order may not hold in every run.\n\n")
	p("| figure | direct | Sluice | stunnel | HAProxy | Sluice vs stunnel | Sluice vs HAProxy |\n|---|--:|--:|--:|--:|---|---|\n")
	for _, fig := range b.figures(r) {
		cell := func(mode string) string {
			s, ok, note := fig.value(mode)
			switch {
			case !ok && note == "":
				return "—"
			case !ok:
				return note
			case note != "":
				return fmt.Sprintf(fig.format+" %s (%s)", s.med, fig.unit, note)
			}
			return fmt.Sprintf(fig.format+" %s", s.med, fig.unit)
		}
		sl, slOK, _ := fig.value("sluice")
		row := []string{fig.name, cell("direct"), cell("sluice")}
		var vs []string
		for _, peer := range []string{"stunnel", "haproxy"} {
			row = append(row, cell(peer))
			ps, ok, note := fig.value(peer)
			vs = append(vs, compare(fig, sl, ps, slOK, ok, note).text)
		}
		p("| %s |\n", strings.Join(append(row, vs...), " | "))
	}
}

// reportRef compares this build with ztunnel at -ztunnel-ref, measured in the same run.
func (b *bench) reportRef(w *strings.Builder, r *results) {
	if b.w.refBin == "" {
		return
	}
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("\n## This build against ztunnel at %s\n\n", b.w.refName)
	p("Mode (b) is ztunnel built from this checkout, (b0) ztunnel built at `%s`; both ztunnels are\n", b.w.refName)
	p("restarted with the other binary whenever the mode changes. Medians, ratio this build / %s.\n\n", b.w.refName)
	p("| figure | this build | %s | this build vs %s |\n|---|--:|--:|---|\n", b.w.refName, b.w.refName)
	for _, fig := range b.figures(r) {
		sl, slOK, _ := fig.value("sluice")
		rs, rOK, note := fig.value("ref")
		if !slOK || !rOK {
			continue
		}
		v := compare(fig, sl, rs, slOK, rOK, note)
		text := strings.NewReplacer("ahead", "better", "behind", "worse").Replace(v.text)
		p("| %s | "+fig.format+" %s | "+fig.format+" %s | %s |\n", fig.name, sl.med, fig.unit, rs.med, fig.unit, text)
	}
}

// goal is one line of the goals section.
type goal struct {
	name   string
	met    bool
	detail string
}

func (b *bench) goals(r *results) []goal {
	var gs []goal
	// 1. Ahead of both peers on every figure.
	var behind []string
	for _, fig := range b.figures(r) {
		sl, slOK, _ := fig.value("sluice")
		for _, peer := range []string{"stunnel", "haproxy"} {
			ps, ok, note := fig.value(peer)
			v := compare(fig, sl, ps, slOK, ok, note)
			if !v.ahead {
				by := ""
				if ps.med != 0 && slOK {
					if fig.higherBetter {
						by = fmt.Sprintf("; %.0f%% short", 100*(1-sl.med/ps.med))
					} else {
						by = fmt.Sprintf("; %.0f%% more", 100*(sl.med/ps.med-1))
					}
				}
				behind = append(behind, fmt.Sprintf("%s: Sluice "+fig.format+" %s, %s "+fig.format+" %s%s",
					fig.name, sl.med, fig.unit, peerName(peer), ps.med, fig.unit, by))
			}
		}
	}
	g := goal{name: "Ahead of both stunnel and HAProxy on every figure", met: len(behind) == 0}
	if g.met {
		g.detail = "Ahead on all of the figures in the table above."
	} else {
		g.detail = fmt.Sprintf("Behind on %d of %d comparisons:\n  - %s", len(behind), 2*len(b.figures(r)), strings.Join(behind, "\n  - "))
	}
	gs = append(gs, g)

	// 2. Throughput at least half of direct.
	for _, t := range []struct{ key, name string }{{testTput1, "1 stream"}, {testTput4, "4 streams"}} {
		sl, dir := r.stat(t.key, "sluice", gbps), r.stat(t.key, "direct", gbps)
		ratio := sl.med / dir.med
		g := goal{name: "Throughput at least 50% of direct, " + t.name, met: ratio >= 0.5}
		g.detail = fmt.Sprintf("%.2f of %.2f Gbit/s, %.0f%% (rounds: %s; for scale, stunnel reaches %.0f%% and HAProxy %.0f%%).",
			sl.med, dir.med, 100*ratio, roundRatios(r, t.key, "sluice", "direct", gbps),
			100*r.stat(t.key, "stunnel", gbps).med/dir.med, 100*r.stat(t.key, "haproxy", gbps).med/dir.med)
		if !g.met {
			g.detail += fmt.Sprintf(" Short by %.2f Gbit/s (%.0f points).", 0.5*dir.med-sl.med, 100*(0.5-ratio))
		}
		if rl := r.stat(t.key, "relay", gbps); rl.n > 0 {
			g.detail += fmt.Sprintf(" The plain relays, the same path through two proxies without TLS, reach %.0f%% of direct (rounds: %s):"+
				" what no tunnel with a proxy at each end can pass on this machine.", 100*rl.med/dir.med, roundRatios(r, t.key, "relay", "direct", gbps))
		}
		gs = append(gs, g)
	}

	// 3. Added p50 under half of HAProxy's.
	dl := r.stat(testLat, "direct", p50).med
	slAdd := r.stat(testLat, "sluice", p50).med - dl
	haAdd := r.stat(testLat, "haproxy", p50).med - dl
	g = goal{name: "Added p50 latency under half of HAProxy's"}
	switch {
	case haAdd <= 0:
		g.met = slAdd <= 0
		g.detail = fmt.Sprintf("HAProxy adds %+.3f ms, Sluice %+.3f ms: with HAProxy adding nothing measurable, the goal holds only if Sluice adds nothing either.", haAdd, slAdd)
	default:
		ratio := slAdd / haAdd
		g.met = ratio < 0.5
		g.detail = fmt.Sprintf("Sluice adds %+.3f ms, HAProxy %+.3f ms: ratio %.2f (goal < 0.50).", slAdd, haAdd, ratio)
		if !g.met {
			g.detail += fmt.Sprintf(" Sluice would need to add %.3f ms less (%.0f%% less).", slAdd-0.5*haAdd, 100*(1-0.5*haAdd/slAdd))
		}
	}
	g.detail += " Round by round (each round's p50 minus direct's in the same round): Sluice " +
		roundDiffs(r, testLat, "sluice", "direct", p50) + ", HAProxy " + roundDiffs(r, testLat, "haproxy", "direct", p50) + "."
	if rl := r.stat(testLat, "relay", p50); rl.n > 0 && haAdd > 0 {
		g.detail += fmt.Sprintf(" The plain relays (two proxies, no TLS) add %+.3f ms, %.2f of HAProxy's (rounds: %s): the floor of any path through a proxy at each end.",
			rl.med-dl, (rl.med-dl)/haAdd, roundDiffs(r, testLat, "relay", "direct", p50))
	}
	gs = append(gs, g)

	// 4. Memory per idle connection.
	for _, n := range b.opts.holds {
		h := r.holdFor("sluice", n)
		g := goal{name: fmt.Sprintf("Under 20 KB per idle proxied connection, both ztunnels together, %d held", n)}
		switch {
		case h == nil:
			g.detail = "not measured: fewer connections already failed."
		case h.err != nil:
			g.detail = "could not hold them: " + oneLine(h.err.Error())
		default:
			v := kb(h.perConn())
			g.met = v < 20
			g.detail = fmt.Sprintf("%.1f KB (client side %.1f, server side %.1f; stunnel %s, HAProxy %s).", v, kb(h.side(0)), kb(h.side(1)),
				perConnOr(r, "stunnel", n), perConnOr(r, "haproxy", n))
			if !g.met {
				g.detail += fmt.Sprintf(" Over by %.1f KB (%.0f%%).", v-20, 100*(v/20-1))
			}
		}
		gs = append(gs, g)
	}
	return gs
}

func peerName(key string) string {
	if key == "haproxy" {
		return "HAProxy"
	}
	return key
}

// roundRatios lists a/b round by round (same round, so the same machine conditions).
func roundRatios(r *results, test, a, b string, f func(sample) float64) string {
	as, bs := r.samples[test][a], r.samples[test][b]
	var out []string
	for i := range min(len(as), len(bs)) {
		out = append(out, fmt.Sprintf("%.0f%%", 100*f(as[i])/f(bs[i])))
	}
	return strings.Join(out, ", ")
}

func roundDiffs(r *results, test, a, b string, f func(sample) float64) string {
	as, bs := r.samples[test][a], r.samples[test][b]
	var out []string
	for i := range min(len(as), len(bs)) {
		out = append(out, fmt.Sprintf("%+.3f", f(as[i])-f(bs[i])))
	}
	return strings.Join(out, ", ") + " ms"
}

func (b *bench) reportGoals(w *strings.Builder, r *results) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("\n## Goals\n\n")
	met := 0
	gs := b.goals(r)
	for _, g := range gs {
		v := "**not met**"
		if g.met {
			v = "**met**"
			met++
		}
		p("- %s: %s. %s\n", g.name, v, g.detail)
	}
	p("\n%d of %d goals met in this run.\n", met, len(gs))
}

func reportProfiles(w *strings.Builder, r *results) {
	if len(r.profiles) == 0 {
		return
	}
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("\n## Where ztunnel spends its CPU\n\n")
	p("CPU profiles of both ztunnel processes (admin endpoint /debug/pprof/profile, 5 s) while the load\n")
	p("named ran through them, after the rounds: the ten functions with the most samples of their own\n")
	p("(`go tool pprof -top`), then the ten with the most samples including their callees, leaving out the\n")
	p("runtime, syscall and net wrappers (`-top -cum -hide ...`, so a function's \"flat\" there includes the\n")
	p("hidden ones it calls), which shows the code paths that lead there. Syscall6 is time in the kernel:\n")
	p("on veth a send usually also runs the receiving namespace's network stack, in the sender's context.\n")
	for _, pr := range r.profiles {
		p("\n%s, under %s:\n\n", pr.side, pr.load)
		if pr.err != nil {
			p("profile failed: %s\n", oneLine(pr.err.Error()))
			continue
		}
		p("```\n%s\n```\n\n```\n%s\n```\n", pr.top, pr.cum)
	}
}

func (b *bench) reportMethod(w *strings.Builder, r *results) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("\n## Method\n\n")
	p("- A lab (`test/lab`) with two nodes, each with its node agent (`sluice-agent`, started as\n")
	p("  `sluicectl lab up --with-sluice` does: a detached process in the node's netns and host cgroup, its\n")
	p("  own BPF instance) and sluice-cni chained after the bridge plugin. Four pods: `%s/client` and\n", plainNS)
	p("  `%s/server` in a namespace outside the mesh, for (a) and (c); `%s/client` and `%s/server` in a\n", plainNS, meshNS, meshNS)
	p("  namespace labelled `istio.io/dataplane-mode=ambient`, for (b). Clients on node0, servers on node1.\n")
	p("- ztunnel is the real binary (`ztunnel/cmd/ztunnel`, built from this checkout at the start of the\n")
	p("  run), one process per node in the node's netns, in local mode: a YAML config listing the four\n")
	p("  pods (the ambient ones as HBONE workloads), certificates from a local CA directory both share. It\n")
	p("  gets the ambient pods' network namespaces from the node agent and opens its listeners inside them.\n")
	p("  The first connection of (b) must be counted by the server side's `istio_tcp_connections_opened_total`\n")
	p("  (this run: %.0f), or the run fails.\n", r.meshProbeConns)
	p("- stunnel and HAProxy run as one process per side: the client side in the client pod (the\n")
	p("  application connects to it on 127.0.0.1, as to a sidecar), the server side in the server pod,\n")
	p("  delivering to the application's port there, so the packets take the same path as ztunnel's:\n")
	p("  pod → veth → node0 → node1 → veth → pod. Mutual TLS, each side verifying the other's chain against\n")
	p("  the mesh's root; ECDSA P-256 certificates from the same CA as ztunnel's (`internal/ca`, workload\n")
	p("  profile, SPIFFE URI SAN); TLS 1.3 only, cipher suite %s (stunnel `ciphersuites`, HAProxy\n", peerCipherSuite)
	p("  `ssl-default-bind-ciphersuites`/`ssl-default-server-ciphersuites`); stunnel with TCP_NODELAY on both\n")
	p("  sockets (Go and HAProxy set it by default); HAProxy in TCP mode, its maxconn derived from the open-files limit. Neither checks\n")
	p("  the peer's SPIFFE ID (they have no such option), which ztunnel does. The key exchange differs where\n")
	p("  the libraries differ: Go offers a post-quantum hybrid that OpenSSL 3.0 lacks; it costs only at\n")
	p("  connection setup, which none of the figures but the time to open the held connections includes.\n")
	p("- Tools: iperf3, stunnel4 and haproxy from Debian; fortio %s, which the benchmark installs with\n", fortioVersion)
	p("  `go install fortio.org/fortio@%s` into the user's cache directory (`-fortio` to use another).\n", fortioVersion)
	p("  iperf3 and fortio's echo server run in the server pods, their clients in the client pods (all in\n")
	p("  the pods' cgroups, so that the mesh pods' traffic is captured like any application's).\n")
	p("- The open-files limit (RLIMIT_NOFILE) of the benchmark and of everything it starts is set to %d\n", b.fileLimit)
	p("  (262144 where the machine allows it). The server holding idle connections is a process of its own in\n")
	p("  the server pod, so that the client's and the server's ends do not share one process's limit.\n")
	p("- Rounds: each round runs the four tests in turn (iperf3 with 1 stream, with 4 streams, fortio at\n")
	p("  %d requests/s, fortio unlimited), each for every mode back to back; the mode going first rotates\n", fortioQPS)
	p("  from round to round. Before each run the machine must go idle (up to 1 s), and each round waits\n")
	p("  (at most 45 s over the run) until other processes use no more than %s of the CPUs. Other\n", pct(b.opts.quiet))
	p("  processes' share is the machine's busy time (/proc/stat) less the lab's cgroups (cpu.stat, where\n")
	p("  every process the benchmark starts runs) and the benchmark itself; a run in which it passed %s is\n", pct(b.opts.quiet))
	p("  measured again (at most once per round on average).\n")
	p("- CPU time of a tunnel is utime + stime of its processes, all threads, read from /proc/<pid>/stat\n")
	p("  before and after each run (10 ms ticks). Kernel work done in softirq context on behalf of a\n")
	p("  tunnel's sockets is charged to whichever process was running, so the figures compare well between\n")
	p("  modes but are not the whole cost.\n")
	p("- The machine is shared and small (2 CPUs for clients, servers and both tunnels): throughput moves\n")
	p("  by 10%% or more between runs. Compare modes within one run, not across runs.\n")
}

// holdFor finds the measurement with n connections held through mode, if it got that far.
func (r *results) holdFor(mode string, n int) *holdResult {
	for i := range r.holds[mode] {
		if r.holds[mode][i].n == n {
			return &r.holds[mode][i]
		}
	}
	return nil
}

// keptForeign is other processes' share of the CPU over the runs kept, weighted by their
// length.
func (r *results) keptForeign() float64 {
	var f, t float64
	for _, byMode := range r.samples {
		for _, ss := range byMode {
			for _, s := range ss {
				f += s.use.foreign * s.use.wall.Seconds()
				t += s.use.wall.Seconds()
			}
		}
	}
	if t == 0 {
		return 0
	}
	return f / t
}

// reportZtunnelMemory shows what ztunnel itself says about its memory at the most
// connections it held.
func reportZtunnelMemory(w *strings.Builder, r *results) {
	var h *holdResult
	for i := range r.holds["sluice"] {
		if r.holds["sluice"][i].mem != nil {
			h = &r.holds["sluice"][i]
		}
	}
	if h == nil {
		return
	}
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("\nztunnel's own account (admin endpoint, /debug/pprof) with %d connections held: goroutines, the Go\n", h.n)
	p("heap in use and goroutine stacks, per held connection, and the allocations holding the heap.\n\n")
	p("| side | goroutines | per connection | heap in use MB | per connection KB | stacks MB | per connection KB |\n|---|--:|--:|--:|--:|--:|--:|\n")
	for _, d := range h.mem {
		if d.err != nil {
			p("| %s | failed: %s | | | | | |\n", d.side, oneLine(d.err.Error()))
			continue
		}
		n := float64(h.n)
		p("| %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f |\n", d.side, d.goroutines, float64(d.goroutines)/n,
			mb(d.heapInuse), kb(float64(d.heapInuse)/n), mb(d.stackInuse), kb(float64(d.stackInuse)/n))
	}
	for _, d := range h.mem {
		if d.top != "" {
			p("\n%s, heap in use:\n\n```\n%s\n```\n", d.side, d.top)
		}
	}
}

// perConnOr is a mode's memory per held connection with n held, or why there is none.
func perConnOr(r *results, mode string, n int) string {
	h := r.holdFor(mode, n)
	switch {
	case h == nil:
		return "not measured"
	case h.err != nil:
		return fmt.Sprintf("failed after %d", h.opened)
	}
	return fmt.Sprintf("%.1f KB", kb(h.perConn()))
}
