//go:build linux

package cmd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/sluicemesh/sluice/test/lab"
)

// Labels of Istio's ambient mode that `lab up --ambient` sets.
const (
	dataplaneModeLabel   = "istio.io/dataplane-mode"
	dataplaneModeAmbient = "ambient"
	sluicePluginType     = "sluice-cni"
)

// LabUpOptions describe the demo lab `sluicectl lab up` builds. The zero value of a field
// means its default.
type LabUpOptions struct {
	Name        string // lab name; default lab.DefaultName
	StateDir    string // default /run/sluice-lab/<Name>
	Nodes       int    // default 2
	PodsPerNode int    // pods "app-<node>-<j>" on every node; 0 for none
	Namespace   string // namespace of the pods; default "demo"
	// Ambient labels Namespace istio.io/dataplane-mode=ambient before any pod starts.
	Ambient bool
	// CNIBinDir holds bridge and host-local (and sluice-cni with WithSluice); empty
	// builds bridge and host-local into lab.DefaultCNIBinDir().
	CNIBinDir string
	// WithSluice chains sluice-cni after the bridge plugin, each node's copy talking to
	// the agent socket in its node directory, and starts a node agent and a ztunnel
	// stand-in on every node before the first pod.
	WithSluice bool
	// Ztunnel runs the real ztunnel (HBONE, mutual TLS, L4 policy) on every node instead
	// of the passthrough stand-in. It reads the lab's registry directory as its local
	// config, so Istio policies dropped there (e.g. <state>/registry/policies/*.yaml) apply.
	Ztunnel bool
	// SluiceBinDir holds sluice-agent and sluice-cni (and sluicectl, run as the ztunnel
	// stand-in); default the directory of the running executable, where `make build`
	// puts them all. sluice-cni is looked up there when CNIBinDir lacks it.
	SluiceBinDir string
	// StartZtunnel starts what serves the in-pod listeners of node n once its agent is
	// up; it should return once started, not wait for pods. Nil starts the passthrough
	// stand-in (package test/passthrough) as a detached `sluicectl lab passthrough`.
	StartZtunnel func(ctx context.Context, l *lab.Lab, n lab.Node) error
	// Recreate removes a lab of the same name first, also one left by a crash.
	Recreate bool
	Logger   *slog.Logger // nil discards
}

// sluicePluginConf is sluice-cni's conflist entry in the lab: every node has its own
// agent, serving in the node's directory.
func sluicePluginConf() map[string]any {
	return map[string]any{
		"type":        sluicePluginType,
		"agentSocket": "${NODE_DIR}/cni.sock",
		"stateFile":   "${NODE_DIR}/mesh-state.json",
	}
}

// LabUp builds the demo lab: nodes, the node services, the namespace and the pods, in
// the order a cluster comes up, so that capture is in place before the first pod's CNI
// ADD. If a step after the lab exists fails, the lab is removed again.
func LabUp(ctx context.Context, opts LabUpOptions) (_ *lab.Lab, err error) {
	if opts.Nodes == 0 {
		opts.Nodes = 2
	}
	if opts.Namespace == "" {
		opts.Namespace = "demo"
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("the lab needs root (network namespaces, cgroups): run sluicectl with sudo")
	}
	cfg := lab.Config{Name: opts.Name, Nodes: opts.Nodes, StateDir: opts.StateDir, CNIBinDir: opts.CNIBinDir, Logger: opts.Logger}
	if opts.WithSluice {
		if opts.SluiceBinDir == "" {
			opts.SluiceBinDir = defaultSluiceBinDir()
		}
		if _, err := findBinary(opts.SluiceBinDir, agentBinary); err != nil {
			return nil, fmt.Errorf("--with-sluice: %w", err)
		}
		binPath, err := sluiceCNIBinPath(ctx, opts.CNIBinDir, opts.SluiceBinDir)
		if err != nil {
			return nil, err
		}
		cfg.CNIBinDir = binPath
		cfg.ExtraPlugins = append(cfg.ExtraPlugins, sluicePluginConf())
	}
	if opts.Recreate {
		if err := labDown(ctx, cfg); err != nil {
			return nil, fmt.Errorf("remove the old lab: %w", err)
		}
	}

	l, err := lab.Up(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			err = errors.Join(err, labDown(dctx, l.Config()))
		}
	}()
	if err := startNodeServices(ctx, l, opts); err != nil {
		return nil, err
	}
	if opts.Ambient {
		if err := l.LabelNamespace(opts.Namespace, dataplaneModeLabel, dataplaneModeAmbient); err != nil {
			return nil, err
		}
	}
	for _, n := range l.Nodes() {
		for j := range opts.PodsPerNode {
			name := fmt.Sprintf("app-%d-%d", n.Index, j)
			spec := lab.PodSpec{Name: name, Namespace: opts.Namespace, Node: n.Index, Labels: map[string]string{"app": name}}
			if _, err := l.AddPod(ctx, spec); err != nil {
				return nil, err
			}
		}
	}
	if opts.WithSluice {
		if err := waitPodsCaptured(ctx, l); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// startNodeServices starts what runs on every node before pods: with WithSluice, the
// node agent (sluice-agent, in local mode on the lab's registry) and then ztunnel's
// stand-in. Both run in the node's netns and host cgroup, detached, so they outlive
// sluicectl and `lab down` kills them; their sockets and logs are in the node's
// directory.
func startNodeServices(ctx context.Context, l *lab.Lab, opts LabUpOptions) error {
	if !opts.WithSluice {
		return nil
	}
	agentBin, err := findBinary(opts.SluiceBinDir, agentBinary)
	if err != nil {
		return err
	}
	for _, n := range l.Nodes() {
		if err := startAgent(ctx, l, n, agentBin); err != nil {
			return err
		}
		opts.Logger.Debug("node agent up", "node", n.Name, "log", pathsOf(n).agentLog)
		switch {
		case opts.StartZtunnel != nil:
			err = opts.StartZtunnel(ctx, l, n)
		case opts.Ztunnel:
			err = startZtunnelProcess(l, n, opts.SluiceBinDir)
		default:
			err = startPassthroughProcess(l, n, opts.SluiceBinDir)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
