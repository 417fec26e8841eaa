package hbone

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rawClient speaks HTTP/2 frame by frame to a Server, to send what a proper
// client never would.
type rawClient struct {
	t      *testing.T
	nc     net.Conn
	fr     *http2.Framer
	enc    *hpack.Encoder
	hbuf   bytes.Buffer
	frames chan frameSummary
}

// frameSummary is what the tests look at in a frame the server sent.
type frameSummary struct {
	typ    http2.FrameType
	stream uint32
	flags  http2.Flags
	code   http2.ErrCode // RST_STREAM, GOAWAY
	last   uint32        // GOAWAY
	status string        // HEADERS
	data   int           // DATA length
	err    error         // read error (connection gone)
}

func (f frameSummary) String() string {
	switch f.typ {
	case http2.FrameGoAway:
		return fmt.Sprintf("GOAWAY %v last=%d", f.code, f.last)
	case http2.FrameRSTStream:
		return fmt.Sprintf("RST_STREAM %d %v", f.stream, f.code)
	case http2.FrameHeaders:
		return fmt.Sprintf("HEADERS %d :status=%s", f.stream, f.status)
	}
	if f.err != nil {
		return "read error: " + f.err.Error()
	}
	return fmt.Sprintf("%v stream=%d", f.typ, f.stream)
}

// newRawClient connects to srv. With handshake it sends the preface and an
// empty SETTINGS frame.
func newRawClient(t *testing.T, srv *Server, handshake bool) *rawClient {
	ts := startServer(t, srv, nil)
	nc, err := net.Dial("tcp", ts.addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	rc := &rawClient{t: t, nc: nc, frames: make(chan frameSummary, 1024)}
	rc.fr = http2.NewFramer(nc, nil)
	rc.fr.AllowIllegalWrites = true
	rc.enc = hpack.NewEncoder(&rc.hbuf)
	rfr := http2.NewFramer(nil, nc)
	rfr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	go rc.readLoop(rfr)
	if handshake {
		io.WriteString(nc, http2.ClientPreface)
		rc.fr.WriteSettings()
	}
	return rc
}

func (rc *rawClient) readLoop(fr *http2.Framer) {
	defer close(rc.frames)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			rc.frames <- frameSummary{err: err}
			return
		}
		fs := frameSummary{typ: f.Header().Type, stream: f.Header().StreamID, flags: f.Header().Flags}
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			fs.code = f.ErrCode
		case *http2.GoAwayFrame:
			fs.code, fs.last = f.ErrCode, f.LastStreamID
		case *http2.MetaHeadersFrame:
			fs.status = f.PseudoValue("status")
		case *http2.DataFrame:
			fs.data = len(f.Data())
		}
		rc.frames <- fs
	}
}

// expect waits for a frame matching want, failing on connection loss or after
// a timeout.
func (rc *rawClient) expect(what string, want func(frameSummary) bool) frameSummary {
	rc.t.Helper()
	timeout := time.After(5 * time.Second)
	var seen []string
	for {
		select {
		case f, ok := <-rc.frames:
			if !ok || f.err != nil {
				rc.t.Fatalf("connection ended before %s; saw %v", what, seen)
			}
			if want(f) {
				return f
			}
			seen = append(seen, f.String())
		case <-timeout:
			rc.t.Fatalf("no %s within 5s; saw %v", what, seen)
		}
	}
}

func (rc *rawClient) expectGoAway(code http2.ErrCode) {
	rc.t.Helper()
	rc.expect("GOAWAY "+code.String(), func(f frameSummary) bool {
		return f.typ == http2.FrameGoAway && f.code == code
	})
	// ... and the connection closes.
	timeout := time.After(5 * time.Second)
	for {
		select {
		case f, ok := <-rc.frames:
			if !ok || f.err != nil {
				return
			}
		case <-timeout:
			rc.t.Fatal("connection still open after GOAWAY")
		}
	}
}

