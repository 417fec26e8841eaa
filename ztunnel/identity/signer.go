package identity

import (
	"context"
	"crypto/x509"
	"errors"
	"time"

	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/internal/spiffe"
)

// Signer turns a CSR into a certificate for id. The Manager does not trust it blindly:
// the chain must certify id and the CSR's key, and chain to roots when roots are given.
type Signer interface {
	// Sign returns the certificate chain, leaf first, DER-encoded, and the trust bundle
	// of id's trust domain. An empty roots means "no change to the bundle".
	Sign(ctx context.Context, csrDER []byte, id spiffe.ID) (chain [][]byte, roots []*x509.Certificate, err error)
}

// LocalSigner signs with a CA in this process: ztunnel's local-CA mode, until the
// controller serves the CA over gRPC. It trusts its caller, so it is only for setups
// where ztunnel may act for every identity (the lab, single-node tests).
type LocalSigner struct {
	CA *ca.CA
	// TTL of issued certificates; zero means ca.DefaultTTL.
	TTL time.Duration
}

// Sign implements Signer.
func (s LocalSigner) Sign(ctx context.Context, csrDER []byte, id spiffe.ID) ([][]byte, []*x509.Certificate, error) {
	if s.CA == nil {
		return nil, nil, errors.New("identity: LocalSigner has no CA")
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	der, err := s.CA.Sign(csrDER, id, s.TTL)
	if err != nil {
		return nil, nil, err
	}
	return [][]byte{der}, s.CA.Roots(), nil
}
