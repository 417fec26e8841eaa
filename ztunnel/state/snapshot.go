package state

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/sluicemesh/sluice/ztunnel/policy"
)

// Snapshot is one immutable version of ztunnel's state. Readers may keep a pointer to it
// for as long as they like; it never changes.
type Snapshot struct {
	Version     uint64
	TrustDomain string
	// Policy is the compiled AuthorizationPolicy and PeerAuthentication set.
	Policy *policy.Set

	workloads   []*Workload
	services    []*Service
	byIP        map[netip.Addr]*Workload
	byUID       map[string]*Workload
	byVIP       map[netip.Addr]*Service
	endpoints   map[string][]*Workload // service key -> selected workloads, stable order
	policyNotes []error
}

// NewSnapshot indexes workloads and services. Entries that conflict with earlier ones
// (an IP claimed twice) are left out and reported; everything valid is kept.
func NewSnapshot(version uint64, trustDomain string, workloads []*Workload, services []*Service, pol *policy.Set) (*Snapshot, []error) {
	if trustDomain == "" {
		trustDomain = DefaultTrustDomain
	}
	if pol == nil {
		// No policies at all: allow, PERMISSIVE. (A nil *policy.Set denies everything,
		// which is for "nothing loaded yet".)
		pol, _ = policy.Compile("", nil, nil)
	}
	s := &Snapshot{
		Version: version, TrustDomain: trustDomain, Policy: pol,
		byIP: map[netip.Addr]*Workload{}, byUID: map[string]*Workload{},
		byVIP: map[netip.Addr]*Service{}, endpoints: map[string][]*Workload{},
	}
	var errs []error
	for _, w := range workloads {
		if err := checkWorkload(w); err != nil {
			errs = append(errs, err)
			continue
		}
		if w.TrustDomain == "" {
			w.TrustDomain = trustDomain
		}
		if w.Protocol == "" {
			w.Protocol = HBONE
		}
		free := unclaimed(s.byIP, w.IPs, "workload "+w.Key(), "address", &errs)
		if len(free) == 0 {
			continue
		}
		if len(free) < len(w.IPs) {
			cp := *w
			cp.IPs = free
			w = &cp
		}
		for _, ip := range w.IPs {
			s.byIP[ip.Unmap()] = w
		}
		if w.UID != "" {
			s.byUID[w.UID] = w
		}
		s.workloads = append(s.workloads, w)
	}
	for _, svc := range services {
		if err := checkService(svc); err != nil {
			errs = append(errs, err)
			continue
		}
		free := unclaimed(s.byVIP, svc.VIPs, "service "+svc.Key(), "VIP", &errs)
		if len(free) == 0 {
			continue
		}
		if len(free) < len(svc.VIPs) {
			cp := *svc
			cp.VIPs = free
			svc = &cp
		}
		for _, vip := range svc.VIPs {
			s.byVIP[vip.Unmap()] = svc
		}
		s.services = append(s.services, svc)
		var eps []*Workload
		for _, w := range s.workloads {
			if svc.Selects(w) {
				eps = append(eps, w)
			}
		}
		slices.SortFunc(eps, func(a, b *Workload) int { return strings.Compare(a.Key(), b.Key()) })
		s.endpoints[svc.Key()] = eps
	}
	return s, errs
}

// unclaimed returns those of addrs that no earlier entry claimed in claimed, and reports
// each of the others in errs. The first claim to an address wins; the later entry keeps
// its other addresses, which unknown would be reached in plain TCP.
func unclaimed[T interface{ Key() string }](claimed map[netip.Addr]T, addrs []netip.Addr, entry, what string, errs *[]error) []netip.Addr {
	free := addrs[:0:0]
	for _, a := range addrs {
		if owner, ok := claimed[a.Unmap()]; ok {
			*errs = append(*errs, fmt.Errorf("%s: %s %s already belongs to %s; %s is not reachable there", entry, what, a.Unmap(), owner.Key(), entry))
			continue
		}
		free = append(free, a)
	}
	return free
}

