//go:build !linux

package cmd

import (
	"errors"

	"github.com/spf13/cobra"
)

func newLabCommand(*globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "lab",
		Short: "Run a local lab (Linux only)",
		RunE: func(*cobra.Command, []string) error {
			return errors.New("the lab uses Linux network namespaces and cgroups; run it on Linux")
		},
	}
}
