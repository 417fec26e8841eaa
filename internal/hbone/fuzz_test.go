package hbone

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// fuzzSeeds are frame sequences a client might send after its preface.
func fuzzSeeds() [][]byte {
	var seeds [][]byte
	build := func(write func(fr *http2.Framer, block func(...string) []byte)) {
		var buf, hbuf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		fr.AllowIllegalWrites = true
		enc := hpack.NewEncoder(&hbuf)
		block := func(kv ...string) []byte {
			hbuf.Reset()
			for i := 0; i < len(kv); i += 2 {
				enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
			}
			return bytes.Clone(hbuf.Bytes())
		}
		write(fr, block)
		seeds = append(seeds, buf.Bytes())
	}
	build(func(fr *http2.Framer, block func(...string) []byte) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":method", "CONNECT", ":authority", "10.0.0.1:80", "forwarded", "for=1.2.3.4"), EndHeaders: true})
		fr.WriteData(1, false, []byte("hello"))
		fr.WriteWindowUpdate(1, 1000)
		fr.WriteData(1, true, nil)
	})
	build(func(fr *http2.Framer, block func(...string) []byte) {
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":method", "CONNECT"), EndHeaders: false})
		fr.WriteContinuation(1, true, block(":authority", "10.0.0.1:80"))
		fr.WriteDataPadded(1, false, []byte("padded"), make([]byte, 7))
		fr.WriteRSTStream(1, http2.ErrCodeCancel)
	})
	build(func(fr *http2.Framer, block func(...string) []byte) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 14}, http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0})
		fr.WritePing(false, [8]byte{1, 2, 3})
		fr.WriteWindowUpdate(0, 1<<20)
		fr.WritePriority(1, http2.PriorityParam{StreamDep: 0, Weight: 10})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block(":method", "GET", ":path", "/", ":scheme", "https", ":authority", "x"), EndStream: true, EndHeaders: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, BlockFragment: block(":method", "CONNECT", ":authority", "10.0.0.1:80"), EndStream: true, EndHeaders: true})
		fr.WriteRawFrame(0x10, 0, 0, []byte{0, 0, 0, 5, 'u', '=', '1'})
		fr.WriteGoAway(5, http2.ErrCodeNo, []byte("bye"))
	})
	build(func(fr *http2.Framer, block func(...string) []byte) {
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":method", "CONNECT", ":authority", "10.0.0.1:80"), EndHeaders: true, PadLength: 3})
		fr.WriteData(1, false, make([]byte, 20000))
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block("x-trailer", "t"), EndStream: true, EndHeaders: true})
		fr.WriteSettings()
	})
	return seeds
}

// FuzzServerFrames feeds arbitrary bytes after the preface to a Server: it
// must not panic, and ServeConn must return once the client hangs up.
// Run longer with: go test -run '^$' -fuzz FuzzServerFrames ./internal/hbone/
func FuzzServerFrames(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := net.Pipe()
		srv := &Server{Handler: echoHandler, PingInterval: -1, HandshakeTimeout: time.Second}
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(context.Background(), b) }()
		go io.Copy(io.Discard, a)
		a.SetWriteDeadline(time.Now().Add(2 * time.Second))
		io.WriteString(a, http2.ClientPreface)
		a.Write(data)
		a.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("ServeConn did not return after the client hung up")
		}
	})
}
