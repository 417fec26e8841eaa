package policy

import (
	"fmt"
	"net/netip"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
)

// DefaultRootNamespace is Istio's default root namespace, whose policies apply mesh-wide.
const DefaultRootNamespace = "istio-system"

// Workload is the destination of a connection, as far as policy is concerned.
type Workload struct {
	Namespace string
	Labels    map[string]string
}

// Conn is one inbound connection as the destination's ztunnel sees it.
type Conn struct {
	// SrcIdentity is the peer's verified SPIFFE ID ("spiffe://td/ns/foo/sa/bar"), or ""
	// for a plaintext connection.
	SrcIdentity string
	SrcIP       netip.Addr
	DstIP       netip.Addr
	DstPort     uint16
}

// AuthorizationPolicy is an Istio AuthorizationPolicy (security.istio.io v1 or v1beta1;
// the specs are identical).
type AuthorizationPolicy struct {
	Name, Namespace string
	Spec            *securityv1beta1.AuthorizationPolicy
	// ParseError, when set, says why the policy's source could not be read exactly (an
	// unknown field, a value of the wrong type). Spec then holds only what could be
	// read for failing closed: its action and selector. Compile rejects the policy.
	ParseError error
}

// PeerAuthentication is an Istio PeerAuthentication.
type PeerAuthentication struct {
	Name, Namespace string
	// CreationTimestamp breaks ties between policies at the same level: as in Istio the
	// oldest wins. Policies without one (local files) rank by namespace/name.
	CreationTimestamp time.Time
	Spec              *securityv1beta1.PeerAuthentication
	// ParseError: see AuthorizationPolicy.ParseError. Spec then holds only the selector.
	ParseError error
}

// Decision is the outcome of Set.Authorize.
type Decision struct {
	Allow bool
	// Policy is "namespace/name" of the policy that decided, "" when no policy did (the
	// default allow, or no ALLOW policy matching).
	Policy string
	// Reason is a sentence for the access log.
	Reason string
}

func (d Decision) String() string {
	verdict := "deny"
	if d.Allow {
		verdict = "allow"
	}
	if d.Policy == "" {
		return fmt.Sprintf("%s: %s", verdict, d.Reason)
	}
	return fmt.Sprintf("%s by %s: %s", verdict, d.Policy, d.Reason)
}

// Mode is the effective PeerAuthentication mTLS mode for a workload port.
type Mode uint8

const (
	// ModeStrict accepts only mutual-TLS (HBONE) connections.
	ModeStrict Mode = iota + 1
	// ModePermissive accepts mutual TLS and plaintext. Istio's default.
	ModePermissive
	// ModeDisable is what the policy says, but ztunnel cannot stop a peer from using
	// HBONE, so it behaves as ModePermissive (Istio's ambient docs: DISABLE is not
	// supported in ambient mode).
	ModeDisable
)

func (m Mode) String() string {
	switch m {
	case ModeStrict:
		return "STRICT"
	case ModePermissive:
		return "PERMISSIVE"
	case ModeDisable:
		return "DISABLE"
	}
	return fmt.Sprintf("Mode(%d)", uint8(m))
}

// AllowsPlaintext reports whether a connection without a peer identity may proceed.
func (m Mode) AllowsPlaintext() bool {
	return m == ModePermissive || m == ModeDisable
}
