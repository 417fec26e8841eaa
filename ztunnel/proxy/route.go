package proxy

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/sluicemesh/sluice/internal/spiffe"
	"github.com/sluicemesh/sluice/ztunnel/state"
)

// HBONEPort is where every mesh workload (and waypoint) accepts HBONE.
const HBONEPort = 15008

// Upstream says how a captured outbound connection leaves ztunnel.
type Upstream struct {
	// Protocol is HBONE (mutual TLS tunnel) or TCP (plain passthrough).
	Protocol state.Protocol
	// Gateway is the address to connect to: the destination pod's or waypoint's HBONE
	// port, or for TCP the destination itself.
	Gateway netip.AddrPort
	// Target is the :authority of the HBONE CONNECT: the address the tunnel's far end
	// delivers to (a pod ip:port, or for a waypoint the service address).
	Target netip.AddrPort
	// PeerIdentity is the SPIFFE ID the far end must present (HBONE only).
	PeerIdentity spiffe.ID
	// DstWorkload and DstService describe the destination for metrics and logs; either
	// may be nil.
	DstWorkload *state.Workload
	DstService  *state.Service
	// ViaWaypoint is set when Gateway is a waypoint.
	ViaWaypoint bool
}

// ErrNoEndpoints is wrapped when a service has nothing to send to.
var ErrNoEndpoints = errors.New("no endpoints")

// Picker chooses one of n endpoints; production uses a random or round-robin picker,
// tests a fixed one. It keeps routing a pure function of its inputs.
type Picker func(n int) int

// buildUpstream decides where a connection from src to dst goes. It is pure: the same
// snapshot, source, destination and picker give the same answer.
func buildUpstream(snap *state.Snapshot, src *state.Workload, dst netip.AddrPort, pick Picker) (Upstream, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())

	if svc, ok := snap.ServiceByVIP(dst.Addr()); ok {
		if wp := svc.Waypoint; wp != nil && !isWaypoint(src, wp) {
			return viaWaypoint(wp, dst, nil, svc)
		}
		target, ok := svc.Target(dst.Port())
		if !ok {
			return Upstream{}, fmt.Errorf("service %s has no port %d; check the service's ports", svc.Key(), dst.Port())
		}
		eps := snap.Endpoints(svc)
		if len(eps) == 0 {
			return Upstream{}, fmt.Errorf("service %s: %w (no workload matches its selector)", svc.Key(), ErrNoEndpoints)
		}
		w := eps[pick(len(eps))]
		u, err := toWorkload(w, netip.AddrPortFrom(w.IPs[0], target))
		u.DstService = svc
		return u, err
	}
	if w, ok := snap.WorkloadByIP(dst.Addr()); ok {
		if wp := w.Waypoint; wp != nil && !isWaypoint(src, wp) {
			return viaWaypoint(wp, dst, w, nil)
		}
		return toWorkload(w, dst)
	}
	// Not in the mesh's view at all: an external address.
	return Upstream{Protocol: state.TCP, Gateway: dst, Target: dst}, nil
}

func toWorkload(w *state.Workload, target netip.AddrPort) (Upstream, error) {
	u := Upstream{DstWorkload: w, Target: target}
	if w.Protocol == state.TCP {
		u.Protocol, u.Gateway = state.TCP, target
		return u, nil
	}
	u.Protocol = state.HBONE
	u.Gateway = netip.AddrPortFrom(target.Addr(), HBONEPort)
	u.PeerIdentity = w.Identity()
	return u, nil
}

func viaWaypoint(wp *state.Waypoint, dst netip.AddrPort, w *state.Workload, svc *state.Service) (Upstream, error) {
	id, err := spiffe.Parse(wp.Identity)
	if err != nil {
		return Upstream{}, fmt.Errorf("waypoint %s has a bad identity %q: %w", wp.Address, wp.Identity, err)
	}
	return Upstream{
		Protocol: state.HBONE, Gateway: netip.AddrPortFrom(wp.Address, HBONEPort), Target: dst,
		PeerIdentity: id, DstWorkload: w, DstService: svc, ViaWaypoint: true,
	}, nil
}

// isWaypoint reports whether src is the waypoint itself: its own traffic must not loop
// back into it.
func isWaypoint(src *state.Workload, wp *state.Waypoint) bool {
	if src == nil {
		return false
	}
	for _, ip := range src.IPs {
		if ip.Unmap() == wp.Address.Unmap() {
			return true
		}
	}
	return false
}
