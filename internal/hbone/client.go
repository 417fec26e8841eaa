package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Request is an HBONE CONNECT request.
type Request struct {
	// Authority is the destination, "ip:port" (the request's :authority).
	Authority string
	// Header holds extra header fields, such as forwarded, baggage and
	// traceparent. Connection-specific fields (connection, keep-alive, ...) are
	// not allowed in HTTP/2.
	Header http.Header
}

// ClientOptions configure a ClientConn. The zero value gives ztunnel's settings.
type ClientOptions struct {
	// StreamWindow is the receive window of each stream; 0 means 4 MiB. It is
	// at least 65535, the window the peer may use before it has seen ours.
	StreamWindow uint32
	// ConnWindow is the receive window of the connection, shared by all its
	// streams; 0 means 4 MiB.
	ConnWindow uint32
	// MaxFrameSize is the largest frame the peer may send us; 0 means 1 MiB.
	MaxFrameSize uint32
	// MaxHeaderListSize bounds the response header list we accept; 0 means
	// 16 KiB.
	MaxHeaderListSize uint32
	// MaxConcurrentStreams is the most streams this side opens at once; 0 means
	// 100. The peer's SETTINGS_MAX_CONCURRENT_STREAMS lowers it.
	MaxConcurrentStreams int
	// PingInterval is how often a PING checks that the peer is alive; 0 means
	// 10 s, negative disables keepalive.
	PingInterval time.Duration
	// PingTimeout is how long a PING may go unanswered before the connection is
	// closed as dead; 0 means 20 s.
	PingTimeout time.Duration
	// IdleTimeout closes the connection after it had no stream for that long;
	// 0 means never.
	IdleTimeout time.Duration
	// HandshakeTimeout bounds the wait for the server's first SETTINGS; 0 means
	// 10 s.
	HandshakeTimeout time.Duration
	// Logger receives connection-level events; nil discards them.
	Logger *slog.Logger
}

func (o *ClientOptions) settings() localSettings {
	return localSettings{
		streamWindow:      clampWindow(o.StreamWindow, defaultStreamWindow, initialWindowSize),
		connWindow:        clampWindow(o.ConnWindow, defaultConnWindow, initialWindowSize),
		maxFrameSize:      clampFrame(o.MaxFrameSize),
		maxHeaderListSize: orDefault(o.MaxHeaderListSize, defaultMaxHeaderListSize),
	}
}

// clampWindow keeps windows at or above lo: a window below the RFC default
// could be overrun, legitimately, by a peer that has not yet seen our SETTINGS.
func clampWindow(v, def, lo uint32) uint32 {
	if v == 0 {
		v = def
	}
	return min(max(v, lo), maxWindowSize)
}

