//go:build linux

package cmd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sluicemesh/sluice/test/lab"
)

// labOptions are the flags shared by the lab subcommands.
type labOptions struct {
	*globalOptions
	name     string
	stateDir string
}

func (o *labOptions) config() lab.Config {
	return lab.Config{Name: o.name, StateDir: o.stateDir, Logger: o.logger()}
}

func newLabCommand(g *globalOptions) *cobra.Command {
	o := &labOptions{globalOptions: g}
	c := &cobra.Command{
		Use:   "lab",
		Short: "Run a local lab: nodes and pods as network namespaces, wired by the real CNI chain",
		Long: `The lab builds nodes and pods as network namespaces and cgroups on this machine
(root needed). Its state lives in /run/sluice-lab/<name>, so every command works from a
new shell, and "lab down" also clears what a crashed run left.`,
	}
	c.PersistentFlags().StringVar(&o.name, "name", lab.DefaultName, "lab name (lowercase letters and digits)")
	c.PersistentFlags().StringVar(&o.stateDir, "state-dir", "", "state directory (default /run/sluice-lab/<name>)")
	c.AddCommand(newLabUpCommand(o), newLabDownCommand(o), newLabStatusCommand(o), newLabExecCommand(o), newLabPluginsCommand(o),
		newLabDemoCommand(o), newLabMeshDemoCommand(o), newLabPassthroughCommand(o))
	return c
}

func newLabUpCommand(o *labOptions) *cobra.Command {
	var up LabUpOptions
	c := &cobra.Command{
		Use:   "up",
		Short: "Create a lab with nodes and demo pods",
		Example: `  sudo sluicectl lab up --nodes 2 --pods-per-node 2 --ambient
  sudo sluicectl lab up --cni-bin /opt/cni/bin --with-sluice`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			up.Name, up.StateDir, up.Logger = o.name, o.stateDir, o.logger()
			start := time.Now()
			l, err := LabUp(c.Context(), up)
			if err != nil {
				return err
			}
			fmt.Fprintf(o.stdout, "lab %s is up (%s)\n\n", l.Name(), time.Since(start).Round(time.Millisecond))
			printStatus(o.stdout, l)
			if up.WithSluice {
				printNodeServices(o.stdout, l)
			}
			fmt.Fprintf(o.stdout, "\nTry: sluicectl lab exec%s %s/app-0-0 -- ip addr\nRemove it: sluicectl lab down%s\n", nameFlag(l), up.Namespace, nameFlag(l))
			return nil
		},
	}
	f := c.Flags()
	f.IntVar(&up.Nodes, "nodes", 2, "number of nodes")
	f.IntVar(&up.PodsPerNode, "pods-per-node", 2, "demo pods per node")
	f.StringVar(&up.Namespace, "namespace", "demo", "namespace of the demo pods")
	f.BoolVar(&up.Ambient, "ambient", false, "label the namespace istio.io/dataplane-mode=ambient")
	f.StringVar(&up.CNIBinDir, "cni-bin", "", "CNI plugin directory, or several joined with ':' (default: build bridge and host-local into "+lab.DefaultCNIBinDir()+")")
	f.BoolVar(&up.WithSluice, "with-sluice", false, "run a node agent and a ztunnel stand-in on every node and chain sluice-cni after the bridge plugin")
	f.BoolVar(&up.Ztunnel, "ztunnel", false, "with --with-sluice: run the real ztunnel (HBONE, mutual TLS, L4 policy) instead of the passthrough stand-in")
	f.StringVar(&up.SluiceBinDir, "sluice-bin", "", "directory holding sluice-agent and sluice-cni (default: sluicectl's own directory)")
	f.BoolVar(&up.Recreate, "recreate", false, "remove an existing lab of the same name first")
	return c
}

