//go:build linux

package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"time"
)

// ErrNotFound is wrapped by errors about pods that do not exist.
var ErrNotFound = errors.New("not found")

// PodSpec describes a pod to add.
type PodSpec struct {
	Name      string
	Namespace string // default "default"
	Node      int    // index into Lab.Nodes
	Labels    map[string]string
	// ServiceAccount names the pod's identity (spec.serviceAccountName); default
	// "default".
	ServiceAccount string
	// HostNetwork pods share the node's network namespace and skip CNI, as in
	// Kubernetes; they still get their own cgroup.
	HostNetwork bool
}

// Pod is a pod of the lab: a network namespace wired by the CNI chain, a cgroup2
// directory and a manifest in the registry.
type Pod struct {
	Name           string            `json:"name"`
	Namespace      string            `json:"namespace"`
	UID            string            `json:"uid"`
	Node           int               `json:"node"` // index into Lab.Nodes
	NodeName       string            `json:"nodeName"`
	IP             netip.Addr        `json:"ip"` // invalid until CNI ADD returned
	NetnsPath      string            `json:"netns"`
	CgroupPath     string            `json:"cgroup"`
	ContainerID    string            `json:"containerID"` // the sandbox ID CNI saw
	Labels         map[string]string `json:"labels,omitempty"`
	ServiceAccount string            `json:"serviceAccount"`
	HostNetwork    bool              `json:"hostNetwork,omitempty"`
	CreatedAt      time.Time         `json:"createdAt"`
}

