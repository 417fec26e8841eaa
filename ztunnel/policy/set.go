package policy

import (
	"fmt"
	"sort"
	"strings"
)

// Set is the compiled policy of the mesh. It is immutable: build a new one with Compile
// on every configuration change and swap it in; concurrent reads need no lock.
type Set struct {
	// RootNamespace holds the mesh-wide policies. Compile sets it; treat it as read-only.
	RootNamespace string

	authz map[string][]*authzPolicy // by namespace, sorted by name
	peer  peerLevels
	notes []string
}

// Compile builds a Set. root is the root namespace ("" means DefaultRootNamespace).
//
// The errors are *PolicyError, one per problem, each naming the policy and field. Every
// rejected policy is still part of the Set and fails closed, as the package comment
// describes; a policy without a namespace cannot be scoped and fails closed mesh-wide.
// The Set is always usable.
func Compile(root string, authz []AuthorizationPolicy, peer []PeerAuthentication) (*Set, []error) {
	if root == "" {
		root = DefaultRootNamespace
	}
	s := &Set{RootNamespace: root, authz: map[string][]*authzPolicy{}}
	var errs []error
	for _, ap := range authz {
		p, e, n := compileAuthz(ap)
		errs = append(errs, e...)
		s.notes = append(s.notes, n...)
		if p == nil {
			continue
		}
		ns := ap.Namespace
		if ns == "" {
			ns = root
		}
		s.authz[ns] = append(s.authz[ns], p)
	}
	for _, list := range s.authz {
		sort.SliceStable(list, func(i, j int) bool { return list[i].key < list[j].key })
	}
	lv, e, n := compilePeer(root, peer)
	s.peer = lv
	errs = append(errs, e...)
	s.notes = append(s.notes, n...)
	return s, errs
}

// Notes are remarks about accepted policies that do not do everything they say at L4:
// policies for waypoints, HTTP attributes ztunnel cannot see, DISABLE enforced as
// PERMISSIVE, conflicting PeerAuthentications. Worth logging once per Compile.
func (s *Set) Notes() []string {
	if s == nil {
		return nil
	}
	return append([]string(nil), s.notes...)
}

// Mode returns the effective PeerAuthentication mode for a connection to port of dst
// (the workload's port, not a Service port): the workload-level policy if one selects
// dst (its portLevelMtls for that port first), else the namespace's, else the mesh's,
// UNSET inheriting from the level above; PERMISSIVE when nothing says otherwise. A nil
// Set says STRICT.
func (s *Set) Mode(dst Workload, port uint16) Mode {
	if s == nil {
		return ModeStrict
	}
	m, _ := s.peer.mode(dst, port)
	return m
}

// Authorize decides a connection to dst. It enforces PeerAuthentication STRICT as
// well, so a proxy needs no separate plaintext check. A nil Set denies everything: no
// policy has been loaded yet.
func (s *Set) Authorize(dst Workload, c Conn) Decision {
	if s == nil {
		return Decision{Reason: "no policy has been loaded yet"}
	}
	if c.SrcIdentity == "" {
		if mode, from := s.peer.mode(dst, c.DstPort); !mode.AllowsPlaintext() {
			return Decision{Policy: from, Reason: fmt.Sprintf(
				"plaintext connection to port %d, but PeerAuthentication %s requires mutual TLS (STRICT)", c.DstPort, from)}
		}
	}
	p := parsePeer(c.SrcIdentity)
	applicable := s.applicable(dst)
	var allows []*authzPolicy
	for _, pol := range applicable {
		if !pol.deny {
			allows = append(allows, pol)
			continue
		}
		i, ok := pol.match(p, c)
		if !ok {
			continue
		}
		switch {
		case pol.denyAll:
			return Decision{Policy: pol.key, Reason: fmt.Sprintf(
				"policy was rejected (%s) and is enforced as deny-all until fixed", pol.rejected)}
		case pol.custom:
			return Decision{Policy: pol.key, Reason: fmt.Sprintf(
				"matched rule %d of a CUSTOM policy; Sluice cannot ask provider %q, so the connection is denied", i, pol.provider)}
		}
		return Decision{Policy: pol.key, Reason: fmt.Sprintf("matched rule %d of a DENY policy", i)}
	}
	if len(allows) == 0 {
		return Decision{Allow: true, Reason: "no ALLOW policy applies to the workload"}
	}
	for _, pol := range allows {
		if i, ok := pol.match(p, c); ok {
			return Decision{Allow: true, Policy: pol.key, Reason: fmt.Sprintf("matched rule %d of an ALLOW policy", i)}
		}
	}
	keys := make([]string, len(allows))
	for i, pol := range allows {
		keys[i] = pol.key
		if pol.rejected != "" {
			keys[i] += " (rejected: matches nothing)"
		}
	}
	return Decision{Reason: fmt.Sprintf("no ALLOW policy matched; %d apply: %s", len(allows), strings.Join(keys, ", "))}
}

// applicable lists the policies that select dst: the root namespace's and dst's own.
func (s *Set) applicable(dst Workload) []*authzPolicy {
	var out []*authzPolicy
	add := func(ns string) {
		for _, p := range s.authz[ns] {
			if selects(p.selector, dst.Labels) {
				out = append(out, p)
			}
		}
	}
	add(s.RootNamespace)
	if dst.Namespace != s.RootNamespace {
		add(dst.Namespace)
	}
	return out
}
