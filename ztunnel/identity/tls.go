package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/sluicemesh/sluice/internal/spiffe"
)

// ALPN is the only application protocol HBONE speaks.
const ALPN = "h2"

// ClientTLS is the TLS configuration for an HBONE connection from a local workload with
// identity src to a peer that must be wantPeer. The certificate is src's current one,
// fetched at handshake time (waiting, bounded by the handshake's context, if there is
// none yet), so a long-lived Config follows rotations.
func (m *Manager) ClientTLS(src, wantPeer spiffe.ID) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return m.Certificate(cri.Context(), src)
		},
		// Go's built-in verification checks the server name against DNS SANs, which
		// workload certificates do not have; peers are identified by their SPIFFE ID
		// and verified against the roots of its trust domain in VerifyConnection, as
		// Istio's ztunnel does. Not skipping verification: replacing it.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			peer, err := m.verifyPeer(cs)
			if err != nil {
				return err
			}
			if peer != wantPeer {
				return fmt.Errorf("peer identity is %s, want %s; the destination is not the workload it should be", peer, wantPeer)
			}
			return nil
		},
	}
}

// ServerTLS is the TLS configuration of an HBONE server (port 15008). local names the
// identity whose certificate to present, from the connection (in-pod listeners know
// their pod). Every client must present a certificate that verifies against the roots
// of its own trust domain; which identities may connect is policy's business, read
// from the connection with PeerIdentity.
func (m *Manager) ServerTLS(local func(*tls.ClientHelloInfo) (spiffe.ID, error)) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			id, err := local(hello)
			if err != nil {
				return nil, fmt.Errorf("no local identity for connection to %s: %w", hello.Conn.LocalAddr(), err)
			}
			return m.Certificate(hello.Context(), id)
		},
		// RequireAndVerifyClientCert would verify against one static ClientCAs pool with
		// the clientAuth usage; roots depend on the client's trust domain, so the
		// certificate is required here and verified in VerifyConnection.
		ClientAuth:       tls.RequireAnyClientCert,
		VerifyConnection: func(cs tls.ConnectionState) error { _, err := m.verifyPeer(cs); return err },
		// A resumed session would skip certificate exchange and could outlive the
		// client's certificate; HBONE connections are long-lived, so a full handshake
		// each time costs little.
		SessionTicketsDisabled: true,
	}
}

// verifyPeer returns the peer's identity after checking its chain against the roots of
// that identity's trust domain. No hostname or SNI check: the SPIFFE ID is the name.
func (m *Manager) verifyPeer(cs tls.ConnectionState) (spiffe.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffe.ID{}, errors.New("peer presented no certificate; mutual TLS is required")
	}
	leaf := cs.PeerCertificates[0]
	id, err := spiffe.FromCertificate(leaf)
	if err != nil {
		return spiffe.ID{}, fmt.Errorf("peer certificate: %w", err)
	}
	roots := m.Roots(id.TrustDomain)
	if roots == nil {
		return spiffe.ID{}, fmt.Errorf("peer %s: no trust bundle for trust domain %q", id, id.TrustDomain)
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	// ExtKeyUsageAny, as Istio's ztunnel: the identity comes from the URI SAN, not the
	// usages, and a client certificate without clientAuth is not worth a failed call.
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return spiffe.ID{}, fmt.Errorf("peer %s: certificate does not verify against the trust bundle of %q: %w", id, id.TrustDomain, err)
	}
	return id, nil
}

// PeerIdentity returns the peer's identity on a connection whose handshake used
// ClientTLS or ServerTLS, which have verified it.
func PeerIdentity(cs tls.ConnectionState) (spiffe.ID, error) {
	if !cs.HandshakeComplete || len(cs.PeerCertificates) == 0 {
		return spiffe.ID{}, errors.New("no verified peer certificate on this connection")
	}
	return spiffe.FromCertificate(cs.PeerCertificates[0])
}
