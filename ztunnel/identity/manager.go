// Package identity keeps a certificate for every workload identity on this node, so
// that ztunnel always has a valid certificate to present for the pods it proxies and a
// trust bundle to check peers against.
//
// It follows Istio's ztunnel: certificates are fetched when a local workload appears,
// renewed at half their lifetime with a fresh key, and a certificate in use is never
// dropped because a renewal failed — the old one stays until a new one arrives.
// Connections that need a certificate that does not exist yet wait for it; they are
// never sent without mutual TLS.
package identity

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sluicemesh/sluice/internal/spiffe"
)

// Defaults for the Manager's optional fields.
const (
	DefaultForgetGrace  = time.Minute
	DefaultConcurrency  = 8
	DefaultSignTimeout  = 30 * time.Second
	defaultRetryInitial = time.Second
	defaultRetryMax     = time.Minute
	// maxRenewJitter bounds how much earlier than half-life a renewal may start. Jitter
	// spreads the renewals of identities issued together (all pods at node start) so
	// they do not hit the CA in the same second twelve hours later.
	maxRenewJitter = 5 * time.Minute
)

// Backoff is the delay between failed certificate requests for one identity: Initial
// after the first failure, doubling up to Max.
type Backoff struct {
	Initial time.Duration // zero: 1s
	Max     time.Duration // zero: 1m
}

// Manager holds the certificates of the workload identities on this node. Configure the
// exported fields before calling any method; the zero value of each optional field is a
// sane default. Run must be running for certificates to be issued and renewed.
type Manager struct {
	// Signer issues certificates. Required.
	Signer Signer
	// Logger receives issuance and failure events; nil discards them.
	Logger *slog.Logger
	// KeyFactory makes the private key for each request; nil means ECDSA P-256, what
	// Istio uses. A new key per renewal limits what a leaked key is worth.
	KeyFactory func() (crypto.Signer, error)
	// RetryBackoff paces retries after a failed request.
	RetryBackoff Backoff
	// ForgetGrace is how long a forgotten identity's certificate stays available, for
	// connections being set up as its last workload goes away. Zero: DefaultForgetGrace.
	ForgetGrace time.Duration
	// Concurrency bounds requests in flight to the Signer. Zero: DefaultConcurrency.
	Concurrency int
	// SignTimeout bounds one Signer call. Zero: DefaultSignTimeout.
	SignTimeout time.Duration

	initOnce sync.Once
	wake     chan struct{} // pokes Run after Want/Forget
	running  atomic.Bool

	// mu guards entries and the bookkeeping fields of each entry. Certificate reads it
	// shared, so handshakes do not wait for each other.
	mu      sync.RWMutex
	entries map[spiffe.ID]*entry

	rootsMu sync.RWMutex
	roots   map[string]*x509.CertPool
}

// entry is one identity's state.
type entry struct {
	id  spiffe.ID
	cur atomic.Pointer[issued] // read without m.mu on the handshake path

	// Guarded by Manager.mu.
	wanted      bool
	forgottenAt time.Time
	due         time.Time // next request; zero means now
	inFlight    bool
	failures    int
	lastErr     error
	changed     chan struct{} // closed and replaced when cur changes or the entry is dropped
}

// issued is an immutable certificate with its private key and renewal time.
type issued struct {
	cert      *tls.Certificate // Leaf is set
	refreshAt time.Time
}

func (m *Manager) init() {
	m.initOnce.Do(func() {
		m.wake = make(chan struct{}, 1)
		m.entries = make(map[spiffe.ID]*entry)
		m.roots = make(map[string]*x509.CertPool)
	})
}

func (m *Manager) log() *slog.Logger {
	if m.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return m.Logger
}

