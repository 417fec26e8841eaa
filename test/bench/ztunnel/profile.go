//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// profile is the top of a CPU profile of one ztunnel.
type profile struct {
	side, load string
	top, cum   string // `go tool pprof -top` output (flat, then cumulative), header trimmed
	err        error
}

// profileZtunnels takes a CPU profile of both ztunnels (admin endpoint, /debug/pprof) while
// load runs through them, and returns the ten functions with the most CPU time of each.
func (b *bench) profileZtunnels(ctx context.Context, loadName string, load func(context.Context) error, seconds int) []profile {
	out := make([]profile, len(b.w.nodes))
	var wg sync.WaitGroup
	for i, n := range b.w.nodes {
		out[i] = profile{side: []string{"client side (" + n.Name + ", outbound)", "server side (" + n.Name + ", inbound)"}[i], load: loadName}
		wg.Go(func() {
			body, err := httpGetTimeout(ctx, n, "127.0.0.1:15000", fmt.Sprintf("/debug/pprof/profile?seconds=%d", seconds), time.Duration(seconds+10)*time.Second)
			if err != nil {
				out[i].err = err
				return
			}
			path := filepath.Join(b.w.work, fmt.Sprintf("ztunnel-%s-%s.pprof", n.Name, strings.Fields(loadName)[0]))
			if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
				out[i].err = err
				return
			}
			if out[i].top, err = pprofTop(ctx, path, "-nodecount=10"); err != nil {
				out[i].err = err
				return
			}
			out[i].cum, out[i].err = pprofTop(ctx, path, "-nodecount=10", "-cum", `-hide=^(runtime|internal/|syscall|net\.|os\.|bufio\.|io\.|sync\.)`)
		})
	}
	// The profiles start when the requests arrive; give them a moment, then load for
	// longer than they run.
	sleep(ctx, 200*time.Millisecond)
	if err := load(ctx); err != nil {
		for i := range out {
			out[i].err = fmt.Errorf("load during the profile: %w", err)
		}
	}
	wg.Wait()
	return out
}

// trimPprofHeader drops the lines before "Duration:" or, in profiles without one,
// "Showing" (file, build ID, type, time), which say nothing about the code.
func trimPprofHeader(s string) string {
	for _, mark := range []string{"Duration:", "Showing"} {
		if i := strings.Index(s, mark); i >= 0 {
			return strings.TrimRight(s[i:], "\n")
		}
	}
	return strings.TrimRight(s, "\n")
}

// memDiag is one ztunnel's own account of its memory with connections held: how many
// goroutines, how much Go heap and goroutine stack, and which allocations hold the heap.
type memDiag struct {
	side                  string
	goroutines            int
	heapInuse, stackInuse int64
	top                   string // `go tool pprof -top -sample_index=inuse_space`
	err                   error
}

// ztunnelMemory asks both ztunnels (admin endpoint) about their memory.
func (b *bench) ztunnelMemory(ctx context.Context) []memDiag {
	out := make([]memDiag, len(b.w.nodes))
	for i, n := range b.w.nodes {
		d := &out[i]
		d.side = []string{"client side (" + n.Name + ")", "server side (" + n.Name + ")"}[i]
		g, err := httpGet(ctx, n, "127.0.0.1:15000", "/debug/pprof/goroutine?debug=1")
		if err != nil {
			d.err = err
			continue
		}
		first, _, _ := strings.Cut(g, "\n")
		if v, ok := strings.CutPrefix(first, "goroutine profile: total "); ok {
			d.goroutines, _ = strconv.Atoi(strings.TrimSpace(v))
		}
		h, err := httpGet(ctx, n, "127.0.0.1:15000", "/debug/pprof/heap?debug=1")
		if err != nil {
			d.err = err
			continue
		}
		for line := range strings.Lines(h) {
			if v, ok := strings.CutPrefix(line, "# HeapInuse = "); ok {
				d.heapInuse, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			}
			if v, ok := strings.CutPrefix(line, "# Stack = "); ok { // "inuse / sys"
				f := strings.Fields(v)
				if len(f) > 0 {
					d.stackInuse, _ = strconv.ParseInt(f[0], 10, 64)
				}
			}
		}
		raw, err := httpGet(ctx, n, "127.0.0.1:15000", "/debug/pprof/heap")
		if err != nil {
			d.err = err
			continue
		}
		path := filepath.Join(b.w.work, "ztunnel-"+n.Name+"-heap.pprof")
		if err := os.WriteFile(path, []byte(raw), 0o644); err != nil {
			d.err = err
			continue
		}
		d.top, d.err = pprofTop(ctx, path, "-nodecount=8", "-sample_index=inuse_space")
	}
	return out
}

// pprofTop runs `go tool pprof -top` on a profile file.
func pprofTop(ctx context.Context, path string, flags ...string) (string, error) {
	args := append([]string{"tool", "pprof", "-top"}, flags...)
	out, err := exec.CommandContext(ctx, "go", append(args, path)...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go tool pprof: %w: %s", err, out)
	}
	return trimPprofHeader(string(out)), nil
}
