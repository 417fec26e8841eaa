package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	"sigs.k8s.io/yaml"
)

// object is the Kubernetes envelope of an Istio resource.
type object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name              string `json:"name"`
		Namespace         string `json:"namespace"`
		CreationTimestamp string `json:"creationTimestamp"`
	} `json:"metadata"`
	Spec json.RawMessage `json:"spec"`
}

// ParseAuthorizationPolicyYAML reads one YAML (or JSON) document as users write it for
// Istio: apiVersion security.istio.io/v1 or v1beta1, kind AuthorizationPolicy. A missing
// metadata.namespace is "default", as with kubectl apply.
//
// The error is for a document that is not an AuthorizationPolicy at all (bad YAML,
// another kind, no name). A spec that cannot be read exactly, such as one with an
// unknown field, is not an error here: the policy comes back with ParseError set and
// whatever action and selector could be read, so that Compile rejects it and it fails
// closed instead of vanishing. Pass it to Compile.
func ParseAuthorizationPolicyYAML(doc []byte) (AuthorizationPolicy, error) {
	obj, err := parseObject(doc, "AuthorizationPolicy")
	if err != nil {
		return AuthorizationPolicy{}, err
	}
	p := AuthorizationPolicy{Name: obj.Metadata.Name, Namespace: obj.Metadata.Namespace}
	spec := &securityv1beta1.AuthorizationPolicy{}
	if err := unmarshalSpec(obj.Spec, spec); err != nil {
		p.ParseError = err
		p.Spec = looseAuthzSpec(obj.Spec)
		return p, nil
	}
	p.Spec = spec
	return p, nil
}

// ParsePeerAuthenticationYAML is ParseAuthorizationPolicyYAML for PeerAuthentication.
// metadata.creationTimestamp, when present, is kept: the oldest policy of a level wins.
func ParsePeerAuthenticationYAML(doc []byte) (PeerAuthentication, error) {
	obj, err := parseObject(doc, "PeerAuthentication")
	if err != nil {
		return PeerAuthentication{}, err
	}
	p := PeerAuthentication{Name: obj.Metadata.Name, Namespace: obj.Metadata.Namespace}
	if ts := obj.Metadata.CreationTimestamp; ts != "" {
		t, err := time.Parse(time.RFC3339, ts)
		if err != nil {
			return PeerAuthentication{}, fmt.Errorf("PeerAuthentication %s/%s: metadata.creationTimestamp: %q is not an RFC 3339 time", p.Namespace, p.Name, ts)
		}
		p.CreationTimestamp = t
	}
	spec := &securityv1beta1.PeerAuthentication{}
	if err := unmarshalSpec(obj.Spec, spec); err != nil {
		p.ParseError = err
		p.Spec = &securityv1beta1.PeerAuthentication{Selector: looseSelector(obj.Spec)}
		return p, nil
	}
	p.Spec = spec
	return p, nil
}

func parseObject(doc []byte, kind string) (object, error) {
	var obj object
	if err := yaml.Unmarshal(doc, &obj); err != nil {
		return obj, fmt.Errorf("%s: %w", kind, err)
	}
	group, _, _ := strings.Cut(obj.APIVersion, "/")
	if obj.Kind != kind || group != "security.istio.io" {
		return obj, fmt.Errorf("want apiVersion security.istio.io/v1 and kind %s, got apiVersion %q and kind %q", kind, obj.APIVersion, obj.Kind)
	}
	if obj.Metadata.Name == "" {
		return obj, fmt.Errorf("%s: metadata.name must be set", kind)
	}
	if obj.Metadata.Namespace == "" {
		obj.Metadata.Namespace = "default"
	}
	return obj, nil
}

// unmarshalSpec decodes with protojson, which unlike the istio.io/api UnmarshalJSON
// rejects unknown fields: a misspelt "notPrincipal" must not silently widen a rule
// (kubectl's default strict field validation rejects it as well).
func unmarshalSpec(raw json.RawMessage, m proto.Message) error {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil
	}
	if err := protojson.Unmarshal(raw, m); err != nil {
		// protojson reports positions in the JSON it was given, not in the user's YAML.
		msg := err.Error()
		if _, after, ok := strings.Cut(msg, "): "); ok {
			msg = after
		}
		msg = strings.ReplaceAll(msg, "\u00a0", " ")
		if strings.Contains(msg, "invalid value for string field") {
			msg += ` (quote it: Istio's ports and values are strings, such as ports: ["8080"])`
		}
		return fmt.Errorf("spec: %s", msg)
	}
	return nil
}

// looseAuthzSpec keeps what a policy that failed to decode says about scope and
// action, for failing closed. An unreadable action is recorded as -1: deny-all.
func looseAuthzSpec(raw json.RawMessage) *securityv1beta1.AuthorizationPolicy {
	var fields map[string]json.RawMessage
	if json.Unmarshal(raw, &fields) != nil {
		return nil
	}
	spec := &securityv1beta1.AuthorizationPolicy{Selector: looseSelector(raw)}
	if a, ok := fields["action"]; ok {
		spec.Action = -1
		var name string
		var num int32
		if json.Unmarshal(a, &name) == nil {
			if v, ok := securityv1beta1.AuthorizationPolicy_Action_value[name]; ok {
				spec.Action = securityv1beta1.AuthorizationPolicy_Action(v)
			}
		} else if json.Unmarshal(a, &num) == nil {
			if _, ok := securityv1beta1.AuthorizationPolicy_Action_name[num]; ok {
				spec.Action = securityv1beta1.AuthorizationPolicy_Action(num)
			}
		}
	}
	if namesTarget(fields["targetRef"], false) || namesTarget(fields["targetRefs"], true) {
		spec.TargetRefs = []*typev1beta1.PolicyTargetReference{{}}
	}
	return spec
}

// namesTarget reports whether raw, a targetRef (or with list a targetRefs array), names
// at least one target by kind and name. Only then is an unreadable policy taken for a
// waypoint's: an empty or half-written reference ("targetRefs: [-]" from a template)
// must not make a DENY vanish.
func namesTarget(raw json.RawMessage, list bool) bool {
	type ref struct{ Kind, Name string }
	var refs []ref
	if list {
		if json.Unmarshal(raw, &refs) != nil {
			return false
		}
	} else {
		var r ref
		if json.Unmarshal(raw, &r) != nil {
			return false
		}
		refs = []ref{r}
	}
	for _, r := range refs {
		if r.Kind != "" && r.Name != "" {
			return true
		}
	}
	return false
}

// looseSelector is the selector of a spec that failed to decode: nil without one, its
// labels if they can be read, and an empty selector if one is there but cannot be read
// (a workload-level policy, of unknown workloads).
func looseSelector(raw json.RawMessage) *typev1beta1.WorkloadSelector {
	var s struct {
		Selector json.RawMessage `json:"selector"`
	}
	if json.Unmarshal(raw, &s) != nil {
		return nil
	}
	if v := bytes.TrimSpace(s.Selector); len(v) == 0 || bytes.Equal(v, []byte("null")) {
		return nil
	}
	var sel struct {
		MatchLabels map[string]string `json:"matchLabels"`
	}
	if json.Unmarshal(s.Selector, &sel) != nil {
		return &typev1beta1.WorkloadSelector{}
	}
	return &typev1beta1.WorkloadSelector{MatchLabels: sel.MatchLabels}
}
