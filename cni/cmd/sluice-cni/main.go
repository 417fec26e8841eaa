// Command sluice-cni is the chained CNI plugin the container runtime runs for every pod
// sandbox; it hands the pod to the Sluice node agent for capture. The logic lives in
// package plugin so it can be tested without exec.
package main

import (
	"log/slog"
	"os"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/sluicemesh/sluice/cni/plugin"
)

// buildVersion is set at link time: -ldflags "-X main.buildVersion=v1.2.3".
var buildVersion = "dev"

func main() {
	// stderr, not stdout: stdout is reserved for the CNI result.
	p := &plugin.Plugin{Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	skel.PluginMainFuncs(p.Funcs(), plugin.VersionInfo, "sluice-cni "+buildVersion+": chains pods into the Sluice mesh")
}