func clampFrame(v uint32) uint32 {
	if v == 0 {
		v = defaultMaxFrameSize
	}
	return min(max(v, minMaxFrameSize), maxMaxFrameSize)
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

func pingTimes(interval, timeout time.Duration) (time.Duration, time.Duration) {
	if interval < 0 {
		return 0, 0
	}
	return orDefault(interval, defaultPingInterval), orDefault(timeout, defaultPingTimeout)
}

// ClientConn is the client side of one HTTP/2 connection, carrying many
// streams. It is safe for concurrent use.
type ClientConn struct {
	c          *conn
	maxStreams int
}

// NewClientConn starts HTTP/2 on nc, an established (normally mutual TLS 1.3,
// ALPN h2) connection to an HBONE server. It sends the preface and returns
// without waiting for the server's settings.
func NewClientConn(nc net.Conn, opts ClientOptions) (*ClientConn, error) {
	return newClientConn(nc, opts, nil)
}

func newClientConn(nc net.Conn, opts ClientOptions, onClosed func()) (*ClientConn, error) {
	c := newConn(nc, roleClient, opts.settings(), opts.Logger)
	cc := &ClientConn{c: c, maxStreams: orDefault(opts.MaxConcurrentStreams, defaultMaxConcurrentStreams)}
	c.onHeaders = cc.onHeaders
	c.onClosed = onClosed
	c.idleTimeout = opts.IdleTimeout
	if err := c.writePreface(); err != nil {
		nc.Close()
		return nil, fmt.Errorf("hbone: send HTTP/2 preface: %w", err)
	}
	_ = nc.SetReadDeadline(time.Now().Add(orDefault(opts.HandshakeTimeout, defaultHandshakeTimeout)))
	c.mu.Lock()
	c.noteIdleLocked()
	c.mu.Unlock()
	c.start(pingTimes(opts.PingInterval, opts.PingTimeout))
	return cc, nil
}

// Connect opens a stream to req.Authority and waits for the server's answer.
// It returns a *StatusError for a status other than 200, ErrConnFull when the
// connection cannot take another stream, and an error matching
// ErrStreamRefused when the server did not process the request (retry it on
// another connection). Cancelling ctx abandons the wait and resets the stream;
// it does not affect the stream once Connect has returned.
func (cc *ClientConn) Connect(ctx context.Context, req Request) (*Stream, error) {
	if !cc.reserve() {
		if err := cc.c.closeErr(); err != nil {
			return nil, wrapConnErr(err)
		}
		return nil, ErrConnFull
	}
	return cc.connectReserved(ctx, req)
}

// CanTakeNewStream reports whether Connect would open a stream now.
func (cc *ClientConn) CanTakeNewStream() bool {
	c := cc.c
	c.mu.Lock()
	defer c.mu.Unlock()
	return cc.canTakeLocked()
}

func (cc *ClientConn) canTakeLocked() bool {
	c := cc.c
	limit := min(cc.maxStreams, int(min(c.peerMaxStreams, 1<<30)))
	return c.err == nil && !c.goAwayRecv && !c.goAwaySent && c.nextStreamID <= maxStreamID &&
		len(c.streams)+c.reserved < limit
}

// reserve takes a stream slot for a Connect about to happen.
func (cc *ClientConn) reserve() bool {
	c := cc.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if !cc.canTakeLocked() {
		return false
	}
	c.reserved++
	return true
}

func (cc *ClientConn) unreserve() {
	c := cc.c
	c.mu.Lock()
	if c.reserved > 0 {
		c.reserved--
		if len(c.streams) == 0 && c.reserved == 0 {
			c.noteIdleLocked()
		}
	}
	c.mu.Unlock()
}

// ActiveStreams returns the number of open streams, counting Connects in
// progress.
func (cc *ClientConn) ActiveStreams() int {
	c := cc.c
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.streams) + c.reserved
}

// Close sends GOAWAY and closes the connection; its open streams fail.
func (cc *ClientConn) Close() error {
	cc.c.goAwayClose(http2.ErrCodeNo, errClosedByUser)
	<-cc.c.done
	return nil
}

var errClosedByUser = errors.New("hbone: connection closed by Close")

// Done is closed when the connection has closed, for whatever reason.
func (cc *ClientConn) Done() <-chan struct{} { return cc.c.done }

// Err returns why the connection closed, nil while it is open.
func (cc *ClientConn) Err() error { return cc.c.closeErr() }

func (cc *ClientConn) connectReserved(ctx context.Context, req Request) (*Stream, error) {
	c := cc.c
	fields, size, err := req.fields()
	if err != nil {
		cc.unreserve()
		return nil, err
	}
	s := newStream(c)
	c.lockWrite()
	c.mu.Lock()
	switch {
	case c.err != nil:
		err = fmt.Errorf("%w: %w", ErrStreamRefused, wrapConnErr(c.err))
	case c.goAwayRecv || c.goAwaySent || c.nextStreamID > maxStreamID:
		err = fmt.Errorf("%w: connection is shutting down", ErrStreamRefused)
	case size > c.peerMaxHeaders:
		err = fmt.Errorf("hbone: request header list of %d bytes exceeds the peer's limit of %d", size, c.peerMaxHeaders)
	}
	if err != nil {
		c.mu.Unlock()
		c.wmu.Unlock()
		cc.unreserve()
		return nil, err
	}
	s.id = c.nextStreamID
	c.nextStreamID += 2
	s.sendWindow = c.peerInitWindow
	s.recvWindow = int64(c.local.streamWindow)
	c.streams[s.id] = s
	c.reserved--
	c.mu.Unlock()
	if err := c.writeHeadersLocked(s.id, false, fields); err != nil {
		c.shutdown(fmt.Errorf("write: %w", err), false)
	}
	c.unlockWrite()

	for {
		s.mu.Lock()
		status, hdr := s.status, s.respHeader
		var err error
		if status == 0 {
			err = s.readErrLocked()
		}
		s.mu.Unlock()
		if status == http.StatusOK {
			return s, nil
		}
		if status != 0 {
			s.Close()
			return nil, &StatusError{Authority: req.Authority, Code: status, Header: hdr}
		}
		if err != nil {
			s.Close()
			if err == io.EOF {
				err = fmt.Errorf("hbone: stream ended without a response")
			}
			return nil, err
		}
		select {
		case <-s.readWake:
		case <-ctx.Done():
			s.Close()
			return nil, ctx.Err()
		}
	}
}

