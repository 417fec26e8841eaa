package hbone

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// Stream is one HBONE tunnel: an HTTP/2 CONNECT stream used as a bidirectional
// byte stream. It implements net.Conn, and CloseWrite for half-close.
//
// Read and WriteTo may be used by one goroutine while another uses Write and
// CloseWrite. Always Close a Stream when done with it: Close frees what it holds
// and returns its unread bytes to the connection's flow-control window.
type Stream struct {
	// detach ends a server stream's handler slot; detached means the Handler gave the
	// stream to its caller (Detach) and will not end it on return.
	detach   func()
	detached bool

	c  *conn
	id uint32

	// Server side: the request and the handler's context, cancelled when the
	// stream ends or its connection dies.
	req    *Request
	ctx    context.Context
	cancel context.CancelFunc

	mu sync.Mutex
	// Received data not yet read, as a list of pooled chunks; nil when none.
	head, tail  *chunk
	buffered    int
	recvWindow  int64 // credit the peer has on this stream
	recvUnacked int64 // read by the application, not yet returned
	recvEnd     bool  // the peer sent END_STREAM
	sendWindow  int64
	sentEnd     bool // we sent END_STREAM
	status      int  // response status, received (client) or sent (server); 0 before
	respHeader  http.Header
	reset       bool // RST_STREAM sent or received
	resetCode   http2.ErrCode
	resetRemote bool
	err         error // the connection failed
	closed      bool  // Close was called
	rdl, wdl    *deadline
	readWake    chan struct{} // cap 1: data, end, reset, response or deadline change
	writeWake   chan struct{} // cap 1: window, reset or deadline change
	sink        *sink         // set by SendTo: data goes there, not to Read
	reading     bool          // Read or WriteTo was called: SendTo may not be
}

var _ net.Conn = (*Stream)(nil)

func newStream(c *conn) *Stream {
	return &Stream{
		c:         c,
		readWake:  make(chan struct{}, 1),
		writeWake: make(chan struct{}, 1),
	}
}

func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// ID returns the HTTP/2 stream identifier.
func (s *Stream) ID() uint32 { return s.id }

// LocalAddr returns the local address of the connection carrying the stream.
func (s *Stream) LocalAddr() net.Addr { return s.c.nc.LocalAddr() }

// RemoteAddr returns the peer address of the connection carrying the stream.
func (s *Stream) RemoteAddr() net.Addr { return s.c.nc.RemoteAddr() }

// NetConn returns the connection carrying the stream, typically a *tls.Conn
// whose ConnectionState identifies the peer. Do not read from or write to it.
func (s *Stream) NetConn() net.Conn { return s.c.nc }

// ResponseHeader returns the header fields of the CONNECT response (client
// side), for example Istio's baggage. It is nil on the server side.
func (s *Stream) ResponseHeader() http.Header {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.respHeader
}

// --- receiving (called by the connection's reader goroutine) ---

// admitData checks an incoming DATA frame of n bytes (padding included)
// against the stream's state and window, and takes the window.
func (s *Stream) admitData(n int64) http2.ErrCode {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.c.role == roleClient && s.status == 0:
		return http2.ErrCodeProtocol // DATA before the response
	case s.recvEnd:
		return http2.ErrCodeStreamClosed
	case n > s.recvWindow:
		return http2.ErrCodeFlowControl
	}
	s.recvWindow -= n
	return http2.ErrCodeNo
}

// discardingLocked reports whether received data has nowhere to go.
func (s *Stream) discardingLocked() bool {
	return s.closed || s.reset || s.err != nil
}

// receive takes a DATA payload from the reader goroutine: b, held in ck when ck is
// not nil (ck.buf[:ck.w] is b), otherwise in the reader's scratch space.
func (s *Stream) receive(b []byte, ck *chunk) {
	s.mu.Lock()
	if s.sink != nil {
		s.mu.Unlock()
		s.sinkReceive(b, ck)
		return
	}
	if s.discardingLocked() {
		s.mu.Unlock()
		s.c.returnConnCredit(int64(len(b)))
		if ck != nil {
			putChunk(ck)
		}
		return
	}
	s.queueLocked(b, ck)
	s.mu.Unlock()
	wake(s.readWake)
}

// appendBytesLocked queues a copy of b, filling the last chunk before taking a new
// one. mu is held.
func (s *Stream) appendBytesLocked(b []byte) {
	s.buffered += len(b)
	for len(b) > 0 {
		t := s.tail
		if t == nil || t.w == len(t.buf) {
			t = getChunk(len(b))
			s.linkLocked(t)
		}
		k := copy(t.buf[t.w:], b)
		t.w += k
		b = b[k:]
	}
}

