//go:build linux

package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"
)

// Tests, in the order each round runs them.
const (
	testTput1 = "tput1"
	testTput4 = "tput4"
	testLat   = "lat"
	testMax   = "max"
)

var testKeys = []string{testTput1, testTput4, testLat, testMax}

// results of a whole run.
type results struct {
	// samples[test][mode] holds one sample per round.
	samples map[string]map[string][]sample
	// idle is each tunnel's resident memory right after start and one connection.
	idle map[string][]memUse
	// mapped names, per mode, the files its tunnels map and how much of each is resident.
	mapped map[string]string
	holds  map[string][]holdResult
	// hello is the ServerHello each tunnel's server side sent, as seen on the wire.
	hello map[string]serverHello
	// hboneConns is how many HBONE connections ztunnel had open between the pods after
	// the rounds (the pool shares them between streams).
	hboneConns int
	// meshProbeConns is the server-side ztunnel's count of inbound connections after
	// the probe, the proof that (b) went through ztunnel.
	meshProbeConns float64
	profiles       []profile
	foreign        float64 // other processes' share of the CPU over the rounds
	redone         int
	took           time.Duration
}

func (b *bench) run(ctx context.Context) (*results, error) {
	res := &results{samples: map[string]map[string][]sample{}, idle: map[string][]memUse{}, mapped: map[string]string{},
		holds: map[string][]holdResult{}, hello: map[string]serverHello{}}
	for _, t := range testKeys {
		res.samples[t] = map[string][]sample{}
	}
	if err := b.probeAll(ctx, res); err != nil {
		return nil, err
	}

	s0, err := takeCPUSnapshot(b.labCgroup)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	d := b.opts.duration
	tests := map[string]func(context.Context, *mode) (sample, error){
		testTput1: func(ctx context.Context, m *mode) (sample, error) { return b.iperf(ctx, m, 1, d) },
		testTput4: func(ctx context.Context, m *mode) (sample, error) { return b.iperf(ctx, m, 4, d) },
		testLat:   func(ctx context.Context, m *mode) (sample, error) { return b.fortio(ctx, m, fortioQPS, b.opts.latency) },
		testMax:   func(ctx context.Context, m *mode) (sample, error) { return b.fortio(ctx, m, 0, d) },
	}
	for round := range b.opts.rounds {
		if err := b.waitQuiet(ctx); err != nil {
			return nil, err
		}
		b.log.Info("round", "n", round+1, "of", b.opts.rounds)
		for _, t := range testKeys {
			// The modes take turns, and who goes first rotates with the round, so that
			// a burst of noise or what one mode leaves behind does not always land on the
			// same mode.
			for i := range b.modes {
				m := b.modes[(i+round)%len(b.modes)]
				if err := b.useZtunnel(ctx, m); err != nil {
					return nil, err
				}
				s, err := b.measure(ctx, m, t, tests[t])
				if err != nil {
					return nil, fmt.Errorf("round %d: %w", round+1, err)
				}
				res.samples[t][m.key] = append(res.samples[t][m.key], s)
			}
		}
	}
	s1, err := takeCPUSnapshot(b.labCgroup)
	if err != nil {
		return nil, err
	}
	res.foreign = s1.since(s0, time.Since(t0)).foreign
	res.redone = b.redos
	res.hboneConns = b.countHBONE()

	if b.opts.profile {
		b.log.Info("profiling both ztunnels")
		mesh := b.modes[1]
		if err := b.useZtunnel(ctx, mesh); err != nil {
			return nil, err
		}
		res.profiles = append(res.profiles, b.profileZtunnels(ctx, "iperf3 -P 1", func(ctx context.Context) error {
			_, err := b.iperf(ctx, mesh, 1, 6*time.Second)
			return err
		}, 5)...)
		res.profiles = append(res.profiles, b.profileZtunnels(ctx, "fortio -qps 0 (max)", func(ctx context.Context) error {
			_, err := b.fortio(ctx, mesh, 0, 6*time.Second)
			return err
		}, 5)...)
	}

	// Held connections last: a tunnel that cannot take 10,000 may be left broken.
	steps, extra := b.holdPlan()
	for _, m := range b.modes {
		if m.direct() || m.key == "relay" {
			continue
		}
		if m.ztBin != "" {
			b.w.ztBin = m.ztBin // holdSteps restarts them anyway
		}
		hs, err := b.holdSteps(ctx, m, steps, extra)
		res.holds[m.key] = hs
		if err != nil {
			return nil, fmt.Errorf("held connections through %s: %w", m.name, err)
		}
	}
	return res, nil
}

// measure runs one test of one mode after the machine settled, and once more if other
// processes took more than -quiet of the CPU meanwhile (at most as many such redos per
// run as there are rounds).
func (b *bench) measure(ctx context.Context, m *mode, test string, fn func(context.Context, *mode) (sample, error)) (sample, error) {
	for {
		if err := b.settle(ctx); err != nil {
			return sample{}, err
		}
		if err := checkAll(m.tunnels); err != nil {
			return sample{}, err
		}
		s, err := fn(ctx, m)
		if err != nil {
			return s, err
		}
		if b.opts.quiet <= 0 || s.use.foreign <= b.opts.quiet || b.redos >= b.opts.rounds {
			return s, nil
		}
		b.redos++
		b.log.Info("run disturbed by other processes; measuring it again", "mode", m.name, "test", test, "othersCPU", pct(s.use.foreign))
		if err := b.waitQuiet(ctx); err != nil {
			return sample{}, err
		}
	}
}

