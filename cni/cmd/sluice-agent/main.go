// Command sluice-agent is Sluice's node agent (DaemonSet): it owns eBPF capture on one
// node. See package cni/agent.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/cni/agent"
	"github.com/sluicemesh/sluice/cni/cniapi"
	"github.com/sluicemesh/sluice/cni/install"
	"github.com/sluicemesh/sluice/cni/zds"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sluice-agent:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		cfg        agent.Config
		kubeconfig = flag.String("kubeconfig", "", "kubeconfig file; empty means in-cluster config (unless --pods-dir)")
		podsDir    = flag.String("pods-dir", "", "local mode: read Pod and Namespace manifests from this directory instead of Kubernetes")
		installCNI = flag.Bool("install-cni", false, "install the plugin binary and chain it into the node's CNI config")
		cniBinDir  = flag.String("cni-bin-dir", install.DefaultBinDir, "where CNI plugin binaries live")
		cniConfDir = flag.String("cni-conf-dir", install.DefaultConfDir, "where the node's CNI config lives")
		pluginBin  = flag.String("plugin-binary", "/opt/sluice/bin/sluice-cni", "the sluice-cni binary to install")
		uninstall  = flag.Bool("uninstall", false, "remove capture (BPF pins) and the CNI plugin, then exit")
		logJSON    = flag.Bool("log-json", false, "log JSON lines instead of text")
	)
	flag.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME)")
	flag.StringVar(&cfg.CNISocket, "cni-socket", cniapi.DefaultAgentSocket, "unix socket the CNI plugin calls")
	flag.StringVar(&cfg.MeshStateFile, "mesh-state-file", cniapi.DefaultStateFile, "file telling the plugin which namespaces are ambient")
	flag.StringVar(&cfg.ZtunnelSocket, "ztunnel-socket", zds.DefaultSocket, "unix socket ztunnel connects to for pod network namespaces")
	flag.StringVar(&cfg.StateDir, "state-dir", "/var/run/sluice/agent", "where pod records survive agent restarts")
	flag.StringVar(&cfg.MetricsAddr, "metrics-addr", ":15014", "Prometheus metrics address; empty disables")
	flag.StringVar(&cfg.Capture.Instance, "bpf-instance", bpf.DefaultInstance, "pin directory name under /sys/fs/bpf/sluice")
	flag.StringVar(&cfg.Capture.CgroupPath, "cgroup", "", "cgroup2 directory above every pod (default: the cgroup2 root)")
	flag.BoolVar(&cfg.Capture.CaptureDNS, "capture-dns", false, "steer pods' DNS (port 53) to ztunnel's DNS proxy on 15053")
	// No flag turns on sk_msg acceleration (bpf.Config.Accelerate): redirected data has
	// no flow control, so a slow ztunnel would let a pod fill the node's TCP memory
	// (docs/capture-design.md, TestAccelerationHasNoBackpressure). The old flag is still
	// accepted, so that a DaemonSet that passes it keeps starting.
	accelerate := flag.Bool("accelerate", false, "ignored: sk_msg acceleration was withdrawn (no flow control; see docs/capture-design.md)")
	flag.Parse()

	var handler slog.Handler = slog.NewTextHandler(os.Stderr, nil)
	if *logJSON {
		handler = slog.NewJSONHandler(os.Stderr, nil)
	}
	log := slog.New(handler)
	cfg.Logger = log
	if *accelerate {
		log.Warn("--accelerate is ignored: sk_msg acceleration was withdrawn because redirected data has no flow control; remove the flag (docs/capture-design.md)")
	}
	in := &install.Installer{BinDir: *cniBinDir, ConfDir: *cniConfDir, PluginBinary: *pluginBin,
		PluginConfig: map[string]any{"agentSocket": cfg.CNISocket, "stateFile": cfg.MeshStateFile}, Logger: log}

	if *uninstall {
		return errors.Join(in.Uninstall(), bpf.Uninstall(cfg.Capture))
	}
	if *installCNI {
		cfg.Installer = in
	}
	if *podsDir != "" {
		cfg.Source = &agent.LocalSource{Dir: *podsDir, NodeName: cfg.NodeName, Logger: log}
	} else {
		rc, err := restConfig(*kubeconfig)
		if err != nil {
			return err
		}
		client, err := kubernetes.NewForConfig(rc)
		if err != nil {
			return err
		}
		cfg.Source = &agent.KubeSource{Client: client, NodeName: cfg.NodeName}
	}
	a, err := agent.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return a.Run(ctx)
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		return clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	rc, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("no Kubernetes config (use --kubeconfig, or --pods-dir for local mode): %w", err)
	}
	return rc, nil
}