func (m *Manager) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// Want records that a workload with identity id runs on this node, so its certificate is
// fetched (now, if there is none) and kept renewed. Calls are idempotent: the caller
// tracks how many workloads share the identity and calls Forget after the last one.
func (m *Manager) Want(id spiffe.ID) {
	m.init()
	if err := id.Validate(); err != nil {
		m.log().Error("not requesting a certificate for an invalid identity", "identity", id.String(), "error", err)
		return
	}
	m.mu.Lock()
	e := m.entries[id]
	if e == nil {
		e = &entry{id: id, changed: make(chan struct{})}
		m.entries[id] = e
	}
	already := e.wanted
	e.wanted, e.forgottenAt = true, time.Time{}
	m.mu.Unlock()
	if !already {
		m.poke()
	}
}

// Forget records that no workload on this node uses id any more: renewals stop and the
// certificate is dropped after ForgetGrace unless Want is called again.
func (m *Manager) Forget(id spiffe.ID) {
	m.init()
	m.mu.Lock()
	e := m.entries[id]
	if e != nil && e.wanted {
		e.wanted, e.forgottenAt = false, time.Now()
	}
	m.mu.Unlock()
	m.poke()
}

// Certificate returns a valid certificate for id, waiting for the first one (or a
// replacement of an expired one) until ctx is done. It fails at once for identities no
// local workload has: the node must never mint certificates for arbitrary identities.
func (m *Manager) Certificate(ctx context.Context, id spiffe.ID) (*tls.Certificate, error) {
	m.init()
	for {
		m.mu.RLock()
		e := m.entries[id]
		var changed chan struct{}
		if e != nil {
			changed = e.changed
		}
		m.mu.RUnlock()
		if e == nil {
			return nil, fmt.Errorf("no certificate for %s: no workload on this node has that identity", id)
		}
		// changed was read before cur: a certificate stored after this load closes it.
		if c := e.cur.Load(); c != nil && time.Now().Before(c.cert.Leaf.NotAfter) {
			return c.cert, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			m.mu.RLock()
			last := e.lastErr
			m.mu.RUnlock()
			if last != nil {
				return nil, fmt.Errorf("no certificate for %s yet: %w; last request to the CA failed: %v", id, ctx.Err(), last)
			}
			return nil, fmt.Errorf("no certificate for %s yet: %w; is the CA reachable?", id, ctx.Err())
		}
	}
}

// Roots returns the trust bundle for trustDomain, nil if there is none. The pool is
// shared: callers must not modify it.
func (m *Manager) Roots(trustDomain string) *x509.CertPool {
	m.init()
	m.rootsMu.RLock()
	defer m.rootsMu.RUnlock()
	return m.roots[trustDomain]
}

// SetRoots replaces the trust bundle for trustDomain (empty roots removes it). Bundles
// for the local trust domain also arrive with every issued certificate; SetRoots is for
// explicit updates and for peers' trust domains.
func (m *Manager) SetRoots(trustDomain string, roots []*x509.Certificate) {
	m.init()
	var pool *x509.CertPool
	if len(roots) > 0 {
		pool = x509.NewCertPool()
		for _, r := range roots {
			pool.AddCert(r)
		}
	}
	m.rootsMu.Lock()
	defer m.rootsMu.Unlock()
	if pool == nil {
		delete(m.roots, trustDomain)
		return
	}
	m.roots[trustDomain] = pool
}

// Run requests and renews certificates until ctx is done. It returns nil when ctx is
// cancelled, an error only if the Manager is misconfigured.
func (m *Manager) Run(ctx context.Context) error {
	m.init()
	if m.Signer == nil {
		return errors.New("identity: Manager.Signer is nil")
	}
	if !m.running.CompareAndSwap(false, true) {
		return errors.New("identity: Manager.Run is already running")
	}
	defer m.running.Store(false)

	results := make(chan result)
	inFlight := 0
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		starts, next := m.schedule(time.Now(), m.concurrency()-inFlight)
		for _, id := range starts {
			inFlight++
			go m.requestCertificate(ctx, id, results)
		}
		var tick <-chan time.Time
		if !next.IsZero() {
			timer.Reset(time.Until(next))
			tick = timer.C
		} else {
			timer.Stop()
		}
		select {
		case <-ctx.Done():
			// Requests see the same ctx and end soon; wait so none outlives Run.
			for ; inFlight > 0; inFlight-- {
				<-results
			}
			return nil
		case <-m.wake:
		case <-tick:
		case r := <-results:
			inFlight--
			m.apply(r)
		}
	}
}

