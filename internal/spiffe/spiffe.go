// Package spiffe is the one place that knows the shape of a mesh identity,
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, so that the CA that
// writes it, the ztunnel that presents it and the policy code that matches on it can
// never disagree about what a valid identity is.
//
// Parsing is deliberately stricter than net/url: an identity is compared as a string by
// peers (Istio's ztunnel and Envoy do), so anything that has two spellings —
// percent-encoding, upper-case trust domains, ports, queries, "." segments — is
// rejected rather than normalised.
package spiffe

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Scheme is the URI scheme of every SPIFFE ID.
const Scheme = "spiffe"

const (
	prefix = Scheme + "://"
	// Limits from the SPIFFE ID specification; longer IDs are refused by other
	// implementations, so refusing them here gives the error at the source.
	maxIDLength          = 2048
	maxTrustDomainLength = 255
)

// ErrInvalid is wrapped by every error about a malformed ID, so callers can tell a bad
// identity (a configuration or peer problem) from other failures with errors.Is.
var ErrInvalid = errors.New("invalid SPIFFE ID")

// ID is a workload identity in Istio's form. The zero value is not a valid ID.
type ID struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

// Parse parses s as spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>. The
// error names the part that is wrong.
func Parse(s string) (ID, error) {
	fail := func(format string, args ...any) (ID, error) {
		return ID{}, fmt.Errorf("%w %q: %s", ErrInvalid, s, fmt.Sprintf(format, args...))
	}
	if len(s) > maxIDLength {
		return fail("longer than %d bytes", maxIDLength)
	}
	rest, ok := strings.CutPrefix(s, prefix)
	if !ok {
		if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
			return fail("scheme must be lower-case %q", prefix)
		}
		return fail("must start with %q", prefix)
	}
	if i := strings.IndexAny(rest, "?#"); i >= 0 {
		return fail("must not have a query or fragment (found %q)", rest[i])
	}
	td, path, _ := strings.Cut(rest, "/")
	if err := checkTrustDomain(td); err != nil {
		return fail("%v", err)
	}
	segs := strings.Split(path, "/")
	if len(segs) != 4 || segs[0] != "ns" || segs[2] != "sa" {
		return fail("path %q is not /ns/<namespace>/sa/<service-account>", "/"+path)
	}
	id := ID{TrustDomain: td, Namespace: segs[1], ServiceAccount: segs[3]}
	if err := checkSegment("namespace", id.Namespace); err != nil {
		return fail("%v", err)
	}
	if err := checkSegment("service account", id.ServiceAccount); err != nil {
		return fail("%v", err)
	}
	return id, nil
}

// Validate reports whether id would survive a round trip through String and Parse.
// Callers building an ID from parts (a pod's namespace and service account, the
// configured trust domain) use it before issuing a certificate for it.
func (id ID) Validate() error {
	parsed, err := Parse(id.String())
	if err != nil {
		return err
	}
	if parsed != id {
		// Only reachable if a field smuggles a '/'; Parse's segment count catches it today.
		return fmt.Errorf("%w %q: fields do not round-trip", ErrInvalid, id.String())
	}
	return nil
}

// IsZero reports whether id is the zero ID.
func (id ID) IsZero() bool { return id == ID{} }

// String returns the URI form of id.
func (id ID) String() string {
	return prefix + id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// URL returns id as a URL, the form x509 templates and CSRs take for URI SANs.
func (id ID) URL() *url.URL {
	return &url.URL{Scheme: Scheme, Host: id.TrustDomain, Path: "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount}
}

// MarshalText makes IDs print as their URI in JSON (admin endpoints) and config.
func (id ID) MarshalText() ([]byte, error) {
	if id.IsZero() {
		return nil, nil
	}
	return []byte(id.String()), nil
}

// UnmarshalText parses the URI form; an empty text yields the zero ID.
func (id *ID) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		*id = ID{}
		return nil
	}
	parsed, err := Parse(string(b))
	if err != nil {
		return err
	}
	*id = parsed
	return nil
}

// FromCertificate returns the identity a certificate carries. Like Istio's ztunnel it
// requires exactly one URI SAN: with two, which one the peer "is" would depend on the
// verifier, so such a certificate is refused rather than guessed about. DNS and IP SANs
// are ignored.
func FromCertificate(cert *x509.Certificate) (ID, error) {
	if cert == nil {
		return ID{}, errors.New("no certificate: the peer presented none")
	}
	switch n := len(cert.URIs); n {
	case 0:
		return ID{}, fmt.Errorf("certificate (serial %x) has no URI SAN; a SPIFFE identity is required", cert.SerialNumber)
	case 1:
	default:
		uris := make([]string, n)
		for i, u := range cert.URIs {
			uris[i] = u.String()
		}
		return ID{}, fmt.Errorf("certificate (serial %x) has %d URI SANs %v; exactly one SPIFFE identity is required", cert.SerialNumber, n, uris)
	}
	id, err := Parse(cert.URIs[0].String())
	if err != nil {
		return ID{}, fmt.Errorf("certificate URI SAN: %w", err)
	}
	return id, nil
}

// FromRawChain returns the identity of the leaf of a DER chain (leaf first), as handed
// to tls.Config.VerifyPeerCertificate. It does not verify the chain.
func FromRawChain(rawCerts [][]byte) (ID, error) {
	if len(rawCerts) == 0 {
		return ID{}, errors.New("no certificate: the peer presented none")
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return ID{}, fmt.Errorf("parse peer certificate: %w", err)
	}
	return FromCertificate(leaf)
}

func checkTrustDomain(td string) error {
	switch {
	case td == "":
		return errors.New("trust domain is empty")
	case len(td) > maxTrustDomainLength:
		return fmt.Errorf("trust domain is longer than %d bytes", maxTrustDomainLength)
	case strings.Contains(td, "@"):
		return errors.New("trust domain must not contain user info ('@')")
	case strings.Contains(td, ":"):
		return errors.New("trust domain must not contain a port (':')")
	}
	for _, c := range td {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return fmt.Errorf("trust domain %q contains %q; only lower-case letters, digits, '.', '-' and '_' are allowed", td, c)
		}
	}
	return nil
}

func checkSegment(what, s string) error {
	switch s {
	case "":
		return fmt.Errorf("%s is empty", what)
	case ".", "..":
		return fmt.Errorf("%s must not be %q", what, s)
	}
	for _, c := range s {
		if c == '%' {
			return fmt.Errorf("%s %q is percent-encoded; SPIFFE IDs must be written literally", what, s)
		}
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return fmt.Errorf("%s %q contains %q; only letters, digits, '.', '-' and '_' are allowed", what, s, c)
		}
	}
	return nil
}
