package policy

import (
	"fmt"
	"maps"
	"net/netip"
	"strconv"
	"strings"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

// authzPolicy is a compiled AuthorizationPolicy.
type authzPolicy struct {
	key      string // namespace/name
	selector map[string]string
	deny     bool // DENY, CUSTOM, or a rejected policy of unknown action
	custom   bool
	provider string
	rules    []rule
	// denyAll replaces the rules of a rejected DENY: it matches every connection.
	denyAll bool
	// rejected is the first problem Compile found, for the access log.
	rejected string
}

// match returns the index of the first matching rule; -1 with ok for denyAll.
func (p *authzPolicy) match(pr peer, c Conn) (int, bool) {
	if p.denyAll {
		return -1, true
	}
	for i := range p.rules {
		if p.rules[i].matches(pr, c) {
			return i, true
		}
	}
	return 0, false
}

const (
	effectAllowNothing = "enforced as an ALLOW policy that matches nothing until fixed: the workloads it selects deny what no other ALLOW policy allows"
	effectDenyAll      = "enforced as deny-all for the workloads it selects until fixed"
	effectIgnored      = "the policy has no effect"
)

// compileAuthz returns nil for a policy that ztunnel does not enforce.
func compileAuthz(p AuthorizationPolicy) (*authzPolicy, []error, []string) {
	ck := &checker{kind: "AuthorizationPolicy", namespace: p.Namespace, name: p.Name}
	var notes []string
	if p.Name == "" {
		ck.addf("metadata.name", "must not be empty")
	}
	if p.Namespace == "" {
		ck.addf("metadata.namespace", "must not be empty; the policy cannot be scoped")
	}
	spec := p.Spec
	unreadable := false
	if p.ParseError != nil {
		ck.addf("", "%v", p.ParseError)
		unreadable = spec == nil
	}
	if spec == nil {
		spec = &securityv1beta1.AuthorizationPolicy{}
	}

	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		if spec.GetSelector() == nil {
			notes = append(notes, ck.notef("spec.targetRef(s) is set: the policy is for waypoints and ztunnel does not enforce it"))
			return nil, nil, notes
		}
		ck.addf("spec", "only one of selector, targetRef and targetRefs may be set")
	}

	// An unusable selector yields nil: the stand-in then covers the whole scope.
	out := &authzPolicy{key: ck.key(), selector: checkSelector(ck, spec.GetSelector())}

	action := spec.GetAction()
	if unreadable {
		action = -1
	}
	unsupported := ""
	switch action {
	case securityv1beta1.AuthorizationPolicy_ALLOW:
	case securityv1beta1.AuthorizationPolicy_DENY:
		out.deny = true
	case securityv1beta1.AuthorizationPolicy_AUDIT:
		ck.addf("spec.action", "AUDIT is not supported by Sluice's ztunnel; remove the policy (AUDIT never allows or denies a connection in Istio either)")
		return nil, ck.finish(effectIgnored), notes
	case securityv1beta1.AuthorizationPolicy_CUSTOM:
		out.deny = true
		out.custom, out.provider = true, spec.GetProvider().GetName()
		if out.provider == "" {
			ck.addf("spec.provider.name", "CUSTOM requires an extension provider")
		}
		unsupported = fmt.Sprintf("CUSTOM is not supported by Sluice's ztunnel, which cannot call extension provider %q; remove the policy, or attach it to a waypoint with targetRefs", out.provider)
	default:
		out.deny = true
		if p.ParseError == nil {
			ck.addf("spec.action", "unknown action %d", int32(action))
		}
	}
	if spec.GetProvider() != nil && action != securityv1beta1.AuthorizationPolicy_CUSTOM {
		ck.addf("spec.provider", "only valid with action CUSTOM")
	}

	for i, r := range spec.GetRules() {
		field := fmt.Sprintf("spec.rules[%d]", i)
		compiled, l7 := compileRule(ck, field, r, p.Namespace, !out.deny)
		out.rules = append(out.rules, compiled)
		if len(l7) == 0 {
			continue
		}
		list := strings.Join(l7, ", ")
		if out.deny {
			notes = append(notes, ck.notef("%s uses HTTP attributes (%s), which ztunnel cannot see; the rule is enforced without them and denies more than written. Use a waypoint to enforce HTTP rules", field, list))
		} else {
			notes = append(notes, ck.notef("%s uses HTTP attributes (%s), which ztunnel cannot see; this ALLOW rule never matches. Use a waypoint to enforce HTTP rules", field, list))
		}
	}

	malformed := len(ck.errs) > 0
	if malformed {
		notes = nil // the rules are not enforced as written at all
	}
	if unsupported != "" {
		ck.addf("spec.action", "%s", unsupported)
	}
	switch {
	case malformed && out.deny:
		out.rejected = ck.errs[0].Problem
		out.denyAll, out.rules = true, nil
		return out, ck.finish(effectDenyAll), notes
	case malformed:
		out.rejected = ck.errs[0].Problem
		out.rules = nil
		return out, ck.finish(effectAllowNothing), notes
	case unsupported != "":
		out.rejected = unsupported
		return out, ck.finish("connections its rules match are denied, as Envoy's ext_authz does when its provider is unreachable"), notes
	}
	return out, nil, notes
}

