package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/hbone"
	"github.com/sluicemesh/sluice/internal/rawio"
)

// bufPool lends copy buffers only while data moves: an idle connection holds none, which
// is most of what keeps ztunnel's memory per held connection small.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// halfCloser is a connection whose write side can be closed alone.
type halfCloser interface {
	io.ReadWriter
	CloseWrite() error
	Close() error
}

// counter receives byte counts as they flow (Prometheus counters, access log totals).
type counter struct {
	n   atomic.Uint64
	add func(float64)
}

func (c *counter) Add(n int) {
	c.n.Add(uint64(n))
	if c.add != nil {
		c.add(float64(n))
	}
}

// pipe copies both directions until both are done, propagating half-close (one side
// finished sending: close the other's write half, the opposite direction keeps flowing)
// and resets (one side aborted: abort the other). It returns the first real error.
func pipe(a, b halfCloser, aToB, bToA *counter) error {
	errc := make(chan error, 1)
	go func() { errc <- copyClientToUpstream(b, a, aToB) }()
	err := copyUpstreamToClient(a, b, bToA)
	return errors.Join(err, <-errc)
}

// pipeDetached is pipe without the caller: it returns at once, so the deep stack of the
// goroutine that set the connection up is not kept for as long as the connection is
// held (most of ztunnel's memory per idle connection). A direction from an HBONE stream
// into a TCP socket needs no goroutine at all (hbone.Stream.SendTo); any other gets a
// fresh one. finish runs once, after both directions are done, with the first real
// error.
func pipeDetached(a, b halfCloser, aToB, bToA *counter, finish func(error)) {
	var (
		left  atomic.Int32
		mu    sync.Mutex
		first error
	)
	left.Store(2)
	end := func(err error) {
		if err != nil {
			mu.Lock()
			first = errors.Join(first, err)
			mu.Unlock()
		}
		if left.Add(-1) == 0 {
			finish(first)
		}
	}
	carryHalf(b, a, aToB, end, copyClientToUpstream)
	carryHalf(a, b, bToA, end, copyUpstreamToClient)
}

// carryHalf starts copying src to dst and calls end with the outcome.
func carryHalf(dst, src halfCloser, c *counter, end func(error), run func(dst, src halfCloser, c *counter) error) {
	if s, ok := src.(*hbone.Stream); ok {
		if tc, ok := dst.(*net.TCPConn); ok {
			var count func(int)
			if c != nil {
				count = c.Add
			}
			err := s.SendTo(tc, count, func(err error) { end(finish(dst, err)) })
			if err == nil {
				return
			}
		}
	}
	if tc, ok := src.(*net.TCPConn); ok {
		go carryFromTCP(dst, tc, c, end)
		return
	}
	go func() { end(run(dst, src, c)) }()
}

// carryFromTCP copies src to dst on a goroutine that lives at most about idleHandoff
// after its first bytes moved: then its read fails (whether or not data is waiting) and
// a fresh goroutine carries on. Writing into an HBONE stream runs TLS and the socket
// write on the copying goroutine, which grows its stack to 8 KiB, and a parked goroutine
// keeps its stack (the GC only halves it, to 4 KiB): a held connection that once carried
// a few bytes would keep that for as long as it is held, about a tenth of ztunnel's memory
// per held connection. The new goroutine parks on the runtime's starting stack. A busy
// connection pays one hand-over a second; handing over at every pause instead cost 14%
// more CPU per request of request/response traffic.
func carryFromTCP(dst halfCloser, src *net.TCPConn, c *counter, end func(error)) {
	err := readFromTCP(dst, src, c, idleHandoff)
	if err == errWentIdle {
		go resumeFromTCP(dst, src, c, end)
		return
	}
	end(finish(dst, err))
}

// resumeFromTCP is carryFromTCP on a fresh goroutine, after a hand-over.
func resumeFromTCP(dst halfCloser, src *net.TCPConn, c *counter, end func(error)) {
	if err := src.SetReadDeadline(time.Time{}); err != nil {
		end(finish(dst, err))
		return
	}
	carryFromTCP(dst, src, c, end)
}

// copyClientToUpstream and copyUpstreamToClient are the same copy; the names make stack
// dumps readable.
func copyClientToUpstream(dst, src halfCloser, c *counter) error { return copyHalf(dst, src, c) }
func copyUpstreamToClient(dst, src halfCloser, c *counter) error { return copyHalf(dst, src, c) }

