// Package plugin is the logic of sluice-cni, the chained CNI plugin that tells the Sluice
// node agent about every pod sandbox the container runtime sets up or tears down.
//
// The plugin runs after the node's primary CNI plugin, so the pod already has its
// addresses; it never changes the network itself. Its one job is to make sure a pod
// that belongs in the ambient mesh does not start without the agent having captured it:
// when the agent cannot be asked, ADD fails for such pods instead of letting traffic
// bypass the mesh (fail closed). DEL, on the other hand, never blocks pod teardown.
//
// The handlers take skel.CmdArgs and return values instead of writing to stdout, so
// they can be tested without exec; Funcs adapts them to skel.PluginMainFuncs.
package plugin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/sluicemesh/sluice/cni/cniapi"
)

// Plugin runs the CNI commands. The zero value is ready to use.
type Plugin struct {
	// Logger receives diagnostics. Nil means text on stderr. Never point it at stdout:
	// stdout carries the CNI result and anything else there corrupts it.
	Logger *slog.Logger

	// Stdout receives the ADD result when the plugin runs through Funcs. Nil means
	// os.Stdout.
	Stdout io.Writer
}

func (p *Plugin) log() *slog.Logger {
	if p.Logger != nil {
		return p.Logger
	}
	return slog.New(slog.NewTextHandler(os.Stderr, nil))
}

// Funcs adapts the handlers to skel.PluginMainFuncs. Failures are also logged, because
// the runtime shows the JSON error to the user but rarely keeps it on the node. GC is left
// to skel's no-op: the agent reconciles enrollment from the pod list itself.
func (p *Plugin) Funcs() skel.CNIFuncs {
	logged := func(cmd string, args *skel.CmdArgs, err error) error {
		if err != nil {
			p.log().Error(cmd+" failed", "container", args.ContainerID, "args", args.Args, "err", err)
		}
		return err
	}
	return skel.CNIFuncs{
		Add: func(args *skel.CmdArgs) error {
			res, err := p.Add(context.Background(), args)
			if err != nil {
				return logged("ADD", args, err)
			}
			out := p.Stdout
			if out == nil {
				out = os.Stdout
			}
			if _, err := out.Write(res); err != nil {
				return logged("ADD", args, types.NewError(types.ErrIOFailure, fmt.Sprintf("write result to stdout: %v", err), ""))
			}
			return nil
		},
		Del: func(args *skel.CmdArgs) error {
			return logged("DEL", args, p.Del(context.Background(), args))
		},
		Check: func(args *skel.CmdArgs) error {
			return logged("CHECK", args, p.Check(context.Background(), args))
		},
		Status: func(args *skel.CmdArgs) error {
			return logged("STATUS", args, p.Status(context.Background(), args))
		},
	}
}

// invocation is what every command works out from its arguments before deciding whether
// to ask the agent.
type invocation struct {
	cmd  string
	conf *Config
	pod  Pod
	req  cniapi.Request
}

// prepare parses config, CNI_ARGS and prevResult. With strict unset (DEL), bad CNI_ARGS
// or prevResult are logged and left out instead of failing: teardown must not be blocked
// by what ADD already accepted. A broken config fails every command.
func (p *Plugin) prepare(cmd string, args *skel.CmdArgs, strict bool) (*invocation, error) {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return nil, err
	}
	pod, err := ParsePod(args.Args)
	if err != nil {
		if strict {
			return nil, err
		}
		p.log().Warn("ignoring unparsable CNI_ARGS", "cmd", cmd, "container", args.ContainerID, "err", err)
	}
	ips, err := conf.PodIPs()
	if err != nil {
		if strict {
			return nil, err
		}
		p.log().Warn("ignoring unparsable prevResult", "cmd", cmd, "container", args.ContainerID, "err", err)
	}
	return &invocation{
		cmd:  cmd,
		conf: conf,
		pod:  pod,
		req: cniapi.Request{
			ContainerID:  args.ContainerID,
			Netns:        args.Netns,
			IfName:       args.IfName,
			PodName:      pod.Name,
			PodNamespace: pod.Namespace,
			PodUID:       pod.UID,
			IPs:          ips,
		},
	}, nil
}

// asksAgent reports whether the agent has a say in this pod at all.
func (p *Plugin) asksAgent(inv *invocation) bool {
	switch {
	case !inv.pod.known():
		p.log().Debug("no Kubernetes pod in CNI_ARGS; not asking the agent", "cmd", inv.cmd, "container", inv.req.ContainerID)
		return false
	case inv.conf.excluded(inv.pod.Namespace):
		p.log().Debug("namespace excluded; not asking the agent", "cmd", inv.cmd, "pod", inv.pod.String())
		return false
	}
	return true
}