// checkSelector validates a workload selector as Istio's CRD does. It returns the
// labels to match, or nil (all workloads in scope) when there is no selector or it is
// unusable; the caller fails closed on the errors.
func checkSelector(ck *checker, sel *typev1beta1.WorkloadSelector) map[string]string {
	if sel == nil {
		return nil
	}
	bad := false
	for k, v := range sel.GetMatchLabels() {
		field := fmt.Sprintf("spec.selector.matchLabels[%q]", k)
		switch {
		case k == "":
			ck.addf("spec.selector.matchLabels", "label key must not be empty")
			bad = true
		case strings.Contains(k, "*"):
			ck.addf(field, "wildcard not allowed in label key match")
			bad = true
		case strings.Contains(v, "*"):
			ck.addf(field, "wildcard not allowed in label value match; list the values in separate policies")
			bad = true
		}
	}
	if bad || len(sel.GetMatchLabels()) == 0 {
		return nil
	}
	return maps.Clone(sel.GetMatchLabels()) // the Set must not change if the caller's spec does
}

// compileRule validates one rule and reduces it to L4. l7 lists the HTTP-only fields it
// uses. For an ALLOW rule those make it never match; a DENY rule drops them, which
// leaves a superset of what was written (istiod's ambient conversion: "DENY policy with
// HTTP attributes is enforced without the HTTP rules").
func compileRule(ck *checker, field string, r *securityv1beta1.Rule, policyNS string, allow bool) (rule, []string) {
	var out rule
	var l7 []string
	addL7 := func(name string) {
		for _, have := range l7 {
			if have == name {
				return
			}
		}
		l7 = append(l7, name)
	}

	if len(r.GetFrom()) > 0 {
		var clause []l4Match
		for j, from := range r.GetFrom() {
			f := fmt.Sprintf("%s.from[%d].source", field, j)
			clause = append(clause, compileSource(ck, f, from.GetSource(), policyNS, addL7))
		}
		out.clauses = append(out.clauses, clause)
	}
	if len(r.GetTo()) > 0 {
		var clause []l4Match
		for j, to := range r.GetTo() {
			f := fmt.Sprintf("%s.to[%d].operation", field, j)
			clause = append(clause, compileOperation(ck, f, to.GetOperation(), addL7))
		}
		out.clauses = append(out.clauses, clause)
	}
	for j, cond := range r.GetWhen() {
		f := fmt.Sprintf("%s.when[%d]", field, j)
		if m, ok := compileCondition(ck, f, cond, addL7); ok {
			out.clauses = append(out.clauses, []l4Match{m})
		}
	}
	if allow && len(l7) > 0 {
		out = rule{never: true}
	}
	return out, l7
}

