//go:build linux

package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/test/bench/benchutil"
)

// proc is a process the benchmark started (a tunnel, an agent, a server): kept so that
// its CPU time and memory can be read from /proc and so that it is stopped at the end.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	err     error // valid once exited is closed
	// mk and ready, when set, let restart start the same process again: mk makes the
	// command, ready waits until the new process serves.
	mk    func() *exec.Cmd
	ready func(context.Context, *proc) error
}

// spawn starts the command mk makes and waits until ready says it serves; the process
// can then be restarted.
func spawn(ctx context.Context, name string, mk func() *exec.Cmd, logPath string, ready func(context.Context, *proc) error) (*proc, error) {
	p, err := startProc(name, mk(), logPath)
	if err != nil {
		return nil, err
	}
	p.mk, p.ready = mk, ready
	if ready != nil {
		err = ready(ctx, p)
	}
	return p, err
}

// restart stops the process and starts it again, fresh: the memory figures start from
// a process that has carried nothing yet.
func (p *proc) restart(ctx context.Context) (*proc, error) {
	if p.mk == nil {
		return nil, fmt.Errorf("%s cannot be restarted", p.name)
	}
	if err := p.stop(); err != nil {
		return nil, err
	}
	return spawn(ctx, p.name, p.mk, p.logPath, p.ready)
}

// restartAll restarts each of ps in place (the slice then holds the new processes),
// stopping at the first that fails.
func restartAll(ctx context.Context, ps []*proc) error {
	for i, p := range ps {
		np, err := p.restart(ctx)
		if np != nil {
			ps[i] = np
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// startProc starts cmd (from Node.Command or Pod.Command, which put it in a netns and a
// cgroup of the lab) in a session of its own, so that ^C on the terminal reaches only the
// benchmark, which then stops everything in order; its output goes to logPath unless
// cmd already has somewhere to send it.
func startProc(name string, cmd *exec.Cmd, logPath string) (*proc, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child has its own copy
	if cmd.Stdout == nil {
		cmd.Stdout = logFile
	}
	if cmd.Stderr == nil {
		cmd.Stderr = logFile
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = new(syscall.SysProcAttr)
	}
	cmd.SysProcAttr.Setsid = true
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// check returns an error with the end of the process's log if it has exited.
func (p *proc) check() error {
	select {
	case <-p.exited:
		return fmt.Errorf("%s exited (%v); its log %s ends:\n%s", p.name, p.err, p.logPath, tailFile(p.logPath, 15))
	default:
		return nil
	}
}

// stop asks the process to end (SIGTERM), and kills it if it has not after a few seconds.
func (p *proc) stop() error {
	select {
	case <-p.exited:
		return nil
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(3 * time.Second):
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %s (pid %d): %w", p.name, p.pid(), err)
	}
	<-p.exited
	return nil
}

// cpuTime is the process's user plus system time, all threads, from /proc/<pid>/stat.
func (p *proc) cpuTime() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.pid()))
	if err != nil {
		return 0, fmt.Errorf("CPU time of %s: %w", p.name, err)
	}
	// The command name (field 2) may hold spaces; fields after it start at state (3).
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("CPU time of %s: unexpected /proc/%d/stat", p.name, p.pid())
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("CPU time of %s: short /proc/%d/stat", p.name, p.pid())
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseUint(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("CPU time of %s: %w", p.name, err)
	}
	return time.Duration(utime+stime) * benchutil.ClockTick, nil
}

// memUse is a process's resident memory in bytes, from /proc/<pid>/status: the whole
// resident set (VmRSS) and two of its parts, anonymous memory (heap, stacks, the data the
// program wrote) and file-backed pages (the mapped program and shared libraries, which
// the page cache holds once for every process that maps them).
type memUse struct{ rss, anon, file int64 }

func (p *proc) mem() (memUse, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid()))
	if err != nil {
		return memUse{}, fmt.Errorf("memory of %s: %w", p.name, err)
	}
	var m memUse
	fields := map[string]*int64{"VmRSS": &m.rss, "RssAnon": &m.anon, "RssFile": &m.file}
	for line := range strings.Lines(string(b)) {
		key, v, _ := strings.Cut(line, ":")
		dst, ok := fields[key]
		if !ok {
			continue
		}
		f := strings.Fields(v) // "1234 kB"
		if len(f) != 2 || f[1] != "kB" {
			return memUse{}, fmt.Errorf("memory of %s: unexpected line %q in /proc/%d/status", p.name, strings.TrimSpace(line), p.pid())
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return memUse{}, fmt.Errorf("memory of %s: %s in /proc/%d/status: %w", p.name, key, p.pid(), err)
		}
		*dst = kb << 10
		delete(fields, key)
	}
	for key := range fields {
		return memUse{}, fmt.Errorf("memory of %s: no %s in /proc/%d/status", p.name, key, p.pid())
	}
	return m, nil
}