func (rc *rawClient) expectRST(stream uint32, code http2.ErrCode) {
	rc.t.Helper()
	rc.expect(fmt.Sprintf("RST_STREAM %d %v", stream, code), func(f frameSummary) bool {
		return f.typ == http2.FrameRSTStream && f.stream == stream && f.code == code
	})
}

func (rc *rawClient) expectStatus(stream uint32, status string) {
	rc.t.Helper()
	rc.expect("HEADERS :status "+status, func(f frameSummary) bool {
		return f.typ == http2.FrameHeaders && f.stream == stream && f.status == status
	})
}

// alive checks the connection still answers PING.
func (rc *rawClient) alive() {
	rc.t.Helper()
	rc.fr.WritePing(false, [8]byte{'a', 'l', 'i', 'v', 'e'})
	rc.expect("PING ACK", func(f frameSummary) bool { return f.typ == http2.FramePing && f.flags.Has(http2.FlagPingAck) })
}

func (rc *rawClient) block(fields ...string) []byte {
	rc.hbuf.Reset()
	for i := 0; i < len(fields); i += 2 {
		rc.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return bytes.Clone(rc.hbuf.Bytes())
}

func (rc *rawClient) headers(stream uint32, endStream bool, fields ...string) {
	rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: rc.block(fields...), EndStream: endStream, EndHeaders: true})
}

func (rc *rawClient) connect(stream uint32) {
	rc.headers(stream, false, ":method", "CONNECT", ":authority", "10.0.0.1:80")
}

func waitHandler(ctx context.Context, req *Request, s *Stream) {
	s.Respond(200)
	<-ctx.Done()
}

func TestProtocolErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		srv    Server
		noPref bool
		run    func(rc *rawClient)
	}{
		{name: "DATA on stream 0", run: func(rc *rawClient) {
			rc.fr.WriteData(0, false, []byte("x"))
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "DATA on idle stream", run: func(rc *rawClient) {
			rc.fr.WriteData(5, false, []byte("x"))
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "HEADERS on even stream", run: func(rc *rawClient) {
			rc.connect(2)
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "stream ID going backwards", run: func(rc *rawClient) {
			rc.connect(5)
			rc.expectStatus(5, "200")
			rc.connect(3)
			rc.expectGoAway(http2.ErrCodeStreamClosed)
		}},
		{name: "first frame not SETTINGS", noPref: true, run: func(rc *rawClient) {
			io.WriteString(rc.nc, http2.ClientPreface)
			rc.fr.WritePing(false, [8]byte{})
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "not HTTP/2", noPref: true, run: func(rc *rawClient) {
			io.WriteString(rc.nc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			rc.expect("connection close", func(f frameSummary) bool { return false && f.err == nil })
		}},
		{name: "connection window overflow", run: func(rc *rawClient) {
			rc.fr.WriteWindowUpdate(0, 1<<31-1)
			rc.expectGoAway(http2.ErrCodeFlowControl)
		}},
		{name: "stream window overflow", run: func(rc *rawClient) {
			rc.connect(1)
			rc.expectStatus(1, "200")
			rc.fr.WriteWindowUpdate(1, 1<<31-1)
			rc.expectRST(1, http2.ErrCodeFlowControl)
			rc.alive()
		}},
		{name: "WINDOW_UPDATE of zero", run: func(rc *rawClient) {
			rc.fr.WriteWindowUpdate(0, 0)
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "stream flow control violated", srv: Server{StreamWindow: 65535}, run: func(rc *rawClient) {
			rc.connect(1)
			rc.fr.WriteData(1, false, make([]byte, 65536))
			rc.expectRST(1, http2.ErrCodeFlowControl)
			rc.alive()
		}},
		{name: "connection flow control violated", srv: Server{ConnWindow: 4 << 20}, run: func(rc *rawClient) {
			// Two streams, each within its 4 MiB window, together beyond the
			// connection's 4 MiB.
			rc.connect(1)
			rc.connect(3)
			chunk := make([]byte, 16384)
			for sent := 0; sent < 4<<20+65535+16384; sent += len(chunk) {
				rc.fr.WriteData(1+uint32(sent/(3<<20))*2, false, chunk)
			}
			rc.expectGoAway(http2.ErrCodeFlowControl)
		}},
		{name: "oversize header list answered 431", run: func(rc *rawClient) {
			v := strings.Repeat("a", 4<<10)
			rc.headers(1, false, ":method", "CONNECT", ":authority", "10.0.0.1:80",
				"x-a", v, "x-b", v, "x-c", v, "x-d", v, "x-e", v)
			rc.expectStatus(1, "431")
			rc.alive()
		}},
		{name: "header value longer than the whole limit", run: func(rc *rawClient) {
			rc.headers(1, false, ":method", "CONNECT", ":authority", "10.0.0.1:80", "x-big", strings.Repeat("a", 20<<10))
			rc.expectGoAway(http2.ErrCodeCompression)
		}},
		{name: "header block far beyond the limit", run: func(rc *rawClient) {
			rc.headers(1, false, ":method", "CONNECT", ":authority", "10.0.0.1:80", "x-big", strings.Repeat("a", 100<<10))
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "CONTINUATION flood", run: func(rc *rawClient) {
			rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.block(":method", "CONNECT"), EndHeaders: false})
			frag := rc.block("x-filler", strings.Repeat("b", 4000))
			for range 20 {
				rc.fr.WriteContinuation(1, false, frag)
			}
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "CONTINUATION without HEADERS", run: func(rc *rawClient) {
			rc.fr.WriteContinuation(1, true, rc.block(":method", "CONNECT"))
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "HEADERS interrupted by DATA", run: func(rc *rawClient) {
			rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.block(":method", "CONNECT"), EndHeaders: false})
			rc.fr.WriteData(1, false, []byte("x"))
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "PUSH_PROMISE from a client", run: func(rc *rawClient) {
			rc.connect(1)
			rc.fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: rc.block(":method", "GET"), EndHeaders: true})
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "GET is not allowed", run: func(rc *rawClient) {
			rc.headers(1, true, ":method", "GET", ":scheme", "https", ":path", "/", ":authority", "x")
			rc.expectStatus(1, "405")
			rc.alive()
		}},
		{name: "CONNECT with :path", run: func(rc *rawClient) {
			rc.headers(1, false, ":method", "CONNECT", ":authority", "10.0.0.1:80", ":path", "/")
			rc.expectRST(1, http2.ErrCodeProtocol)
			rc.alive()
		}},
		{name: "CONNECT without :authority", run: func(rc *rawClient) {
			rc.headers(1, false, ":method", "CONNECT")
			rc.expectRST(1, http2.ErrCodeProtocol)
			rc.alive()
		}},
		{name: "extended CONNECT not offered", run: func(rc *rawClient) {
			rc.headers(1, false, ":method", "CONNECT", ":authority", "10.0.0.1:80", ":protocol", "websocket", ":scheme", "https", ":path", "/")
			rc.expectRST(1, http2.ErrCodeProtocol)
		}},
		{name: "connection-specific header", run: func(rc *rawClient) {
			rc.headers(1, false, ":method", "CONNECT", ":authority", "10.0.0.1:80", "connection", "keep-alive")
			rc.expectRST(1, http2.ErrCodeProtocol)
			rc.alive()
		}},
		{name: "upper-case header name", run: func(rc *rawClient) {
			rc.headers(1, false, ":method", "CONNECT", ":authority", "10.0.0.1:80", "X-Upper", "1")
			rc.expectRST(1, http2.ErrCodeProtocol)
			rc.alive()
		}},
		{name: "unknown pseudo header", run: func(rc *rawClient) {
			rc.headers(1, false, ":method", "CONNECT", ":authority", "10.0.0.1:80", ":bogus", "1")
			rc.expectRST(1, http2.ErrCodeProtocol)
			rc.alive()
		}},
		{name: "invalid SETTINGS_MAX_FRAME_SIZE", run: func(rc *rawClient) {
			rc.fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 100})
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "invalid SETTINGS_INITIAL_WINDOW_SIZE", run: func(rc *rawClient) {
			rc.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31})
			rc.expectGoAway(http2.ErrCodeFlowControl)
		}},
		{name: "RST_STREAM on idle stream", run: func(rc *rawClient) {
			rc.fr.WriteRSTStream(9, http2.ErrCodeCancel)
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "PING on a stream", run: func(rc *rawClient) {
			rc.fr.WriteRawFrame(http2.FramePing, 0, 1, make([]byte, 8))
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "frame above SETTINGS_MAX_FRAME_SIZE", run: func(rc *rawClient) {
			rc.connect(1)
			rc.fr.WriteData(1, false, make([]byte, 1<<20+1))
			rc.expectGoAway(http2.ErrCodeFrameSize)
		}},
		{name: "DATA padding longer than the frame", run: func(rc *rawClient) {
			rc.connect(1)
			rc.fr.WriteRawFrame(http2.FrameData, http2.FlagDataPadded, 1, []byte{10, 'a', 'b'})
			rc.expectGoAway(http2.ErrCodeProtocol)
		}},
		{name: "DATA after END_STREAM", srv: Server{Handler: waitHandler}, run: func(rc *rawClient) {
			rc.headers(1, true, ":method", "CONNECT", ":authority", "10.0.0.1:80")
			rc.expectStatus(1, "200")
			rc.fr.WriteData(1, false, []byte("late"))
			rc.expectRST(1, http2.ErrCodeStreamClosed)
			rc.alive()
		}},
		{name: "trailers without END_STREAM", run: func(rc *rawClient) {
			rc.connect(1)
			rc.expectStatus(1, "200")
			rc.headers(1, false, "x-trailer", "1")
			rc.expectRST(1, http2.ErrCodeProtocol)
			rc.alive()
		}},
		{name: "streams beyond the limit are refused", srv: Server{MaxConcurrentStreams: 2}, run: func(rc *rawClient) {
			rc.connect(1)
			rc.connect(3)
			rc.connect(5)
			var refused, answered bool
			rc.expect("RST_STREAM 5 REFUSED_STREAM and :status 200 on 3", func(f frameSummary) bool {
				refused = refused || f.typ == http2.FrameRSTStream && f.stream == 5 && f.code == http2.ErrCodeRefusedStream
				answered = answered || f.typ == http2.FrameHeaders && f.stream == 3 && f.status == "200"
				return refused && answered
			})
			rc.alive()
		}},
		{name: "rapid reset", srv: Server{MaxConcurrentStreams: 2}, run: func(rc *rawClient) {
			// Handlers that ignore their context outlive the resets; the server
			// stops the client before they pile up.
			for id := uint32(1); id < 200; id += 2 {
				rc.connect(id)
				rc.fr.WriteRSTStream(id, http2.ErrCodeCancel)
			}
			rc.expectGoAway(http2.ErrCodeEnhanceYourCalm)
		}},
		{name: "large unknown frame is skipped", run: func(rc *rawClient) {
			rc.fr.WriteRawFrame(0xfa, 0, 0, make([]byte, 200<<10))
			rc.alive()
		}},
		{name: "GOAWAY with large debug data", run: func(rc *rawClient) {
			rc.fr.WriteGoAway(0, http2.ErrCodeNo, make([]byte, 100<<10))
			rc.expect("connection close", func(f frameSummary) bool { return false })
		}},
		{name: "padding is not data", run: func(rc *rawClient) {
			rc.connect(1)
			rc.expectStatus(1, "200")
			rc.fr.WriteDataPadded(1, true, []byte("hello"), make([]byte, 100))
			rc.expect("echo", func(f frameSummary) bool { return f.typ == http2.FrameData && f.data == 5 })
			rc.expect("END_STREAM", func(f frameSummary) bool {
				return f.typ == http2.FrameData && f.flags.Has(http2.FlagDataEndStream)
			})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := tc.srv
			if srv.Handler == nil {
				srv.Handler = echoHandler
			}
			block := make(chan struct{})
			if tc.name == "rapid reset" {
				srv.Handler = func(ctx context.Context, req *Request, s *Stream) { <-block }
			}
			rc := newRawClient(t, &srv, !tc.noPref)
			t.Cleanup(func() { close(block) }) // before the server's cleanup
			if tc.name == "GOAWAY with large debug data" || tc.name == "not HTTP/2" {
				// These end with the connection closing: wait for it here.
				tc.run = func(rc *rawClient) {
					if tc.name == "GOAWAY with large debug data" {
						rc.fr.WriteGoAway(0, http2.ErrCodeNo, make([]byte, 100<<10))
					} else {
						io.WriteString(rc.nc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
					}
					timeout := time.After(5 * time.Second)
					for {
						select {
						case f, ok := <-rc.frames:
							if !ok || f.err != nil {
								return
							}
						case <-timeout:
							t.Fatal("connection not closed")
						}
					}
				}
			}
			tc.run(rc)
		})
	}
}

// A client that floods PINGs and never reads what we send cannot make the
// server queue without bound.
func TestPingFloodWithoutReading(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	srv := &Server{Handler: echoHandler}
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), b) }()
	// Read the server's SETTINGS and WINDOW_UPDATE so the handshake completes,
	// then stop reading.
	fr := http2.NewFramer(a, a)
	go func() {
		io.WriteString(a, http2.ClientPreface)
		fr.WriteSettings()
		for range 100000 {
			if err := fr.WritePing(false, [8]byte{1}); err != nil {
				return
			}
		}
	}()
	for range 2 {
		if _, err := fr.ReadFrame(); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "ENHANCE_YOUR_CALM") {
			t.Fatalf("ServeConn: %v, want ENHANCE_YOUR_CALM", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server kept queueing PING ACKs for a client that does not read")
	}
}

// The peer's settings bind what we send: frame size, and stream windows that
// SETTINGS_INITIAL_WINDOW_SIZE changes while a Write is blocked.
func TestPeerSettingsApply(t *testing.T) {
	const size = 100 << 10
	srv := &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		s.Respond(200)
		s.Write(make([]byte, size))
		s.CloseWrite()
		<-ctx.Done()
	}}
	rc := newRawClient(t, srv, false)
	io.WriteString(rc.nc, http2.ClientPreface)
	rc.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1000})
	rc.fr.WriteWindowUpdate(0, 1<<20)
	rc.connect(1)
	got := 0
	rc.expect("the first 1000 bytes", func(f frameSummary) bool {
		if f.typ == http2.FrameData {
			got += f.data
		}
		return got == 1000
	})
	// Blocked on the stream window; more window comes from new settings.
	select {
	case f := <-rc.frames:
		t.Fatalf("sent beyond the stream window: %v", f)
	case <-time.After(50 * time.Millisecond):
	}
	rc.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	rc.expect("the rest, in frames of at most 16 KiB", func(f frameSummary) bool {
		if f.typ != http2.FrameData {
			return false
		}
		if f.data > 16384 {
			t.Fatalf("DATA frame of %d bytes; the peer's SETTINGS_MAX_FRAME_SIZE is 16384", f.data)
		}
		got += f.data
		return f.flags.Has(http2.FlagDataEndStream)
	})
	if got != size {
		t.Fatalf("got %d bytes, want %d", got, size)
	}
}
