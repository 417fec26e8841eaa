package policy

import (
	"fmt"
	"strings"
)

// PolicyError is one reason Compile rejected a policy. Error() names the policy and
// the field, says what is wrong and what Sluice enforces instead, for example:
//
//	AuthorizationPolicy foo/allow-db: spec.rules[0].from[0].source.ipBlocks[1]: "10.0.0.300" is not an IP address or CIDR (such as 10.0.0.1 or 10.0.0.0/16); enforced as an ALLOW policy that matches nothing until fixed
type PolicyError struct {
	Kind      string // "AuthorizationPolicy" or "PeerAuthentication"
	Namespace string
	Name      string
	// Field is the path of the offending field ("spec.rules[0].to[1].operation.ports[0]"),
	// "" when the problem is the whole policy.
	Field   string
	Problem string
	// Effect says what Sluice enforces in the policy's place.
	Effect string
}

func (e *PolicyError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s/%s: ", e.Kind, e.Namespace, e.Name)
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Problem)
	if e.Effect != "" {
		b.WriteString("; ")
		b.WriteString(e.Effect)
	}
	return b.String()
}

// checker collects the problems found in one policy.
type checker struct {
	kind, namespace, name string
	errs                  []*PolicyError
}

func (c *checker) addf(field, format string, args ...any) {
	c.errs = append(c.errs, &PolicyError{
		Kind:      c.kind,
		Namespace: c.namespace,
		Name:      c.name,
		Field:     field,
		Problem:   fmt.Sprintf(format, args...),
	})
}

// finish sets the effect on every problem and returns them as errors.
func (c *checker) finish(effect string) []error {
	out := make([]error, 0, len(c.errs))
	for _, e := range c.errs {
		e.Effect = effect
		out = append(out, e)
	}
	return out
}

func (c *checker) key() string { return c.namespace + "/" + c.name }

func (c *checker) notef(format string, args ...any) string {
	return fmt.Sprintf("%s %s: %s", c.kind, c.key(), fmt.Sprintf(format, args...))
}
