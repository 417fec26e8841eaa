//go:build unix

package hbone

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/testutil"
)

// tcpPair returns the two ends of a loopback TCP connection; the small receive buffer
// on the far end makes a destination that fills quickly.
func tcpPair(t *testing.T, rcvbuf int) (near, far *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := ln.Accept(); ch <- res{c, err} }()
	n, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	near, far = n.(*net.TCPConn), r.c.(*net.TCPConn)
	if rcvbuf > 0 {
		far.SetReadBuffer(rcvbuf)
		near.SetWriteBuffer(rcvbuf)
	}
	t.Cleanup(func() { near.Close(); far.Close() })
	return near, far
}

// sendingHandler answers 200, writes as many pattern bytes as the authority's port says
// (seed 7), then ends its side.
func sendingHandler(ctx context.Context, req *Request, s *Stream) {
	s.Respond(200)
	n, _ := strconv.Atoi(req.Authority[len("10.0.0.1:"):])
	s.Write(pattern(7, n))
	s.CloseWrite()
	<-ctx.Done()
}

type sinkResult struct {
	done  chan error
	count atomic.Int64
}

func sendTo(t *testing.T, s *Stream, dst *net.TCPConn) *sinkResult {
	t.Helper()
	r := &sinkResult{done: make(chan error, 1)}
	var calls atomic.Int32
	err := s.SendTo(dst, func(n int) { r.count.Add(int64(n)) }, func(err error) {
		if calls.Add(1) > 1 {
			t.Errorf("done called more than once")
		}
		r.done <- err
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *sinkResult) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("SendTo never reported its end")
		return nil
	}
}

// The stream's bytes reach the socket in order and complete, both when the socket keeps
// up and when it is full for long stretches (the flusher's path); the end is reported
// once the last byte is in the socket, and the flow-control credit comes back so
// transfers far beyond the windows finish.
func TestSendToDeliversInOrder(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   int
		rcvbuf int
		slow   bool
	}{
		{"small", 1000, 0, false},
		{"beyond the windows", 12 << 20, 0, false},
		{"destination full", 12 << 20, 16 << 10, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, &Server{Handler: sendingHandler}, nil)
			cc := ts.dial(t, ClientOptions{})
			s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:" + strconv.Itoa(tc.size)})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			near, far := tcpPair(t, tc.rcvbuf)
			r := sendTo(t, s, near)
			got := make(chan []byte, 1)
			go func() {
				if tc.slow {
					time.Sleep(200 * time.Millisecond) // let the socket fill and the queue grow
				}
				b, _ := io.ReadAll(far)
				got <- b
			}()
			if err := r.wait(t); err != nil {
				t.Fatalf("done: %v, want nil", err)
			}
			near.CloseWrite()
			if b := <-got; !bytes.Equal(b, pattern(7, tc.size)) {
				t.Fatalf("socket got %d bytes, want %d identical", len(b), tc.size)
			}
			if n := r.count.Load(); n != int64(tc.size) {
				t.Errorf("counted %d bytes, want %d", n, tc.size)
			}
		})
	}
}

// A destination that does not read holds up only its own stream: with the default windows
// (the connection's four times a stream's) the stalled stream fills its own window and
// the connection's other streams go on. The reader goroutine never blocks on it.
func TestSendToStalledDestinationDoesNotStallOthers(t *testing.T) {
	ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		s.Respond(200)
		n, _ := strconv.Atoi(req.Authority[len("10.0.0.1:"):])
		s.Write(pattern(uint64(n), n)) // each stream its own bytes
		s.CloseWrite()
		<-ctx.Done()
	}}, nil)
	cc := ts.dial(t, ClientOptions{})
	stuck, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:6000000"})
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	near, _ := tcpPair(t, 16<<10) // never read
	sendTo(t, stuck, near)

	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:8000000"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	n2, far2 := tcpPair(t, 0)
	r := sendTo(t, s, n2)
	got := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(far2); got <- b }()
	if err := r.wait(t); err != nil {
		t.Fatalf("second stream: %v", err)
	}
	n2.CloseWrite()
	if b := <-got; !bytes.Equal(b, pattern(8000000, 8000000)) {
		t.Fatalf("second stream delivered %d bytes while the first was stuck, want its own 8000000", len(b))
	}
}

