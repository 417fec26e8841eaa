//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sluicemesh/sluice/test/lab"
)

// mode is one way for the client pod's traffic to reach the server pod.
type mode struct {
	key, name string
	// path says what carries the traffic, for the report.
	path   string
	client *lab.Pod
	// addr is where the client connects for apps[i].
	addr func(i int) string
	// tunnels are the processes that carry the traffic, client side first; none when
	// direct.
	tunnels []*proc
	hold    *holdServer
	// explain, when set, says why the tunnel may have refused connections.
	explain func() error
	// ztBin is the ztunnel binary the mode's tunnels must run (ztunnel modes only).
	ztBin string
}

func (m *mode) direct() bool { return len(m.tunnels) == 0 }

func (m *mode) why() error {
	if m.explain == nil {
		return nil
	}
	return m.explain()
}

// runTool runs cmd to completion and returns its standard output; ctx ending kills it.
func runTool(ctx context.Context, cmd *exec.Cmd) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return stdout.Bytes(), fmt.Errorf("%s: %w: %s", filepath.Base(cmd.Args[3]), err, strings.TrimSpace(lastLines(stderr.String()+stdout.String(), 5)))
		}
		return stdout.Bytes(), nil
	case <-ctx.Done():
		cmd.Process.Kill()
		<-done
		return nil, ctx.Err()
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// sample is what one measurement of one mode gave.
type sample struct {
	value     float64       // Gbit/s, or requests/s
	bytes     int64         // iperf3: bytes received by the server
	tunnelCPU time.Duration // CPU time of the mode's tunnel processes, both sides
	use       cpuUse
	// fortio
	p50, p90, p99 time.Duration
	requests      int
	errors        int
}

