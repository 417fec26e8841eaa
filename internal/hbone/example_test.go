package hbone_test

import (
	"context"
	"crypto/tls"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"

	"github.com/sluicemesh/sluice/internal/hbone"
)

// The inbound side: accept HBONE on :15008, open the destination, answer 200,
// and copy both ways, passing each direction's end on as a half-close.
func ExampleServer() {
	srv := &hbone.Server{Handler: func(ctx context.Context, req *hbone.Request, s *hbone.Stream) {
		// The peer's identity, for authorization:
		// s.NetConn().(*tls.Conn).ConnectionState().PeerCertificates[0]
		var d net.Dialer
		up, err := d.DialContext(ctx, "tcp", req.Authority)
		if err != nil {
			s.Respond(http.StatusServiceUnavailable)
			return
		}
		defer up.Close()
		if err := s.Respond(http.StatusOK); err != nil {
			return
		}
		done := make(chan struct{})
		go func() {
			io.Copy(up, s) // Stream.WriteTo: no buffer while idle
			up.(*net.TCPConn).CloseWrite()
			close(done)
		}()
		io.Copy(s, up)
		s.CloseWrite()
		<-done
	}}
	var tlsConf *tls.Config // TLS 1.3, ALPN h2, client certificates required
	ln, err := tls.Listen("tcp", ":15008", tlsConf)
	if err != nil {
		log.Fatal(err)
	}
	for {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		go srv.ServeConn(context.Background(), nc)
	}
}

// The outbound side: a pool of mutual-TLS connections keyed by identities.
func ExamplePool() {
	var clientTLS *tls.Config // the source workload's certificate, ALPN h2
	pool := &hbone.Pool{Dial: func(ctx context.Context, key hbone.PoolKey) (net.Conn, error) {
		d := tls.Dialer{Config: clientTLS}
		return d.DialContext(ctx, "tcp", key.Addr.String())
	}}
	defer pool.Close()
	s, err := pool.Connect(context.Background(), hbone.PoolKey{
		Src:  "spiffe://cluster.local/ns/a/sa/client",
		Dst:  "spiffe://cluster.local/ns/b/sa/server",
		Addr: netip.MustParseAddrPort("10.0.1.5:15008"),
	}, hbone.Request{
		Authority: "10.0.1.5:8080",
		Header:    http.Header{"Forwarded": {"for=10.0.0.7"}},
	})
	if err != nil {
		log.Fatal(err) // a *hbone.StatusError if the destination refused
	}
	defer s.Close()
}
