package hbone

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Server serves HBONE CONNECT streams on accepted connections. The zero value
// with a Handler uses the settings of Istio's HBONE listeners.
type Server struct {
	// Handler is called in its own goroutine for each CONNECT request. It
	// decides the answer with s.Respond: 200 opens the tunnel, any other status
	// refuses it. The stream is closed when Handler returns (reset, if a
	// direction is still open), and ctx is cancelled when the stream ends or its
	// connection dies. A Handler that returns without responding answers 503.
	Handler func(ctx context.Context, req *Request, s *Stream)

	// MaxConcurrentStreams is advertised to clients; 0 means 100.
	MaxConcurrentStreams int
	// PingInterval is how often a PING checks that the client is alive; 0 means
	// 10 s, negative disables keepalive.
	PingInterval time.Duration
	// PingTimeout closes a connection whose PING went unanswered that long; 0
	// means 20 s.
	PingTimeout time.Duration
	// StreamWindow and ConnWindow are the receive windows of each stream and of
	// each connection; 0 means 4 MiB, and neither goes below 65535.
	StreamWindow, ConnWindow uint32
	// MaxFrameSize is the largest frame clients may send; 0 means 1 MiB.
	MaxFrameSize uint32
	// MaxHeaderListSize bounds request headers; 0 means 16 KiB. Larger requests
	// are answered 431.
	MaxHeaderListSize uint32
	// HandshakeTimeout bounds the wait for the client's preface and SETTINGS;
	// 0 means 10 s.
	HandshakeTimeout time.Duration
	// Logger receives connection-level events; nil discards them.
	Logger *slog.Logger
}

// ServeConn serves HTTP/2 on nc, an accepted (normally mutual TLS 1.3, ALPN
// h2) connection, until the connection closes. Cancelling ctx drains the
// connection gracefully: GOAWAY stops new streams, streams in progress run to
// their end, then the connection closes; close nc to stop at once. ServeConn
// returns after every handler of the connection has returned, nil when the
// connection ended cleanly.
func (srv *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	if srv.Handler == nil {
		nc.Close()
		return errors.New("hbone: Server.Handler is nil")
	}
	ls := localSettings{
		streamWindow:      clampWindow(srv.StreamWindow, defaultStreamWindow, initialWindowSize),
		connWindow:        clampWindow(srv.ConnWindow, defaultConnWindow, initialWindowSize),
		maxFrameSize:      clampFrame(srv.MaxFrameSize),
		maxHeaderListSize: orDefault(srv.MaxHeaderListSize, defaultMaxHeaderListSize),
		maxStreams:        uint32(max(orDefault(srv.MaxConcurrentStreams, defaultMaxConcurrentStreams), 1)),
	}
	c := newConn(nc, roleServer, ls, srv.Logger)
	sc := &serverConn{srv: srv, c: c, base: context.WithoutCancel(ctx)}
	c.onHeaders = sc.onHeaders

	if err := c.writePreface(); err != nil {
		nc.Close()
		return fmt.Errorf("hbone: send HTTP/2 settings: %w", err)
	}
	_ = nc.SetReadDeadline(time.Now().Add(orDefault(srv.HandshakeTimeout, defaultHandshakeTimeout)))
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c.br, preface[:]); err != nil {
		nc.Close()
		return fmt.Errorf("hbone: read HTTP/2 client preface: %w", err)
	}
	if !bytes.Equal(preface[:], []byte(http2.ClientPreface)) {
		nc.Close()
		return errors.New("hbone: client did not send the HTTP/2 preface; is it speaking HTTP/2 (ALPN h2)?")
	}
	c.start(pingTimes(srv.PingInterval, srv.PingTimeout))
	stop := context.AfterFunc(ctx, c.drain)
	defer stop()
	<-c.done
	sc.handlers.Wait()
	err := c.closeErr()
	if errors.Is(err, errGracefulClose) || errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

type serverConn struct {
	srv      *Server
	c        *conn
	base     context.Context
	handlers sync.WaitGroup
	running  int // handler goroutines; under c.mu
}