// schedule drops identities whose grace has ended and picks up to slots identities to
// request now, those without a certificate first. It returns when to look again.
func (m *Manager) schedule(now time.Time, slots int) (starts []spiffe.ID, next time.Time) {
	earliest := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var due []*entry
	for id, e := range m.entries {
		switch {
		case e.inFlight:
			// Its result wakes Run.
		case !e.wanted:
			if drop := e.forgottenAt.Add(m.forgetGrace()); now.Before(drop) {
				earliest(drop)
			} else {
				delete(m.entries, id)
				close(e.changed) // waiters re-check and find it gone
				m.log().Info("dropped certificate of forgotten identity", "identity", id.String())
			}
		case now.Before(e.due):
			earliest(e.due)
		default:
			due = append(due, e)
		}
	}
	// Identities without a certificate have connections waiting; renewals have time.
	sort.Slice(due, func(i, j int) bool {
		hi, hj := due[i].cur.Load() != nil, due[j].cur.Load() != nil
		if hi != hj {
			return !hi
		}
		return due[i].due.Before(due[j].due)
	})
	for _, e := range due[:min(len(due), max(slots, 0))] {
		e.inFlight = true
		starts = append(starts, e.id)
	}
	return starts, next
}

// apply records the outcome of a request.
func (m *Manager) apply(r result) {
	now := time.Now()
	if r.err == nil && len(r.roots) > 0 {
		// Roots first, so no handshake sees the new certificate with an older bundle.
		m.SetRoots(r.id.TrustDomain, r.roots)
	}
	m.mu.Lock()
	e := m.entries[r.id] // present: entries in flight are never dropped
	e.inFlight = false
	if r.err != nil {
		e.failures++
		e.lastErr = r.err
		delay := m.backoff(e.failures)
		e.due = now.Add(delay)
		attempt := e.failures
		m.mu.Unlock()
		attrs := []any{"identity", r.id.String(), "attempt", attempt, "retry_in", delay, "error", r.err}
		if c := e.cur.Load(); c != nil && now.Before(c.cert.Leaf.NotAfter) {
			attrs = append(attrs, "current_valid_until", c.cert.Leaf.NotAfter)
		} else {
			attrs = append(attrs, "current_valid_until", "none: connections of this identity wait")
		}
		m.log().Warn("certificate request failed; retrying (a valid current certificate stays in use)", attrs...)
		return
	}
	e.failures, e.lastErr = 0, nil
	e.due = r.issued.refreshAt
	e.cur.Store(r.issued)
	close(e.changed)
	e.changed = make(chan struct{})
	m.mu.Unlock()
	leaf := r.issued.cert.Leaf
	m.log().Info("certificate issued", "identity", r.id.String(), "serial", fmt.Sprintf("%x", leaf.SerialNumber),
		"not_after", leaf.NotAfter, "refresh_at", r.issued.refreshAt)
}

func (m *Manager) backoff(failures int) time.Duration {
	initial, maxDelay := m.RetryBackoff.Initial, m.RetryBackoff.Max
	if initial <= 0 {
		initial = defaultRetryInitial
	}
	if maxDelay <= 0 {
		maxDelay = defaultRetryMax
	}
	d := initial
	for i := 1; i < failures && d < maxDelay; i++ {
		d *= 2
	}
	d = min(d, maxDelay)
	// Up to 10% less, so identities that failed together do not retry together.
	return d - rand.N(d/10+1)
}

func (m *Manager) forgetGrace() time.Duration {
	if m.ForgetGrace > 0 {
		return m.ForgetGrace
	}
	return DefaultForgetGrace
}

func (m *Manager) concurrency() int {
	if m.Concurrency > 0 {
		return m.Concurrency
	}
	return DefaultConcurrency
}

func (m *Manager) signTimeout() time.Duration {
	if m.SignTimeout > 0 {
		return m.SignTimeout
	}
	return DefaultSignTimeout
}
