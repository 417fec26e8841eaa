package policy

import (
	"net/netip"
	"slices"
	"strings"
)

// matchOp is how Istio reads a string value: "*" present, "abc*" prefix, "*abc" suffix,
// anything else exact.
type matchOp uint8

const (
	opExact matchOp = iota
	opPrefix
	opSuffix
	opPresent
)

type strMatch struct {
	op matchOp
	s  string
}

func newStrMatch(v string) strMatch {
	switch {
	case v == "*":
		return strMatch{op: opPresent}
	case strings.HasPrefix(v, "*"):
		return strMatch{op: opSuffix, s: v[1:]}
	case strings.HasSuffix(v, "*"):
		return strMatch{op: opPrefix, s: v[:len(v)-1]}
	}
	return strMatch{op: opExact, s: v}
}

// matches never matches the empty string: an attribute that is absent (a plaintext
// peer's principal) matches no positive value.
func (m strMatch) matches(v string) bool {
	if v == "" {
		return false
	}
	switch m.op {
	case opPresent:
		return true
	case opPrefix:
		return strings.HasPrefix(v, m.s)
	case opSuffix:
		return strings.HasSuffix(v, m.s)
	}
	return v == m.s
}

type saMatch struct{ namespace, serviceAccount string }

// l4Match is one source, operation or condition reduced to what ztunnel can see. Every
// non-empty field must hold; a field holds when any positive value and no negative
// value matches (istio/ztunnel src/rbac.rs). An empty l4Match matches everything: it is
// what is left of a DENY's HTTP-only source, operation or condition.
type l4Match struct {
	principals, notPrincipals           []strMatch
	namespaces, notNamespaces           []strMatch
	trustDomains, notTrustDomains       []strMatch
	serviceAccounts, notServiceAccounts []saMatch
	srcIPs, notSrcIPs                   []netip.Prefix
	dstIPs, notDstIPs                   []netip.Prefix
	ports, notPorts                     []uint16
}

// peer is what the source's SPIFFE ID says, parsed once per connection.
type peer struct {
	principal      string // "td/ns/foo/sa/bar", "" for plaintext
	trustDomain    string
	namespace      string
	serviceAccount string
}

func parsePeer(id string) peer {
	// Istio's matchers assume the spiffe:// scheme and compare what follows; an
	// identity in another form matches no positive value.
	rest, ok := strings.CutPrefix(id, "spiffe://")
	if !ok || rest == "" {
		return peer{}
	}
	p := peer{principal: rest}
	td, path, _ := strings.Cut(rest, "/")
	p.trustDomain = td
	if seg := strings.Split(path, "/"); len(seg) == 4 && seg[0] == "ns" && seg[2] == "sa" {
		p.namespace, p.serviceAccount = seg[1], seg[3]
	}
	return p
}

func holds[T any](pos, neg []T, match func(T) bool) bool {
	if len(pos) > 0 && !slices.ContainsFunc(pos, match) {
		return false
	}
	return !slices.ContainsFunc(neg, match)
}

func (m *l4Match) matches(p peer, c Conn) bool {
	str := func(v string) func(strMatch) bool {
		return func(sm strMatch) bool { return sm.matches(v) }
	}
	ip := func(a netip.Addr) func(netip.Prefix) bool {
		a = a.Unmap()
		return func(pf netip.Prefix) bool { return pf.Contains(a) }
	}
	return holds(m.principals, m.notPrincipals, str(p.principal)) &&
		holds(m.namespaces, m.notNamespaces, str(p.namespace)) &&
		holds(m.trustDomains, m.notTrustDomains, str(p.trustDomain)) &&
		holds(m.serviceAccounts, m.notServiceAccounts, func(sa saMatch) bool {
			return p.serviceAccount != "" && sa.namespace == p.namespace && sa.serviceAccount == p.serviceAccount
		}) &&
		holds(m.srcIPs, m.notSrcIPs, ip(c.SrcIP)) &&
		holds(m.dstIPs, m.notDstIPs, ip(c.DstIP)) &&
		holds(m.ports, m.notPorts, func(port uint16) bool { return port == c.DstPort })
}

// rule is one spec.rules entry: every clause must hold, and a clause holds when any of
// its matches does (from entries, to entries, or the one match of a when condition).
type rule struct {
	clauses [][]l4Match
	// never is set for an ALLOW rule that needs HTTP attributes.
	never bool
}

func (r *rule) matches(p peer, c Conn) bool {
	if r.never {
		return false
	}
	for _, clause := range r.clauses {
		if !slices.ContainsFunc(clause, func(m l4Match) bool { return m.matches(p, c) }) {
			return false
		}
	}
	return true
}

func selects(selector, labels map[string]string) bool {
	for k, v := range selector {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}