// appendChunkLocked queues ck's unread bytes, or copies them into the last chunk if
// they fit there, so many small frames do not each pin a big chunk. mu is held.
func (s *Stream) appendChunkLocked(ck *chunk) {
	n := ck.w - ck.r
	s.buffered += n
	if t := s.tail; t != nil && len(t.buf)-t.w >= n {
		t.w += copy(t.buf[t.w:], ck.buf[ck.r:ck.w])
		putChunk(ck)
	} else {
		s.linkLocked(ck)
	}
}

func (s *Stream) linkLocked(ck *chunk) {
	if s.tail == nil {
		s.head = ck
	} else {
		s.tail.next = ck
	}
	s.tail = ck
}

// dropLocked frees the unread data and returns how many bytes it was.
func (s *Stream) dropLocked() int {
	n := s.buffered
	for h := s.head; h != nil; {
		next := h.next
		putChunk(h)
		h = next
	}
	s.head, s.tail, s.buffered = nil, nil, 0
	return n
}

// onEndStream records the peer's END_STREAM.
func (s *Stream) onEndStream() {
	s.mu.Lock()
	if s.reset || s.err != nil {
		s.mu.Unlock()
		return
	}
	s.recvEnd = true
	done := s.sentEnd
	s.mu.Unlock()
	wake(s.readWake)
	s.sinkCheck()
	if done {
		s.c.removeStream(s)
	}
}

// onReset records the peer's RST_STREAM. Unread data survives a NO_ERROR reset
// (the peer finished and asks us to stop sending, RFC 9113 section 8.1); any
// other reset discards it, as a TCP reset would.
func (s *Stream) onReset(code http2.ErrCode) {
	s.mu.Lock()
	if s.reset || s.err != nil {
		s.mu.Unlock()
		return
	}
	s.reset, s.resetCode, s.resetRemote = true, code, true
	dropped := 0
	if code != http2.ErrCodeNo {
		dropped = s.dropLocked()
	}
	s.mu.Unlock()
	wake(s.readWake)
	wake(s.writeWake)
	s.sinkCheck()
	s.c.removeStream(s)
	s.c.returnConnCredit(int64(dropped))
}

// resetLocal resets the stream because the peer broke the protocol on it.
func (s *Stream) resetLocal(code http2.ErrCode) {
	s.mu.Lock()
	if s.reset || s.err != nil {
		s.mu.Unlock()
		return
	}
	s.reset, s.resetCode, s.resetRemote = true, code, false
	dropped := s.dropLocked()
	s.mu.Unlock()
	wake(s.readWake)
	wake(s.writeWake)
	s.sinkCheck()
	s.c.queueControl(ctrlFrame{kind: ctrlRST, stream: s.id, val: uint32(code)})
	s.c.removeStream(s)
	s.c.returnConnCredit(int64(dropped))
}

// connFailed fails the stream because its connection is gone (or, for err
// wrapping ErrStreamRefused, because the peer will not process it).
func (s *Stream) connFailed(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	wake(s.readWake)
	wake(s.writeWake)
	s.sinkCheck()
	if s.cancel != nil {
		s.cancel()
	}
}

// adjustSendWindow adds delta to the send window and reports whether it stays
// within the protocol's limit.
func (s *Stream) adjustSendWindow(delta int64) bool {
	s.mu.Lock()
	s.sendWindow += delta
	ok := s.sendWindow <= maxWindowSize
	s.mu.Unlock()
	if delta > 0 {
		wake(s.writeWake)
	}
	return ok
}

// consumedLocked accounts n bytes handed to the application and returns the
// stream WINDOW_UPDATE increment to send, if one is due.
func (s *Stream) consumedLocked(n int) uint32 {
	if s.recvEnd || s.reset || s.err != nil {
		return 0
	}
	s.recvUnacked += int64(n)
	if s.recvUnacked < int64(s.c.local.streamWindow)/4 {
		return 0
	}
	inc := s.recvUnacked
	s.recvUnacked = 0
	s.recvWindow += inc
	return uint32(inc)
}

func (s *Stream) consumed(n int) {
	s.mu.Lock()
	inc := s.consumedLocked(n)
	s.mu.Unlock()
	s.sendWindowUpdate(inc)
}

func (s *Stream) sendWindowUpdate(inc uint32) {
	if inc > 0 {
		s.c.queueControl(ctrlFrame{kind: ctrlWindowUpdate, stream: s.id, val: inc})
	}
}

// --- reading ---

// readErrLocked is the error Read returns once the unread data is exhausted,
// nil if more may come.
func (s *Stream) readErrLocked() error {
	switch {
	case s.recvEnd:
		return io.EOF
	case s.reset && s.resetRemote && s.resetCode == http2.ErrCodeNo:
		return io.EOF
	case s.reset:
		return &StreamError{Code: s.resetCode, Remote: s.resetRemote}
	case s.err != nil:
		return s.err
	}
	return nil
}

