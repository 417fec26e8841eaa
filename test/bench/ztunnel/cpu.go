//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/test/bench/benchutil"
)

// cpuSnapshot is the machine's CPU time and what the benchmark's own processes used, at
// one moment. The benchmark's work runs in the lab's cgroups (tunnels, agents, iperf3,
// fortio) and in this process (held connections); the rest of the machine's busy time is
// other processes, which on a shared 2-core machine say how much to trust a figure.
// Network softirq work that the kernel runs in ksoftirqd, outside any lab cgroup, counts
// as "other" too, so the share is an upper bound.
type cpuSnapshot struct {
	busy, total time.Duration // all CPUs, from /proc/stat
	lab         time.Duration // the lab's cgroup tree (cpu.stat usage_usec)
	own         time.Duration // this process (getrusage)
}

// cpuUse is what happened between two snapshots.
type cpuUse struct {
	wall time.Duration
	// busy is the share of the machine's CPU time used by anyone (0 to 1); foreign the
	// share used by other processes than the benchmark's.
	busy, foreign float64
}

func takeCPUSnapshot(labCgroup string) (cpuSnapshot, error) {
	var s cpuSnapshot
	var err error
	if s.busy, s.total, err = benchutil.MachineCPU(); err != nil {
		return s, err
	}
	if labCgroup != "" {
		if s.lab, err = cgroupCPU(labCgroup); err != nil {
			return s, err
		}
	}
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return s, err
	}
	s.own = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	return s, nil
}

// cgroupCPU is the CPU time used by every process that ever ran in the cgroup2 subtree at
// dir.
func cgroupCPU(dir string) (time.Duration, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0, fmt.Errorf("CPU time of the lab's cgroups: %w", err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			us, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse %s/cpu.stat: %w", dir, err)
			}
			return time.Duration(us) * time.Microsecond, nil
		}
	}
	return 0, fmt.Errorf("no usage_usec in %s/cpu.stat", dir)
}

func (s cpuSnapshot) since(before cpuSnapshot, wall time.Duration) cpuUse {
	u := cpuUse{wall: wall}
	total := s.total - before.total
	if total <= 0 {
		return u
	}
	busy := s.busy - before.busy
	mine := (s.lab - before.lab) + (s.own - before.own)
	u.busy = float64(busy) / float64(total)
	u.foreign = max(0, float64(busy-mine)/float64(total))
	return u
}

// meter measures one stretch of work: the machine's CPU and the tunnel processes'.
type meter struct {
	labCgroup string
	tunnels   []*proc
	start     time.Time
	snap      cpuSnapshot
	tunnelCPU time.Duration
}

// metered is what a meter measured.
type metered struct {
	use       cpuUse
	tunnelCPU time.Duration
}

func startMeter(labCgroup string, tunnels []*proc) (*meter, error) {
	m := &meter{labCgroup: labCgroup, tunnels: tunnels, start: time.Now()}
	var err error
	if m.snap, err = takeCPUSnapshot(labCgroup); err != nil {
		return nil, err
	}
	if m.tunnelCPU, err = cpuOf(tunnels); err != nil {
		return nil, err
	}
	return m, nil
}

// stop returns the machine's use since start and the tunnel processes' CPU time.
func (m *meter) stop() (metered, error) {
	s, err := takeCPUSnapshot(m.labCgroup)
	if err != nil {
		return metered{}, err
	}
	t, err := cpuOf(m.tunnels)
	if err != nil {
		return metered{}, err
	}
	return metered{use: s.since(m.snap, time.Since(m.start)), tunnelCPU: t - m.tunnelCPU}, nil
}

// settle waits (up to a second) until the machine is idle, so that what the previous
// measurement left running (iperf3's server finishing, TIME_WAIT timers, Go's GC in the
// tunnels) is not billed to the next one.
func (b *bench) settle(ctx context.Context) error {
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		s0, err := takeCPUSnapshot(b.labCgroup)
		if err != nil {
			return err
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
		s1, err := takeCPUSnapshot(b.labCgroup)
		if err != nil {
			return err
		}
		if s1.since(s0, 0).busy < 0.10 {
			return nil
		}
	}
	return nil
}

// waitQuiet waits, out of budget, until other processes leave the CPUs alone (use no more
// than -quiet of them over a quarter second), so that a round does not start in the middle
// of someone's build.
func (b *bench) waitQuiet(ctx context.Context) error {
	if b.opts.quiet <= 0 {
		return nil
	}
	logged := false
	for b.waitBudget > 0 {
		s0, err := takeCPUSnapshot(b.labCgroup)
		if err != nil {
			return err
		}
		if err := sleep(ctx, 250*time.Millisecond); err != nil {
			return err
		}
		s1, err := takeCPUSnapshot(b.labCgroup)
		if err != nil {
			return err
		}
		b.waitBudget -= 250 * time.Millisecond
		f := s1.since(s0, 0).foreign
		if f <= b.opts.quiet {
			return nil
		}
		if !logged {
			b.log.Info("other processes are busy; waiting for the CPUs to quieten", "othersCPU", pct(f), "budgetLeft", b.waitBudget.Round(time.Second))
			logged = true
		}
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

func pct(f float64) string { return fmt.Sprintf("%.0f%%", 100*f) }