func newLabPluginsCommand(o *labOptions) *cobra.Command {
	var dir string
	c := &cobra.Command{
		Use:   "plugins",
		Short: "Build the bridge and host-local CNI plugins the lab runs, and print their directory",
		Long: `Build the bridge and host-local CNI plugins from the version of
github.com/containernetworking/plugins that Sluice's go.mod requires (needs the Go
toolchain; nothing is done when they are up to date), then print the directory.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if dir == "" {
				dir = lab.DefaultCNIBinDir()
			}
			if err := lab.BuildPlugins(c.Context(), dir); err != nil {
				return err
			}
			fmt.Fprintln(o.stdout, dir)
			return nil
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "output directory (default "+lab.DefaultCNIBinDir()+")")
	return c
}

func nameFlag(l *lab.Lab) string {
	if l.Name() == lab.DefaultName {
		return ""
	}
	return " --name " + l.Name()
}

func newLabDownCommand(o *labOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Remove a lab, also one whose process crashed",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(c.Context(), 2*time.Minute)
			defer cancel()
			if err := labDown(ctx, o.config()); err != nil {
				return err
			}
			fmt.Fprintf(o.stdout, "lab %s is down\n", o.name)
			return nil
		},
	}
}

func newLabStatusCommand(o *labOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show a lab's nodes and pods",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			l, err := lab.Open(o.config())
			if err != nil {
				if others := existingLabs(); len(others) > 0 {
					return fmt.Errorf("%w\nlabs here: %s (pick one with --name)", err, strings.Join(others, ", "))
				}
				return err
			}
			printStatus(o.stdout, l)
			return nil
		},
	}
}

// printNodeServices tells where each node's agent and ztunnel stand-in log, and how to
// look at them.
func printNodeServices(w io.Writer, l *lab.Lab) {
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tAGENT LOG\tZTUNNEL STAND-IN LOG\tBPF PINS")
	for _, n := range l.Nodes() {
		p := pathsOf(n)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", n.Name, p.agentLog, p.ztunnelLog, pinDir(n))
	}
	tw.Flush()
	fmt.Fprintf(w, "\nAgent metrics: sluicectl lab exec%s node0 -- curl -s %s/metrics\n", nameFlag(l), agentMetricsAddr)
}

// existingLabs lists the labs with state in the default place.
func existingLabs() []string {
	entries, _ := os.ReadDir(lab.DefaultStateBase)
	var names []string
	for _, e := range entries {
		if _, err := os.Stat(filepath.Join(lab.DefaultStateBase, e.Name(), "state.json")); err == nil {
			names = append(names, e.Name())
		}
	}
	return names
}

func printStatus(w io.Writer, l *lab.Lab) {
	f := l.Fabric()
	fmt.Fprintf(w, "lab %s   state %s   registry %s   fabric %s (netns %s)\n\n", l.Name(), l.StateDir(), l.RegistryDir(), f.IP, filepath.Base(f.NetnsPath))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tIP\tPOD CIDR\tGATEWAY\tNETNS")
	for _, n := range l.Nodes() {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", n.Name, n.IP, n.PodCIDR, n.Gateway, filepath.Base(n.NetnsPath))
	}
	tw.Flush()

	pods := l.Pods()
	if len(pods) == 0 {
		fmt.Fprintln(w, "\nno pods")
		return
	}
	namespaces := l.Namespaces()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tPOD\tNODE\tIP\tMESH\tNETNS")
	for _, p := range pods {
		ip := "<pending>"
		if p.IP.IsValid() {
			ip = p.IP.String()
		}
		netns := filepath.Base(p.NetnsPath)
		if p.HostNetwork {
			netns += " (host)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Namespace, p.Name, l.Node(p.Node).Name, ip, meshMode(namespaces[p.Namespace], p), netns)
	}
	tw.Flush()
}

// meshMode tells whether the pod's labels put it in the mesh (the rule the node agent
// applies); it shows what the registry says, not what the agent did.
func meshMode(nsLabels map[string]string, p *lab.Pod) string {
	switch {
	case p.HostNetwork, p.Labels[dataplaneModeLabel] == "none":
		return "-"
	case nsLabels[dataplaneModeLabel] == dataplaneModeAmbient:
		return "ambient"
	default:
		return "-"
	}
}

func newLabExecCommand(o *labOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "exec TARGET -- COMMAND [ARG...]",
		Short: "Run a command in a pod (namespace/pod), a node (its name or nodeN) or the fabric",
		Long: `Run a command in the network namespace of a pod, node or the fabric, and for pods
and nodes in their cgroup too. TARGET is <namespace>/<pod>, a node name (or node0,
node1, ...) or "fabric". The command's exit status becomes sluicectl's.`,
		Example: `  sluicectl lab exec demo/app-0-0 -- ip route
  sluicectl lab exec node1 -- ip -br addr`,
		Args: func(c *cobra.Command, args []string) error {
			if c.ArgsLenAtDash() != 1 || len(args) < 2 {
				return errors.New("usage: sluicectl lab exec TARGET -- COMMAND [ARG...]")
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			l, err := lab.Open(o.config())
			if err != nil {
				return err
			}
			cmd, err := targetCommand(l, args[0], args[1], args[2:]...)
			if err != nil {
				return err
			}
			cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, o.stdout, o.stderr
			err = cmd.Run()
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				if code := exit.ExitCode(); code >= 0 {
					return exitError{code}
				}
				return exitError{128 + 9} // killed by a signal; report like a shell
			}
			return err
		},
	}
}

// targetCommand resolves an exec target and returns the command to run there.
func targetCommand(l *lab.Lab, target, name string, args ...string) (*exec.Cmd, error) {
	if ns, pod, ok := strings.Cut(target, "/"); ok {
		p, found := l.Pod(ns, pod)
		if !found {
			var names []string
			for _, p := range l.Pods() {
				names = append(names, p.String())
			}
			return nil, fmt.Errorf("no pod %s in lab %s; pods: %s", target, l.Name(), strings.Join(names, ", "))
		}
		return p.Command(name, args...), nil
	}
	if target == "fabric" {
		return l.Fabric().Command(name, args...), nil
	}
	nodes := l.Nodes()
	if i, err := strconv.Atoi(strings.TrimPrefix(target, "node")); err == nil && strings.HasPrefix(target, "node") && i >= 0 && i < len(nodes) {
		return nodes[i].Command(name, args...), nil
	}
	if i := slices.IndexFunc(nodes, func(n lab.Node) bool { return n.Name == target }); i >= 0 {
		return nodes[i].Command(name, args...), nil
	}
	return nil, fmt.Errorf("unknown target %q: use <namespace>/<pod>, a node (node0..node%d or its full name) or fabric", target, len(nodes)-1)
}