// probeAll sends a first connection through every mode while recording the link between
// the nodes, so that the report can show what each tunnel negotiated, checks that (b)
// really went through both ztunnels, and reads the tunnels' memory at rest.
func (b *bench) probeAll(ctx context.Context, res *results) error {
	w := b.w
	keys := map[string]helloKey{
		"sluice":  netip.AddrPortFrom(w.serverMesh.IP, 15008),
		"stunnel": netip.AddrPortFrom(w.serverPlain.IP, stunnelServerBase+2),
		"haproxy": netip.AddrPortFrom(w.serverPlain.IP, haproxyServerBase+2),
	}
	var ref *mode
	err := b.recordHellos(res, keys, func() error {
		for _, m := range b.modes {
			if m.key == "ref" {
				ref = m // last: the checks below are about this build
				continue
			}
			if err := b.probe(ctx, m); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	// The mesh pair's probe must have been carried by ztunnel: its server side counts
	// the inbound connection once it closed.
	err = waitFor(ctx, 5*time.Second, nil, "", func() (bool, error) {
		v, err := metricSum(ctx, w.nodes[1], "istio_tcp_connections_opened_total")
		res.meshProbeConns = v
		return err == nil && v > 0, nil
	})
	if err != nil {
		return fmt.Errorf("the ztunnel on %s counted no connection after the probe from %s: traffic of (b) did not go through the mesh (%v)", w.nodes[1].Name, w.clientMesh, err)
	}
	for _, m := range b.modes {
		if m.direct() || m == ref {
			continue
		}
		if err := restMemory(res, m); err != nil {
			return err
		}
	}
	if ref == nil {
		return nil
	}
	// Switching restarts both ztunnels and sends a first connection through the new ones.
	err = b.recordHellos(res, map[string]helloKey{ref.key: keys["sluice"]}, func() error { return b.useZtunnel(ctx, ref) })
	if err != nil {
		return err
	}
	return restMemory(res, ref)
}

// restMemory records m's tunnels' memory at rest.
func restMemory(res *results, m *mode) error {
	var err error
	if res.idle[m.key], err = memOf(m.tunnels); err != nil {
		return err
	}
	res.mapped[m.key], err = mappedFiles(m.tunnels)
	return err
}

// recordHellos runs probe while recording the link between the nodes and keeps, for each
// mode in keys, the ServerHello its server endpoint sent.
func (b *bench) recordHellos(res *results, keys map[string]helloKey, probe func() error) error {
	var want []helloKey
	for _, k := range keys {
		want = append(want, k)
	}
	sn, err := sniff(b.w.nodes[0], "eth0", want)
	if err != nil {
		return err
	}
	probeErr := probe()
	time.Sleep(100 * time.Millisecond)
	hellos := sn.stop()
	if probeErr != nil {
		return probeErr
	}
	for mode, k := range keys {
		h, ok := hellos[k]
		if !ok {
			return fmt.Errorf("no TLS ServerHello from %s (%s) seen on %s's eth0: is that mode's traffic encrypted?", k, mode, b.w.nodes[0].Name)
		}
		res.hello[mode] = h
	}
	return nil
}

// useZtunnel makes the ztunnels run m's binary, restarting both when they run the other
// one (a ztunnel mode measured against -ztunnel-ref).
func (b *bench) useZtunnel(ctx context.Context, m *mode) error {
	w := b.w
	if m.ztBin == "" || m.ztBin == w.ztBin {
		return nil
	}
	w.ztBin = m.ztBin
	if err := restartAll(ctx, w.ztunnels); err != nil {
		return fmt.Errorf("switch ztunnel to %s: %w", m.name, err)
	}
	return b.probe(ctx, m)
}

// countHBONE counts established connections to port 15008 in the mesh client pod:
// ztunnel's in-pod HBONE client sockets towards the server pod.
func (b *bench) countHBONE() int {
	var tables []string
	b.w.clientMesh.Do(func() error {
		bt, err := os.ReadFile("/proc/thread-self/net/tcp")
		tables = append(tables, string(bt))
		return err
	})
	port := fmt.Sprintf(":%04X", 15008)
	return countSockets(tables, func(_, _, remote string) bool { return strings.HasSuffix(remote, port) }, "01")
}

// fileMargin is what a tunnel process needs besides two descriptors per connection
// (listeners, logs, epoll).
const fileMargin = 200

// fitting is the largest multiple of 500 connections a two-descriptors-per-connection
// tunnel can hold under limit.
func fitting(limit uint64) int {
	if limit < fileMargin {
		return 0
	}
	return int((limit-fileMargin)/2) / 500 * 500
}

// holdPlan is the numbers of connections to hold, ascending: -hold's, plus, when some
// cannot fit the open-files limit of a tunnel using two descriptors per connection
// (stunnel, HAProxy), the most that can, so that there is a figure every tunnel reaches.
func (b *bench) holdPlan() ([]int, map[int]bool) {
	steps := slices.Clone(b.opts.holds)
	extra := map[int]bool{}
	fit := fitting(b.fileLimit)
	if fit > 0 && 2*uint64(slices.Max(steps))+fileMargin > b.fileLimit && !slices.Contains(steps, fit) {
		steps = append(steps, fit)
		extra[fit] = true
	}
	slices.Sort(steps)
	return slices.Compact(steps), extra
}