// iperf runs iperf3 from the client pod for d with streams parallel streams.
func (b *bench) iperf(ctx context.Context, m *mode, streams int, d time.Duration) (sample, error) {
	host, port, _ := net.SplitHostPort(m.addr(0))
	cmd := m.client.Command(b.w.tools.iperf3, "-c", host, "-p", port, "-t", strconv.Itoa(int(d.Seconds())),
		"-P", strconv.Itoa(streams), "-J", "--connect-timeout", "5000")
	meter, err := startMeter(b.labCgroup, m.tunnels)
	if err != nil {
		return sample{}, err
	}
	out, runErr := runTool(ctx, cmd)
	mt, err := meter.stop()
	if err != nil {
		return sample{}, err
	}
	var res struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				Bytes         int64   `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := ctx.Err(); err != nil {
		return sample{}, err
	}
	if jerr := json.Unmarshal(out, &res); jerr != nil || res.Error != "" || runErr != nil {
		return sample{}, fmt.Errorf("iperf3 -P %d via %s: %w", streams, m.name, errors.Join(runErr, jerr, errIf(res.Error)))
	}
	if res.End.SumReceived.Bytes == 0 {
		return sample{}, fmt.Errorf("iperf3 -P %d via %s moved no data", streams, m.name)
	}
	return sample{value: res.End.SumReceived.BitsPerSecond / 1e9, bytes: res.End.SumReceived.Bytes,
		tunnelCPU: mt.tunnelCPU, use: mt.use}, nil
}

func errIf(msg string) error {
	if msg == "" {
		return nil
	}
	return errors.New(msg)
}

// fortio runs fortio's load generator from the client pod against the echo server: qps
// requests per second in total (0: as fast as it goes) over 16 connections, each a POST
// of 1 KiB echoed back, for d.
func (b *bench) fortio(ctx context.Context, m *mode, qps int, d time.Duration) (sample, error) {
	url := "http://" + m.addr(1) + "/echo"
	cmd := m.client.Command(b.w.tools.fortio, "load", "-quiet", "-qps", strconv.Itoa(qps), "-c", strconv.Itoa(fortioConns),
		"-t", d.String(), "-payload-size", strconv.Itoa(fortioPayload), "-r", "0.00001", "-p", "50,90,99", "-json", "-", url)
	meter, err := startMeter(b.labCgroup, m.tunnels)
	if err != nil {
		return sample{}, err
	}
	out, runErr := runTool(ctx, cmd)
	mt, err := meter.stop()
	if err != nil {
		return sample{}, err
	}
	var res struct {
		ActualQPS         float64
		DurationHistogram struct {
			Count       int
			Percentiles []struct {
				Percentile float64
				Value      float64
			}
		}
		RetCodes map[string]int
	}
	if err := ctx.Err(); err != nil {
		return sample{}, err
	}
	if jerr := json.Unmarshal(out, &res); jerr != nil || runErr != nil {
		return sample{}, fmt.Errorf("fortio -qps %d via %s: %w", qps, m.name, errors.Join(runErr, jerr))
	}
	s := sample{value: res.ActualQPS, tunnelCPU: mt.tunnelCPU, use: mt.use, requests: res.DurationHistogram.Count}
	s.errors = s.requests - res.RetCodes["200"]
	for _, p := range res.DurationHistogram.Percentiles {
		v := time.Duration(p.Value * float64(time.Second))
		switch p.Percentile {
		case 50:
			s.p50 = v
		case 90:
			s.p90 = v
		case 99:
			s.p99 = v
		}
	}
	if s.requests == 0 || s.p50 == 0 {
		return sample{}, fmt.Errorf("fortio -qps %d via %s made no successful request", qps, m.name)
	}
	return s, nil
}

// probe makes one connection through m to the hold server and waits for its greeting,
// retrying for a while: the first proves the whole path (capture, certificates, tunnels).
func (b *bench) probe(ctx context.Context, m *mode) error {
	var last error
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		if last = greet(ctx, m.client, m.addr(2)); last == nil {
			return m.hold.release()
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
	return fmt.Errorf("no connection through %s to %s within 20s: %w", m.name, m.addr(2), last)
}

func greet(ctx context.Context, from *lab.Pod, addr string) error {
	c, err := dialGreet(ctx, from, addr)
	if c != nil {
		c.Close()
	}
	return err
}

// dialGreet connects and reads the hold server's greeting.
func dialGreet(ctx context.Context, from *lab.Pod, addr string) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := from.Dial(dctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	if _, err := c.Read(b[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("no greeting from %s: %w", addr, err)
	}
	c.SetReadDeadline(time.Time{})
	return c, nil
}

// holdResult is the tunnels' memory with n idle connections held through them.
type holdResult struct {
	n int
	// extra marks a step added because a larger one cannot fit the open-files limit
	// of a tunnel that uses a descriptor per side of each connection.
	extra        bool
	before, held []int64 // RSS per tunnel process (client side, server side)
	afterClose   []int64
	opened       int           // connections open when the step ended
	took         time.Duration // from the first connection to the end of the step
	err          error
	mem          []memDiag // ztunnel's own account of its memory, at its largest step
}

// perConn is the tunnels' extra memory per held connection, both sides together.
func (r holdResult) perConn() float64 {
	return float64(sum(r.held)-sum(r.before)) / float64(r.n)
}

// side is one tunnel process's extra memory per held connection (0: client side).
func (r holdResult) side(i int) float64 {
	return float64(r.held[i]-r.before[i]) / float64(r.n)
}

func sum(v []int64) int64 {
	var s int64
	for _, x := range v {
		s += x
	}
	return s
}

// holdSteps measures the tunnels' memory with idle connections held through m: it
// restarts the tunnels so they start from nothing, makes one connection, reads their
// memory, then opens connections (each greeted by the server, so established end to end)
// up to each of steps in turn, reading the memory at each, and closes them all. It stops
// at the first step it cannot reach.
func (b *bench) holdSteps(ctx context.Context, m *mode, steps []int, extra map[int]bool) ([]holdResult, error) {
	if err := restartAll(ctx, m.tunnels); err != nil {
		return nil, err
	}
	if err := b.probe(ctx, m); err != nil {
		return nil, err
	}
	if err := sleep(ctx, time.Second); err != nil {
		return nil, err
	}
	before, err := rssOf(m.tunnels)
	if err != nil {
		return nil, err
	}
	var res []holdResult
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	start := time.Now()
	for _, n := range steps {
		r := holdResult{n: n, extra: extra[n], before: before}
		b.log.Info("holding idle connections", "mode", m.name, "n", n)
		conns, r.err = openHeld(ctx, m, conns, n)
		r.opened, r.took = len(conns), time.Since(start)
		if r.err == nil {
			r.held, r.err = b.heldMemory(ctx, m, n)
		}
		res = append(res, r)
		if r.err != nil {
			b.log.Warn("could not hold the connections", "mode", m.name, "n", n, "err", r.err)
			break
		}
	}
	if m.key == "sluice" {
		for i := len(res) - 1; i >= 0; i-- {
			if res[i].err == nil {
				res[i].mem = b.ztunnelMemory(ctx)
				break
			}
		}
	}
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	err = m.hold.release()
	// Let the tunnels see the closes before the memory is read again.
	if serr := sleep(ctx, 2*time.Second); serr != nil {
		return res, serr
	}
	after, aerr := rssOf(m.tunnels)
	for i := range res {
		res[i].afterClose = after
	}
	return res, errors.Join(err, aerr)
}

// openHeld adds connections through m until n are open, holdDialers at a time.
func openHeld(ctx context.Context, m *mode, conns []net.Conn, n int) ([]net.Conn, error) {
	have := len(conns)
	if have >= n {
		return conns, nil
	}
	conns = append(conns, make([]net.Conn, n-have)...)
	var next atomic.Int64
	next.Store(int64(have))
	var failed atomic.Bool
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	for range holdDialers {
		wg.Go(func() {
			for !failed.Load() {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				c, err := dialGreet(ctx, m.client, m.addr(2))
				if err != nil {
					once.Do(func() { firstErr = fmt.Errorf("connection %d of %d: %w", i+1, n, err) })
					failed.Store(true)
					return
				}
				conns[i] = c
			}
		})
	}
	wg.Wait()
	open := conns[:0]
	for _, c := range conns {
		if c != nil {
			open = append(open, c)
		}
	}
	if firstErr != nil {
		return open, errors.Join(firstErr, checkAll(m.tunnels), logHints(m.tunnels), m.why())
	}
	return open, nil
}

// heldMemory checks that the server holds n connections and reads the tunnels' memory
// once it stopped growing (goroutines parked, Go's heap grown, buffers allocated): two
// readings 250 ms apart within 1% of each other, or after 3 s.
func (b *bench) heldMemory(ctx context.Context, m *mode, n int) ([]int64, error) {
	got, err := m.hold.count()
	if err != nil {
		return nil, err
	}
	if got != n {
		return nil, fmt.Errorf("the server holds %d connections, %d were greeted", got, n)
	}
	var held []int64
	prev := int64(-1)
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); {
		if err := sleep(ctx, 250*time.Millisecond); err != nil {
			return nil, err
		}
		if held, err = rssOf(m.tunnels); err != nil {
			return nil, err
		}
		cur := sum(held)
		if prev > 0 && absDiff(cur, prev) <= prev/100 {
			break
		}
		prev = cur
	}
	return held, nil
}

func absDiff(a, b int64) int64 {
	if a > b {
		return a - b
	}
	return b - a
}

// logHints returns, for each of procs, the last line of its log that reports a problem,
// to say why connections failed.
func logHints(procs []*proc) error {
	var errs []error
	for _, p := range procs {
		b, err := os.ReadFile(p.logPath)
		if err != nil {
			continue
		}
		var last string
		for line := range strings.Lines(string(b)) {
			l := strings.ToLower(line)
			if strings.Contains(l, "error") || strings.Contains(l, "alert") || strings.Contains(l, "too many") ||
				strings.Contains(l, "limit") || strings.Contains(l, "fail") {
				last = line
			}
		}
		if last != "" {
			errs = append(errs, fmt.Errorf("%s logged: %s", p.name, strings.TrimSpace(last)))
		}
	}
	return errors.Join(errs...)
}

// checkAll reports tunnel processes that have died.
func checkAll(procs []*proc) error {
	var errs []error
	for _, p := range procs {
		errs = append(errs, p.check())
	}
	return errors.Join(errs...)
}

// metricSum adds up every series of a Prometheus counter on node's ztunnel.
func metricSum(ctx context.Context, n lab.Node, name string) (float64, error) {
	body, err := httpGet(ctx, n, "127.0.0.1:15020", "/metrics")
	if err != nil {
		return 0, err
	}
	var total float64
	for line := range strings.Lines(body) {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			total += v
		}
	}
	return total, nil
}
