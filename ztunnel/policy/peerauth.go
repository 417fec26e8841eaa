package policy

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
)

type mtlsMode = securityv1beta1.PeerAuthentication_MutualTLS_Mode

const (
	mtlsUnset      = securityv1beta1.PeerAuthentication_MutualTLS_UNSET
	mtlsDisable    = securityv1beta1.PeerAuthentication_MutualTLS_DISABLE
	mtlsPermissive = securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE
	mtlsStrict     = securityv1beta1.PeerAuthentication_MutualTLS_STRICT
)

// peerPolicy is a compiled PeerAuthentication.
type peerPolicy struct {
	key      string
	ns       string // scope; the root namespace for one without a namespace
	created  time.Time
	selector map[string]string // nil for mesh and namespace level
	mode     mtlsMode
	ports    map[uint16]mtlsMode
	rejected bool // failed validation: enforced as STRICT
}

// older orders policies of one level as Istio does: the oldest wins; namespace/name
// breaks ties and orders policies without a timestamp. A rejected policy comes first
// whatever its age: being STRICT where a valid one would have been weaker is what fails
// closed (one whose selector could not be read was widened to its namespace, and must
// not lose to the namespace's own policy).
func older(a, b *peerPolicy) bool {
	if a.rejected != b.rejected {
		return a.rejected
	}
	if !a.created.Equal(b.created) {
		return a.created.Before(b.created)
	}
	return a.key < b.key
}

// peerLevels holds the PeerAuthentication in force at each level.
type peerLevels struct {
	mesh      *peerPolicy
	namespace map[string]*peerPolicy
	workload  map[string][]*peerPolicy // by namespace, oldest first
}

func compilePeer(root string, pas []PeerAuthentication) (peerLevels, []error, []string) {
	lv := peerLevels{namespace: map[string]*peerPolicy{}, workload: map[string][]*peerPolicy{}}
	var errs []error
	var notes []string
	wide := map[string][]*peerPolicy{} // mesh (root) and namespace level candidates
	for _, pa := range pas {
		p, e, n := compileOnePeer(root, pa)
		errs = append(errs, e...)
		notes = append(notes, n...)
		if p == nil {
			continue
		}
		if p.selector == nil {
			wide[p.ns] = append(wide[p.ns], p)
		} else {
			lv.workload[p.ns] = append(lv.workload[p.ns], p)
		}
	}
	for _, ns := range slices.Sorted(maps.Keys(wide)) {
		cands := wide[ns]
		sort.Slice(cands, func(i, j int) bool { return older(cands[i], cands[j]) })
		if len(cands) > 1 {
			keys := make([]string, len(cands))
			for i, c := range cands {
				keys[i] = c.key
			}
			level := "namespace-wide in " + ns
			if ns == root {
				level = "mesh-wide"
			}
			notes = append(notes, fmt.Sprintf("PeerAuthentication: %d %s policies (%s); only %s applies (a rejected one, else the oldest, then by name, as in Istio)",
				len(cands), level, strings.Join(keys, ", "), cands[0].key))
		}
		if ns == root {
			lv.mesh = cands[0]
		} else {
			lv.namespace[ns] = cands[0]
		}
	}
	for _, list := range lv.workload {
		sort.Slice(list, func(i, j int) bool { return older(list[i], list[j]) })
	}
	return lv, errs, notes
}

const effectStrict = "enforced as STRICT at its level, without port exceptions, until fixed"

