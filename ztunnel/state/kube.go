package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"time"

	"github.com/sluicemesh/sluice/internal/manifest"
	"github.com/sluicemesh/sluice/internal/workload"
	"github.com/sluicemesh/sluice/ztunnel/policy"
)

// ParseDir builds a snapshot from a directory of Kubernetes manifests: Namespaces, Pods,
// Services and Istio AuthorizationPolicy / PeerAuthentication objects, in any *.yaml,
// *.yml or *.json file (multi-document YAML too), in any subfolder. It is local mode's
// stand-in for the controller: the same objects a cluster would have, converted the way
// the controller will. Other kinds are ignored.
func ParseDir(version uint64, dir string) (*Snapshot, []error, error) {
	docs, err := readManifests(dir)
	if err != nil {
		return nil, nil, err
	}
	var (
		pods     []*kubePod
		nss      = map[string]*kubeNamespace{}
		svcs     []*kubeService
		authz    []policy.AuthorizationPolicy
		peer     []policy.PeerAuthentication
		warnings []error
	)
	for _, d := range docs {
		switch d.Kind {
		case "Pod":
			var p kubePod
			if err := json.Unmarshal(d.JSON, &p); err != nil {
				return nil, nil, unreadable(d.Where, "Pod", err)
			}
			pods = append(pods, &p)
		case "Namespace":
			var n kubeNamespace
			if err := json.Unmarshal(d.JSON, &n); err != nil {
				return nil, nil, unreadable(d.Where, "Namespace", err)
			}
			nss[n.Name] = &n
		case "Service":
			var s kubeService
			if err := json.Unmarshal(d.JSON, &s); err != nil {
				return nil, nil, unreadable(d.Where, "Service", err)
			}
			svcs = append(svcs, &s)
		case "AuthorizationPolicy", "PeerAuthentication":
			if err := addPolicy(d.Kind, d.JSON, d.Where, &authz, &peer); err != nil {
				return nil, nil, err
			}
		}
	}
	ws := workloadsFromPods(pods, nss)
	ss, serr := servicesFromKube(svcs)
	warnings = append(warnings, serr...)
	if err := checkEntries(ws, ss); err != nil {
		return nil, nil, err
	}
	set, perr := policy.Compile(rootNamespace(nss), authz, peer)
	snap, errs := NewSnapshot(version, "", ws, ss, set)
	return snap, append(append(warnings, perr...), errs...), nil
}

// unreadable is the error for a Pod, Namespace or Service that does not decode. The
// whole directory waits for it: without the object a meshed pod would be reached in plain
// TCP (a pod not known, or its namespace not known to be ambient).
func unreadable(where, kind string, err error) error {
	return fmt.Errorf("%s: %s: %w (nothing in the directory applies until it is fixed: a pod left out would be reached in plain TCP)", where, kind, err)
}

// readManifests reads dir's manifests, all or nothing: a file that does not parse might
// be a DENY policy, and applying the rest without it could open what it closes, so the
// directory waits until it is fixed. A file that vanished while being read (an editor
// replacing it, a git checkout) is read again at once, up to three times.
func readManifests(dir string) ([]manifest.Doc, error) {
	for attempt := 1; ; attempt++ {
		docs, errs, err := manifest.ReadDir(dir)
		vanished := err == nil && len(errs) > 0
		for _, e := range errs {
			vanished = vanished && errors.Is(e, fs.ErrNotExist)
		}
		if err == nil && len(errs) > 0 {
			err = errors.Join(errs...)
		}
		if err == nil || !vanished || attempt == 3 {
			return docs, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// rootNamespace is istio-system: Istio's default, which local mode keeps.
func rootNamespace(map[string]*kubeNamespace) string { return policy.DefaultRootNamespace }

func workloadsFromPods(pods []*kubePod, nss map[string]*kubeNamespace) []*Workload {
	var out []*Workload
	for _, p := range pods {
		if p.Spec.HostNetwork || p.Status.Phase == "Succeeded" || p.Status.Phase == "Failed" {
			continue
		}
		var ips []netip.Addr
		for _, ip := range p.Status.PodIPs {
			if a, err := netip.ParseAddr(ip.IP); err == nil {
				ips = append(ips, a)
			}
		}
		if len(ips) == 0 {
			if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
				ips = append(ips, a)
			}
		}
		if len(ips) == 0 {
			continue // not started yet
		}
		ns := p.Namespace
		if ns == "" {
			ns = "default"
		}
		var nsLabels map[string]string
		if n := nss[ns]; n != nil {
			nsLabels = n.Labels
		}
		wp := p.workload()
		proto := TCP
		if workload.Ambient(wp, nsLabels) {
			proto = HBONE
		}
		out = append(out, &Workload{
			UID: p.UID, Name: p.Name, Namespace: ns, ServiceAccount: workload.ServiceAccount(wp),
			Node: p.Spec.NodeName, IPs: ips, Labels: p.Labels, Protocol: proto,
			WorkloadName: workload.Name(wp), CanonicalName: workload.CanonicalService(wp), CanonicalRevision: workload.CanonicalRevision(wp),
		})
	}
	return out
}

func servicesFromKube(svcs []*kubeService) ([]*Service, []error) {
	var (
		out  []*Service
		errs []error
	)
	for _, s := range svcs {
		ns := s.Namespace
		if ns == "" {
			ns = "default"
		}
		svc := &Service{Name: s.Name, Namespace: ns, Hostname: s.Name + "." + ns + ".svc.cluster.local", Selector: s.Spec.Selector}
		ips := s.Spec.ClusterIPs
		if len(ips) == 0 && s.Spec.ClusterIP != "" {
			ips = []string{s.Spec.ClusterIP}
		}
		for _, ip := range ips {
			if a, err := netip.ParseAddr(ip); err == nil {
				svc.VIPs = append(svc.VIPs, a)
			}
		}
		if len(svc.VIPs) == 0 {
			continue // headless: clients reach pods by their own addresses
		}
		for _, p := range s.Spec.Ports {
			if p.Protocol != "" && p.Protocol != "TCP" {
				continue
			}
			if p.Port < 1 || p.Port > 65535 || p.TargetPort.Number < 0 || p.TargetPort.Number > 65535 {
				errs = append(errs, fmt.Errorf("service %s/%s: port %d (targetPort %d) ignored: spec.ports[].port must be between 1 and 65535, and a numeric targetPort too (0 or none means the port)", ns, s.Name, p.Port, p.TargetPort.Number))
				continue
			}
			sp := ServicePort{Name: p.Name, Port: uint16(p.Port), TargetPort: uint16(p.Port)}
			if p.TargetPort.Number != 0 {
				sp.TargetPort = uint16(p.TargetPort.Number)
			} else if p.TargetPort.Name != "" {
				errs = append(errs, fmt.Errorf("service %s/%s port %d: named targetPort %q is not supported in local mode yet; using the service port", ns, s.Name, p.Port, p.TargetPort.Name))
			}
			svc.Ports = append(svc.Ports, sp)
		}
		out = append(out, svc)
	}
	return out, errs
}