func compileSource(ck *checker, field string, s *securityv1beta1.Source, policyNS string, addL7 func(string)) l4Match {
	var m l4Match
	if s == nil || isEmptySource(s) {
		ck.addf(field, "must not be empty")
		return m
	}
	m.principals = principalList(ck, field+".principals", s.GetPrincipals())
	m.notPrincipals = principalList(ck, field+".notPrincipals", s.GetNotPrincipals())
	m.namespaces = stringList(ck, field+".namespaces", s.GetNamespaces())
	m.notNamespaces = stringList(ck, field+".notNamespaces", s.GetNotNamespaces())
	m.trustDomains = stringList(ck, field+".trustDomains", s.GetTrustDomains())
	m.notTrustDomains = stringList(ck, field+".notTrustDomains", s.GetNotTrustDomains())
	m.serviceAccounts = serviceAccountList(ck, field+".serviceAccounts", s.GetServiceAccounts(), policyNS)
	m.notServiceAccounts = serviceAccountList(ck, field+".notServiceAccounts", s.GetNotServiceAccounts(), policyNS)
	if len(s.GetServiceAccounts())+len(s.GetNotServiceAccounts()) > 0 &&
		len(s.GetPrincipals())+len(s.GetNotPrincipals())+len(s.GetNamespaces())+len(s.GetNotNamespaces()) > 0 {
		ck.addf(field, "serviceAccounts cannot be set with principals or namespaces")
	}
	m.srcIPs = ipList(ck, field+".ipBlocks", s.GetIpBlocks())
	m.notSrcIPs = ipList(ck, field+".notIpBlocks", s.GetNotIpBlocks())

	// remoteIpBlocks is the client address from X-Forwarded-For or PROXY protocol,
	// which ztunnel does not have; istiod's ambient conversion treats it as HTTP.
	ipList(ck, field+".remoteIpBlocks", s.GetRemoteIpBlocks())
	ipList(ck, field+".notRemoteIpBlocks", s.GetNotRemoteIpBlocks())
	nonEmpty(ck, field+".requestPrincipals", s.GetRequestPrincipals())
	nonEmpty(ck, field+".notRequestPrincipals", s.GetNotRequestPrincipals())
	for _, f := range []struct {
		name string
		vals []string
	}{
		{"remoteIpBlocks", s.GetRemoteIpBlocks()}, {"notRemoteIpBlocks", s.GetNotRemoteIpBlocks()},
		{"requestPrincipals", s.GetRequestPrincipals()}, {"notRequestPrincipals", s.GetNotRequestPrincipals()},
	} {
		if len(f.vals) > 0 {
			addL7(f.name)
		}
	}
	return m
}

func isEmptySource(s *securityv1beta1.Source) bool {
	return len(s.GetPrincipals())+len(s.GetNotPrincipals())+
		len(s.GetRequestPrincipals())+len(s.GetNotRequestPrincipals())+
		len(s.GetNamespaces())+len(s.GetNotNamespaces())+
		len(s.GetServiceAccounts())+len(s.GetNotServiceAccounts())+
		len(s.GetIpBlocks())+len(s.GetNotIpBlocks())+
		len(s.GetRemoteIpBlocks())+len(s.GetNotRemoteIpBlocks())+
		len(s.GetTrustDomains())+len(s.GetNotTrustDomains()) == 0
}