func compileOnePeer(root string, pa PeerAuthentication) (*peerPolicy, []error, []string) {
	ck := &checker{kind: "PeerAuthentication", namespace: pa.Namespace, name: pa.Name}
	if pa.Name == "" {
		ck.addf("metadata.name", "must not be empty")
	}
	if pa.Namespace == "" {
		ck.addf("metadata.namespace", "must not be empty; the policy cannot be scoped")
	}
	if pa.ParseError != nil {
		ck.addf("", "%v", pa.ParseError)
	}
	spec := pa.Spec
	if spec == nil {
		spec = &securityv1beta1.PeerAuthentication{}
	}
	p := &peerPolicy{key: ck.key(), ns: pa.Namespace, created: pa.CreationTimestamp, selector: checkSelector(ck, spec.GetSelector())}
	sel := spec.GetSelector()
	if p.selector == nil && pa.Namespace != root && sel != nil && (len(sel.GetMatchLabels()) > 0 || pa.ParseError != nil) {
		// A workload-level policy whose selector cannot be read (or used) covers its
		// whole namespace, still at workload level (an empty selector matches every
		// pod), so that no valid workload-level policy there weakens it: as a rejected
		// policy it comes first there. (In the root namespace selectors are ignored.)
		p.selector = map[string]string{}
	}
	if p.ns == "" {
		p.ns, p.selector = root, nil // it cannot be scoped: fail closed mesh-wide
	}

	if pa.Namespace == root && len(spec.GetSelector().GetMatchLabels()) > 0 {
		// Istio ignores these (peer_authentication.proto and istiod's ambient code).
		return nil, nil, []string{ck.notef("a PeerAuthentication with a selector in the root namespace %s is ignored, as in Istio; put it in the workload's namespace", root)}
	}

	p.mode = checkMode(ck, "spec.mtls.mode", spec.GetMtls().GetMode())
	if len(spec.GetPortLevelMtls()) > 0 {
		if len(spec.GetSelector().GetMatchLabels()) == 0 {
			ck.addf("spec.portLevelMtls", "requires a selector: port-level mTLS applies only to workload-level policies")
		}
		p.ports = map[uint16]mtlsMode{}
		for port, m := range spec.GetPortLevelMtls() {
			field := fmt.Sprintf("spec.portLevelMtls[%d]", port)
			if port == 0 || port > 65535 {
				ck.addf(field, "port must be between 1 and 65535")
				continue
			}
			p.ports[uint16(port)] = checkMode(ck, field+".mode", m.GetMode())
		}
	}
	if len(ck.errs) > 0 {
		p.mode, p.ports, p.rejected = mtlsStrict, nil, true
		return p, ck.finish(effectStrict), nil
	}
	if p.mode == mtlsDisable || hasMode(p.ports, mtlsDisable) {
		return p, nil, []string{ck.notef("DISABLE cannot stop peers from using mutual TLS through ztunnel; it is enforced as PERMISSIVE")}
	}
	return p, nil, nil
}

func hasMode(ports map[uint16]mtlsMode, want mtlsMode) bool {
	for _, m := range ports {
		if m == want {
			return true
		}
	}
	return false
}

func checkMode(ck *checker, field string, m mtlsMode) mtlsMode {
	switch m {
	case mtlsUnset, mtlsDisable, mtlsPermissive, mtlsStrict:
		return m
	}
	ck.addf(field, "unknown mode %d; want STRICT, PERMISSIVE, DISABLE or UNSET", int32(m))
	return mtlsStrict
}

// mode resolves the effective mode, most specific level first; UNSET inherits.
func (lv *peerLevels) mode(dst Workload, port uint16) (Mode, string) {
	mode, from := mtlsPermissive, ""
	apply := func(p *peerPolicy, m mtlsMode) {
		if m != mtlsUnset {
			mode, from = m, p.key
		}
	}
	if lv.mesh != nil {
		apply(lv.mesh, lv.mesh.mode)
	}
	if p := lv.namespace[dst.Namespace]; p != nil {
		apply(p, p.mode)
	}
	for _, p := range lv.workload[dst.Namespace] {
		if selects(p.selector, dst.Labels) {
			apply(p, p.mode)
			if m, ok := p.ports[port]; ok {
				apply(p, m)
			}
			break
		}
	}
	switch mode {
	case mtlsStrict:
		return ModeStrict, from
	case mtlsDisable:
		return ModeDisable, from
	}
	return ModePermissive, from
}
