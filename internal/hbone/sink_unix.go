//go:build unix

package hbone

import (
	"net"
	"os"
	"syscall"

	"github.com/sluicemesh/sluice/internal/rawio"
)

const sinkSupported = true

// writeNow writes as much of b as the socket takes without waiting.
func (k *sink) writeNow(b []byte) (int, error) {
	var (
		n    int
		werr error
	)
	err := k.rc.Write(func(fd uintptr) bool {
		n, werr = writeFD(fd, b)
		return true
	})
	return n, sinkErr(err, werr)
}

// writeAll writes all of b, waiting for the socket to drain as often as needed.
func (k *sink) writeAll(b []byte) (int, error) {
	var (
		n    int
		werr error
	)
	err := k.rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			m, err := writeFD(fd, b[n:])
			n += m
			if err != nil {
				werr = err
				return true
			}
			if m == 0 {
				return false // full: wait until writable
			}
		}
		return true
	})
	return n, sinkErr(err, werr)
}

// writeFD is one write(2), raw (see package rawio): EAGAIN is (0, nil).
func writeFD(fd uintptr, b []byte) (int, error) {
	n, err := rawio.Write(fd, b)
	if err == syscall.EAGAIN {
		return 0, nil
	}
	return n, err
}

func sinkErr(rawErr, werr error) error {
	if rawErr != nil {
		return rawErr // net.ErrClosed and the like, already wrapped by net
	}
	if werr != nil {
		return &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", werr)}
	}
	return nil
}
