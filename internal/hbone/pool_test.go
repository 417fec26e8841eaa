package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sluicemesh/sluice/internal/testutil"
)

// holdHandler answers 200 and keeps the stream until the client ends it.
func holdHandler(ctx context.Context, req *Request, s *Stream) {
	s.Respond(200)
	io.Copy(io.Discard, s)
	s.CloseWrite()
	<-ctx.Done()
}

func testKey(addr string) PoolKey {
	return PoolKey{
		Src:  "spiffe://cluster.local/ns/a/sa/client",
		Dst:  "spiffe://cluster.local/ns/b/sa/server",
		Addr: netip.MustParseAddrPort(addr),
	}
}

func countingDial(n *atomic.Int32, delay time.Duration) func(ctx context.Context, key PoolKey) (net.Conn, error) {
	return func(ctx context.Context, key PoolKey) (net.Conn, error) {
		n.Add(1)
		time.Sleep(delay)
		var d net.Dialer
		return d.DialContext(ctx, "tcp", key.Addr.String())
	}
}

func openMany(t *testing.T, p *Pool, key PoolKey, n int) []*Stream {
	t.Helper()
	streams := make([]*Stream, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			s, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
			if err != nil {
				t.Errorf("Connect %d: %v", i, err)
				return
			}
			streams[i] = s
		})
	}
	wg.Wait()
	return streams
}

func closeAll(streams []*Stream) {
	for _, s := range streams {
		if s != nil {
			s.Close()
		}
	}
}

func TestPoolBurstSharesOneDial(t *testing.T) {
	ts := startServer(t, &Server{Handler: holdHandler}, nil)
	var dials atomic.Int32
	p := &Pool{Dial: countingDial(&dials, 20*time.Millisecond)}
	defer p.Close()
	key := testKey(ts.addr())
	streams := openMany(t, p, key, 60)
	defer closeAll(streams)
	if n := dials.Load(); n != 1 {
		t.Fatalf("a burst of 60 Connects dialed %d times, want 1", n)
	}
	st := p.Stats()
	if st.Conns != 1 || st.Streams != 60 || st.Opened != 60 || st.Dials != 1 {
		t.Fatalf("stats %+v", st)
	}
	// A different key gets its own connection.
	other := key
	other.Src = "spiffe://cluster.local/ns/a/sa/other"
	s, err := p.Connect(context.Background(), other, Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if n := dials.Load(); n != 2 {
		t.Fatalf("another key dialed %d times in all, want 2", n)
	}
}

func TestPoolOpensSecondConnWhenFull(t *testing.T) {
	ts := startServer(t, &Server{Handler: holdHandler}, nil)
	var dials atomic.Int32
	p := &Pool{Dial: countingDial(&dials, 10*time.Millisecond), MaxStreamsPerConn: 10}
	defer p.Close()
	key := testKey(ts.addr())
	streams := openMany(t, p, key, 25)
	defer closeAll(streams)
	if n := dials.Load(); n != 3 {
		t.Fatalf("25 streams at 10 per connection dialed %d times, want 3", n)
	}
	if st := p.Stats(); st.Conns != 3 || st.Streams != 25 {
		t.Fatalf("stats %+v", st)
	}
	// Freed slots are reused before dialing again.
	streams[0].Close()
	streams[1].Close()
	testutil.WaitFor(t, time.Second, "closed streams to free their slots", func() bool { return p.Stats().Streams == 23 })
	more := openMany(t, p, key, 2)
	defer closeAll(more)
	if n := dials.Load(); n != 3 {
		t.Fatalf("dialed again (%d) although slots were free", n)
	}
}

func TestPoolHonoursServerConcurrencyLimit(t *testing.T) {
	ts := startServer(t, &Server{Handler: holdHandler, MaxConcurrentStreams: 3}, nil)
	var dials atomic.Int32
	p := &Pool{Dial: countingDial(&dials, 0)}
	defer p.Close()
	key := testKey(ts.addr())
	// Sequentially, the client learns the limit from the server's SETTINGS.
	var streams []*Stream
	defer func() { closeAll(streams) }()
	for range 7 {
		s, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
	}
	if st := p.Stats(); st.Conns != 3 {
		t.Fatalf("7 streams with a server limit of 3: %d connections, want 3", st.Conns)
	}
	// A burst races the SETTINGS: the server refuses the excess and the pool
	// retries them elsewhere, so every Connect still succeeds.
	burst := openMany(t, p, testKey(ts.addr()), 9)
	defer closeAll(burst)
}

func TestClientConnConcurrencyLimit(t *testing.T) {
	ts := startServer(t, &Server{Handler: holdHandler, MaxConcurrentStreams: 2}, nil)
	cc := ts.dial(t, ClientOptions{})
	s1, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s2, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	if cc.CanTakeNewStream() {
		t.Fatal("CanTakeNewStream with 2 of 2 streams open")
	}
	if _, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"}); !errors.Is(err, ErrConnFull) {
		t.Fatalf("third Connect: %v, want ErrConnFull", err)
	}
	s2.Close()
	testutil.WaitFor(t, time.Second, "a free slot", cc.CanTakeNewStream)
}

