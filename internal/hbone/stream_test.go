package hbone

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/sluicemesh/sluice/internal/testutil"
)

// countingHandler reads the request body to EOF, checks its digest against the
// x-sum header, then answers with x-reply bytes of pattern(x-seed+1).
func countingHandler(t *testing.T) func(ctx context.Context, req *Request, s *Stream) {
	return func(ctx context.Context, req *Request, s *Stream) {
		if err := s.Respond(200); err != nil {
			t.Errorf("Respond: %v", err)
			return
		}
		seed, _ := strconv.ParseUint(req.Header.Get("X-Seed"), 10, 64)
		reply, _ := strconv.Atoi(req.Header.Get("X-Reply"))
		got, err := io.ReadAll(s)
		if err != nil {
			t.Errorf("stream %d: server read: %v", s.ID(), err)
			return
		}
		if fmt.Sprintf("%x", sum(got)) != req.Header.Get("X-Sum") {
			t.Errorf("stream %d: server got %d bytes with the wrong digest", s.ID(), len(got))
		}
		if _, err := s.Write(pattern(seed+1, reply)); err != nil {
			t.Errorf("stream %d: server write: %v", s.ID(), err)
			return
		}
		if err := s.CloseWrite(); err != nil {
			t.Errorf("stream %d: CloseWrite: %v", s.ID(), err)
		}
		<-ctx.Done()
	}
}

func exchange(t *testing.T, open func(Request) (*Stream, error), seed uint64, send, reply int) {
	t.Helper()
	body := pattern(seed, send)
	h := http.Header{}
	h.Set("X-Seed", strconv.FormatUint(seed, 10))
	h.Set("X-Reply", strconv.Itoa(reply))
	h.Set("X-Sum", fmt.Sprintf("%x", sum(body)))
	s, err := open(Request{Authority: "10.0.0.1:8080", Header: h})
	if err != nil {
		t.Errorf("connect: %v", err)
		return
	}
	defer s.Close()
	errc := make(chan error, 1)
	go func() {
		// Write in uneven pieces to exercise frame splitting.
		p := body
		for len(p) > 0 {
			n := min(len(p), 100+int(seed%7)*9000)
			if _, err := s.Write(p[:n]); err != nil {
				errc <- err
				return
			}
			p = p[n:]
		}
		errc <- s.CloseWrite()
	}()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Errorf("client read: %v", err)
		return
	}
	if werr := <-errc; werr != nil {
		t.Errorf("client write: %v", werr)
	}
	if want := pattern(seed+1, reply); !bytes.Equal(got, want) {
		t.Errorf("client got %d bytes, want %d (or content differs)", len(got), len(want))
	}
}

func TestManyConcurrentStreamsExactBytes(t *testing.T) {
	ts := startServer(t, &Server{Handler: countingHandler(t)}, nil)
	cc := ts.dial(t, ClientOptions{})
	var wg sync.WaitGroup
	for i := range 80 {
		wg.Go(func() {
			send := (i * 37_813) % 600_000
			reply := (i * 51_137) % 700_000
			exchange(t, func(r Request) (*Stream, error) { return cc.Connect(context.Background(), r) }, uint64(i), send, reply)
		})
	}
	wg.Wait()
	testutil.WaitFor(t, 2*time.Second, "streams to be forgotten", func() bool { return cc.ActiveStreams() == 0 })
}