// Closing a stream whose flusher is blocked on a full destination ends delivery once the
// destination is closed too, with done called once.
func TestSendToCloseWhileFlushing(t *testing.T) {
	ts := startServer(t, &Server{Handler: sendingHandler}, nil)
	cc := ts.dial(t, ClientOptions{})
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:3000000"})
	if err != nil {
		t.Fatal(err)
	}
	near, _ := tcpPair(t, 16<<10) // never read: the flusher blocks
	r := sendTo(t, s, near)
	testutil.WaitFor(t, 5*time.Second, "the flusher to take over", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.sink.flushing
	})
	s.Close()
	near.Close()
	if err := r.wait(t); err == nil {
		t.Fatal("done: nil after the stream was closed mid-transfer")
	}
	nextStreamCompletes(t, cc)
}

// nextStreamCompletes checks that the connection still works: a new stream on it
// carries a whole transfer.
func nextStreamCompletes(t *testing.T, cc *ClientConn) {
	t.Helper()
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:100000"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n, err := io.Copy(io.Discard, s); err != nil || n != 100000 {
		t.Fatalf("next stream read %d, %v", n, err)
	}
}

// Data that arrived before SendTo goes out first.
func TestSendToAfterDataArrived(t *testing.T) {
	ts := startServer(t, &Server{Handler: sendingHandler}, nil)
	cc := ts.dial(t, ClientOptions{})
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:50000"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	testutil.WaitFor(t, 5*time.Second, "the data to arrive", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.recvEnd
	})
	near, far := tcpPair(t, 0)
	r := sendTo(t, s, near)
	if err := r.wait(t); err != nil {
		t.Fatal(err)
	}
	near.CloseWrite()
	if b, _ := io.ReadAll(far); !bytes.Equal(b, pattern(7, 50000)) {
		t.Fatalf("got %d bytes, want the 50000 sent before SendTo, in order", len(b))
	}
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, errSinkSet) {
		t.Errorf("Read on a stream sending to a sink: %v, want errSinkSet", err)
	}
}

// A reset from the peer ends delivery with the reset; closing the destination ends it
// with the write error and the rest is discarded without harming the connection.
func TestSendToErrors(t *testing.T) {
	t.Run("peer resets", func(t *testing.T) {
		ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
			s.Respond(200)
			s.Write([]byte("partial"))
			time.Sleep(50 * time.Millisecond)
			s.resetLocal(0x8) // CANCEL
		}}, nil)
		cc := ts.dial(t, ClientOptions{})
		s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:1"})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		near, _ := tcpPair(t, 0)
		if err := sendTo(t, s, near).wait(t); !isStreamErr(err, 0x8) {
			t.Fatalf("done: %v, want a CANCEL stream error", err)
		}
	})
	t.Run("destination closed", func(t *testing.T) {
		ts := startServer(t, &Server{Handler: sendingHandler}, nil)
		cc := ts.dial(t, ClientOptions{})
		s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:20000000"})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		near, far := tcpPair(t, 16<<10)
		far.SetLinger(0)
		far.Close() // the destination resets
		if err := sendTo(t, s, near).wait(t); err == nil {
			t.Fatal("done: nil, want the write error")
		}
		nextStreamCompletes(t, cc)
	})
	t.Run("local close", func(t *testing.T) {
		ts := startServer(t, &Server{Handler: sendingHandler}, nil)
		cc := ts.dial(t, ClientOptions{})
		s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:0"})
		if err != nil {
			t.Fatal(err)
		}
		// The handler's END_STREAM may or may not have arrived: both ends are fine,
		// but done must come exactly once.
		near, _ := tcpPair(t, 0)
		r := sendTo(t, s, near)
		s.Close()
		if err := r.wait(t); err != nil && !errors.Is(err, net.ErrClosed) {
			t.Fatalf("done: %v, want nil or net.ErrClosed", err)
		}
	})
}
