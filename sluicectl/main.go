// Command sluicectl is Sluice's command-line tool, like istioctl: it inspects and
// configures the mesh and runs the local lab. The commands live in package cmd.
package main

import (
	"os"

	"github.com/sluicemesh/sluice/sluicectl/cmd"
)

func main() {
	os.Exit(cmd.Execute())
}