func TestPoolClosesIdleConnections(t *testing.T) {
	ts := startServer(t, &Server{Handler: holdHandler}, nil)
	var dials atomic.Int32
	p := &Pool{Dial: countingDial(&dials, 0), IdleTimeout: 100 * time.Millisecond}
	defer p.Close()
	key := testKey(ts.addr())
	s, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	// In use: not idle, however long.
	time.Sleep(250 * time.Millisecond)
	if st := p.Stats(); st.Conns != 1 {
		t.Fatalf("a connection with a stream was closed: %+v", st)
	}
	s.CloseWrite()
	io.Copy(io.Discard, s)
	s.Close()
	testutil.WaitFor(t, 2*time.Second, "the idle connection to close", func() bool { return p.Stats().Conns == 0 })
	s, err = p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if n := dials.Load(); n != 2 {
		t.Fatalf("dials = %d, want 2", n)
	}
}

func TestPoolDropsBrokenConnections(t *testing.T) {
	ts := startServer(t, &Server{Handler: holdHandler}, nil)
	var dials atomic.Int32
	p := &Pool{Dial: countingDial(&dials, 0)}
	defer p.Close()
	key := testKey(ts.addr())
	s, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	ts.mu.Lock()
	for _, c := range ts.conns {
		c.Close()
	}
	ts.mu.Unlock()
	if _, err := io.ReadAll(s); !errors.Is(err, ErrConnClosed) {
		t.Fatalf("read on a broken connection: %v", err)
	}
	s.Close()
	testutil.WaitFor(t, 2*time.Second, "the broken connection to leave the pool", func() bool { return p.Stats().Conns == 0 })
	s, err = p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatalf("Connect after the connection broke: %v", err)
	}
	s.Close()
}

func TestPoolDialErrorIsSharedAndReported(t *testing.T) {
	var dials atomic.Int32
	p := &Pool{Dial: func(ctx context.Context, key PoolKey) (net.Conn, error) {
		dials.Add(1)
		time.Sleep(30 * time.Millisecond)
		return nil, errors.New("connection refused")
	}}
	defer p.Close()
	key := testKey("10.0.0.2:15008")
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			_, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.2:80"})
			if err == nil || !strings.Contains(err.Error(), "connection refused") || !strings.Contains(err.Error(), "10.0.0.2:15008") {
				t.Errorf("Connect: %v", err)
			}
		})
	}
	wg.Wait()
	if n := dials.Load(); n != 1 {
		t.Fatalf("20 concurrent Connects dialed %d times, want 1", n)
	}
	if st := p.Stats(); st.DialErrors != 1 || st.Conns != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestPoolConnectRespectsContextDuringDial(t *testing.T) {
	release := make(chan struct{})
	p := &Pool{Dial: func(ctx context.Context, key PoolKey) (net.Conn, error) {
		<-release
		return nil, errors.New("gave up")
	}}
	defer p.Close()
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, err := p.Connect(ctx, testKey("10.0.0.3:15008"), Request{Authority: "10.0.0.3:80"}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Connect: %v, want deadline exceeded", err)
	}
}

func TestPoolClose(t *testing.T) {
	ts := startServer(t, &Server{Handler: holdHandler}, nil)
	p := &Pool{Dial: countingDial(new(atomic.Int32), 0)}
	key := testKey(ts.addr())
	s, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p.Close()
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, ErrConnClosed) {
		t.Fatalf("Read after Pool.Close: %v", err)
	}
	if _, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"}); !errors.Is(err, ErrPoolClosed) {
		t.Fatalf("Connect after Close: %v", err)
	}
}

func TestGracefulDrain(t *testing.T) {
	ts := startServer(t, &Server{Handler: echoHandler}, nil)
	cc := ts.dial(t, ClientOptions{})
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ts.drain()
	testutil.WaitFor(t, 2*time.Second, "GOAWAY to reach the client", func() bool { return !cc.CanTakeNewStream() })
	if _, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"}); !errors.Is(err, ErrConnFull) {
		t.Fatalf("Connect after GOAWAY: %v, want ErrConnFull", err)
	}
	// The stream in progress runs to its end.
	io.WriteString(s, "still here")
	buf := make([]byte, 10)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "still here" {
		t.Fatalf("echo after GOAWAY: %q, %v", buf, err)
	}
	s.CloseWrite()
	if _, err := io.ReadAll(s); err != nil {
		t.Fatal(err)
	}
	select {
	case <-cc.Done():
	case <-time.After(2 * time.Second):
		t.Fatal("the drained connection did not close after its last stream")
	}
	ts.close()
	if len(ts.errs) > 0 {
		t.Fatalf("ServeConn: %v", ts.errs)
	}
}

