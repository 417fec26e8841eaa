// Package ca is the mesh's certificate authority: it holds a root and signs workload
// certificate requests with Istio's workload certificate profile, so that certificates
// Sluice issues are accepted by Istio's ztunnel and Envoy and the other way round.
//
// ztunnel uses it directly in local-CA mode; the controller will serve it over gRPC,
// after checking that the caller may act for the identity it asks for. This package
// does no such check: the identity to certify is an argument, never read from the CSR.
package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"time"

	"github.com/sluicemesh/sluice/internal/spiffe"
)

const (
	// DefaultTTL is the workload certificate lifetime when Sign is given none (Istio's default).
	DefaultTTL = 24 * time.Hour
	// ClockSkew is how far in the past a certificate's validity starts, so a peer whose
	// clock is a little behind ours does not reject a certificate issued a moment ago.
	// Istio uses the same two minutes.
	ClockSkew = 2 * time.Minute
	// minRSABits matches what Istio's CA accepts; smaller keys are refused.
	minRSABits = 2048
)

// CA signs workload certificates with one root. It is safe for concurrent use.
type CA struct {
	root        *x509.Certificate
	key         crypto.Signer
	trustDomain string
	rootsPEM    []byte
}

// New returns a CA that signs with rootKey as rootCert. trustDomain is configuration,
// not read from the certificate: a plugged-in root (Istio's cacerts) names its
// organisation, not the mesh's trust domain.
func New(rootCert *x509.Certificate, rootKey crypto.Signer, trustDomain string) (*CA, error) {
	if rootCert == nil || rootKey == nil {
		return nil, errors.New("ca: root certificate and key are both required")
	}
	if err := (spiffe.ID{TrustDomain: trustDomain, Namespace: "ns", ServiceAccount: "sa"}).Validate(); err != nil {
		return nil, fmt.Errorf("ca: trust domain %q: %w", trustDomain, err)
	}
	if !rootCert.IsCA || !rootCert.BasicConstraintsValid {
		return nil, fmt.Errorf("ca: certificate %q is not a CA certificate (basic constraints CA:TRUE missing)", rootCert.Subject)
	}
	if rootCert.KeyUsage != 0 && rootCert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("ca: certificate %q may not sign certificates (key usage lacks certSign)", rootCert.Subject)
	}
	if !publicKeysEqual(rootCert.PublicKey, rootKey.Public()) {
		return nil, fmt.Errorf("ca: the private key does not belong to certificate %q", rootCert.Subject)
	}
	return &CA{
		root:        rootCert,
		key:         rootKey,
		trustDomain: trustDomain,
		rootsPEM:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rootCert.Raw}),
	}, nil
}

// TrustDomain is the trust domain this CA issues identities in.
func (c *CA) TrustDomain() string { return c.trustDomain }

// Roots is the trust bundle peers need to verify certificates this CA issues. Callers
// must not modify the certificates.
func (c *CA) Roots() []*x509.Certificate { return []*x509.Certificate{c.root} }

// RootsPEM is Roots PEM-encoded, the form Istio distributes (root-cert.pem).
func (c *CA) RootsPEM() []byte { return bytes.Clone(c.rootsPEM) }

// Sign issues a workload certificate for id to the key in csrDER. Only the CSR's public
// key is used: its subject and SANs are whatever the requester asked for and are
// ignored, the identity comes from id. ttl <= 0 means DefaultTTL; the lifetime is cut
// at the root's expiry because no verifier would accept the remainder.
func (c *CA) Sign(csrDER []byte, id spiffe.ID, ttl time.Duration) ([]byte, error) {
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("ca: sign: %w", err)
	}
	if id.TrustDomain != c.trustDomain {
		return nil, fmt.Errorf("ca: sign %s: this CA issues identities in trust domain %q only", id, c.trustDomain)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: parse CSR: %w", id, err)
	}
	// The signature proves the requester holds the private key; without this check
	// anyone could get a certificate for someone else's public key.
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("ca: sign %s: CSR signature does not verify: %w", id, err)
	}
	if err := checkWorkloadKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w", id, err)
	}
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	now := time.Now()
	if !now.Before(c.root.NotAfter) {
		return nil, fmt.Errorf("ca: sign %s: root certificate expired at %s; rotate the root", id, c.root.NotAfter.Format(time.RFC3339))
	}
	notAfter := now.Add(ttl)
	if notAfter.After(c.root.NotAfter) {
		notAfter = c.root.NotAfter
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w", id, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		// Empty subject: the identity is the URI SAN alone. x509.CreateCertificate marks
		// the SAN extension critical when the subject is empty, as RFC 5280 4.2.1.6
		// requires and as Istio's certificates are.
		NotBefore: now.Add(-ClockSkew),
		NotAfter:  notAfter,
		// keyEncipherment means nothing for ECDSA keys and nothing in TLS 1.3, but Istio
		// sets it and some verifiers compare profiles, so match it.
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		// Both: every workload is a client and a server, and Go's verifier checks
		// serverAuth even on client certificates unless told otherwise.
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true, // CA:FALSE, explicitly
		URIs:                  []*url.URL{id.URL()},
		// AuthorityKeyId is copied from the root's SubjectKeyId by CreateCertificate.
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.root, csr.PublicKey, c.key)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w", id, err)
	}
	return der, nil
}

// checkWorkloadKey accepts the key types Istio's CA accepts, so a certificate we issue
// works with every mesh peer.
func checkWorkloadKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if name := k.Curve.Params().Name; name != "P-256" && name != "P-384" {
			return fmt.Errorf("CSR key is ECDSA %s; use P-256 or P-384", name)
		}
	case *rsa.PublicKey:
		if k.N.BitLen() < minRSABits {
			return fmt.Errorf("CSR key is RSA %d bits; at least %d are required", k.N.BitLen(), minRSABits)
		}
	default:
		return fmt.Errorf("CSR key type %T is not supported; use ECDSA P-256", pub)
	}
	return nil
}

// randomSerial returns a positive random 128-bit serial. Random serials make issued
// certificates unpredictable, which is what CAs have relied on since the MD5
// collision attacks; 128 bits rules out collisions among any number we will issue.
func randomSerial() (*big.Int, error) {
	for {
		n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
		if err != nil {
			return nil, fmt.Errorf("generate serial number: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	// Every public key type in the standard library has Equal.
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}