func TestTransferBeyondWindows(t *testing.T) {
	for _, tc := range []struct {
		name         string
		streamWindow uint32
		connWindow   uint32
		size         int
		streams      int
	}{
		{"minimum windows", 1, 1, 4 << 20, 4},
		{"small windows", 96 << 10, 128 << 10, 8 << 20, 3},
		{"default windows", 0, 0, 24 << 20, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, &Server{
				Handler:      echoHandler,
				StreamWindow: tc.streamWindow,
				ConnWindow:   tc.connWindow,
			}, nil)
			cc := ts.dial(t, ClientOptions{StreamWindow: tc.streamWindow, ConnWindow: tc.connWindow})
			var wg sync.WaitGroup
			for i := range tc.streams {
				wg.Go(func() {
					s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
					if err != nil {
						t.Error(err)
						return
					}
					defer s.Close()
					data := pattern(uint64(i), tc.size)
					go func() {
						if _, err := s.Write(data); err != nil {
							t.Errorf("write: %v", err)
						}
						s.CloseWrite()
					}()
					got, err := io.ReadAll(s)
					if err != nil {
						t.Errorf("read: %v", err)
					}
					if !bytes.Equal(got, data) {
						t.Errorf("echo returned %d bytes, want %d identical", len(got), len(data))
					}
				})
			}
			wg.Wait()
		})
	}
}

// A Read blocked on one stream must not hold up the others: with the
// connection window shared, an unread stream still leaves room for the rest
// as long as its own window is smaller.
func TestSlowReaderDoesNotStallOtherStreams(t *testing.T) {
	ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		s.Respond(200)
		n, _ := strconv.Atoi(req.Authority[len("10.0.0.1:"):])
		s.Write(make([]byte, n))
		s.CloseWrite()
		<-ctx.Done()
	}}, nil)
	cc := ts.dial(t, ClientOptions{StreamWindow: 256 << 10, ConnWindow: 1 << 20})
	stuck, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:30000"})
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	// Never read stuck; another stream still completes.
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:4000000"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	n, err := io.Copy(io.Discard, s)
	if err != nil || n != 4000000 {
		t.Fatalf("read %d bytes, err %v; want 4000000", n, err)
	}
}

func TestHalfClose(t *testing.T) {
	t.Run("client closes first", func(t *testing.T) {
		serverDone := make(chan error, 1)
		ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
			s.Respond(200)
			serverDone <- func() error {
				got, err := io.ReadAll(s) // ends with the client's CloseWrite
				if err != nil || string(got) != "request" {
					return fmt.Errorf("server read %q, %v", got, err)
				}
				// Our direction still flows after the client's EOF.
				for i := range 3 {
					if _, err := fmt.Fprintf(s, "reply%d;", i); err != nil {
						return err
					}
					time.Sleep(10 * time.Millisecond)
				}
				return s.CloseWrite()
			}()
			<-ctx.Done()
		}}, nil)
		cc := ts.dial(t, ClientOptions{})
		s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		io.WriteString(s, "request")
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Write([]byte("x")); err == nil {
			t.Error("Write after CloseWrite succeeded")
		}
		got, err := io.ReadAll(s)
		if err != nil || string(got) != "reply0;reply1;reply2;" {
			t.Fatalf("client read %q, %v", got, err)
		}
		if err := <-serverDone; err != nil {
			t.Fatal(err)
		}
	})
	t.Run("server closes first", func(t *testing.T) {
		serverGot := make(chan string, 1)
		ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
			s.Respond(200)
			io.WriteString(s, "banner")
			s.CloseWrite()
			got, err := io.ReadAll(s)
			if err != nil {
				got = []byte(err.Error())
			}
			serverGot <- string(got)
		}}, nil)
		cc := ts.dial(t, ClientOptions{})
		s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		got, err := io.ReadAll(s)
		if err != nil || string(got) != "banner" {
			t.Fatalf("client read %q, %v", got, err)
		}
		// After the server's EOF we still send.
		for i := range 3 {
			fmt.Fprintf(s, "more%d;", i)
		}
		s.CloseWrite()
		if got := <-serverGot; got != "more0;more1;more2;" {
			t.Fatalf("server read %q", got)
		}
		testutil.WaitFor(t, time.Second, "stream to be forgotten", func() bool { return cc.ActiveStreams() == 0 })
	})
}

