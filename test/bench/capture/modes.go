//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/test/lab"
)

// capture is what stands between the client pod's connect and the network.
type capture int

const (
	captureNone capture = iota
	captureEBPF
	captureEBPFAccel
	captureIptables
)

func (c capture) String() string {
	return [...]string{"none", "eBPF", "eBPF + sk_msg", "iptables"}[c]
}

// Instances of the BPF programs the benchmark loads, one at a time. Fixed names so that a
// run that crashed can be cleaned up by the next one.
var bpfInstances = map[capture]string{
	captureEBPF:      "capbench",
	captureEBPFAccel: "capbench-accel",
}

// iptablesRule is the outbound capture rule of Istio's in-pod mode (istio-cni's
// ISTIO_OUTPUT chain), put straight into the nat OUTPUT chain of the client pod.
var iptablesRule = []string{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-d", "127.0.0.1/32",
	"-m", "mark", "!", "--mark", fmt.Sprintf("%#x/%#x", bpf.DefaultMark, bpf.DefaultMarkMask),
	"-j", "REDIRECT", "--to-ports", "15001"}

// mode is one way of making the client's connections.
type mode struct {
	key, title string
	capture    capture
	proxied    bool // the connection must land on the in-pod 15001 listener, else on the server
	direct     bool // dial 127.0.0.1:15001 instead of the server pod
}

var connectModes = []mode{
	{key: "a0", title: "direct to the server pod over veth (context)", capture: captureNone},
	{key: "a", title: "direct to 127.0.0.1:15001, not captured (baseline)", capture: captureNone, proxied: true, direct: true},
	{key: "b", title: "captured by Sluice eBPF", capture: captureEBPF, proxied: true},
	{key: "c", title: "captured by iptables REDIRECT", capture: captureIptables, proxied: true},
}

var throughputModes = []mode{
	{key: "t0", title: "not captured, to 127.0.0.1:15001 (context)", capture: captureNone, proxied: true, direct: true},
	{key: "t1", title: "captured by iptables REDIRECT (context)", capture: captureIptables, proxied: true},
	{key: "t2", title: "captured by eBPF, Accelerate=false", capture: captureEBPF, proxied: true},
	{key: "t3", title: "captured by eBPF, Accelerate=true (sk_msg)", capture: captureEBPFAccel, proxied: true},
}

// bench holds the lab and the listeners every measurement shares.
type bench struct {
	opts           options
	log            *slog.Logger
	quiet          *slog.Logger // for the lab and BPF loader, which log every step at info
	node           lab.Node
	client, server *lab.Pod
	proxy, app     *acceptor      // 127.0.0.1:15001 in the client pod, :8080 in the server pod
	serverAddr     netip.AddrPort // the server pod's application
	proxyAddr      netip.AddrPort // the in-pod capture port
}

// selected is the part of modes that -modes asks for (all by default).
func (b *bench) selected(modes []mode) []mode {
	if len(b.opts.modes) == 0 {
		return modes
	}
	var out []mode
	for _, m := range modes {
		if b.opts.modes[m.key] {
			out = append(out, m)
		}
	}
	return out
}

func (b *bench) target(m mode) netip.AddrPort {
	if m.direct {
		return b.proxyAddr
	}
	return b.serverAddr
}

// enable puts capture c in place for the client pod; disable takes it away entirely, so
// the next mode pays nothing for it: the BPF programs are detached and unpinned, and the
// iptables NAT chain (which is what keeps conntrack on in the namespace) is deleted.
// With eBPF, capt is the loaded capture, nil otherwise.
func (b *bench) enable(ctx context.Context, c capture) (capt *bpf.Capture, disable func() error, err error) {
	switch c {
	case captureNone:
		return nil, func() error { return nil }, nil
	case captureEBPF, captureEBPFAccel:
		cfg := bpf.Config{Instance: bpfInstances[c], NodeNetns: b.node.NetnsPath, Accelerate: c == captureEBPFAccel, Logger: b.quiet}
		capt, err := bpf.Load(cfg)
		if err != nil {
			return nil, nil, errors.Join(fmt.Errorf("load BPF capture: %w", err), bpf.Uninstall(cfg))
		}
		disable = func() error { return errors.Join(capt.Close(), bpf.Uninstall(cfg)) }
		if _, err := capt.Enroll(b.client.NetnsPath, []netip.Addr{b.client.IP}); err != nil {
			return nil, nil, errors.Join(fmt.Errorf("enroll client pod: %w", err), disable())
		}
		return capt, disable, nil
	case captureIptables:
		disable = func() error {
			// -F empties the chain, -X then removes the (now empty) built-in chains with
			// iptables-nft, so their netfilter hooks, and conntrack with them, go away.
			return errors.Join(b.iptables(ctx, "-t", "nat", "-F"), b.iptables(ctx, "-t", "nat", "-X"))
		}
		if err := b.iptables(ctx, iptablesRule...); err != nil {
			return nil, nil, errors.Join(err, disable())
		}
		return nil, disable, nil
	}
	return nil, nil, fmt.Errorf("unknown capture %d", c)
}

func (b *bench) iptables(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(context.WithoutCancel(ctx), "nsenter", append([]string{"--net=" + b.client.NetnsPath, "iptables"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s in pod %s: %w: %s (is iptables installed? `make deps` installs it)", strings.Join(args, " "), b.client, err, strings.TrimSpace(string(out)))
	}
	return nil
}