func TestPoolMovesOnAfterDrain(t *testing.T) {
	ts1 := startServer(t, &Server{Handler: echoHandler}, nil)
	ts2 := startServer(t, &Server{Handler: echoHandler}, nil)
	var dials atomic.Int32
	p := &Pool{Dial: func(ctx context.Context, key PoolKey) (net.Conn, error) {
		addr := ts1.addr()
		if dials.Add(1) > 1 {
			addr = ts2.addr() // the "restarted" server
		}
		return net.Dial("tcp", addr)
	}}
	defer p.Close()
	key := testKey("127.0.0.1:15008")
	s1, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	ts1.drain()
	testutil.WaitFor(t, 2*time.Second, "GOAWAY", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return !p.conns[key][0].CanTakeNewStream()
	})
	s2, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if n := dials.Load(); n != 2 {
		t.Fatalf("dials = %d, want 2", n)
	}
}

// A server that answers GOAWAY to a request it has not processed: the client
// sees a retryable error.
func TestGoAwayRefusesUnprocessedStreams(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		buf := make([]byte, len(http2.ClientPreface))
		io.ReadFull(nc, buf)
		fr := http2.NewFramer(nc, nc)
		fr.WriteSettings()
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			if _, ok := f.(*http2.HeadersFrame); ok {
				fr.WriteGoAway(0, http2.ErrCodeNo, nil)
			}
		}
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cc, err := NewClientConn(nc, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	_, err = cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if !errors.Is(err, ErrStreamRefused) {
		t.Fatalf("Connect: %v, want ErrStreamRefused", err)
	}
}

// silentPeer completes the HTTP/2 handshake as a server and then neither reads
// nor writes, like a peer whose host died.
func silentPeer(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop); ln.Close() })
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		http2.NewFramer(nc, nil).WriteSettings()
		<-stop
	}()
	return ln.Addr().String()
}

func TestKeepaliveDetectsDeadServer(t *testing.T) {
	nc, err := net.Dial("tcp", silentPeer(t))
	if err != nil {
		t.Fatal(err)
	}
	cc, err := NewClientConn(nc, ClientOptions{PingInterval: 50 * time.Millisecond, PingTimeout: 150 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	connectErr := make(chan error, 1)
	go func() {
		_, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
		connectErr <- err
	}()
	select {
	case <-cc.Done():
	case <-time.After(3 * time.Second):
		t.Fatal("keepalive did not notice the dead peer")
	}
	if err := cc.Err(); err == nil || !strings.Contains(err.Error(), "PING") {
		t.Fatalf("Err = %v, want a PING timeout", err)
	}
	if err := <-connectErr; !errors.Is(err, ErrConnClosed) {
		t.Fatalf("pending Connect: %v", err)
	}
}

// With a synchronous pipe the PING cannot even be written: the timeout still
// fires and closing the connection unblocks the stuck writer.
func TestKeepaliveWhenWritesBlock(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	go func() {
		// Handshake: read what the client sends for a moment, send SETTINGS,
		// then stop reading.
		go io.CopyN(io.Discard, b, int64(len(http2.ClientPreface)+100))
		http2.NewFramer(b, nil).WriteSettings()
	}()
	cc, err := NewClientConn(a, ClientOptions{PingInterval: 50 * time.Millisecond, PingTimeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-cc.Done():
	case <-time.After(3 * time.Second):
		t.Fatal("keepalive did not close a connection whose writes block")
	}
}

func TestServerKeepaliveDetectsDeadClient(t *testing.T) {
	srv := &Server{Handler: holdHandler, PingInterval: 50 * time.Millisecond, PingTimeout: 150 * time.Millisecond}
	ts := startServer(t, srv, nil)
	nc, err := net.Dial("tcp", ts.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	io.WriteString(nc, http2.ClientPreface)
	http2.NewFramer(nc, nil).WriteSettings()
	// ... and never read again.
	testutil.WaitFor(t, 3*time.Second, "the server to give up on the client", func() bool {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		return len(ts.errs) == 1 && strings.Contains(ts.errs[0].Error(), "PING")
	})
}

func TestKeepaliveKeepsHealthyConnection(t *testing.T) {
	ts := startServer(t, &Server{Handler: holdHandler, PingInterval: 20 * time.Millisecond, PingTimeout: 100 * time.Millisecond}, nil)
	cc := ts.dial(t, ClientOptions{PingInterval: 20 * time.Millisecond, PingTimeout: 100 * time.Millisecond})
	time.Sleep(400 * time.Millisecond)
	if err := cc.Err(); err != nil {
		t.Fatalf("healthy connection closed: %v", err)
	}
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}