func TestResetPropagates(t *testing.T) {
	t.Run("client Close", func(t *testing.T) {
		serverErr := make(chan error, 2)
		ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
			s.Respond(200)
			_, err := io.Copy(io.Discard, s)
			serverErr <- err
			<-ctx.Done() // the reset cancels the handler's context
			_, err = s.Write([]byte("late"))
			serverErr <- err
		}}, nil)
		cc := ts.dial(t, ClientOptions{})
		s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(s, "some data")
		s.Close()
		if err := <-serverErr; !isStreamErr(err, 0x8) {
			t.Fatalf("server read error %v, want a CANCEL stream reset", err)
		}
		if err := <-serverErr; !isStreamErr(err, 0x8) {
			t.Fatalf("server write error %v, want a CANCEL stream reset", err)
		}
		if _, err := s.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Read after Close: %v, want net.ErrClosed", err)
		}
	})
	t.Run("server Close", func(t *testing.T) {
		ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
			s.Respond(200)
			io.WriteString(s, "partial")
			// Returning closes the stream with both directions open: reset.
		}}, nil)
		cc := ts.dial(t, ClientOptions{})
		s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		_, err = io.ReadAll(s)
		var se *StreamError
		if !errors.As(err, &se) || !se.Remote {
			t.Fatalf("client read error %v, want a stream reset by the peer", err)
		}
		testutil.WaitFor(t, time.Second, "reset stream to be forgotten", func() bool { return cc.ActiveStreams() == 0 })
		if _, err := s.Write([]byte("x")); err == nil {
			t.Fatal("Write on a reset stream succeeded")
		}
	})
}

func TestNon200IsAnError(t *testing.T) {
	ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		switch req.Authority {
		case "10.0.0.1:403":
			h := http.Header{}
			h.Set("Baggage", "k8s.namespace.name=default")
			s.RespondHeader(403, h)
		case "10.0.0.1:200":
			s.Respond(200)
			s.CloseWrite()
			io.Copy(io.Discard, s)
		default:
			// No answer: the server answers 503.
		}
	}}, nil)
	cc := ts.dial(t, ClientOptions{})
	_, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:403"})
	var se *StatusError
	if !errors.As(err, &se) || se.Code != 403 || se.Header.Get("Baggage") != "k8s.namespace.name=default" {
		t.Fatalf("got %v, want a StatusError 403 with the response header", err)
	}
	_, err = cc.Connect(context.Background(), Request{Authority: "10.0.0.1:1"})
	if !errors.As(err, &se) || se.Code != 503 {
		t.Fatalf("got %v, want a StatusError 503", err)
	}
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:200"})
	if err != nil {
		t.Fatalf("the connection still works after refusals: %v", err)
	}
	s.CloseWrite()
	if _, err := io.ReadAll(s); err != nil {
		t.Fatal(err)
	}
	s.Close()
	testutil.WaitFor(t, time.Second, "streams to be forgotten", func() bool { return cc.ActiveStreams() == 0 })
}

func TestRequestHeadersReachHandler(t *testing.T) {
	got := make(chan *Request, 1)
	ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		got <- req
		s.Respond(200)
	}}, nil)
	cc := ts.dial(t, ClientOptions{})
	h := http.Header{}
	h.Set("Forwarded", "for=10.0.0.9")
	h.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	h.Add("Baggage", "a=1")
	s, err := cc.Connect(context.Background(), Request{Authority: "[fd00::1]:8080", Header: h})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	req := <-got
	if req.Authority != "[fd00::1]:8080" || req.Header.Get("Forwarded") != "for=10.0.0.9" ||
		req.Header.Get("Traceparent") == "" || req.Header.Get("Baggage") != "a=1" {
		t.Fatalf("handler got %+v", req)
	}
	for _, bad := range []Request{
		{Authority: ""},
		{Authority: "a b"},
		{Authority: "1.2.3.4:5", Header: http.Header{"Connection": {"close"}}},
		{Authority: "1.2.3.4:5", Header: http.Header{"X": {"bad\nvalue"}}},
	} {
		if _, err := cc.Connect(context.Background(), bad); err == nil {
			t.Errorf("Connect(%+v) succeeded", bad)
		}
	}
	if n := cc.ActiveStreams(); n != 0 {
		t.Errorf("failed Connects left %d reserved streams", n)
	}
}

