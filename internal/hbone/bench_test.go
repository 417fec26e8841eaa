package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Run with: go test -run '^$' -bench . -benchtime 2s ./internal/hbone/

func BenchmarkThroughput(b *testing.B) {
	for _, bc := range []struct {
		name     string
		tls      bool
		download bool
	}{
		{"tcp/upload", false, false},
		{"tcp/download", false, true},
		{"tls13/upload", true, false},
		{"tls13/download", true, true},
	} {
		b.Run(bc.name, func(b *testing.B) { benchThroughput(b, bc.tls, bc.download, false) })
	}
	// TLSClient: the records of each write leave in one system call.
	b.Run("tls13-batched/upload", func(b *testing.B) { benchThroughput(b, true, false, true) })
	// The same sockets without HTTP/2, for comparison.
	b.Run("tcp/baseline", func(b *testing.B) { benchBaseline(b, false) })
	b.Run("tls13/baseline", func(b *testing.B) { benchBaseline(b, true) })
}

func benchBaseline(b *testing.B, useTLS bool) {
	const chunk = 32 << 10
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var serverTLS, clientTLS *tls.Config
	if useTLS {
		serverTLS, clientTLS = selfSignedTLS(b)
		clientTLS.CipherSuites = []uint16{tls.TLS_AES_128_GCM_SHA256}
	}
	received := make(chan int64, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		if useTLS {
			nc = tls.Server(nc, serverTLS)
		}
		defer nc.Close()
		buf := make([]byte, chunk)
		n, _ := io.CopyBuffer(io.Discard, struct{ io.Reader }{nc}, buf)
		received <- n
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	if useTLS {
		nc = tls.Client(nc, clientTLS)
	}
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if _, err := nc.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	nc.Close()
	<-received
	b.ReportMetric(float64(b.N)*chunk*8/time.Since(start).Seconds()/1e9, "Gbit/s")
}

func benchThroughput(b *testing.B, useTLS, download, batched bool) {
	const chunk = IdealWrite
	var serverTLS, clientTLS *tls.Config
	if useTLS {
		serverTLS, clientTLS = selfSignedTLS(b)
		// HBONE's usual suite; Go prefers it on CPUs with AES instructions.
		clientTLS.CipherSuites = []uint16{tls.TLS_AES_128_GCM_SHA256}
	}
	received := make(chan int64, 1)
	ts := startServer(b, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		s.Respond(200)
		if download {
			buf := make([]byte, chunk)
			for {
				if _, err := s.Write(buf); err != nil {
					return
				}
			}
		}
		n, _ := io.Copy(io.Discard, s) // WriteTo: no buffer of its own
		received <- n
		s.CloseWrite()
	}}, serverTLS)
	nc, err := net.Dial("tcp", ts.addr())
	if err != nil {
		b.Fatal(err)
	}
	if useTLS {
		var tc *tls.Conn
		if batched {
			btc := TLSClient(nc, clientTLS)
			tc, nc = btc.Conn, btc
		} else {
			tc = tls.Client(nc, clientTLS)
			nc = tc
		}
		if err := tc.Handshake(); err != nil {
			b.Fatal(err)
		}
		if cs := tc.ConnectionState().CipherSuite; cs != tls.TLS_AES_128_GCM_SHA256 {
			b.Fatalf("cipher suite %s", tls.CipherSuiteName(cs))
		}
	}
	cc, err := NewClientConn(nc, ClientOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer cc.Close()
	s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.1:80"})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	if download {
		for left := int64(b.N) * chunk; left > 0; {
			n, err := s.Read(buf[:min(left, chunk)])
			if err != nil {
				b.Fatal(err)
			}
			left -= int64(n)
		}
	} else {
		for range b.N {
			if _, err := s.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		s.CloseWrite()
		if n := <-received; n != int64(b.N)*chunk {
			b.Fatalf("server received %d bytes, want %d", n, int64(b.N)*chunk)
		}
	}
	b.ReportMetric(float64(b.N)*chunk*8/time.Since(start).Seconds()/1e9, "Gbit/s")
}

// BenchmarkIdleStreamMemory opens 1000 streams through a Pool (10 connections
// of 100 streams) and measures heap and goroutine stacks per stream. Each side
// has one goroutine per stream blocked copying out of it with io.Copy
// (WriteTo), as a proxy's copy loop would be.
func BenchmarkIdleStreamMemory(b *testing.B) {
	const n = 1000
	for range b.N {
		var running sync.WaitGroup
		running.Add(n + 1) // and the warm-up stream
		ts := startServer(b, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
			s.Respond(200)
			running.Done()
			io.Copy(io.Discard, s)
		}}, nil)
		p := &Pool{Dial: func(ctx context.Context, key PoolKey) (net.Conn, error) {
			return net.Dial("tcp", ts.addr())
		}}
		key := testKey(ts.addr())
		// Warm up a connection, pools and the runtime before measuring.
		if s, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"}); err == nil {
			s.Close()
		}
		before := memInUse()

		streams := make([]*Stream, n)
		var copiers sync.WaitGroup
		var started atomic.Int32
		for i := range streams {
			s, err := p.Connect(context.Background(), key, Request{Authority: "10.0.0.1:80"})
			if err != nil {
				b.Fatal(err)
			}
			streams[i] = s
			copiers.Go(func() {
				started.Add(1)
				io.Copy(io.Discard, s)
			})
		}
		running.Wait()
		for started.Load() < n {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond) // let everyone park
		after := memInUse()
		st := p.Stats()

		perStream := float64(after.total-before.total) / n
		b.ReportMetric(perStream, "B/stream(both-sides)")
		b.ReportMetric(perStream/2, "B/stream/side")
		b.ReportMetric(float64(after.heap-before.heap)/n, "heapB/stream")
		b.ReportMetric(float64(after.stack-before.stack)/n, "stackB/stream")
		b.ReportMetric(float64(st.Conns), "conns")

		for _, s := range streams {
			s.Close()
		}
		copiers.Wait()
		p.Close()
		ts.close()
	}
}

type memUse struct{ heap, stack, total uint64 }

func memInUse() memUse {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memUse{heap: ms.HeapAlloc, stack: ms.StackInuse, total: ms.HeapAlloc + ms.StackInuse}
}