// Read reads data the peer sent. It returns io.EOF after the peer's END_STREAM
// (its CloseWrite), a *StreamError after a reset, and an error wrapping
// ErrConnClosed when the connection died.
func (s *Stream) Read(p []byte) (int, error) {
	for {
		s.mu.Lock()
		if s.sink != nil {
			s.mu.Unlock()
			return 0, errSinkSet
		}
		s.reading = true
		if s.closed {
			s.mu.Unlock()
			return 0, net.ErrClosed
		}
		rd := s.rdl.wait()
		if isClosed(rd) {
			s.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		}
		if s.head != nil {
			n := 0
			for n < len(p) && s.head != nil {
				h := s.head
				k := copy(p[n:], h.buf[h.r:h.w])
				h.r += k
				n += k
				if h.r == h.w {
					s.head = h.next
					if s.head == nil {
						s.tail = nil
					}
					putChunk(h)
				}
			}
			s.buffered -= n
			inc := s.consumedLocked(n)
			s.mu.Unlock()
			s.sendWindowUpdate(inc)
			s.c.returnConnCredit(int64(n))
			return n, nil
		}
		if err := s.readErrLocked(); err != nil {
			s.mu.Unlock()
			return 0, err
		}
		if len(p) == 0 {
			s.mu.Unlock()
			return 0, nil
		}
		s.mu.Unlock()
		select {
		case <-s.readWake:
		case <-rd:
		}
	}
}

// WriteTo writes the stream's data to w until EOF, handing w the received
// chunks themselves, so io.Copy from a Stream needs no buffer of its own.
func (s *Stream) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		ck, err := s.takeChunk()
		if err != nil {
			if err == io.EOF {
				err = nil
			}
			return total, err
		}
		n, err := w.Write(ck.buf[ck.r:ck.w])
		total += int64(n)
		putChunk(ck)
		if err != nil {
			return total, err
		}
	}
}

// takeChunk waits for data and detaches the first chunk.
func (s *Stream) takeChunk() (*chunk, error) {
	for {
		s.mu.Lock()
		if s.sink != nil {
			s.mu.Unlock()
			return nil, errSinkSet
		}
		s.reading = true
		if s.closed {
			s.mu.Unlock()
			return nil, net.ErrClosed
		}
		rd := s.rdl.wait()
		if isClosed(rd) {
			s.mu.Unlock()
			return nil, os.ErrDeadlineExceeded
		}
		if h := s.head; h != nil {
			s.head = h.next
			if s.head == nil {
				s.tail = nil
			}
			h.next = nil
			n := h.w - h.r
			s.buffered -= n
			inc := s.consumedLocked(n)
			s.mu.Unlock()
			s.sendWindowUpdate(inc)
			s.c.returnConnCredit(int64(n))
			return h, nil
		}
		if err := s.readErrLocked(); err != nil {
			s.mu.Unlock()
			return nil, err
		}
		s.mu.Unlock()
		select {
		case <-s.readWake:
		case <-rd:
		}
	}
}

// --- writing ---

// writeErrLocked is why Write cannot send now, nil if it can.
func (s *Stream) writeErrLocked() error {
	switch {
	case s.closed:
		return net.ErrClosed
	case s.reset:
		return &StreamError{Code: s.resetCode, Remote: s.resetRemote}
	case s.err != nil:
		return s.err
	case s.sentEnd:
		if s.c.role == roleServer && s.status != http.StatusOK {
			return errRejected
		}
		return errWriteAfterClose
	case s.c.role == roleServer && s.status == 0:
		return errNotResponded
	}
	return nil
}

// Write sends p as DATA frames, blocking while the peer's stream or connection
// window is exhausted.
func (s *Stream) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		m, err := s.awaitSendWindow(len(p))
		if err != nil {
			return n, err
		}
		c := s.c
		c.lockWrite()
		s.mu.Lock()
		err = s.writeErrLocked()
		s.mu.Unlock()
		if err == nil {
			if err = c.writeDataLocked(s.id, p[:m], false); err != nil {
				c.shutdown(err, false)
				err = c.connClosedErr()
			}
		}
		c.unlockWrite()
		if err != nil {
			// The stream died after taking the window: the connection's share
			// was never sent, so give it back.
			c.mu.Lock()
			c.sendWindow += int64(m)
			c.mu.Unlock()
			return n, err
		}
		n += m
		p = p[m:]
	}
	return n, nil
}