// ask sends the request for inv.cmd to the agent within the configured timeout.
func (p *Plugin) ask(ctx context.Context, inv *invocation, path string) (cniapi.Response, error) {
	ctx, cancel := context.WithTimeout(ctx, inv.conf.Timeout)
	defer cancel()
	return newAgentClient(inv.conf.AgentSocket).call(ctx, path, inv.req)
}

// Add returns the bytes to print on stdout: prevResult, unchanged, once the agent has
// taken the pod (or the pod is none of the agent's business).
func (p *Plugin) Add(ctx context.Context, args *skel.CmdArgs) ([]byte, error) {
	inv, err := p.prepare("ADD", args, true)
	if err != nil {
		return nil, err
	}
	conf := inv.conf
	if !conf.hasPrevResult() {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			`network config field "prevResult" is missing: sluice-cni is a chained plugin and must come after the primary CNI plugin in the conflist's "plugins" list`, "")
	}
	if !p.asksAgent(inv) {
		return conf.PrevResult, nil
	}
	resp, err := p.ask(ctx, inv, cniapi.PathAdd)
	if err != nil {
		if err := p.agentFailed(inv, err); err != nil {
			return nil, err
		}
		return conf.PrevResult, nil
	}
	p.log().Debug("pod added", "pod", inv.pod.String(), "container", inv.req.ContainerID, "enrolled", resp.Enrolled, "ips", inv.req.IPs)
	return conf.PrevResult, nil
}

// Check asks the agent whether the pod is still as ADD left it.
func (p *Plugin) Check(ctx context.Context, args *skel.CmdArgs) error {
	inv, err := p.prepare("CHECK", args, true)
	if err != nil {
		return err
	}
	if !p.asksAgent(inv) {
		return nil
	}
	if _, err := p.ask(ctx, inv, cniapi.PathCheck); err != nil {
		return p.agentFailed(inv, err)
	}
	return nil
}

// Del tells the agent the pod is gone. It succeeds whatever the agent says: a failed DEL
// makes the runtime keep the sandbox and the pod hangs in Terminating, while the agent
// drops enrollments of vanished pods on its own when it reconciles.
func (p *Plugin) Del(ctx context.Context, args *skel.CmdArgs) error {
	inv, err := p.prepare("DEL", args, false)
	if err != nil {
		return err
	}
	if !p.asksAgent(inv) {
		return nil
	}
	if _, err := p.ask(ctx, inv, cniapi.PathDel); err != nil {
		p.log().Warn("agent did not take DEL; it will clean up when it reconciles",
			"pod", inv.pod.String(), "container", inv.req.ContainerID, "err", err)
	}
	return nil
}

// Status validates the config and reports ready. It deliberately does not report an
// unreachable agent: the runtime would mark the whole node's network not ready, which
// would also stop pods outside the mesh, while ADD already fails closed pod by pod.
func (p *Plugin) Status(_ context.Context, args *skel.CmdArgs) error {
	_, err := ParseConfig(args.StdinData)
	return err
}

// agentFailed decides what an agent error means for ADD and CHECK. A refusal is final. If
// the agent could not be asked, the state file it leaves behind says whether the pod
// would have been captured: if not, the pod may go on; if so, or if nobody can tell, the
// pod must not start uncaptured.
func (p *Plugin) agentFailed(inv *invocation, err error) error {
	var refused *refusedError
	if errors.As(err, &refused) {
		code := types.ErrInternal
		if refused.status == http.StatusServiceUnavailable || refused.status == http.StatusTooManyRequests {
			code = types.ErrTryAgainLater
		}
		return types.NewError(code,
			fmt.Sprintf("sluice node agent refused %s for pod %s: %s", inv.cmd, inv.pod, refused.msg), "")
	}
	var unreachable *unreachableError
	if !errors.As(err, &unreachable) {
		return types.NewError(types.ErrInternal, fmt.Sprintf("%s for pod %s: %v", inv.cmd, inv.pod, err), "")
	}

	socket, stateFile := inv.conf.AgentSocket, inv.conf.StateFile
	state, serr := cniapi.ReadMeshState(stateFile)
	if serr != nil {
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("sluice node agent at %s is unreachable and its mesh state file %s cannot be read, so pod %s cannot start uncaptured; check the sluice-agent pod on this node",
				socket, stateFile, inv.pod),
			fmt.Sprintf("agent: %v; state file: %v", unreachable.err, serr))
	}
	if state.Ambient(inv.pod.Namespace) {
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("sluice node agent at %s is unreachable and namespace %s is in the ambient mesh, so pod %s cannot start uncaptured; check the sluice-agent pod on this node",
				socket, inv.pod.Namespace, inv.pod),
			unreachable.err.Error())
	}
	p.log().Warn("node agent unreachable; letting pod through because its namespace is not in the mesh",
		"cmd", inv.cmd, "pod", inv.pod.String(), "socket", socket, "stateFile", stateFile, "err", unreachable.err)
	return nil
}