func TestDeadlines(t *testing.T) {
	ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		s.Respond(200)
		<-ctx.Done()
	}}, nil)
	cc := ts.dial(t, ClientOptions{})
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	_, err = s.Read(make([]byte, 10))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read: %v, want deadline exceeded", err)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read error %v is not a net.Error timeout", err)
	}
	if d := time.Since(start); d < 40*time.Millisecond || d > 2*time.Second {
		t.Fatalf("Read returned after %v", d)
	}
	// Extending the deadline while blocked takes effect.
	s.SetReadDeadline(time.Now().Add(time.Hour))
	readErr := make(chan error, 1)
	go func() { _, err := s.Read(make([]byte, 10)); readErr <- err }()
	time.Sleep(20 * time.Millisecond)
	s.SetReadDeadline(time.Now())
	if err := <-readErr; !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read after deadline moved: %v", err)
	}
	// The handler never reads, so the 4 MiB stream window fills and Write
	// blocks until the write deadline.
	s.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	n, err := s.Write(make([]byte, 5<<20))
	if !errors.Is(err, os.ErrDeadlineExceeded) || n != 4<<20 {
		t.Fatalf("Write = %d, %v; want 4 MiB and deadline exceeded", n, err)
	}
	s.SetDeadline(time.Time{})
}

func TestWriteToSkipsCopies(t *testing.T) {
	ts := startServer(t, &Server{Handler: echoHandler}, nil)
	cc := ts.dial(t, ClientOptions{})
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	data := pattern(7, 3<<20)
	go func() { s.Write(data); s.CloseWrite() }()
	var buf bytes.Buffer
	n, err := s.WriteTo(&buf)
	if err != nil || n != int64(len(data)) || !bytes.Equal(buf.Bytes(), data) {
		t.Fatalf("WriteTo = %d, %v", n, err)
	}
}

func TestConnectContextCancel(t *testing.T) {
	release := make(chan struct{})
	ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		select {
		case <-release:
		case <-ctx.Done(): // the client's reset
		}
	}}, nil)
	defer close(release)
	cc := ts.dial(t, ClientOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := cc.Connect(ctx, Request{Authority: "10.0.0.1:80"})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Connect: %v, want deadline exceeded", err)
	}
	testutil.WaitFor(t, time.Second, "abandoned stream to be forgotten", func() bool { return cc.ActiveStreams() == 0 })
}

func TestConnectionDeathFailsStreams(t *testing.T) {
	ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		s.Respond(200)
		<-ctx.Done()
	}}, nil)
	cc := ts.dial(t, ClientOptions{})
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ts.mu.Lock()
	ts.conns[0].Close()
	ts.mu.Unlock()
	_, err = s.Read(make([]byte, 1))
	if !errors.Is(err, ErrConnClosed) {
		t.Fatalf("Read: %v, want ErrConnClosed", err)
	}
	<-cc.Done()
	if _, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"}); !errors.Is(err, ErrConnClosed) {
		t.Fatalf("Connect on a dead connection: %v", err)
	}
}

func TestHandlerPanicResetsStream(t *testing.T) {
	ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		s.Respond(200)
		panic("boom")
	}}, nil)
	cc := ts.dial(t, ClientOptions{})
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := io.ReadAll(s); !isStreamErr(err, 0x2) {
		t.Fatalf("read: %v, want INTERNAL_ERROR reset", err)
	}
}

// Chunk types must fill their allocation size class exactly, or every chunk
// wastes the rest of it.
func TestChunkSizeClasses(t *testing.T) {
	if got := unsafe.Sizeof(smallChunk{}); got != 2048 {
		t.Errorf("smallChunk is %d bytes, want 2048", got)
	}
	if got := unsafe.Sizeof(bigChunk{}); got != 32768 {
		t.Errorf("bigChunk is %d bytes, want 32768", got)
	}
}