func compileOperation(ck *checker, field string, op *securityv1beta1.Operation, addL7 func(string)) l4Match {
	var m l4Match
	if op == nil || len(op.GetHosts())+len(op.GetNotHosts())+len(op.GetPorts())+len(op.GetNotPorts())+
		len(op.GetMethods())+len(op.GetNotMethods())+len(op.GetPaths())+len(op.GetNotPaths()) == 0 {
		ck.addf(field, "must not be empty")
		return m
	}
	m.ports = portList(ck, field+".ports", op.GetPorts())
	m.notPorts = portList(ck, field+".notPorts", op.GetNotPorts())
	for _, f := range []struct {
		name string
		vals []string
	}{
		{"hosts", op.GetHosts()}, {"notHosts", op.GetNotHosts()},
		{"methods", op.GetMethods()}, {"notMethods", op.GetNotMethods()},
		{"paths", op.GetPaths()}, {"notPaths", op.GetNotPaths()},
	} {
		if len(f.vals) > 0 {
			nonEmpty(ck, field+"."+f.name, f.vals)
			addL7(f.name)
		}
	}
	return m
}

// l4Attributes are the when keys ztunnel evaluates, as in istiod's l4WhenAttributes.
var l4Attributes = map[string]bool{
	"source.ip": true, "source.namespace": true, "source.principal": true,
	"destination.ip": true, "destination.port": true,
}

// compileCondition returns ok=false for a condition ztunnel cannot evaluate.
func compileCondition(ck *checker, field string, c *securityv1beta1.Condition, addL7 func(string)) (l4Match, bool) {
	var m l4Match
	key := c.GetKey()
	if len(c.GetValues()) == 0 && len(c.GetNotValues()) == 0 {
		ck.addf(field, "at least one of values or notValues must be set")
	}
	vals, nots := field+".values", field+".notValues"
	switch {
	case key == "":
		ck.addf(field+".key", "must not be empty")
		return m, false
	case key == "source.ip":
		m.srcIPs, m.notSrcIPs = ipList(ck, vals, c.GetValues()), ipList(ck, nots, c.GetNotValues())
	case key == "destination.ip":
		m.dstIPs, m.notDstIPs = ipList(ck, vals, c.GetValues()), ipList(ck, nots, c.GetNotValues())
	case key == "destination.port":
		m.ports, m.notPorts = portList(ck, vals, c.GetValues()), portList(ck, nots, c.GetNotValues())
	case key == "source.namespace":
		m.namespaces, m.notNamespaces = stringList(ck, vals, c.GetValues()), stringList(ck, nots, c.GetNotValues())
	case key == "source.principal":
		m.principals, m.notPrincipals = principalList(ck, vals, c.GetValues()), principalList(ck, nots, c.GetNotValues())
	case key == "remote.ip":
		ipList(ck, vals, c.GetValues())
		ipList(ck, nots, c.GetNotValues())
	case key == "request.auth.principal", key == "request.auth.audiences", key == "request.auth.presenter",
		key == "connection.sni", strings.HasPrefix(key, "experimental.envoy.filters."):
	case strings.HasPrefix(key, "request.headers"), strings.HasPrefix(key, "request.auth.claims"):
		if !bracketed(key) {
			ck.addf(field+".key", "%q: write the name in brackets, such as request.headers[User-Agent]", key)
		}
	case key == "destination.labels" || strings.HasPrefix(key, "destination.labels[") ||
		key == "destination.name" || key == "destination.namespace" || key == "destination.user":
		ck.addf(field+".key", "%q was only supported by the removed v1alpha1 RBAC API", key)
		return m, false
	default:
		ck.addf(field+".key", "unknown attribute %q; see https://istio.io/latest/docs/reference/config/security/conditions/", key)
		return m, false
	}
	if !l4Attributes[key] {
		addL7("when " + key)
		return m, false
	}
	return m, true
}

func bracketed(key string) bool {
	open := strings.IndexByte(key, '[')
	return open > 0 && strings.HasSuffix(key, "]") && len(key) > open+2
}

