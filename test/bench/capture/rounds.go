//go:build linux

package main

import (
	"context"
	"fmt"
	"time"
)

// results of a whole run.
type results struct {
	connect    map[string][]connectRound
	throughput map[string][]throughputRound
	// foreign is the share of the machine other processes used during the whole run.
	foreign float64
	// connectRedone and throughputRedone count rounds measured again because other
	// processes disturbed them.
	connectRedone, throughputRedone int
}

// run measures every mode in every round. A round gives each mode its share (1/rounds) of
// the latency samples, the rate time and the throughput time, in an order that changes
// from round to round (see order); many short rounds spread the machine's bursts of noise
// (a shared 2-core VM) over all modes instead of letting one burst decide a mode's number.
// A round during which other processes took more than -quiet of the CPU is measured
// again, all modes together, up to rounds extra times; the report says how many were.
func (b *bench) run(ctx context.Context) (*results, error) {
	res := &results{connect: map[string][]connectRound{}, throughput: map[string][]throughputRound{}}
	cpu0, err := takeCPUSnapshot()
	if err != nil {
		return nil, err
	}
	samples := max(1, b.opts.conns/b.opts.rounds)
	slice := b.opts.duration / time.Duration(b.opts.rounds)
	cms, tms := b.selected(connectModes), b.selected(throughputModes)
	redos := 0
	waitBudget := 2 * time.Minute
	for round := 0; round < b.opts.rounds; {
		if err := b.waitQuiet(ctx, &waitBudget); err != nil {
			return nil, err
		}
		got := map[string]connectRound{}
		busiest := 0.0
		for i := range cms {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			m := cms[order(len(cms), round, i)]
			if err := b.settle(ctx); err != nil {
				return nil, err
			}
			r, err := b.measureConnect(ctx, m, round+1, samples, slice)
			if err != nil {
				return nil, fmt.Errorf("round %d: %w", round+1, err)
			}
			got[m.key] = r
			busiest = max(busiest, r.foreign)
		}
		if b.redo(busiest, &redos) {
			res.connectRedone++
			continue
		}
		for k, r := range got {
			res.connect[k] = append(res.connect[k], r)
		}
		round++
	}
	for round := 0; round < b.opts.rounds; {
		if err := b.waitQuiet(ctx, &waitBudget); err != nil {
			return nil, err
		}
		got := map[string]throughputRound{}
		busiest := 0.0
		for i := range tms {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			m := tms[order(len(tms), round, i)]
			if err := b.settle(ctx); err != nil {
				return nil, err
			}
			r, err := b.measureThroughput(ctx, m, round+1, slice)
			if err != nil {
				return nil, fmt.Errorf("round %d: %w", round+1, err)
			}
			got[m.key] = r
			busiest = max(busiest, r.foreign)
		}
		if b.redo(busiest, &redos) {
			res.throughputRedone++
			continue
		}
		for k, r := range got {
			res.throughput[k] = append(res.throughput[k], r)
		}
		round++
	}
	cpu1, err := takeCPUSnapshot()
	if err != nil {
		return nil, err
	}
	res.foreign = cpu1.since(cpu0).foreign
	return res, nil
}

// order is the position of the i-th mode of n in round r: a Williams design (a balanced
// Latin square), in which over n rounds every mode comes first once and follows every other
// mode once. The mode before matters: tearing capture down leaves work behind (freeing the
// BPF maps, conntrack's garbage collection) that would otherwise always land on the same
// successor.
func order(n, r, i int) int {
	// First row 0, 1, n-1, 2, n-2, ...; row r adds r.
	var first int
	switch {
	case i == 0:
		first = 0
	case i%2 == 1:
		first = (i + 1) / 2
	default:
		first = n - i/2
	}
	return (first + r) % n
}

// settle waits (up to a second) for the machine to go idle before a mode starts, so that
// work the previous mode's teardown left to kernel threads is not billed to this one.
func (b *bench) settle(ctx context.Context) error {
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		s0, err := takeCPUSnapshot()
		if err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		s1, err := takeCPUSnapshot()
		if err != nil {
			return err
		}
		if s1.since(s0).foreign < 0.05 {
			return nil
		}
	}
	return nil
}

// waitQuiet waits, out of budget, until other processes leave the CPUs alone (use no more
// than -quiet of them over a quarter second), so that a round does not start in the middle
// of someone's build.
func (b *bench) waitQuiet(ctx context.Context, budget *time.Duration) error {
	if b.opts.quiet <= 0 {
		return nil
	}
	logged := false
	for *budget > 0 {
		s0, err := takeCPUSnapshot()
		if err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
		s1, err := takeCPUSnapshot()
		if err != nil {
			return err
		}
		*budget -= 250 * time.Millisecond
		if f := s1.since(s0).foreign; f <= b.opts.quiet {
			return nil
		} else if !logged {
			b.log.Info("other processes are busy; waiting for the CPUs to quieten", "othersCPU", fmt.Sprintf("%.0f%%", 100*f), "budgetLeft", budget.Round(time.Second))
			logged = true
		}
	}
	return nil
}

// redo says whether a round that other processes disturbed this much should be measured
// again, counting redos against the budget of one per round.
func (b *bench) redo(foreign float64, redos *int) bool {
	if b.opts.quiet <= 0 || foreign <= b.opts.quiet || *redos >= b.opts.rounds {
		return false
	}
	*redos++
	b.log.Info("round disturbed by other processes; measuring it again", "othersCPU", fmt.Sprintf("%.0f%%", 100*foreign))
	return true
}
