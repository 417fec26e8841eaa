//go:build unix

package rawio

import (
	"os"
	"syscall"
)

// Writer writes to a non-blocking socket with raw system calls, waiting for room through
// the runtime's poller (and honouring the socket's write deadline). One goroutine at a
// time may use it.
type Writer struct {
	rc syscall.RawConn

	// The state of the write in progress, so that the callback given to rc is made
	// once, not per call.
	p       []byte
	n       int
	err     error
	wait    bool // Write: wait for room; WriteNow: stop when the socket is full
	writeFn func(fd uintptr) bool
}

// NewWriter writes to the socket of rc.
func NewWriter(rc syscall.RawConn) *Writer {
	w := &Writer{rc: rc}
	w.writeFn = w.writeSome
	return w
}

func (w *Writer) writeSome(fd uintptr) bool {
	for w.n < len(w.p) {
		n, err := Write(fd, w.p[w.n:])
		if err == syscall.EAGAIN {
			return !w.wait // full: wait until writable, or stop here
		}
		if err != nil {
			w.err = err
			return true
		}
		w.n += n
	}
	return true
}

// Write writes all of p, waiting for room as often as needed.
func (w *Writer) Write(p []byte) (int, error) { return w.write(p, true) }

// WriteNow writes as much of p as the socket takes without waiting.
func (w *Writer) WriteNow(p []byte) (int, error) { return w.write(p, false) }

func (w *Writer) write(p []byte, wait bool) (int, error) {
	w.p, w.n, w.wait = p, 0, wait
	err := w.rc.Write(w.writeFn)
	n, werr := w.n, w.err
	w.p, w.n, w.err = nil, 0, nil
	switch {
	case err != nil:
		return n, opError("write", err)
	case werr != nil:
		return n, opError("write", os.NewSyscallError("write", werr))
	}
	return n, nil
}
