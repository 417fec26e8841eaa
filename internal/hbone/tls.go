package hbone

import (
	"crypto/tls"
	"net"
	"sync"
)

// crypto/tls writes every record (at most 16 KiB) with a system call of its own, and
// over a TCP_NODELAY socket each of those leaves as a packet train of its own. HBONE's
// writes are whole 64 KiB frames, so a Write through TLSConn gathers its records and
// sends them with one write(2): a quarter of the system calls, and segments as large as
// the kernel can offload, on both ends of the link.

// TLSConn is a tls.Conn whose Write leaves in one system call. Use it (TLSClient,
// TLSServer) for the connections given to NewClientConn and Server.ServeConn.
type TLSConn struct {
	*tls.Conn
	raw *recordBatcher
	wmu sync.Mutex // one Write gathers at a time, as net.Conn allows concurrent Writes
}

// TLSClient is tls.Client with batched writes.
func TLSClient(raw net.Conn, cfg *tls.Config) *TLSConn {
	b := &recordBatcher{Conn: raw}
	return &TLSConn{Conn: tls.Client(b, cfg), raw: b}
}

// TLSServer is tls.Server with batched writes.
func TLSServer(raw net.Conn, cfg *tls.Config) *TLSConn {
	b := &recordBatcher{Conn: raw}
	return &TLSConn{Conn: tls.Server(b, cfg), raw: b}
}

// Write encrypts p and sends its records together.
func (c *TLSConn) Write(p []byte) (int, error) {
	// The handshake must not be gathered: it waits for answers to what it sends.
	if err := c.Conn.Handshake(); err != nil {
		return 0, err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.raw.begin()
	n, err := c.Conn.Write(p)
	if ferr := c.raw.flush(); err == nil && ferr != nil {
		// tls.Conn counted the bytes as written; they were not.
		return 0, ferr
	}
	return n, err
}

// NetConn returns the TCP connection under TLS.
func (c *TLSConn) NetConn() net.Conn { return c.raw.Conn }

// batchBufs lend the gathering buffer only for the duration of a Write: an idle
// connection holds none.
var batchBufs = sync.Pool{New: func() any {
	b := make([]byte, 0, writeBufSize+writeBufSize/512)
	return &b
}}

// recordBatcher is the net.Conn under a tls.Conn: between begin and flush it keeps what
// TLS writes, flush sends it at once. Writes TLS makes outside a batch (handshake,
// alerts, key updates answered while reading) go straight through, or join the batch in
// order if one is open.
type recordBatcher struct {
	net.Conn
	mu  sync.Mutex
	buf *[]byte // non-nil while batching
}

func (b *recordBatcher) begin() {
	b.mu.Lock()
	b.buf = batchBufs.Get().(*[]byte)
	b.mu.Unlock()
}

// Write holds mu while it writes, as flush does, so that the records reach the socket
// in the order TLS sealed them (their sequence numbers are the nonces).
func (b *recordBatcher) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf != nil {
		*b.buf = append(*b.buf, p...)
		return len(p), nil
	}
	return b.Conn.Write(p)
}

func (b *recordBatcher) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	bp := b.buf
	b.buf = nil
	var err error
	if len(*bp) > 0 {
		_, err = b.Conn.Write(*bp)
	}
	if cap(*bp) > 2*writeBufSize {
		return err // grown by an unusually big Write: let it go
	}
	*bp = (*bp)[:0]
	batchBufs.Put(bp)
	return err
}
