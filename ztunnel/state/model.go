// Package state is ztunnel's view of the mesh: workloads, services and policies. One
// updater builds an immutable Snapshot and swaps it in; the proxies read the current
// snapshot without locks. Conversion (from local YAML now, from the controller's stream
// later) happens outside the swap, so a reader never sees half an update.
package state

import (
	"net/netip"

	"github.com/sluicemesh/sluice/internal/spiffe"
)

// Protocol says how a workload is reached.
type Protocol string

const (
	// HBONE: the workload is in the mesh; connect over mutual TLS to its port 15008.
	HBONE Protocol = "HBONE"
	// TCP: the workload is outside the mesh; connect to it directly.
	TCP Protocol = "TCP"
)

// DefaultTrustDomain is Istio's.
const DefaultTrustDomain = "cluster.local"

// Workload is one pod (or VM) the mesh knows.
type Workload struct {
	UID            string            `json:"uid"`
	Name           string            `json:"name"`
	Namespace      string            `json:"namespace"`
	ServiceAccount string            `json:"serviceAccount"`
	Node           string            `json:"node"`
	IPs            []netip.Addr      `json:"ips"`
	Labels         map[string]string `json:"labels,omitempty"`
	Protocol       Protocol          `json:"protocol"`
	TrustDomain    string            `json:"trustDomain,omitempty"`
	// WorkloadName, CanonicalName and CanonicalRevision label metrics as Istio does.
	WorkloadName      string `json:"workloadName,omitempty"`
	CanonicalName     string `json:"canonicalName,omitempty"`
	CanonicalRevision string `json:"canonicalRevision,omitempty"`
	// Waypoint, when set, receives all traffic addressed to this workload.
	Waypoint *Waypoint `json:"waypoint,omitempty"`
}

// Identity is the workload's SPIFFE identity.
func (w *Workload) Identity() spiffe.ID {
	td := w.TrustDomain
	if td == "" {
		td = DefaultTrustDomain
	}
	sa := w.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	return spiffe.ID{TrustDomain: td, Namespace: w.Namespace, ServiceAccount: sa}
}

// Key is namespace/name.
func (w *Workload) Key() string { return w.Namespace + "/" + w.Name }

// Waypoint is an L7 proxy that traffic for a workload or service goes through.
type Waypoint struct {
	Address  netip.Addr `json:"address"`
	Identity string     `json:"identity"` // SPIFFE ID the waypoint must present
}

// Service is a set of workloads behind virtual IPs.
type Service struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Hostname  string            `json:"hostname,omitempty"`
	VIPs      []netip.Addr      `json:"vips"`
	Ports     []ServicePort     `json:"ports"`
	Selector  map[string]string `json:"selector,omitempty"`
	Waypoint  *Waypoint         `json:"waypoint,omitempty"`
}

// ServicePort maps a service port to the workloads' port.
type ServicePort struct {
	Name       string `json:"name,omitempty"`
	Port       uint16 `json:"port"`
	TargetPort uint16 `json:"targetPort,omitempty"` // 0 means the same as Port
}

// Key is namespace/name.
func (s *Service) Key() string { return s.Namespace + "/" + s.Name }

// Target returns the workload port for service port p.
func (s *Service) Target(p uint16) (uint16, bool) {
	for _, sp := range s.Ports {
		if sp.Port == p {
			if sp.TargetPort == 0 {
				return p, true
			}
			return sp.TargetPort, true
		}
	}
	return 0, false
}

// Selects reports whether the service's selector picks w: same namespace and every
// selector label present, as Kubernetes does. An empty selector selects nothing.
func (s *Service) Selects(w *Workload) bool {
	if len(s.Selector) == 0 || w.Namespace != s.Namespace {
		return false
	}
	for k, v := range s.Selector {
		if w.Labels[k] != v {
			return false
		}
	}
	return true
}
