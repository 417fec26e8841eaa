//go:build linux

package zds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// oobSpace has room for a few more fds than any message carries, so a peer that
// attaches extras has them delivered to us (and closed) instead of silently dropped.
var oobSpace = unix.CmsgSpace(4 * 8)

// packetReader reads whole packets from one connection, reusing its buffers.
type packetReader struct {
	c   *net.UnixConn
	buf []byte
	oob []byte
}

func newPacketReader(c *net.UnixConn) *packetReader {
	return &packetReader{c: c, buf: make([]byte, MaxMessageSize), oob: make([]byte, oobSpace)}
}

// read returns the next message and, for add, the fd it carries; the caller owns it.
// An error wrapping errMalformed means the packet was consumed and rejected but the
// connection is usable; any other error means the connection is done. Either way no
// received fd is left open.
func (r *packetReader) read() (Message, *os.File, error) {
	n, oobn, flags, _, err := r.c.ReadMsgUnix(r.buf, r.oob)
	// Parse rights even on error: a zero-length packet with fds reads as io.EOF but
	// still installs the fds in our table.
	fds, cerr := parseRights(r.oob[:oobn])
	if err != nil {
		closeFDs(fds)
		return Message{}, nil, err
	}
	switch {
	case cerr != nil:
		closeFDs(fds)
		return Message{}, nil, malformed("control message: %v", cerr)
	case flags&unix.MSG_TRUNC != 0:
		closeFDs(fds)
		return Message{}, nil, malformed("packet over the %d byte limit", MaxMessageSize)
	case flags&unix.MSG_CTRUNC != 0:
		closeFDs(fds)
		return Message{}, nil, malformed("too many file descriptors attached")
	}
	m, err := decode(r.buf[:n], len(fds))
	if err != nil {
		closeFDs(fds)
		return Message{}, nil, err
	}
	if len(fds) == 0 {
		return m, nil, nil
	}
	return m, os.NewFile(uintptr(fds[0]), "netns:"+m.UID), nil
}

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	scms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	var errs []error
	for _, scm := range scms {
		if scm.Header.Level != unix.SOL_SOCKET || scm.Header.Type != unix.SCM_RIGHTS {
			errs = append(errs, fmt.Errorf("unexpected control message level %d type %d", scm.Header.Level, scm.Header.Type))
			continue
		}
		got, err := unix.ParseUnixRights(&scm)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fds = append(fds, got...)
	}
	return fds, errors.Join(errs...)
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// writeMessage sends m as one packet, with netns attached when it is not nil. The
// caller keeps ownership of netns: the peer receives its own descriptor.
func writeMessage(c *net.UnixConn, m *Message, netns *os.File) error {
	b, err := encode(m)
	if err != nil {
		return err
	}
	return writePacket(c, b, netns)
}

func writePacket(c *net.UnixConn, b []byte, netns *os.File) error {
	var oob []byte
	if netns != nil {
		oob = unix.UnixRights(int(netns.Fd()))
	}
	_, _, err := c.WriteMsgUnix(b, oob, nil)
	// Only the fd number went into oob; the file must not be finalized (closing the fd)
	// before the kernel has taken its own reference.
	runtime.KeepAlive(netns)
	return err
}

// closeOnCancel runs closeFn when ctx is done, to unblock a read or accept. The stop
// func it returns cancels that, or waits for a close already under way, so that once
// stop returns the fd is really closed: a closer running in another goroutine would
// otherwise outlive the function that owns the fd.
func closeOnCancel(ctx context.Context, closeFn func()) (stop func()) {
	closed := make(chan struct{})
	stopAfter := context.AfterFunc(ctx, func() {
		defer close(closed)
		closeFn()
	})
	return func() {
		if !stopAfter() {
			<-closed
		}
	}
}
