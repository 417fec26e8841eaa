package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"slices"
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
				return nil, nil, refuse(fmt.Errorf("%s: Pod: %w", d.Where, err))
			}
			pods = append(pods, &p)
		case "Namespace":
			var n kubeNamespace
			if err := json.Unmarshal(d.JSON, &n); err != nil {
				return nil, nil, refuse(fmt.Errorf("%s: Namespace: %w", d.Where, err))
			}
			nss[n.Name] = &n
		case "Service":
			var s kubeService
			if err := json.Unmarshal(d.JSON, &s); err != nil {
				return nil, nil, refuse(fmt.Errorf("%s: Service: %w", d.Where, err))
			}
			svcs = append(svcs, &s)
		case "AuthorizationPolicy", "PeerAuthentication":
			if err := addPolicy(d.Kind, d.JSON, d.Where, &authz, &peer); err != nil {
				return nil, nil, err
			}
		}
	}
	ws, wbad := workloadsFromPods(pods, nss)
	ss, serr, sbad := servicesFromKube(svcs)
	warnings = append(warnings, serr...)
	if err := refuse(slices.Concat(wbad, sbad, entryErrors(ws, ss))...); err != nil {
		return nil, nil, err
	}
	set, perr := policy.Compile(rootNamespace(nss), authz, peer)
	snap, errs := NewSnapshot(version, "", ws, ss, set)
	return snap, append(append(warnings, perr...), errs...), nil
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

// workloadsFromPods returns the workloads of running pods, and an error for each pod
// whose addresses cannot be read (see refuse).
func workloadsFromPods(pods []*kubePod, nss map[string]*kubeNamespace) (out []*Workload, bad []error) {
	for _, p := range pods {
		if p.Spec.HostNetwork || p.Status.Phase == "Succeeded" || p.Status.Phase == "Failed" {
			continue
		}
		strs := []string{p.Status.PodIP}
		if len(p.Status.PodIPs) > 0 {
			strs = strs[:0]
			for _, ip := range p.Status.PodIPs {
				strs = append(strs, ip.IP)
			}
		}
		ips, err := parseIPs(strs)
		if err != nil {
			bad = append(bad, fmt.Errorf("pod %s/%s: status.podIPs: %w", p.Namespace, p.Name, err))
			continue
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
	return out, bad
}

// parseIPs reads the addresses of a pod or service; "" and "None" (headless) are none.
// An address that does not parse is an error: the object left out would be reached in
// plain TCP.
func parseIPs(strs []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range strs {
		if s == "" || s == "None" {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, nil
}

// servicesFromKube returns the services with a cluster address, warnings for the ports
// it leaves out, and an error for each service whose addresses cannot be read.
func servicesFromKube(svcs []*kubeService) (out []*Service, errs, bad []error) {
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
		vips, err := parseIPs(ips)
		if err != nil {
			bad = append(bad, fmt.Errorf("service %s/%s: spec.clusterIPs: %w", ns, s.Name, err))
			continue
		}
		svc.VIPs = vips
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
	return out, errs, bad
}
