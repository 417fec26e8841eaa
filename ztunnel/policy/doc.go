// Package policy decides, for one inbound connection at the destination's ztunnel,
// whether Istio's AuthorizationPolicy and PeerAuthentication allow it. It exists so that
// users keep the policies they wrote for Istio ambient and get the same L4 answers from
// Sluice; it is pure (no sockets) so every rule is tested with tables.
//
// Compile turns the policies into an immutable Set once per configuration change;
// Set.Authorize and Set.Mode are then called per connection.
//
// # Istio semantics followed
//
// Scope: a policy in the root namespace (default "istio-system") applies mesh-wide,
// any other only in its own namespace; spec.selector.matchLabels must be a subset of the
// workload's labels (no selector: every workload in scope). Policies with
// targetRef/targetRefs are for waypoints: ztunnel does not enforce them (istiod's
// ambient conversion drops them for ztunnel too), and Compile records a note.
//
// Evaluation: PeerAuthentication STRICT (a plaintext connection is denied; istiod sends
// STRICT to ztunnel as a DENY policy, so it is part of authorization here too), then
// DENY, then ALLOW. Any matching DENY denies. If at least one ALLOW policy applies and
// none matches, the connection is denied; with no ALLOW policy it is allowed. A policy
// without rules matches nothing (an ALLOW spec {} is Istio's allow-nothing); a rule
// without from/to/when matches everything.
//
// Matching follows istio/ztunnel src/rbac.rs: principals are SPIFFE IDs without
// "spiffe://", values support exact, "prefix*", "*suffix" and "*" (present, so any
// authenticated peer); namespaces and serviceAccounts come from the peer's SPIFFE ID, so
// their positive forms never match plaintext while their not-forms do.
//
// # What L4 cannot see
//
// ztunnel sees no HTTP. Following istiod's conversion for ztunnel
// (pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go), the HTTP-only
// attributes are requestPrincipals, remoteIpBlocks, hosts, methods, paths (and their not-
// forms) and every when key other than source.ip, source.namespace, source.principal,
// destination.ip and destination.port (connection.sni included: the inner stream of an
// HBONE tunnel is opaque). An ALLOW rule using any of them never matches, which is
// stricter than written. A DENY rule using them is enforced without them: its L4 parts
// still apply and an HTTP-only source, operation or condition matches every connection,
// which denies more than written. That is what istiod's status message promises ("DENY
// policy with HTTP attributes is enforced without the HTTP rules. This will be more
// restrictive than requested."). Istio's ztunnel actually skips the empty match such a
// rule leaves behind, so a DENY with only HTTP attributes has no effect there
// (istio/istio#61126); Sluice deliberately implements the documented, closed behaviour.
//
// Sluice evaluates trustDomains/notTrustDomains from the peer's SPIFFE ID; istiod's
// ambient conversion drops those fields, which would let an ALLOW rule match any trust
// domain.
//
// # Rejected policies fail closed
//
// Compile returns an error for every policy it cannot enforce exactly (malformed
// values, unknown fields or attributes, unsupported actions). A rejected policy never
// opens anything and a rejected DENY never vanishes:
//
//   - ALLOW: enforced as an ALLOW that matches nothing. The workloads it selects are
//     default-deny; other, valid ALLOW policies still grant access.
//   - DENY, or a policy whose action cannot be read: enforced as deny-all for the
//     workloads it selects (its whole namespace, or the mesh for the root namespace,
//     when the selector itself cannot be read).
//   - CUSTOM: Sluice cannot call the extension provider. As Envoy's ext_authz does when
//     its provider is unreachable, the connections the policy's rules would have sent
//     to the provider are denied (the rules are evaluated like a DENY's); if the rules
//     are also malformed, deny-all.
//   - AUDIT: ignored. AUDIT never allows or denies in Istio, so dropping it changes no
//     decision.
//   - PeerAuthentication: enforced as STRICT at its level (mesh, namespace or workload),
//     without port exceptions.
package policy