func copyHalf(dst, src halfCloser, c *counter) error {
	var err error
	switch s := src.(type) {
	case *hbone.Stream:
		// The stream hands over its received chunks itself: no buffer of ours at all.
		_, err = s.WriteTo(countingWriter{dst, c})
	case *net.TCPConn:
		err = copyFromTCP(dst, s, c)
	default:
		err = copyLoop(dst, src, c)
	}
	return finish(dst, err)
}

// finish ends dst's direction the way src's ended: a clean end half-closes, an abort
// aborts.
func finish(dst halfCloser, err error) error {
	switch {
	case errors.Is(err, hbone.ErrConnClosed):
		// The HBONE connection died under the stream (even with a clean FIN, which
		// wraps io.EOF): the transfer was cut off, and the application must not take
		// it for a clean end.
		abort(dst)
		return err
	case err == nil || errors.Is(err, io.EOF):
		return dst.CloseWrite()
	case errors.Is(err, net.ErrClosed):
		return nil
	case isReset(err):
		abort(dst)
		return nil
	}
	abort(dst)
	return err
}

func isReset(err error) bool {
	var se *hbone.StreamError
	return errors.As(err, &se) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// abort closes a connection so its peer sees a reset, not a clean end.
func abort(c halfCloser) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

type countingWriter struct {
	w io.Writer
	c *counter
}

func (cw countingWriter) Write(p []byte) (int, error) {
	n, err := cw.w.Write(p)
	if cw.c != nil && n > 0 {
		cw.c.Add(n)
	}
	return n, err
}

// copyFromTCP reads straight from the socket inside the poller's callback: the buffer is
// borrowed for the read and handed back if there is nothing to read, so a held but quiet
// connection owns no buffer, and no extra system call is spent asking first. It reads and
// writes rather than splicing: splice would miss bytes sk_msg acceleration placed on the
// socket.
func copyFromTCP(dst io.Writer, src *net.TCPConn, c *counter) error {
	return readFromTCP(dst, src, c, 0)
}

// idleHandoff is how long after its first bytes moved carryFromTCP's goroutine hands
// over to a fresh one. A variable for tests.
var idleHandoff = time.Second

// errWentIdle is readFromTCP's report that src was quiet for its idle period.
var errWentIdle = errors.New("no data to read")

// readFromTCP is copyFromTCP; with idle > 0 it returns errWentIdle, having read nothing
// more, once idle has passed since its first bytes moved. It uses src's read deadline
// for that, which the caller clears.
func readFromTCP(dst io.Writer, src *net.TCPConn, c *counter, idle time.Duration) error {
	rc, err := src.SyscallConn()
	if err != nil {
		return err
	}
	var (
		bp    *[]byte
		n     int
		rerr  error
		armed bool
	)
	read := func(fd uintptr) bool {
		bp = bufPool.Get().(*[]byte)
		// Reads of hbone.IdealWrite become one DATA frame in whole TLS records.
		n, rerr = rawio.Read(fd, (*bp)[:hbone.IdealWrite])
		if rerr == unix.EAGAIN {
			bufPool.Put(bp)
			bp = nil
			return false // wait for readability, holding nothing
		}
		return true
	}
	for {
		if err := rc.Read(read); err != nil {
			if bp != nil {
				bufPool.Put(bp)
			}
			if armed && errors.Is(err, os.ErrDeadlineExceeded) {
				return errWentIdle
			}
			return err
		}
		switch {
		case rerr != nil:
			bufPool.Put(bp)
			return &net.OpError{Op: "read", Net: "tcp", Err: rerr}
		case n == 0:
			bufPool.Put(bp)
			return io.EOF
		}
		_, werr := dst.Write((*bp)[:n])
		bufPool.Put(bp)
		bp = nil
		if werr != nil {
			return werr
		}
		if c != nil {
			c.Add(n)
		}
		if idle > 0 && !armed {
			if err := src.SetReadDeadline(time.Now().Add(idle)); err != nil {
				return err
			}
			armed = true
		}
	}
}

func copyLoop(dst io.Writer, src io.Reader, c *counter) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	for {
		n, err := src.Read(*bp)
		if n > 0 {
			if _, werr := dst.Write((*bp)[:n]); werr != nil {
				return werr
			}
			if c != nil {
				c.Add(n)
			}
		}
		if err != nil {
			return err
		}
	}
}
