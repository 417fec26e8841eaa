package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/internal/spiffe"
)

// node is a Manager with certificates for the given identities from c, running until
// the test's bubble ends.
func node(t *testing.T, c *ca.CA, ids ...spiffe.ID) (*Manager, func()) {
	t.Helper()
	m := &Manager{Signer: LocalSigner{CA: c}}
	stop := start(t, m)
	for _, id := range ids {
		m.Want(id)
		if _, err := certFor(m, id); err != nil {
			t.Fatal(err)
		}
	}
	return m, stop
}

// rawCert issues a certificate for id straight from c, for peers that are not Managers.
func rawCert(t *testing.T, c *ca.CA, id spiffe.ID, ttl time.Duration) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := ca.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	der, err := c.Sign(csr, id, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// foreignServer is a TLS 1.3 server presenting cert and asking for (not checking) a
// client certificate.
func foreignServer(cert tls.Certificate) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAnyClientCert}
}

// foreignClient presents cert and accepts any server.
func foreignClient(cert tls.Certificate) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true}
}

func TestHandshake(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newCA(t)
		client, stopClient := node(t, c, idA)
		defer stopClient()
		server, stopServer := node(t, c, idB)
		defer stopServer()
		mustHandshake(t, client, server, idA, idB)
	})
}

func TestHandshakeRejects(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		mine, theirs := newCA(t), newCA(t)
		m, stop := node(t, mine, idA, idB)
		defer stop()
		otherTD := spiffe.ID{TrustDomain: "example.org", Namespace: "default", ServiceAccount: "x"}
		foreignCA, err := ca.LoadOrCreate(t.TempDir(), "example.org")
		if err != nil {
			t.Fatal(err)
		}
		expiringB := rawCert(t, mine, idB, time.Second)
		expiringA := rawCert(t, mine, idA, time.Second)
		time.Sleep(2 * time.Second)

		cases := []struct {
			name      string
			client    *tls.Config
			server    *tls.Config
			clientErr string // substring the client's error must contain; "" means not checked
			serverErr string // likewise for the server; one side must fail in every case
		}{
			{
				name:   "server certificate from another CA",
				client: m.ClientTLS(idA, idB), server: foreignServer(rawCert(t, theirs, idB, time.Hour)),
				clientErr: "does not verify against the trust bundle",
			},
			{
				name:   "client certificate from another CA",
				client: foreignClient(rawCert(t, theirs, idA, time.Hour)), server: m.ServerTLS(as(idB)),
				serverErr: "does not verify against the trust bundle",
			},
			{
				name:   "expired server certificate",
				client: m.ClientTLS(idA, idB), server: foreignServer(expiringB),
				clientErr: "expired",
			},
			{
				name:   "expired client certificate",
				client: foreignClient(expiringA), server: m.ServerTLS(as(idB)),
				serverErr: "expired",
			},
			{
				name:   "server is not the expected identity",
				client: m.ClientTLS(idA, idC), server: m.ServerTLS(as(idB)),
				clientErr: "peer identity is " + idB.String() + ", want " + idC.String(),
			},
			{
				name:   "peer from a trust domain without a bundle",
				client: m.ClientTLS(idA, otherTD), server: foreignServer(rawCert(t, foreignCA, otherTD, time.Hour)),
				clientErr: `no trust bundle for trust domain "example.org"`,
			},
			{
				name:   "client without a certificate",
				client: &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}, server: m.ServerTLS(as(idB)),
				serverErr: "client didn't provide a certificate",
			},
			{
				name:   "TLS 1.2 client",
				client: &tls.Config{MaxVersion: tls.VersionTLS12, InsecureSkipVerify: true, Certificates: []tls.Certificate{rawCert(t, mine, idA, time.Hour)}},
				server: m.ServerTLS(as(idB)), serverErr: "unsupported versions",
			},
		}
		for _, tc := range cases {
			cErr, sErr, _, _ := handshake(t, tc.client, tc.server)
			if tc.clientErr != "" && (cErr == nil || !strings.Contains(cErr.Error(), tc.clientErr)) {
				t.Errorf("%s: client error = %v, want it to contain %q", tc.name, cErr, tc.clientErr)
			}
			if tc.serverErr != "" && (sErr == nil || !strings.Contains(sErr.Error(), tc.serverErr)) {
				t.Errorf("%s: server error = %v, want it to contain %q", tc.name, sErr, tc.serverErr)
			}
			if cErr == nil && sErr == nil {
				t.Errorf("%s: handshake succeeded", tc.name)
			}
		}

		// Adding the foreign trust domain's bundle is what makes its peers acceptable.
		m.SetRoots("example.org", foreignCA.Roots())
		cErr, _, _, _ := handshake(t, m.ClientTLS(idA, otherTD), foreignServer(rawCert(t, foreignCA, otherTD, time.Hour)))
		if cErr != nil {
			t.Fatalf("after SetRoots for example.org: %v", cErr)
		}
	})
}

// TestHandshakeWaitsForCertificate: a server whose certificate has not been issued yet
// holds the handshake instead of failing it or answering without mTLS.
func TestHandshakeWaitsForCertificate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newCA(t)
		client, stopClient := node(t, c, idA)
		defer stopClient()
		sig := &testSigner{inner: LocalSigner{CA: c}, gate: make(chan struct{})}
		server := &Manager{Signer: sig}
		defer start(t, server)()
		server.Want(idB)
		go func() {
			time.Sleep(3 * time.Second) // the CA answers late, within the handshake deadline
			close(sig.gate)
		}()
		start := time.Now()
		mustHandshake(t, client, server, idA, idB)
		if waited := time.Since(start); waited < 3*time.Second {
			t.Fatalf("handshake finished after %s, before the certificate existed", waited)
		}
	})
}

func TestPeerIdentityWithoutHandshake(t *testing.T) {
	if _, err := PeerIdentity(tls.ConnectionState{}); err == nil {
		t.Fatal("PeerIdentity of an empty state succeeded")
	}
}
