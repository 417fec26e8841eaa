package hbone

import (
	"errors"
	"fmt"
	"net/http"

	"golang.org/x/net/http2"
)

// StatusError is returned by Connect when the peer answers the CONNECT request
// with a status other than 200.
type StatusError struct {
	// Authority is the destination the request asked for.
	Authority string
	// Code is the HTTP status the peer sent.
	Code int
	// Header holds the response's header fields.
	Header http.Header
}

func (e *StatusError) Error() string {
	hint := ""
	switch e.Code {
	case http.StatusUnauthorized, http.StatusForbidden:
		hint = "; does an AuthorizationPolicy deny this source?"
	case http.StatusServiceUnavailable, http.StatusBadGateway:
		hint = "; is the destination listening?"
	}
	return fmt.Sprintf("hbone: CONNECT %s rejected with status %d %s%s",
		e.Authority, e.Code, http.StatusText(e.Code), hint)
}

// StreamError reports that a stream was reset with RST_STREAM.
type StreamError struct {
	// Code is the HTTP/2 error code of the reset.
	Code http2.ErrCode
	// Remote is true when the peer reset the stream, false when this side did
	// (because the peer broke the protocol on it).
	Remote bool
}

func (e *StreamError) Error() string {
	if e.Remote {
		return "hbone: stream reset by peer: " + e.Code.String()
	}
	return "hbone: stream reset: " + e.Code.String()
}

// Is makes a refused stream match ErrStreamRefused.
func (e *StreamError) Is(target error) bool {
	return target == ErrStreamRefused && e.Code == http2.ErrCodeRefusedStream
}

var (
	// ErrStreamRefused means the peer did not process the stream (RST_STREAM
	// REFUSED_STREAM, or above the last stream of its GOAWAY): the request is safe
	// to retry on another connection. Pool does so by itself.
	ErrStreamRefused = errors.New("hbone: stream refused by peer before processing; safe to retry")

	// ErrConnClosed is wrapped by errors of streams whose connection went away;
	// the cause is wrapped too.
	ErrConnClosed = errors.New("hbone: connection closed")

	// ErrConnFull is returned by ClientConn.Connect when the connection has as
	// many streams as it may open, or takes no new streams (GOAWAY received,
	// stream IDs exhausted).
	ErrConnFull = errors.New("hbone: connection cannot take a new stream")

	// ErrPoolClosed is returned by Pool.Connect after Pool.Close.
	ErrPoolClosed = errors.New("hbone: pool closed")

	errWriteAfterClose = errors.New("hbone: write after CloseWrite")
	errNotResponded    = errors.New("hbone: Write before Respond(200)")
	errRejected        = errors.New("hbone: stream was answered with a non-200 status")
	errGracefulClose   = errors.New("hbone: connection closed gracefully")
)

// connError is an error of the whole connection (RFC 9113 section 5.4.1): it is
// reported to the peer with GOAWAY and the connection is closed.
type connError struct {
	code   http2.ErrCode
	reason string
}

func (e connError) Error() string {
	return fmt.Sprintf("hbone: connection error %v: %s", e.code, e.reason)
}

func protocolErr(format string, args ...any) error {
	return connError{http2.ErrCodeProtocol, fmt.Sprintf(format, args...)}
}