// fields returns the request's header fields and their header list size
// (RFC 9113 section 6.5.2).
func (req *Request) fields() ([]hpack.HeaderField, uint32, error) {
	if req.Authority == "" || !httpguts.ValidHostHeader(req.Authority) {
		return nil, 0, fmt.Errorf("hbone: invalid CONNECT authority %q; want ip:port", req.Authority)
	}
	fields := make([]hpack.HeaderField, 0, 2+len(req.Header))
	fields = append(fields,
		hpack.HeaderField{Name: ":method", Value: http.MethodConnect},
		hpack.HeaderField{Name: ":authority", Value: req.Authority})
	hf, err := headerFields(fields, req.Header)
	if err != nil {
		return nil, 0, err
	}
	var size uint32
	for _, f := range hf {
		size += f.Size()
	}
	return hf, size, nil
}

// headerFields appends h to fields as lower-case HTTP/2 fields.
func headerFields(fields []hpack.HeaderField, h http.Header) ([]hpack.HeaderField, error) {
	for k, vs := range h {
		if !httpguts.ValidHeaderFieldName(k) {
			return nil, fmt.Errorf("hbone: invalid header field name %q", k)
		}
		name := strings.ToLower(k)
		if connectionSpecific(name) {
			return nil, fmt.Errorf("hbone: header field %q is not allowed in HTTP/2", k)
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				return nil, fmt.Errorf("hbone: invalid value for header field %q", k)
			}
			fields = append(fields, hpack.HeaderField{Name: name, Value: v})
		}
	}
	return fields, nil
}

// connectionSpecific reports fields RFC 9113 section 8.2.2 forbids.
func connectionSpecific(name string) bool {
	switch name {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "host":
		return true
	}
	return false
}

// toHeader converts regular header fields to an http.Header; nil if none.
func toHeader(fields []hpack.HeaderField) http.Header {
	if len(fields) == 0 {
		return nil
	}
	h := make(http.Header, len(fields))
	for _, f := range fields {
		k := http.CanonicalHeaderKey(f.Name)
		h[k] = append(h[k], f.Value)
	}
	return h
}

// onHeaders handles a response (or trailers) on one of our streams.
func (cc *ClientConn) onHeaders(f *http2.MetaHeadersFrame) error {
	c := cc.c
	s := c.lookup(f.StreamID)
	if s == nil {
		if c.isIdleID(f.StreamID) {
			return protocolErr("HEADERS on stream %d, which we never opened", f.StreamID)
		}
		return nil // a stream we reset
	}
	if f.Truncated {
		s.resetLocal(http2.ErrCodeProtocol)
		return nil
	}
	s.mu.Lock()
	if s.status != 0 {
		// Trailers: they must end the stream; their fields are of no use here.
		s.mu.Unlock()
		if !f.StreamEnded() {
			s.resetLocal(http2.ErrCodeProtocol)
		} else {
			s.onEndStream()
		}
		return nil
	}
	status, err := strconv.Atoi(f.PseudoValue("status"))
	if err != nil || status < 100 || status > 999 || status == http.StatusSwitchingProtocols ||
		(status < 200 && f.StreamEnded()) {
		s.mu.Unlock()
		s.resetLocal(http2.ErrCodeProtocol)
		return nil
	}
	if status < 200 {
		s.mu.Unlock() // informational: wait for the final response
		return nil
	}
	s.status = status
	s.respHeader = toHeader(f.RegularFields())
	s.mu.Unlock()
	wake(s.readWake)
	if f.StreamEnded() {
		s.onEndStream()
	}
	return nil
}
