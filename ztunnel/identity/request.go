package identity

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"time"

	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/internal/spiffe"
)

// result is the outcome of one request, handed from its goroutine to Run.
type result struct {
	id     spiffe.ID
	issued *issued
	roots  []*x509.Certificate
	err    error
}

// requestCertificate makes a key and CSR, asks the Signer, checks the answer and hands
// the result to Run. It runs outside every lock: key generation and the CA round trip
// are the slow part.
func (m *Manager) requestCertificate(ctx context.Context, id spiffe.ID, results chan<- result) {
	iss, roots, err := m.issue(ctx, id)
	results <- result{id: id, issued: iss, roots: roots, err: err}
}

func (m *Manager) issue(ctx context.Context, id spiffe.ID) (*issued, []*x509.Certificate, error) {
	key, err := m.newKey()
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	csr, err := ca.NewCSR(key, id)
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, m.signTimeout())
	defer cancel()
	chain, roots, err := m.Signer.Sign(ctx, csr, id)
	if err != nil {
		return nil, nil, err // the Signer's words: callers add "request to the CA failed"
	}
	leaf, err := checkIssued(chain, roots, key, id, time.Now())
	if err != nil {
		return nil, nil, fmt.Errorf("CA returned an unusable certificate: %w", err)
	}
	return &issued{
		cert:      &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf},
		refreshAt: refreshTime(leaf, time.Now()),
	}, roots, nil
}

func (m *Manager) newKey() (crypto.Signer, error) {
	if m.KeyFactory != nil {
		return m.KeyFactory()
	}
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// checkIssued refuses a certificate that peers would refuse, before it replaces a good
// one: it must be for id and our key, be valid now, and chain to the returned roots.
func checkIssued(chain [][]byte, roots []*x509.Certificate, key crypto.Signer, id spiffe.ID, now time.Time) (*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, errors.New("empty certificate chain")
	}
	certs := make([]*x509.Certificate, len(chain))
	for i, der := range chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("chain[%d]: %w", i, err)
		}
		certs[i] = c
	}
	leaf := certs[0]
	got, err := spiffe.FromCertificate(leaf)
	if err != nil {
		return nil, err
	}
	if got != id {
		return nil, fmt.Errorf("certificate is for %s, requested %s", got, id)
	}
	if pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(key.Public()) {
		return nil, errors.New("certificate is not for the key in the request")
	}
	if !now.Before(leaf.NotAfter) {
		return nil, fmt.Errorf("certificate expired at %s", leaf.NotAfter.Format(time.RFC3339))
	}
	if len(roots) == 0 {
		return leaf, nil // no bundle to check against; peers will decide
	}
	rootPool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	// ExtKeyUsageAny: the profile's serverAuth+clientAuth is the CA's business; this
	// only checks that peers holding these roots can build the chain.
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: rootPool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("certificate does not verify against the returned roots: %w", err)
	}
	return leaf, nil
}

// refreshTime is half-way through the certificate's lifetime (Istio's default), a little
// earlier by jitter. A certificate already past half-life when received (a lifetime
// shorter than the backdated NotBefore, or a slow CA) is renewed half-way through what
// remains of it instead, never in a tight loop.
func refreshTime(leaf *x509.Certificate, now time.Time) time.Time {
	lifetime := leaf.NotAfter.Sub(leaf.NotBefore)
	at := leaf.NotBefore.Add(lifetime / 2)
	if j := renewJitter(lifetime); j > 0 {
		at = at.Add(-mrand.N(j + 1))
	}
	if !at.After(now) {
		at = now.Add(leaf.NotAfter.Sub(now) / 2)
	}
	return at
}

// renewJitter is the most a renewal is moved earlier: 1% of the lifetime, at most
// maxRenewJitter.
func renewJitter(lifetime time.Duration) time.Duration {
	return min(lifetime/100, maxRenewJitter)
}