// checkWildcard enforces Istio's string forms: "*" alone, as a prefix or as a suffix.
func checkWildcard(ck *checker, field, v string) bool {
	switch {
	case v == "":
		ck.addf(field, "empty value")
		return false
	case v == "*":
		return true
	case strings.Count(v, "*") == 0:
		return true
	case strings.Count(v, "*") == 1 && (strings.HasPrefix(v, "*") || strings.HasSuffix(v, "*")):
		return true
	}
	ck.addf(field, "%q: \"*\" may only stand alone, at the start or at the end", v)
	return false
}

// nonEmpty checks HTTP-only values, which ztunnel never evaluates; their own syntax
// (path templates, header matches) is the waypoint's to check.
func nonEmpty(ck *checker, field string, vals []string) {
	for i, v := range vals {
		if v == "" {
			ck.addf(fmt.Sprintf("%s[%d]", field, i), "empty value")
		}
	}
}

func stringList(ck *checker, field string, vals []string) []strMatch {
	var out []strMatch
	for i, v := range vals {
		if checkWildcard(ck, fmt.Sprintf("%s[%d]", field, i), v) {
			out = append(out, newStrMatch(v))
		}
	}
	return out
}

func principalList(ck *checker, field string, vals []string) []strMatch {
	var out []strMatch
	for i, v := range vals {
		f := fmt.Sprintf("%s[%d]", field, i)
		if strings.HasPrefix(v, "spiffe://") {
			ck.addf(f, "%q: write principals without \"spiffe://\", such as %q", v, strings.TrimPrefix(v, "spiffe://"))
			continue
		}
		if checkWildcard(ck, f, v) {
			out = append(out, newStrMatch(v))
		}
	}
	return out
}

// serviceAccountList reads "namespace/serviceaccount", or "serviceaccount" in the
// policy's namespace, as istiod does.
func serviceAccountList(ck *checker, field string, vals []string, policyNS string) []saMatch {
	var out []saMatch
	for i, v := range vals {
		f := fmt.Sprintf("%s[%d]", field, i)
		ns, sa, found := strings.Cut(v, "/")
		if !found {
			ns, sa = policyNS, v
		}
		switch {
		case strings.Contains(v, "*"):
			ck.addf(f, "%q: wildcards are not allowed in serviceAccounts", v)
		case ns == "" || sa == "" || strings.Contains(sa, "/"):
			ck.addf(f, "%q: want \"namespace/serviceaccount\" or \"serviceaccount\"", v)
		default:
			out = append(out, saMatch{namespace: ns, serviceAccount: sa})
		}
	}
	return out
}

func ipList(ck *checker, field string, vals []string) []netip.Prefix {
	var out []netip.Prefix
	for i, v := range vals {
		pf, err := parseIPBlock(v)
		if err != nil {
			ck.addf(fmt.Sprintf("%s[%d]", field, i), "%q is not an IP address or CIDR (such as 10.0.0.1 or 10.0.0.0/16)", v)
			continue
		}
		out = append(out, pf)
	}
	return out
}

func parseIPBlock(v string) (netip.Prefix, error) {
	if strings.Contains(v, "/") {
		pf, err := netip.ParsePrefix(v)
		if err != nil {
			return netip.Prefix{}, err
		}
		// Envoy ignores host bits after the prefix length; so does Contains once masked.
		if pf.Addr().Is4In6() {
			if pf.Bits() < 96 {
				return netip.Prefix{}, fmt.Errorf("IPv4-mapped prefix shorter than /96")
			}
			pf = netip.PrefixFrom(pf.Addr().Unmap(), pf.Bits()-96)
		}
		return pf.Masked(), nil
	}
	a, err := netip.ParseAddr(v)
	if err != nil {
		return netip.Prefix{}, err
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func portList(ck *checker, field string, vals []string) []uint16 {
	var out []uint16
	for i, v := range vals {
		p, err := strconv.ParseUint(v, 10, 16)
		if err != nil {
			ck.addf(fmt.Sprintf("%s[%d]", field, i), "%q is not a port number (0-65535); ranges and names are not supported", v)
			continue
		}
		out = append(out, uint16(p))
	}
	return out
}
