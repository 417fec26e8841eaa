package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/internal/spiffe"
)

// Tests run in testing/synctest bubbles: time.Now, timers and x509/TLS validity checks
// all follow the bubble's fake clock, which jumps ahead whenever every goroutine is
// blocked. That is the fake clock the renewal loop needs; a Now hook alone would not
// move its timers. CAs are created inside the bubble so their roots are valid at its
// epoch (2000-01-01).

const td = "cluster.local"

var (
	idA = spiffe.ID{TrustDomain: td, Namespace: "default", ServiceAccount: "sleep"}
	idB = spiffe.ID{TrustDomain: td, Namespace: "default", ServiceAccount: "httpbin"}
	idC = spiffe.ID{TrustDomain: td, Namespace: "other", ServiceAccount: "httpbin"}
)

func newCA(t *testing.T) *ca.CA {
	t.Helper()
	c, err := ca.LoadOrCreate(t.TempDir(), td)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// SignerFunc adapts a function to Signer.
type SignerFunc func(ctx context.Context, csrDER []byte, id spiffe.ID) ([][]byte, []*x509.Certificate, error)

func (f SignerFunc) Sign(ctx context.Context, csrDER []byte, id spiffe.ID) ([][]byte, []*x509.Certificate, error) {
	return f(ctx, csrDER, id)
}

// testSigner wraps a Signer to record requests, fail them or hold them.
type testSigner struct {
	inner Signer

	mu       sync.Mutex
	fail     error
	gate     chan struct{} // when set, requests wait for it to be closed
	attempts map[spiffe.ID][]time.Time
	issued   map[spiffe.ID][]time.Time
}

func (s *testSigner) Sign(ctx context.Context, csrDER []byte, id spiffe.ID) ([][]byte, []*x509.Certificate, error) {
	s.mu.Lock()
	gate := s.gate
	s.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.attempts == nil {
		s.attempts, s.issued = map[spiffe.ID][]time.Time{}, map[spiffe.ID][]time.Time{}
	}
	s.attempts[id] = append(s.attempts[id], time.Now())
	if s.fail != nil {
		return nil, nil, s.fail
	}
	chain, roots, err := s.inner.Sign(ctx, csrDER, id)
	if err == nil {
		s.issued[id] = append(s.issued[id], time.Now())
	}
	return chain, roots, err
}

func (s *testSigner) setFail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail = err
}

func (s *testSigner) counts(id spiffe.ID) (attempts, issued []time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.attempts[id]...), append([]time.Time(nil), s.issued[id]...)
}

// start runs m until the returned function is called; the function waits for Run to
// return, so no goroutine outlives the bubble.
func start(t *testing.T, m *Manager) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
}

func as(id spiffe.ID) func(*tls.ClientHelloInfo) (spiffe.ID, error) {
	return func(*tls.ClientHelloInfo) (spiffe.ID, error) { return id, nil }
}

// handshake runs a TLS handshake over net.Pipe and has the server send one byte, so a
// server-side rejection of the client certificate (which TLS 1.3 reports after the
// client thinks it is done) shows up as a client error too.
func handshake(t *testing.T, clientCfg, serverCfg *tls.Config) (clientErr, serverErr error, client, server tls.ConnectionState) {
	t.Helper()
	c1, c2 := net.Pipe()
	defer c2.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli, srv := tls.Client(c1, clientCfg), tls.Server(c2, serverCfg)
	type outcome struct {
		err   error
		state tls.ConnectionState
	}
	serverDone := make(chan outcome, 1)
	go func() {
		err := srv.HandshakeContext(ctx)
		if err == nil {
			_, err = srv.Write([]byte("x"))
		}
		serverDone <- outcome{err, srv.ConnectionState()}
	}()
	clientErr = cli.HandshakeContext(ctx)
	if clientErr == nil {
		_, clientErr = io.ReadFull(cli, make([]byte, 1))
	}
	client = cli.ConnectionState()
	c1.Close() // unblocks a server still writing to a client that gave up
	o := <-serverDone
	return clientErr, o.err, client, o.state
}

// mustHandshake is a handshake from src to dst that must succeed both ways.
func mustHandshake(t *testing.T, client, server *Manager, src, dst spiffe.ID) {
	t.Helper()
	cErr, sErr, cs, ss := handshake(t, client.ClientTLS(src, dst), server.ServerTLS(as(dst)))
	if cErr != nil || sErr != nil {
		t.Fatalf("handshake %s -> %s: client: %v, server: %v", src, dst, cErr, sErr)
	}
	if cs.Version != tls.VersionTLS13 || cs.NegotiatedProtocol != ALPN {
		t.Fatalf("negotiated version %x ALPN %q, want TLS 1.3 and h2", cs.Version, cs.NegotiatedProtocol)
	}
	if peer, err := PeerIdentity(ss); err != nil || peer != src {
		t.Fatalf("server sees peer %v (%v), want %s", peer, err, src)
	}
}

// certFor is Certificate bounded by a minute of (fake) time, so a regression fails the
// test instead of waiting while the bubble's clock runs on.
func certFor(m *Manager, id spiffe.ID) (*tls.Certificate, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return m.Certificate(ctx, id)
}
