package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// bufPool lends copy buffers only while data moves: an idle connection holds none, which
// is most of what keeps ztunnel's memory per held connection small.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// halfCloser is a connection whose write side can be closed alone.
type halfCloser interface {
	io.ReadWriter
	CloseWrite() error
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

// pipe copies both directions until both are done, propagating half-close: when one side
// finishes sending, the other side's write half is closed, and the opposite direction
// keeps flowing. It returns the first real error (not EOF).
func pipe(a, b halfCloser, aToB, bToA *counter) error {
	errc := make(chan error, 1)
	go func() { errc <- copyClientToUpstream(b, a, aToB) }()
	err := copyUpstreamToClient(a, b, bToA)
	return errors.Join(err, <-errc)
}

// copyClientToUpstream and copyUpstreamToClient are the same loop; the names make stack
// dumps readable.
func copyClientToUpstream(dst, src halfCloser, c *counter) error { return copyHalf(dst, src, c) }
func copyUpstreamToClient(dst, src halfCloser, c *counter) error { return copyHalf(dst, src, c) }

// copyHalf reads and writes rather than io.Copy: splice(2) would miss bytes that sk_msg
// acceleration placed on the socket, and it borrows the buffer only per read.
func copyHalf(dst, src halfCloser, c *counter) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
			if c != nil {
				c.Add(n)
			}
		}
		if err != nil {
			cerr := dst.CloseWrite()
			if errors.Is(err, io.EOF) {
				return cerr
			}
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
	}
}
