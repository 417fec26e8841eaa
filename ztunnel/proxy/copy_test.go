package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/hbone"
	"github.com/sluicemesh/sluice/internal/testutil"
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

// The detached copy hands over to a fresh goroutine idleHandoff after its first bytes
// moved (carryFromTCP): it does, and bytes sent in bursts with pauses between them, and a
// bulk transfer during which the hand-over fires again and again, all arrive in order;
// the ends of the streams still half-close, and finish runs once with both counts.
func TestPipeDetachedAcrossHandOvers(t *testing.T) {
	defer func(d time.Duration) { idleHandoff = d }(idleHandoff)
	idleHandoff = 2 * time.Millisecond
	app, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	sent, received := &counter{}, &counter{}
	done := make(chan error, 2)
	pipeDetached(proxyIn, proxyOut, sent, received, func(err error) { done <- err })

	server.SetReadDeadline(time.Now().Add(10 * time.Second))
	readN := func(n int) []byte {
		t.Helper()
		buf := make([]byte, n)
		if _, err := io.ReadFull(server, buf); err != nil {
			t.Fatalf("server read: %v", err)
		}
		return buf
	}
	first := []byte("first burst;")
	app.Write(first)
	if got := readN(len(first)); string(got) != string(first) {
		t.Fatalf("server read %q, want %q", got, first)
	}
	testutil.WaitFor(t, 3*time.Second, "a fresh goroutine to take over the quiet socket", func() bool {
		buf := make([]byte, 1<<20)
		return strings.Contains(string(buf[:runtime.Stack(buf, true)]), "proxy.resumeFromTCP")
	})

	bulk := make([]byte, 8<<20)
	for i := range bulk {
		bulk[i] = byte(i * 7)
	}
	go func() {
		for p := bulk; len(p) > 0; p = p[min(len(p), 1000):] {
			app.Write(p[:min(len(p), 1000)])
			if len(p)%(1<<20) < 1000 {
				time.Sleep(3 * time.Millisecond) // a pause longer than idleHandoff
			}
		}
		app.CloseWrite()
	}()
	got, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(got, bulk) {
		t.Fatalf("server read %d bytes (%v), want the %d sent, in order", len(got), err, len(bulk))
	}
	server.Write([]byte("answer"))
	server.CloseWrite()
	app.SetReadDeadline(time.Now().Add(3 * time.Second))
	if got, err := io.ReadAll(app); err != nil || string(got) != "answer" {
		t.Fatalf("client read %q, %v", got, err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("finish got %v after clean ends", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("finish was not called")
	}
	select {
	case <-done:
		t.Error("finish was called twice")
	case <-time.After(50 * time.Millisecond):
	}
	if want := uint64(len(first) + len(bulk)); sent.n.Load() != want || received.n.Load() != 6 {
		t.Errorf("counted %d sent, %d received; want %d, 6", sent.n.Load(), received.n.Load(), want)
	}
}
