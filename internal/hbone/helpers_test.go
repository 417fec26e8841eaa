package hbone

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// testServer runs srv on a loopback listener; connections are served until the
// test ends, and every ServeConn must have returned by then.
type testServer struct {
	t      testing.TB
	ln     net.Listener
	srv    *Server
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	errs  []error
	conns []net.Conn
}

func startServer(t testing.TB, srv *Server, tlsConf *tls.Config) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if tlsConf != nil {
		ln = tls.NewListener(ln, tlsConf)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{t: t, ln: ln, srv: srv, cancel: cancel}
	ts.wg.Add(1)
	go func() {
		defer ts.wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			ts.mu.Lock()
			ts.conns = append(ts.conns, nc)
			ts.mu.Unlock()
			ts.wg.Add(1)
			go func() {
				defer ts.wg.Done()
				if err := srv.ServeConn(ctx, nc); err != nil {
					ts.mu.Lock()
					ts.errs = append(ts.errs, err)
					ts.mu.Unlock()
				}
			}()
		}
	}()
	t.Cleanup(ts.close)
	return ts
}

func (ts *testServer) addr() string { return ts.ln.Addr().String() }

// drain cancels the serving context: every connection drains gracefully.
func (ts *testServer) drain() { ts.cancel() }

func (ts *testServer) close() {
	ts.ln.Close()
	ts.mu.Lock()
	for _, c := range ts.conns {
		c.Close()
	}
	ts.mu.Unlock()
	done := make(chan struct{})
	go func() { ts.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		ts.t.Errorf("ServeConn did not return after its connection closed")
	}
	ts.cancel()
}

func (ts *testServer) dial(t testing.TB, opts ClientOptions) *ClientConn {
	t.Helper()
	nc, err := net.Dial("tcp", ts.addr())
	if err != nil {
		t.Fatal(err)
	}
	cc, err := NewClientConn(nc, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// echoHandler answers 200 and echoes until the client's EOF, then ends its side.
func echoHandler(ctx context.Context, req *Request, s *Stream) {
	if err := s.Respond(200); err != nil {
		return
	}
	if _, err := io.Copy(s, s); err != nil {
		return
	}
	s.CloseWrite()
	// Wait for the client to finish (or reset) before the stream is closed.
	<-ctx.Done()
}

// pattern fills deterministic pseudo-random bytes for a given seed.
func pattern(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := mrand.New(mrand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func sum(b []byte) [32]byte { return sha256.Sum256(b) }

func isStreamErr(err error, code uint32) bool {
	var se *StreamError
	return errors.As(err, &se) && uint32(se.Code) == code
}

// selfSignedTLS returns server and client configs for TLS 1.3 with ALPN h2,
// the way HBONE runs (without SPIFFE verification, which is not this
// package's job).
func selfSignedTLS(t testing.TB) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "hbone-test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{"hbone-test"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	leaf, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	server = &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}
	client = &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   "hbone-test",
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
	}
	return server, client
}
