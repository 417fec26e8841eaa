package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/hbone"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func TestPipeHalfCloseAndReset(t *testing.T) {
	app, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	sent, received := &counter{}, &counter{}
	done := make(chan error, 1)
	go func() { done <- pipe(proxyIn, proxyOut, sent, received) }()

	// The client finishes sending; the server sees EOF yet can still answer.
	app.Write([]byte("request"))
	app.CloseWrite()
	server.SetReadDeadline(time.Now().Add(3 * time.Second))
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "request" {
		t.Fatalf("server read %q, %v", got, err)
	}
	server.Write([]byte("response"))
	buf := make([]byte, 16)
	app.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := app.Read(buf)
	if err != nil || string(buf[:n]) != "response" {
		t.Fatalf("client read %q, %v after half-close", buf[:n], err)
	}

	// The server aborts: the client must see a reset, not a clean end.
	server.SetLinger(0)
	server.Close()
	_, err = app.Read(buf)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("client got %v after the server reset, want ECONNRESET", err)
	}
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("pipe did not finish")
	}
	if sent.n.Load() != 7 || received.n.Load() != 8 {
		t.Errorf("counted %d sent, %d received; want 7, 8", sent.n.Load(), received.n.Load())
	}
}

// An HBONE connection that dies under a stream, even with a clean FIN (its error then
// wraps io.EOF too), cut the transfer off: the application sees a reset, not an end.
func TestFinishResetsWhenTheTunnelDies(t *testing.T) {
	app, proxyIn := tcpPair(t)
	err := finish(proxyIn, fmt.Errorf("%w: peer closed the connection: %w", hbone.ErrConnClosed, io.EOF))
	if err == nil {
		t.Error("finish reported a cut-off transfer as clean")
	}
	app.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, rerr := app.Read(make([]byte, 1)); !errors.Is(rerr, syscall.ECONNRESET) {
		t.Fatalf("the application read %v, want ECONNRESET", rerr)
	}
	// Control: a clean end of the stream half-closes.
	app2, proxyIn2 := tcpPair(t)
	if err := finish(proxyIn2, io.EOF); err != nil {
		t.Fatal(err)
	}
	app2.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, rerr := app2.Read(make([]byte, 1)); rerr != io.EOF {
		t.Fatalf("after a clean end the application read %v, want EOF", rerr)
	}
}
