//go:build unix

package rawio

import (
	"io"
	"net"
	"os"
	"syscall"
)

// Conn is a TCP connection whose Read and Write use raw system calls, waiting for
// readiness (and honouring deadlines) through the runtime's poller. Give it to a reader
// or writer that moves bulk data, such as crypto/tls. Read and Write may each be used by
// one goroutine at a time.
type Conn struct {
	*net.TCPConn
	rc syscall.RawConn
	w  *Writer

	// The state of the read in progress, so that the callback given to rc is made
	// once, not per call.
	rp     []byte
	rn     int
	rerr   error
	readFn func(fd uintptr) bool
}

// NewConn wraps c.
func NewConn(c *net.TCPConn) (*Conn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	rw := &Conn{TCPConn: c, rc: rc, w: NewWriter(rc)}
	rw.readFn = rw.readOnce
	return rw, nil
}

func (c *Conn) readOnce(fd uintptr) bool {
	c.rn, c.rerr = Read(fd, c.rp)
	return c.rerr != syscall.EAGAIN
}

// Read reads what is there, waiting for data if there is none.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rp = p
	err := c.rc.Read(c.readFn)
	n, rerr := c.rn, c.rerr
	c.rp, c.rn, c.rerr = nil, 0, nil
	switch {
	case err != nil:
		return 0, opError("read", err)
	case rerr != nil:
		return 0, opError("read", os.NewSyscallError("read", rerr))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// Write writes all of p, waiting for room as often as needed.
func (c *Conn) Write(p []byte) (int, error) { return c.w.Write(p) }

func opError(op string, err error) error {
	if _, ok := err.(*net.OpError); ok {
		return err
	}
	return &net.OpError{Op: op, Net: "tcp", Err: err}
}