// cpuOf sums the CPU time of procs.
func cpuOf(procs []*proc) (time.Duration, error) {
	var sum time.Duration
	for _, p := range procs {
		t, err := p.cpuTime()
		if err != nil {
			return 0, err
		}
		sum += t
	}
	return sum, nil
}

// memOf reads the resident memory of each of procs.
func memOf(procs []*proc) ([]memUse, error) {
	out := make([]memUse, len(procs))
	for i, p := range procs {
		var err error
		if out[i], err = p.mem(); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// mappedFiles sums, per file, the resident pages of the files procs map (from
// /proc/<pid>/smaps), and describes the largest few: "name MB, ...".
func mappedFiles(procs []*proc) (string, error) {
	perFile := map[string]int64{}
	for _, p := range procs {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", p.pid()))
		if err != nil {
			return "", fmt.Errorf("mapped files of %s: %w", p.name, err)
		}
		var file string
		for line := range strings.Lines(string(b)) {
			f := strings.Fields(line)
			switch {
			case len(f) >= 5 && strings.Contains(f[0], "-"): // a mapping: range perms offset dev inode [path]
				file = ""
				if len(f) >= 6 && f[4] != "0" && !strings.HasPrefix(f[5], "/dev/") {
					file = filepath.Base(f[5])
				}
			case len(f) == 3 && f[0] == "Rss:" && file != "":
				kb, err := strconv.ParseInt(f[1], 10, 64)
				if err != nil {
					return "", fmt.Errorf("mapped files of %s: %q in /proc/%d/smaps: %w", p.name, strings.TrimSpace(line), p.pid(), err)
				}
				perFile[file] += kb << 10
			}
		}
	}
	names := slices.SortedFunc(maps.Keys(perFile), func(a, b string) int { return cmp.Compare(perFile[b], perFile[a]) })
	var parts []string
	for _, n := range names[:min(len(names), 4)] {
		parts = append(parts, fmt.Sprintf("%s %.1f", n, mb(perFile[n])))
	}
	if len(names) > 4 {
		var rest int64
		for _, n := range names[4:] {
			rest += perFile[n]
		}
		parts = append(parts, fmt.Sprintf("%d others %.1f", len(names)-4, mb(rest)))
	}
	return strings.Join(parts, ", "), nil
}

// total adds up the memory of several processes.
func total(m []memUse) memUse {
	var t memUse
	for _, u := range m {
		t.rss += u.rss
		t.anon += u.anon
		t.file += u.file
	}
	return t
}

// rssOf reads the resident set of each of procs.
func rssOf(procs []*proc) ([]int64, error) {
	m, err := memOf(procs)
	if err != nil {
		return nil, err
	}
	out := make([]int64, len(m))
	for i := range m {
		out[i] = m[i].rss
	}
	return out, nil
}

// tailFile returns the last n lines of path, indented, for error messages.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "    (" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}

// raiseFileLimit lifts RLIMIT_NOFILE for this process and, since children inherit it,
// for the tunnels and tools it starts: 10,000 held connections take 10,000 descriptors in
// this process and, for a tunnel that uses a socket per side, 20,000 in each tunnel
// process. Without CAP_SYS_RESOURCE the hard limit cannot be raised; the soft one is then
// set to it. It returns the limit in force. syscall.Setrlimit (not x/sys/unix) also
// tells os/exec not to put the original soft limit back in children.
func raiseFileLimit(want uint64) (uint64, error) {
	var cur syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &cur); err != nil {
		return 0, err
	}
	lim := syscall.Rlimit{Cur: max(cur.Max, want), Max: max(cur.Max, want)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
		return lim.Cur, nil
	}
	lim = syscall.Rlimit{Cur: cur.Max, Max: cur.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("set the open files limit (RLIMIT_NOFILE) to %d: %w", lim.Cur, err)
	}
	return lim.Cur, nil
}