// onHeaders opens a stream for a new request, or handles trailers.
func (sc *serverConn) onHeaders(f *http2.MetaHeadersFrame) error {
	c := sc.c
	id := f.StreamID
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		c.mu.Unlock()
		if f.StreamEnded() {
			s.onEndStream()
		} else {
			s.resetLocal(http2.ErrCodeProtocol)
		}
		return nil
	}
	if id%2 == 0 {
		c.mu.Unlock()
		return protocolErr("client opened even stream %d", id)
	}
	if id <= c.lastPeerStream {
		c.mu.Unlock()
		return connError{http2.ErrCodeStreamClosed, fmt.Sprintf("HEADERS on closed stream %d", id)}
	}
	c.lastPeerStream = id
	// Handlers outlive their streams for a moment; a client that resets
	// streams as fast as it opens them must not pile up goroutines.
	if sc.running >= 4*int(c.local.maxStreams) {
		c.mu.Unlock()
		return connError{http2.ErrCodeEnhanceYourCalm, "too many handlers running; client keeps resetting streams"}
	}
	refuse := c.goAwaySent || c.err != nil || len(c.streams) >= int(c.local.maxStreams)
	c.mu.Unlock()
	if refuse {
		c.queueControl(ctrlFrame{kind: ctrlRST, stream: id, val: uint32(http2.ErrCodeRefusedStream)})
		return nil
	}

	if f.Truncated {
		sc.refuse(id, http.StatusRequestHeaderFieldsTooLarge, f.StreamEnded())
		return nil
	}
	method := f.PseudoValue("method")
	authority := f.PseudoValue("authority")
	if method == "" {
		c.streamError(id, http2.ErrCodeProtocol)
		return nil
	}
	if method != http.MethodConnect {
		sc.refuse(id, http.StatusMethodNotAllowed, f.StreamEnded())
		return nil
	}
	// A plain CONNECT carries no :scheme or :path (RFC 9113 section 8.5); we do
	// not offer extended CONNECT, so no :protocol either.
	if authority == "" || f.PseudoValue("scheme") != "" || f.PseudoValue("path") != "" || f.PseudoValue("protocol") != "" {
		c.streamError(id, http2.ErrCodeProtocol)
		return nil
	}
	regular := f.RegularFields()
	for _, hf := range regular {
		if connectionSpecific(hf.Name) && !(hf.Name == "te" && hf.Value == "trailers") {
			c.streamError(id, http2.ErrCodeProtocol)
			return nil
		}
	}

	s := newStream(c)
	s.id = id
	s.req = &Request{Authority: authority, Header: toHeader(regular)}
	s.recvWindow = int64(c.local.streamWindow)
	s.recvEnd = f.StreamEnded()
	s.ctx, s.cancel = context.WithCancel(sc.base)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		s.cancel()
		return nil
	}
	s.sendWindow = c.peerInitWindow
	c.streams[id] = s
	sc.running++
	c.mu.Unlock()
	sc.handlers.Add(1)
	go sc.runHandler(s)
	return nil
}

// refuse answers a request we will not serve with a bare status, and asks the
// client to stop sending its body if it has one.
func (sc *serverConn) refuse(id uint32, status int, peerEnded bool) {
	sc.c.queueControl(ctrlFrame{kind: ctrlStatus, stream: id, val: uint32(status)})
	if !peerEnded {
		sc.c.queueControl(ctrlFrame{kind: ctrlRST, stream: id, val: uint32(http2.ErrCodeNo)})
	}
}

func (sc *serverConn) runHandler(s *Stream) {
	end := func() {
		s.Close()
		sc.c.mu.Lock()
		sc.running--
		sc.c.mu.Unlock()
		sc.handlers.Done()
	}
	s.detach = end
	req := s.req
	defer func() {
		if r := recover(); r != nil {
			sc.c.log.Error("hbone handler panicked", "authority", req.Authority, "panic", r, "stack", string(debug.Stack()))
			s.resetLocal(http2.ErrCodeInternal)
		}
		s.mu.Lock()
		responded := s.status != 0
		detached := s.detached
		s.mu.Unlock()
		if !responded {
			_ = s.Respond(http.StatusServiceUnavailable)
		}
		if !detached {
			end()
		}
	}()
	sc.srv.Handler(s.ctx, req, s)
}

// Detach lets the Handler return while the stream carries on (server side): the stream
// is no longer closed when the Handler returns, and end must be called exactly once when
// the caller is done with it; it closes the stream and releases its handler slot (and
// ServeConn waits for it like for a running Handler). A proxy uses it to carry a
// long-lived stream on goroutines with small stacks instead of the Handler's. The stream
// forgets its Request (Request returns nil): its header map would otherwise be held for
// as long as the tunnel, by every held connection.
func (s *Stream) Detach() (end func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.detach == nil || s.detached {
		return func() {}
	}
	s.detached = true
	s.req = nil
	var once sync.Once
	d := s.detach
	return func() { once.Do(d) }
}

// Request returns the CONNECT request of a server-side stream; nil on the client
// side and after Detach.
func (s *Stream) Request() *Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.req
}

// Respond answers the CONNECT request (server side). 200 establishes the
// tunnel; any other status (403, 503, ...) refuses it and ends the stream.
func (s *Stream) Respond(status int) error { return s.RespondHeader(status, nil) }

// RespondHeader is Respond with extra response header fields.
func (s *Stream) RespondHeader(status int, h http.Header) error {
	c := s.c
	if c.role != roleServer {
		return errors.New("hbone: Respond on a client stream")
	}
	if status < 200 || status > 999 {
		return fmt.Errorf("hbone: invalid response status %d", status)
	}
	fields, err := headerFields([]hpack.HeaderField{{Name: ":status", Value: strconv.Itoa(status)}}, h)
	if err != nil {
		return err
	}
	end := status != http.StatusOK
	c.lockWrite()
	s.mu.Lock()
	switch {
	case s.status != 0:
		err = errors.New("hbone: Respond called twice")
	case s.closed:
		err = net.ErrClosed
	case s.reset:
		err = &StreamError{Code: s.resetCode, Remote: s.resetRemote}
	case s.err != nil:
		err = s.err
	}
	if err != nil {
		s.mu.Unlock()
		c.unlockWrite()
		return err
	}
	s.status = status
	s.sentEnd = end
	done := end && s.recvEnd
	s.mu.Unlock()
	if err = c.writeHeadersLocked(s.id, end, fields); err != nil {
		c.shutdown(fmt.Errorf("write: %w", err), false)
		err = c.connClosedErr()
	}
	c.unlockWrite()
	wake(s.writeWake)
	if done {
		c.removeStream(s)
	}
	return err
}
