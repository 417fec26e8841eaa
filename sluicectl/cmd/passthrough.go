//go:build linux

package cmd

import (
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sluicemesh/sluice/test/lab"
	"github.com/sluicemesh/sluice/test/passthrough"
)

// newLabPassthroughCommand runs ztunnel's stand-in for one lab node in the foreground.
// `lab up --with-sluice` starts it on every node; it is hidden because it is plumbing.
func newLabPassthroughCommand(o *labOptions) *cobra.Command {
	var node string
	c := &cobra.Command{
		Use:    "passthrough --node NODE",
		Short:  "Serve a lab node's enrolled pods on 15001/15006 in plain TCP (ztunnel's stand-in)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			l, err := lab.Open(o.config())
			if err != nil {
				return err
			}
			n, err := findNode(l, node)
			if err != nil {
				return err
			}
			p := &passthrough.Proxy{
				ZDSPath: pathsOf(n).ztunnelSocket,
				PinDir:  pinDir(n),
				Logger:  slog.New(slog.NewTextHandler(o.stderr, nil)).With("node", n.Name),
			}
			return p.Run(c.Context())
		},
	}
	c.Flags().StringVar(&node, "node", "", "node name, or its index")
	c.MarkFlagRequired("node")
	return c
}

// findNode resolves a node by name, nodeN or index.
func findNode(l *lab.Lab, name string) (lab.Node, error) {
	nodes := l.Nodes()
	if i := slices.IndexFunc(nodes, func(n lab.Node) bool { return n.Name == name }); i >= 0 {
		return nodes[i], nil
	}
	if i, err := strconv.Atoi(strings.TrimPrefix(name, "node")); err == nil && i >= 0 && i < len(nodes) {
		return nodes[i], nil
	}
	return lab.Node{}, fmt.Errorf("lab %s has no node %q (nodes: node0..node%d or their names)", l.Name(), name, len(nodes)-1)
}