// refuse joins the problems that keep a whole config from applying: nil if there are
// none. A workload or service left out would be reached in plain TCP, as one outside the
// mesh is, so the caller keeps its previous config until the source is fixed.
func refuse(errs ...error) error {
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w\n(nothing of this config applies until it is fixed: a workload or service left out would be reached in plain TCP)", err)
	}
	return nil
}

// entryErrors lists the workloads and services ztunnel cannot use (see refuse).
func entryErrors(ws []*Workload, ss []*Service) []error {
	var errs []error
	uids := map[string]bool{}
	for _, w := range ws {
		errs = append(errs, checkWorkload(w))
		if w.UID != "" && uids[w.UID] {
			errs = append(errs, fmt.Errorf("workload %s: uid %q is given twice", w.Key(), w.UID))
		}
		uids[w.UID] = true
	}
	keys := map[string]bool{}
	for _, svc := range ss {
		errs = append(errs, checkService(svc))
		if keys[svc.Key()] {
			errs = append(errs, fmt.Errorf("service %s is defined twice; which one is meant cannot be told", svc.Key()))
		}
		keys[svc.Key()] = true
	}
	return errs
}

func checkWorkload(w *Workload) error {
	switch {
	case w.Name == "" || w.Namespace == "":
		return fmt.Errorf("workload %q: name and namespace are required", w.Key())
	case len(w.IPs) == 0:
		return fmt.Errorf("workload %s: ips is empty; a workload needs at least one address", w.Key())
	case w.Protocol != "" && w.Protocol != HBONE && w.Protocol != TCP:
		return fmt.Errorf("workload %s: protocol %q is not HBONE or TCP", w.Key(), w.Protocol)
	}
	return nil
}

func checkService(svc *Service) error {
	switch {
	case svc.Name == "" || svc.Namespace == "":
		return fmt.Errorf("service %q: name and namespace are required", svc.Key())
	case len(svc.VIPs) == 0:
		return fmt.Errorf("service %s: vips is empty", svc.Key())
	}
	for _, p := range svc.Ports {
		if p.Port == 0 {
			return fmt.Errorf("service %s: a port entry has port 0", svc.Key())
		}
	}
	return nil
}

// WorkloadByIP finds the workload owning addr.
func (s *Snapshot) WorkloadByIP(addr netip.Addr) (*Workload, bool) {
	w, ok := s.byIP[addr.Unmap()]
	return w, ok
}

// WorkloadByUID finds a workload by its UID.
func (s *Snapshot) WorkloadByUID(uid string) (*Workload, bool) {
	w, ok := s.byUID[uid]
	return w, ok
}

// ServiceByVIP finds the service with virtual IP addr.
func (s *Snapshot) ServiceByVIP(addr netip.Addr) (*Service, bool) {
	svc, ok := s.byVIP[addr.Unmap()]
	return svc, ok
}

// Endpoints lists the workloads a service selects, in a stable order.
func (s *Snapshot) Endpoints(svc *Service) []*Workload { return s.endpoints[svc.Key()] }

// Workloads lists every workload.
func (s *Snapshot) Workloads() []*Workload { return s.workloads }

// Services lists every service.
func (s *Snapshot) Services() []*Service { return s.services }

// Store holds the current snapshot. Updates are serialized; reads are lock-free.
type Store struct {
	cur  atomic.Pointer[Snapshot]
	mu   sync.Mutex
	subs []func(old, cur *Snapshot)
}

// Load returns the current snapshot (an empty one before the first update).
func (s *Store) Load() *Snapshot {
	if snap := s.cur.Load(); snap != nil {
		return snap
	}
	empty, _ := NewSnapshot(0, "", nil, nil, nil)
	return empty
}

// Replace installs snap and tells subscribers (in order, synchronously, outside any
// reader's path) so they can react: re-evaluate open connections, fetch certificates.
func (s *Store) Replace(snap *Snapshot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.cur.Swap(snap)
	for _, fn := range s.subs {
		fn(old, snap)
	}
}

// Subscribe registers fn for every later Replace.
func (s *Store) Subscribe(fn func(old, cur *Snapshot)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.subs = append(s.subs, fn)
}
