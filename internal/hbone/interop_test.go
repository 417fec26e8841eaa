package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sluicemesh/sluice/internal/testutil"
)

// These tests prove we speak standard HTTP/2: Go's own implementation (the
// golang.org/x/net/http2 Transport and Server) talks to ours.

func TestInteropXNetTransportToOurServer(t *testing.T) {
	for _, useTLS := range []bool{false, true} {
		name := "h2c"
		if useTLS {
			name = "tls"
		}
		t.Run(name, func(t *testing.T) {
			var serverTLS, clientTLS *tls.Config
			if useTLS {
				serverTLS, clientTLS = selfSignedTLS(t)
			}
			gotReq := make(chan *Request, 1)
			ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
				gotReq <- req
				echoHandler(ctx, req, s)
			}}, serverTLS)
			tr := &http2.Transport{}
			if useTLS {
				tr.TLSClientConfig = clientTLS
			} else {
				tr.AllowHTTP = true
				tr.DialTLSContext = func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, network, addr)
				}
			}
			defer tr.CloseIdleConnections()
			scheme := "http://"
			if useTLS {
				scheme = "https://"
			}
			pr, pw := io.Pipe()
			req, err := http.NewRequest(http.MethodConnect, scheme+ts.addr(), pr)
			if err != nil {
				t.Fatal(err)
			}
			req.Host = "10.0.0.7:9090"
			req.Header.Set("Forwarded", "for=10.0.0.8")
			resp, err := tr.RoundTrip(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			r := <-gotReq
			if r.Authority != "10.0.0.7:9090" || r.Header.Get("Forwarded") != "for=10.0.0.8" {
				t.Fatalf("server saw %+v", r)
			}
			// Interleave: each write is echoed before the next.
			for _, msg := range []string{"hello", "hbone", "world"} {
				if _, err := io.WriteString(pw, msg); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, len(msg))
				if _, err := io.ReadFull(resp.Body, buf); err != nil || string(buf) != msg {
					t.Fatalf("echo %q: %q, %v", msg, buf, err)
				}
			}
			big := pattern(3, 5<<20)
			go func() { pw.Write(big); pw.Close() }()
			got, err := io.ReadAll(resp.Body)
			if err != nil || !bytes.Equal(got, big) {
				t.Fatalf("echo of 5 MiB: %d bytes, %v", len(got), err)
			}
		})
	}
}

func TestInteropXNetTransportRefused(t *testing.T) {
	ts := startServer(t, &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		s.Respond(http.StatusForbidden)
	}}, nil)
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	pr, pw := io.Pipe()
	defer pw.Close()
	req, _ := http.NewRequest(http.MethodConnect, "http://"+ts.addr(), pr)
	req.Host = "10.0.0.7:9090"
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("status %d, want 403", resp.StatusCode)
	}
}

// xnetEchoServer serves CONNECT with golang.org/x/net/http2's Server: 200,
// then echo every read with a flush, then end the response at the body's EOF.
func xnetEchoServer(t *testing.T, serverTLS *tls.Config) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http2.Server{}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect || r.Host != "10.0.0.9:443" || r.Header.Get("Baggage") != "k=v" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		if r.Header.Get("X-Deny") != "" {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				w.Write(buf[:n])
				w.(http.Flusher).Flush()
			}
			if err != nil {
				return
			}
		}
	})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			if serverTLS != nil {
				tc := tls.Server(nc, serverTLS)
				if err := tc.Handshake(); err != nil {
					nc.Close()
					continue
				}
				nc = tc
			}
			mu.Lock()
			conns = append(conns, nc)
			mu.Unlock()
			wg.Go(func() { srv.ServeConn(nc, &http2.ServeConnOpts{Handler: handler}) })
		}
	})
	return ln.Addr().String()
}

func TestInteropOurClientToXNetServer(t *testing.T) {
	for _, useTLS := range []bool{false, true} {
		name := "h2c"
		if useTLS {
			name = "tls"
		}
		t.Run(name, func(t *testing.T) {
			var serverTLS, clientTLS *tls.Config
			if useTLS {
				serverTLS, clientTLS = selfSignedTLS(t)
			}
			addr := xnetEchoServer(t, serverTLS)
			nc, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			if useTLS {
				tc := tls.Client(nc, clientTLS)
				if err := tc.Handshake(); err != nil {
					t.Fatal(err)
				}
				if st := tc.ConnectionState(); st.NegotiatedProtocol != "h2" || st.Version != tls.VersionTLS13 {
					t.Fatalf("negotiated %q, version %x", st.NegotiatedProtocol, st.Version)
				}
				nc = tc
			}
			cc, err := NewClientConn(nc, ClientOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			h := http.Header{"Baggage": {"k=v"}}
			var wg sync.WaitGroup
			for i := range 8 {
				wg.Go(func() {
					s, err := cc.Connect(context.Background(), Request{Authority: "10.0.0.9:443", Header: h})
					if err != nil {
						t.Error(err)
						return
					}
					defer s.Close()
					data := pattern(uint64(i), 3<<20+i)
					go func() { s.Write(data); s.CloseWrite() }()
					got, err := io.ReadAll(s)
					if err != nil || !bytes.Equal(got, data) {
						t.Errorf("stream %d: echo %d bytes, %v", i, len(got), err)
					}
				})
			}
			wg.Wait()
			_, err = cc.Connect(context.Background(), Request{Authority: "10.0.0.9:443", Header: http.Header{"Baggage": {"k=v"}, "X-Deny": {"1"}}})
			var se *StatusError
			if !errors.As(err, &se) || se.Code != http.StatusForbidden {
				t.Fatalf("Connect: %v, want StatusError 403", err)
			}
			testutil.WaitFor(t, 2*time.Second, "streams to be forgotten", func() bool { return cc.ActiveStreams() == 0 })
		})
	}
}
