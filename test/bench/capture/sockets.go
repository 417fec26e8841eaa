//go:build linux

package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/test/lab"
)

// The benchmark drives sockets with raw system calls on locked threads rather than
// through net.Dialer and net.Listener: a blocking connect(2) returns exactly when the
// handshake is done, so the time around it is the kernel's connect path (capture
// included) and not Go's poller and scheduler. Sockets are plain IPPROTO_TCP, never MPTCP,
// which sockmap and sk_lookup do not take.

// acceptor is a listening socket served by one OS thread doing blocking accept4: the
// stand-in for ztunnel's outbound listener (and for the server pod's application). It asks
// every accepted socket for its original destination, as a proxy must, and closes it.
type acceptor struct {
	name string
	fd   int
	// accepted counts accepted sockets; the benchmark checks that each mode's connections
	// landed on the listener it expects.
	accepted atomic.Uint64
	// origMissed counts accepted sockets SO_ORIGINAL_DST had no answer for.
	origMissed atomic.Uint64
	// probe, when set, receives what the next accepted socket looked like.
	probe atomic.Pointer[chan probeResult]
	// sink makes the acceptor read the next connection to its end instead of closing it,
	// and report on sinkDone: the throughput test's reader.
	sink     atomic.Bool
	sinkDone chan sinkResult
	done     chan struct{}
}

type probeResult struct {
	listener string
	orig     netip.AddrPort
	origErr  error
}

type sinkResult struct {
	orig    netip.AddrPort
	origErr error
	bytes   uint64
	elapsed time.Duration // first byte to end of stream
	err     error
}

// listen opens a TCP listener inside pod's network namespace. With mark, the socket
// carries ztunnel's SO_MARK, so capture (eBPF or iptables) never touches its connections.
func listen(pod *lab.Pod, name string, addr netip.AddrPort, mark bool) (*acceptor, error) {
	a := &acceptor{name: name, fd: -1, sinkDone: make(chan sinkResult, 1), done: make(chan struct{})}
	err := pod.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		a.fd = fd
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fmt.Errorf("SO_REUSEADDR: %w", err)
		}
		if mark {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, bpf.DefaultMark); err != nil {
				return fmt.Errorf("SO_MARK: %w", err)
			}
		}
		if err := unix.Bind(fd, sockaddr(addr)); err != nil {
			return fmt.Errorf("bind: %w", err)
		}
		return unix.Listen(fd, 4096)
	})
	if err != nil {
		if a.fd >= 0 {
			unix.Close(a.fd)
		}
		return nil, fmt.Errorf("listen on %s in pod %s: %w", addr, pod, err)
	}
	go a.serve()
	return a, nil
}

// serve accepts until the listener is shut down, on a thread of its own (it dies with
// the goroutine) that stays on the last CPU, away from the connecting thread of the
// latency loop (see pinThread).
func (a *acceptor) serve() {
	runtime.LockOSThread()
	defer close(a.done)
	pinThread(acceptCPU())
	for {
		fd, _, err := unix.Accept4(a.fd, unix.SOCK_CLOEXEC)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
			continue
		}
		if err != nil {
			return // EINVAL after shutdown
		}
		a.accepted.Add(1)
		orig, origErr := bpf.OriginalDst(rawFD(fd))
		if origErr != nil {
			a.origMissed.Add(1)
		}
		if p := a.probe.Load(); p != nil {
			select {
			case *p <- probeResult{listener: a.name, orig: orig, origErr: origErr}:
			default:
			}
		}
		if a.sink.Load() {
			r := drain(fd)
			r.orig, r.origErr = orig, origErr
			a.sinkDone <- r
		}
		unix.Close(fd)
	}
}

// drain reads fd to its end with a 64 KiB buffer, the way a proxy's copy loop does
// (read/write, not splice: splice does not see what sk_msg redirected).
func drain(fd int) sinkResult {
	buf := make([]byte, 64<<10)
	var (
		r     sinkResult
		start time.Time
	)
	for {
		n, err := unix.Read(fd, buf)
		if n > 0 {
			if r.bytes == 0 {
				start = time.Now()
			}
			r.bytes += uint64(n)
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			// A socket in a sockmap reads through tcp_bpf_recvmsg, which can return EAGAIN
			// on a blocking socket when it wakes up without data. (Go's net.Conn never
			// notices: it reads non-blocking and waits in the poller.) Wait and read again.
			unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 1000)
			continue
		}
		if err != nil {
			r.err = fmt.Errorf("read: %w", err)
			break
		}
		if n == 0 {
			break
		}
	}
	if !start.IsZero() {
		r.elapsed = time.Since(start)
	}
	return r
}

// Close stops the acceptor and closes the listener. shutdown(2) wakes the blocked accept.
func (a *acceptor) Close() error {
	err := unix.Shutdown(a.fd, unix.SHUT_RDWR)
	select {
	case <-a.done:
	case <-time.After(5 * time.Second):
		err = errors.Join(err, fmt.Errorf("acceptor %s did not stop", a.name))
	}
	return errors.Join(err, unix.Close(a.fd))
}

// rawFD lets bpf.OriginalDst, which takes a syscall.Conn, work on a plain descriptor.
type rawFD int

func (f rawFD) SyscallConn() (syscall.RawConn, error) { return f, nil }
func (f rawFD) Control(fn func(fd uintptr)) error     { fn(uintptr(f)); return nil }
func (f rawFD) Read(func(fd uintptr) bool) error      { return errors.ErrUnsupported }
func (f rawFD) Write(func(fd uintptr) bool) error     { return errors.ErrUnsupported }

func sockaddr(ap netip.AddrPort) *unix.SockaddrInet4 {
	return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
}

// newClientSocket makes a TCP socket; call it on a thread inside the client pod's
// network namespace. With reset, close(2) sends RST (SO_LINGER 0) so that a benchmark
// making tens of thousands of connections a second leaves no TIME_WAIT behind and never
// runs out of ports.
func newClientSocket(reset bool) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	// A dropped SYN would otherwise block a blocking connect for minutes.
	tv := unix.NsecToTimeval(int64(5 * time.Second))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("SO_SNDTIMEO: %w", err)
	}
	if reset {
		if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("SO_LINGER: %w", err)
		}
	}
	return fd, nil
}

// connect is a blocking connect(2). A signal can interrupt it while the handshake goes
// on; then it waits for the outcome like a non-blocking connect would.
func connect(fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	for errors.Is(err, unix.EINTR) || errors.Is(err, unix.EALREADY) || errors.Is(err, unix.EINPROGRESS) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		if _, perr := unix.Poll(pfd, 5000); perr != nil {
			if errors.Is(perr, unix.EINTR) {
				continue
			}
			return perr
		}
		soErr, gerr := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if gerr != nil {
			return gerr
		}
		if soErr != 0 {
			return syscall.Errno(soErr)
		}
		return nil
	}
	return err
}

// conntrackCount is the number of conntrack entries in pod's network namespace, 0 when
// conntrack was never loaded. It grows only while something (the iptables NAT rule)
// makes the namespace track connections.
func conntrackCount(pod *lab.Pod) (int, error) {
	var n int
	err := pod.Do(func() error {
		b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		n, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err
	})
	return n, err
}
