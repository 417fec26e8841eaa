package identity

import (
	"fmt"
	"sort"
	"time"

	"github.com/sluicemesh/sluice/internal/spiffe"
)

// State of an identity's certificate, named as Istio's ztunnel names them in its admin
// dump so existing tooling and habits carry over.
type State string

const (
	// StateInitializing: no usable certificate yet and no failed request since the last
	// one (the first request, or the renewal of an expired one, is pending).
	StateInitializing State = "Initializing"
	// StateAvailable: a valid certificate is held. LastError may still be set when
	// renewals are failing.
	StateAvailable State = "Available"
	// StateUnavailable: no valid certificate and the last request failed.
	StateUnavailable State = "Unavailable"
)

// CertInfo describes one identity's certificate for the admin endpoint.
type CertInfo struct {
	Identity spiffe.ID `json:"identity"`
	State    State     `json:"state"`
	// Forgotten: no local workload uses the identity; it is dropped after the grace.
	Forgotten bool      `json:"forgotten,omitempty"`
	Serial    string    `json:"serial,omitempty"` // hex
	NotBefore time.Time `json:"notBefore,omitzero"`
	NotAfter  time.Time `json:"notAfter,omitzero"`
	// RefreshAt is when the next request is due: the renewal, or the next retry.
	RefreshAt time.Time `json:"refreshAt,omitzero"`
	Failures  int       `json:"failures,omitempty"`
	LastError string    `json:"lastError,omitempty"`
}

// Snapshot describes every identity the Manager holds, sorted by identity.
func (m *Manager) Snapshot() []CertInfo {
	m.init()
	now := time.Now()
	m.mu.RLock()
	out := make([]CertInfo, 0, len(m.entries))
	for id, e := range m.entries {
		info := CertInfo{Identity: id, Forgotten: !e.wanted, Failures: e.failures, RefreshAt: e.due}
		if e.lastErr != nil {
			info.LastError = e.lastErr.Error()
		}
		c := e.cur.Load()
		switch {
		case c != nil && now.Before(c.cert.Leaf.NotAfter):
			info.State = StateAvailable
		case e.lastErr != nil:
			info.State = StateUnavailable
		default:
			info.State = StateInitializing
		}
		if c != nil {
			leaf := c.cert.Leaf
			info.Serial = fmt.Sprintf("%x", leaf.SerialNumber)
			info.NotBefore, info.NotAfter = leaf.NotBefore, leaf.NotAfter
		}
		out = append(out, info)
	}
	m.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Identity.String() < out[j].Identity.String() })
	return out
}