// awaitSendWindow waits until some of want bytes may be sent, takes that much
// of the stream and connection windows and returns it.
func (s *Stream) awaitSendWindow(want int) (int, error) {
	c := s.c
	for {
		s.mu.Lock()
		if err := s.writeErrLocked(); err != nil {
			s.mu.Unlock()
			return 0, err
		}
		wd := s.wdl.wait()
		if isClosed(wd) {
			s.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		}
		var connWait chan struct{}
		if s.sendWindow > 0 {
			c.mu.Lock()
			if c.err != nil {
				err := c.err
				c.mu.Unlock()
				s.mu.Unlock()
				return 0, wrapConnErr(err)
			}
			if c.sendWindow > 0 {
				m := min(int64(want), s.sendWindow, c.sendWindow, int64(c.peerMaxFrame), maxDataFrame)
				s.sendWindow -= m
				c.sendWindow -= m
				c.mu.Unlock()
				s.mu.Unlock()
				return int(m), nil
			}
			connWait = c.connWindowWaitLocked()
			c.mu.Unlock()
		}
		s.mu.Unlock()
		select {
		case <-s.writeWake:
		case <-connWait:
		case <-wd:
		}
	}
}

// CloseWrite ends our direction of the stream with an empty DATA frame carrying
// END_STREAM; the peer reads EOF and may keep sending. Calling it again does
// nothing.
func (s *Stream) CloseWrite() error {
	c := s.c
	c.lockWrite()
	s.mu.Lock()
	if s.sentEnd && !s.closed && !s.reset && s.err == nil {
		s.mu.Unlock()
		c.unlockWrite()
		return nil
	}
	if err := s.writeErrLocked(); err != nil {
		s.mu.Unlock()
		c.unlockWrite()
		return err
	}
	s.sentEnd = true
	done := s.recvEnd
	s.mu.Unlock()
	err := c.writeDataLocked(s.id, nil, true)
	if err != nil {
		c.shutdown(err, false)
		err = c.connClosedErr()
	}
	c.unlockWrite()
	if done {
		c.removeStream(s)
	}
	return err
}

// Close closes the stream. If either direction is still open it resets the
// stream (RST_STREAM CANCEL), which the peer reads as an error; otherwise it only
// frees the stream. Unread data is discarded.
func (s *Stream) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	dropped := s.dropLocked()
	open := !s.reset && s.err == nil && !(s.sentEnd && s.recvEnd)
	code := http2.ErrCodeCancel
	if s.sentEnd && s.c.role == roleServer && s.status != http.StatusOK {
		// We answered with an error and ended our side: the peer may stop
		// sending, nothing went wrong (RFC 9113 section 8.1).
		code = http2.ErrCodeNo
	}
	if open {
		s.reset, s.resetCode = true, code
	}
	rdl, wdl := s.rdl, s.wdl
	s.mu.Unlock()
	wake(s.readWake)
	wake(s.writeWake)
	s.sinkCheck()
	rdl.stop()
	wdl.stop()
	if open {
		s.c.queueControl(ctrlFrame{kind: ctrlRST, stream: s.id, val: uint32(code)})
	}
	s.c.removeStream(s)
	s.c.returnConnCredit(int64(dropped))
	if s.cancel != nil {
		s.cancel()
	}
	return nil
}

// SetDeadline sets the read and write deadlines.
func (s *Stream) SetDeadline(t time.Time) error {
	s.SetReadDeadline(t)
	s.SetWriteDeadline(t)
	return nil
}

// SetReadDeadline makes Read and WriteTo fail with os.ErrDeadlineExceeded once t
// has passed; the zero time removes the deadline.
func (s *Stream) SetReadDeadline(t time.Time) error {
	s.setDeadline(&s.rdl, t, s.readWake)
	return nil
}

// SetWriteDeadline makes Write fail with os.ErrDeadlineExceeded once t has
// passed while it waits for flow-control window; the zero time removes it.
func (s *Stream) SetWriteDeadline(t time.Time) error {
	s.setDeadline(&s.wdl, t, s.writeWake)
	return nil
}

func (s *Stream) setDeadline(dp **deadline, t time.Time, w chan struct{}) {
	s.mu.Lock()
	if *dp == nil {
		if t.IsZero() {
			s.mu.Unlock()
			return
		}
		*dp = new(deadline)
	}
	d := *dp
	s.mu.Unlock()
	d.set(t)
	wake(w)
}

func (c *conn) connClosedErr() error {
	return wrapConnErr(c.closeErr())
}

func wrapConnErr(err error) error {
	if err == nil {
		return ErrConnClosed
	}
	return &connClosedError{err}
}

// connClosedError wraps the reason a connection closed; it matches
// ErrConnClosed with errors.Is.
type connClosedError struct{ cause error }

func (e *connClosedError) Error() string   { return ErrConnClosed.Error() + ": " + e.cause.Error() }
func (e *connClosedError) Unwrap() []error { return []error{ErrConnClosed, e.cause} }
