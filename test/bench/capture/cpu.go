//go:build linux

package main

import (
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/test/bench/benchutil"
)

// pinThread keeps the calling OS thread, which must be locked, on cpu and returns what
// undoes that; cpu < 0 does nothing. The latency loop runs on CPU 0 and the accepting
// threads on the last CPU: when they share a CPU, waking the acceptor during the
// handshake can preempt the connecting thread inside connect(2), and the sample then
// measures the acceptor's work instead of the connect path. Where the scheduler puts them
// would otherwise decide each round's numbers (they come out in two clusters, ~15 µs
// apart).
func pinThread(cpu int) (restore func()) {
	var old unix.CPUSet
	if cpu < 0 || unix.SchedGetaffinity(0, &old) != nil {
		return func() {}
	}
	var set unix.CPUSet
	set.Set(cpu)
	if unix.SchedSetaffinity(0, &set) != nil {
		return func() {}
	}
	return func() { unix.SchedSetaffinity(0, &old) }
}

// connectCPU and acceptCPU are where the latency loop and the acceptors run; -1 (no
// pinning) on a single CPU.
func connectCPU() int {
	if runtime.NumCPU() < 2 {
		return -1
	}
	return 0
}

func acceptCPU() int {
	if runtime.NumCPU() < 2 {
		return -1
	}
	return runtime.NumCPU() - 1
}

// cpuSnapshot is the machine's CPU time (from /proc/stat) and this process's (getrusage)
// at one moment, to tell what the benchmark itself used from what other processes took
// away from it. On a shared machine that second number says how much to trust a run.
type cpuSnapshot struct {
	busy, total time.Duration // all CPUs, from /proc/stat
	own         time.Duration // this process, user + system
}

func takeCPUSnapshot() (cpuSnapshot, error) {
	var s cpuSnapshot
	var err error
	if s.busy, s.total, err = benchutil.MachineCPU(); err != nil {
		return s, err
	}
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return s, err
	}
	s.own = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	return s, nil
}

// cpuUse is what happened between two snapshots.
type cpuUse struct {
	own time.Duration // CPU time this process used
	// foreign is the share of the machine's CPU time that other processes used (0 to 1).
	foreign float64
}

func (s cpuSnapshot) since(before cpuSnapshot) cpuUse {
	u := cpuUse{own: s.own - before.own}
	if total := s.total - before.total; total > 0 {
		u.foreign = max(0, float64(s.busy-before.busy-u.own)/float64(total))
	}
	return u
}