// AddPod creates a pod as kubelet and a container runtime would: the manifest goes to
// the registry (Pending), then the sandbox (netns with lo up, cgroup) is made and the
// node's CNI chain is run with ADD from inside the node's namespace; the manifest is
// then updated with the pod's IP (Running). If any step fails, what was made is removed
// again (with CNI DEL) and the error says which step failed.
func (l *Lab) AddPod(ctx context.Context, spec PodSpec) (_ *Pod, err error) {
	if spec.Namespace == "" {
		spec.Namespace = "default"
	}
	if spec.ServiceAccount == "" {
		spec.ServiceAccount = "default"
	}
	if err := errors.Join(checkObjectName("namespace", spec.Namespace), checkObjectName("pod", spec.Name)); err != nil {
		return nil, err
	}
	nodes := l.Nodes()
	if spec.Node < 0 || spec.Node >= len(nodes) {
		return nil, fmt.Errorf("pod %s/%s: node %d does not exist; lab %s has nodes 0 to %d", spec.Namespace, spec.Name, spec.Node, l.cfg.Name, len(nodes)-1)
	}
	n := nodes[spec.Node]
	p := &Pod{
		Name:           spec.Name,
		Namespace:      spec.Namespace,
		UID:            newUID(),
		Node:           n.Index,
		NodeName:       n.Name,
		NetnsPath:      netnsPath(l.cfg.Name + "-" + spec.Namespace + "-" + spec.Name),
		CgroupPath:     filepath.Join(n.CgroupPath, spec.Namespace+"_"+spec.Name),
		ContainerID:    newContainerID(),
		Labels:         maps.Clone(spec.Labels),
		ServiceAccount: spec.ServiceAccount,
		HostNetwork:    spec.HostNetwork,
		CreatedAt:      time.Now().UTC().Truncate(time.Second),
	}
	if p.HostNetwork {
		p.NetnsPath = n.NetnsPath
	}
	start := time.Now()

	// Record the pod before making anything, so a crash leaves a trace for Cleanup.
	err = l.change(ctx, func(st *state) error {
		if _, q := st.pod(p.Namespace, p.Name); q != nil {
			return fmt.Errorf("pod %s/%s already exists on %s", p.Namespace, p.Name, q.NodeName)
		}
		for _, q := range st.Pods {
			if !p.HostNetwork && q.NetnsPath == p.NetnsPath {
				return fmt.Errorf("pod %s/%s would share netns %s with pod %s/%s; rename one", p.Namespace, p.Name, p.NetnsPath, q.Namespace, q.Name)
			}
		}
		if st.Namespaces[p.Namespace] == nil {
			st.Namespaces[p.Namespace] = &namespace{UID: newUID(), CreatedAt: p.CreatedAt}
			if err := writeNamespaceManifest(st, p.Namespace); err != nil {
				return err
			}
		}
		st.Pods = append(st.Pods, p.clone())
		return writePodManifest(st, p)
	})
	if err != nil {
		return nil, fmt.Errorf("add pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	defer func() {
		if err == nil {
			return
		}
		// Undo with a fresh context: ctx may be why we failed.
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		gone, terr := l.teardownPod(tctx, n, p)
		if gone {
			terr = errors.Join(terr, l.change(tctx, func(st *state) error {
				st.removePod(p.Namespace, p.Name)
				return nil
			}))
		}
		err = errors.Join(err, terr)
	}()

	if !p.HostNetwork {
		if _, err := createNetns(filepath.Base(p.NetnsPath)); err != nil {
			return nil, fmt.Errorf("add pod %s/%s: %w", p.Namespace, p.Name, err)
		}
	}
	if err := makeCgroup(p.CgroupPath); err != nil {
		return nil, fmt.Errorf("add pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	if p.HostNetwork {
		p.IP = n.IP
	} else if p.IP, err = l.cniAdd(ctx, n, p); err != nil {
		return nil, err
	}
	err = l.change(ctx, func(st *state) error {
		_, q := st.pod(p.Namespace, p.Name)
		if q == nil || q.UID != p.UID {
			return fmt.Errorf("pod was deleted while being created")
		}
		q.IP = p.IP
		return writePodManifest(st, q)
	})
	if err != nil {
		return nil, fmt.Errorf("add pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	l.log.Debug("lab: pod added", "pod", p.String(), "node", n.Name, "ip", p.IP, "took", time.Since(start).Round(time.Millisecond))
	return p, nil
}

// DeletePod removes a pod as kubelet would: kills its processes, runs CNI DEL, removes
// its netns, cgroup and manifest. It carries on past errors and returns them joined.
func (l *Lab) DeletePod(ctx context.Context, ns, name string) error {
	var p *Pod
	var n Node
	err := l.change(ctx, func(st *state) error {
		if _, p = st.pod(ns, name); p == nil {
			return fmt.Errorf("pod %s/%s: %w", ns, name, ErrNotFound)
		}
		n = st.Nodes[p.Node]
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete pod: %w", err)
	}
	gone, err := l.teardownPod(ctx, n, p)
	if gone {
		err = errors.Join(err, l.change(ctx, func(st *state) error {
			st.removePod(ns, name)
			return nil
		}))
	}
	if err != nil {
		return fmt.Errorf("delete pod %s/%s: %w", ns, name, err)
	}
	l.log.Debug("lab: pod deleted", "pod", p.String())
	return nil
}

// teardownPod removes what AddPod made for p. gone reports whether its netns and cgroup
// are gone, i.e. whether p may leave the state. Every step runs even if one before it
// failed: stop the processes, CNI DEL, then the sandbox and the manifest.
func (l *Lab) teardownPod(ctx context.Context, n Node, p *Pod) (gone bool, err error) {
	cgErr := removeCgroupTree(p.CgroupPath)
	var delErr, nsErr error
	if !p.HostNetwork {
		delErr = l.cniDel(ctx, n, p)
		nsErr = deleteNetns(p.NetnsPath)
	}
	regErr := removeFile(podManifestPath(l.cfg.registryDir(), p.Namespace, p.Name))
	return cgErr == nil && nsErr == nil, errors.Join(cgErr, delErr, nsErr, regErr)
}

// LabelNamespace sets label key of namespace ns to value, or removes it when value is
// empty, and rewrites the namespace's manifest. The namespace is created if it does not
// exist yet, so labels (istio.io/dataplane-mode=ambient) can be in place before the first
// pod's CNI ADD.
func (l *Lab) LabelNamespace(ns, key, value string) error {
	if err := checkObjectName("namespace", ns); err != nil {
		return err
	}
	if key == "" {
		return errors.New("label namespace: empty label key")
	}
	ctx, cancel := context.WithTimeout(context.Background(), lockTimeout)
	defer cancel()
	return l.change(ctx, func(st *state) error {
		nsObj := st.Namespaces[ns]
		if nsObj == nil {
			nsObj = &namespace{UID: newUID(), CreatedAt: time.Now().UTC().Truncate(time.Second)}
			st.Namespaces[ns] = nsObj
		}
		nsObj.Labels = setLabel(nsObj.Labels, key, value)
		return writeNamespaceManifest(st, ns)
	})
}

// LabelPod sets label key of pod ns/name to value, or removes it when value is empty, and
// rewrites the pod's manifest.
func (l *Lab) LabelPod(ns, name, key, value string) error {
	if key == "" {
		return errors.New("label pod: empty label key")
	}
	ctx, cancel := context.WithTimeout(context.Background(), lockTimeout)
	defer cancel()
	return l.change(ctx, func(st *state) error {
		_, p := st.pod(ns, name)
		if p == nil {
			return fmt.Errorf("label pod %s/%s: %w", ns, name, ErrNotFound)
		}
		p.Labels = setLabel(p.Labels, key, value)
		return writePodManifest(st, p)
	})
}

func setLabel(labels map[string]string, key, value string) map[string]string {
	if value == "" {
		delete(labels, key)
		return labels
	}
	if labels == nil {
		labels = map[string]string{}
	}
	labels[key] = value
	return labels
}

// String returns "namespace/name".
func (p *Pod) String() string { return p.Namespace + "/" + p.Name }

// AddrPort returns the pod's IP with port, ready for Dial.
func (p *Pod) AddrPort(port uint16) netip.AddrPort { return netip.AddrPortFrom(p.IP, port) }

// Do runs fn on a locked OS thread inside the pod's network namespace. The thread stays
// in the caller's cgroup.
func (p *Pod) Do(fn func() error) error { return doIn(p.NetnsPath, fn) }

// Dial connects from the pod's network namespace; the conn is then usable from any
// goroutine. addr should be an IP literal and port: name lookups would run outside the
// namespace. The socket belongs to the calling process's cgroup, not the pod's.
func (p *Pod) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return dialIn(ctx, p.NetnsPath, network, addr)
}

// Listen opens a listener in the pod's network namespace.
func (p *Pod) Listen(network, addr string) (net.Listener, error) {
	return listenIn(p.NetnsPath, network, addr)
}

// ListenPacket opens a packet socket (UDP) in the pod's network namespace.
func (p *Pod) ListenPacket(network, addr string) (net.PacketConn, error) {
	return listenPacketIn(p.NetnsPath, network, addr)
}

// Command returns a command that runs in the pod's network namespace and, from its first
// instruction, in the pod's cgroup, so cgroup-attached BPF programs see it as the pod.
// It needs nsenter (util-linux). Keep cmd.SysProcAttr and add to it rather than
// replacing it: it carries the cgroup.
func (p *Pod) Command(name string, args ...string) *exec.Cmd {
	return commandIn(p.NetnsPath, p.CgroupPath, name, args...)
}

func (p *Pod) clone() *Pod {
	q := *p
	q.Labels = maps.Clone(p.Labels)
	return &q
}

func newContainerID() string {
	var b [32]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
