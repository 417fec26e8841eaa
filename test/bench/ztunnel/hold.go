//go:build linux

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sluicemesh/sluice/test/lab"
)

// The server that holds idle connections runs as a process of its own in the server pod
// (this binary with -hold-server): a process may have only so many descriptors open,
// and 10,000 connections held at both ends would take twice as many in one.

// holdServer is the parent's handle on a hold server: it asks it, over its standard
// input and output, how many connections it holds and to let them go.
type holdServer struct {
	p   *proc
	mu  sync.Mutex
	in  *os.File
	out *bufio.Reader
}

// startHoldServer starts the hold server in pod p and waits until it listens.
func startHoldServer(ctx context.Context, w *world, p *lab.Pod) (*holdServer, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, err
	}
	cmd := p.Command(exe, "-hold-server", strconv.Itoa(holdPort))
	cmd.Stdin, cmd.Stdout = inR, outW
	pr, err := startProc("hold server in "+p.String(), cmd, filepath.Join(w.work, p.Namespace+"-"+p.Name+"-hold.log"))
	inR.Close() // the child's ends
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, err
	}
	h := &holdServer{p: pr, in: inW, out: bufio.NewReader(outR)}
	return h, waitListening(ctx, p, pr, holdPort)
}

// ask sends a command and returns the number the server answers with.
func (h *holdServer) ask(cmd string) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, err := fmt.Fprintln(h.in, cmd); err != nil {
		return 0, fmt.Errorf("%s: %w", h.p.name, errors.Join(err, h.p.check()))
	}
	line, err := h.out.ReadString('\n')
	if err != nil {
		return 0, fmt.Errorf("%s: %w", h.p.name, errors.Join(err, h.p.check()))
	}
	return strconv.Atoi(strings.TrimSpace(line))
}

// count is how many connections the server holds.
func (h *holdServer) count() (int, error) { return h.ask("count") }

// release closes every connection the server holds.
func (h *holdServer) release() error {
	_, err := h.ask("release")
	return err
}

// close ends the server (it exits when its input closes).
func (h *holdServer) close() error {
	h.in.Close()
	select {
	case <-h.p.exited:
	case <-time.After(3 * time.Second):
	}
	err := h.p.stop()
	h.out = nil
	return err
}

// runHoldServer is the child: accept on port, greet every connection with one byte (so
// the client knows the whole path is up) and hold it without reading; answer "count" and
// "release" on standard input until it closes.
func runHoldServer(port int) error {
	ln, err := net.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return err
	}
	defer ln.Close()
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				// Out of descriptors and the like: the client sees its connection
				// hang without a greeting and reports that.
				fmt.Fprintln(os.Stderr, "accept:", err)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			c.Write([]byte{'h'})
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		mu.Lock()
		n := len(conns)
		if sc.Text() == "release" {
			for _, c := range conns {
				c.Close()
			}
			conns = nil
		}
		mu.Unlock()
		fmt.Println(n)
	}
	return sc.Err()
}
