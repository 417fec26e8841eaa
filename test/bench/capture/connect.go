//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/test/lab"
)

// warmup connects run before each mode's latency samples, after its capture was put in
// place.
const warmup = 200

// connectRound is one mode's measurement in one round.
type connectRound struct {
	round     int
	samples   []int64 // connect(2) durations, ns
	rate      float64 // connections per second, two connecting goroutines
	rateConns int
	errors    int // failed connects, latency and rate phases together
	firstErr  error
	ctGrowth  int // conntrack entries added in the client pod during the mode
	// notAccepted counts connects that succeeded but that the listener never accepted
	// (accept queue overflow while the rate loop outran the acceptor thread).
	notAccepted int
	// accepted counts the connections the listener accepted, origMissed those among them
	// that SO_ORIGINAL_DST had no answer for (the client had often reset the connection by
	// then: iptables still answers from conntrack, Sluice forgets at close).
	accepted, origMissed int
	// cpuPerConn is this process's CPU time (connecting and accepting threads) per
	// connection in the rate loop: unlike the rate, other processes do not move it much.
	cpuPerConn time.Duration
	// foreign is the share of the machine other processes used during the mode.
	foreign float64
}

// measureConnect runs mode m once: capture on, a probe that checks where connections
// land, warm-up, latency samples, then the rate loop, and capture off again.
func (b *bench) measureConnect(ctx context.Context, m mode, round, samples int, d time.Duration) (r connectRound, err error) {
	r.round = round
	_, disable, err := b.enable(ctx, m.capture)
	if err != nil {
		return r, err
	}
	defer func() { err = errors.Join(err, disable()) }()

	ct0, err := conntrackCount(b.client)
	if err != nil {
		return r, fmt.Errorf("read conntrack count: %w", err)
	}
	if err := b.probe(m); err != nil {
		return r, err
	}
	wantLn, otherLn := b.app, b.proxy
	if m.proxied {
		wantLn, otherLn = b.proxy, b.app
	}
	want0, other0 := wantLn.accepted.Load(), otherLn.accepted.Load()
	missed0 := wantLn.origMissed.Load()
	sa := sockaddr(b.target(m))
	cpu0, err := takeCPUSnapshot()
	if err != nil {
		return r, err
	}

	warm := connectLoop(b.client, sa, warmup, time.Time{}, connectCPU(), nil)
	lat := make([]int64, 0, samples)
	l := connectLoop(b.client, sa, samples, time.Time{}, connectCPU(), &lat)
	r.samples = lat

	// The rate loop: two goroutines connect and reset as fast as they can.
	cpuRate, err := takeCPUSnapshot()
	if err != nil {
		return r, err
	}
	deadline := time.Now().Add(d)
	start := time.Now()
	var (
		wg    sync.WaitGroup
		parts [2]loopResult
	)
	for i := range parts {
		wg.Go(func() { parts[i] = connectLoop(b.client, sa, 0, deadline, -1, nil) })
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu1, err := takeCPUSnapshot()
	if err != nil {
		return r, err
	}
	for _, p := range parts {
		r.rateConns += p.ok
	}
	r.rate = float64(r.rateConns) / elapsed.Seconds()
	if r.rateConns > 0 {
		r.cpuPerConn = cpu1.since(cpuRate).own / time.Duration(r.rateConns)
	}
	r.foreign = cpu1.since(cpu0).foreign
	for _, p := range append([]loopResult{warm, l}, parts[:]...) {
		r.errors += p.failed
		if r.firstErr == nil {
			r.firstErr = p.firstErr
		}
	}
	if len(r.samples) == 0 {
		return r, fmt.Errorf("mode %s: no connect succeeded: %v", m.key, r.firstErr)
	}

	// Every connection must have landed where the mode says, none on the other listener.
	total := uint64(warm.ok + l.ok + r.rateConns)
	waitUntil := time.Now().Add(5 * time.Second)
	for wantLn.accepted.Load()-want0 < total && time.Now().Before(waitUntil) {
		time.Sleep(10 * time.Millisecond)
	}
	// A handshake that completes while the accept queue is full is dropped by the listener
	// after the client saw it succeed; count those rather than fail.
	r.notAccepted = int(total - min(total, wantLn.accepted.Load()-want0))
	r.accepted = int(wantLn.accepted.Load() - want0)
	r.origMissed = int(wantLn.origMissed.Load() - missed0)
	if got := otherLn.accepted.Load() - other0; got != 0 {
		return r, fmt.Errorf("mode %s: %d connections reached listener %s instead of %s: capture is not doing what the mode says", m.key, got, otherLn.name, wantLn.name)
	}
	ct1, err := conntrackCount(b.client)
	if err != nil {
		return r, fmt.Errorf("read conntrack count: %w", err)
	}
	r.ctGrowth = ct1 - ct0
	b.log.Info("measured", "mode", m.key, "round", round, "samples", len(r.samples),
		"p50", time.Duration(percentile(sorted(r.samples), 50)), "p99", time.Duration(percentile(sorted(r.samples), 99)),
		"connPerSec", int(r.rate),
		"cpuPerConn", r.cpuPerConn, "errors", r.errors, "notAccepted", r.notAccepted, "origMissed", r.origMissed,
		"conntrackGrowth", r.ctGrowth, "othersCPU", fmt.Sprintf("%.0f%%", 100*r.foreign))
	return r, nil
}

// probe makes one connection and checks which listener took it and, for captured modes,
// that the proxy sees the server pod as the original destination.
func (b *bench) probe(m mode) error {
	ch := make(chan probeResult, 1)
	b.proxy.probe.Store(&ch)
	b.app.probe.Store(&ch)
	defer func() {
		b.proxy.probe.Store(nil)
		b.app.probe.Store(nil)
	}()
	fd := -1
	err := b.client.Do(func() error {
		var err error
		if fd, err = newClientSocket(true); err != nil {
			return err
		}
		return connect(fd, sockaddr(b.target(m)))
	})
	if fd >= 0 {
		defer unix.Close(fd)
	}
	if err != nil {
		return fmt.Errorf("mode %s: probe connect to %s: %w", m.key, b.target(m), err)
	}
	var res probeResult
	select {
	case res = <-ch:
	case <-time.After(5 * time.Second):
		return fmt.Errorf("mode %s: probe connection to %s was never accepted", m.key, b.target(m))
	}
	want := b.app.name
	if m.proxied {
		want = b.proxy.name
	}
	if res.listener != want {
		return fmt.Errorf("mode %s: probe connection to %s reached %s, want %s", m.key, b.target(m), res.listener, want)
	}
	if m.proxied && !m.direct && res.orig != b.serverAddr {
		return fmt.Errorf("mode %s: proxy sees original destination %v (err %v), want %s", m.key, res.orig, res.origErr, b.serverAddr)
	}
	return nil
}

type loopResult struct {
	ok, failed int
	firstErr   error
}

// connectLoop connects to sa from the client pod's network namespace and resets each
// connection at once: n times, or until deadline when n is 0, on cpu unless it is -1. With
// lat it appends each successful connect(2)'s duration in ns. Only connect(2) is timed:
// socket(2) and close(2) are the same in every mode.
func connectLoop(pod *lab.Pod, sa unix.Sockaddr, n int, deadline time.Time, cpu int, lat *[]int64) loopResult {
	var r loopResult
	err := pod.Do(func() error {
		defer pinThread(cpu)()
		for i := 0; n == 0 || i < n; i++ {
			if n == 0 && !time.Now().Before(deadline) {
				return nil
			}
			fd, err := newClientSocket(true)
			if err != nil {
				return err
			}
			t0 := time.Now()
			err = connect(fd, sa)
			d := time.Since(t0)
			unix.Close(fd)
			if err != nil {
				r.failed++
				if r.firstErr == nil {
					r.firstErr = err
				}
				if r.failed > 1000 && r.failed > r.ok {
					return fmt.Errorf("giving up after %d failed connects: %w", r.failed, r.firstErr)
				}
				continue
			}
			r.ok++
			if lat != nil {
				*lat = append(*lat, int64(d))
			}
		}
		return nil
	})
	if err != nil && r.firstErr == nil {
		r.firstErr = err
	}
	return r
}
