//go:build linux

package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
)

const (
	cniVersion     = "1.0.0"
	bridgeName     = "cni0"
	conflistName   = "10-lab.conflist"
	podIfName      = "eth0"
	cniCacheSubdir = "cni-cache"
)

// basePlugins are the plugins every lab chain starts with.
var basePlugins = []string{"bridge", "host-local"}

// nodeConflist is the CNI config of node n: the bridge plugin with host-local IPAM on
// the node's pod subnet, then the extra plugins with ${NODE} and ${NODE_DIR} expanded.
func nodeConflist(cfg Config, n Node) ([]byte, error) {
	bridge := map[string]any{
		"type":      "bridge",
		"bridge":    bridgeName,
		"isGateway": true,
		"ipMasq":    false,
		"ipam": map[string]any{
			"type":    "host-local",
			"ranges":  [][]map[string]string{{{"subnet": n.PodCIDR.String(), "gateway": n.Gateway.String()}}},
			"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
			"dataDir": filepath.Join(n.Dir, "ipam"),
		},
	}
	expand := strings.NewReplacer("${NODE}", n.Name, "${NODE_DIR}", n.Dir)
	plugins := []any{bridge}
	for _, p := range cfg.ExtraPlugins {
		plugins = append(plugins, expandStrings(p, expand))
	}
	list := map[string]any{
		"cniVersion": cniVersion,
		"name":       cfg.Name,
		"plugins":    plugins,
	}
	return json.MarshalIndent(list, "", "  ")
}

func expandStrings(v any, r *strings.Replacer) any {
	switch v := v.(type) {
	case string:
		return r.Replace(v)
	case map[string]any:
		out := make(map[string]any, len(v))
		for k, e := range v {
			out[k] = expandStrings(e, r)
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = expandStrings(e, r)
		}
		return out
	case []string:
		out := make([]string, len(v))
		for i, e := range v {
			out[i] = r.Replace(e)
		}
		return out
	default:
		return v
	}
}

// loadConflist reads the node's CNI config the way container runtimes do: the first
// .conflist in the config directory by name. Whatever rewrote it last (an agent chaining
// itself in, a test) is what the next pod gets.
func loadConflist(n Node) (*libcni.NetworkConfigList, error) {
	files, err := libcni.ConfFiles(n.ConfDir, []string{".conflist"})
	if err != nil {
		return nil, fmt.Errorf("read CNI config dir %s: %w", n.ConfDir, err)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no .conflist in %s: node %s has no CNI config", n.ConfDir, n.Name)
	}
	slices.Sort(files)
	list, err := libcni.ConfListFromFile(files[0])
	if err != nil {
		return nil, fmt.Errorf("load CNI config %s: %w", files[0], err)
	}
	return list, nil
}

// checkPlugins fails early, with a fix, when a plugin of the chain is not installed.
func checkPlugins(cfg Config) error {
	want := slices.Clone(basePlugins)
	for _, p := range cfg.ExtraPlugins {
		want = append(want, p["type"].(string))
	}
	var missing []string
	for _, t := range want {
		found := false
		for _, d := range cfg.binPath() {
			if fi, err := os.Stat(filepath.Join(d, t)); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, t)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("CNI plugins %v not found in %q; build bridge and host-local with lab.BuildPlugins (or `make lab-plugins`) and put extra plugins there too", missing, cfg.CNIBinDir)
	}
	return nil
}

func (l *Lab) cniConfig() *libcni.CNIConfig {
	return libcni.NewCNIConfigWithCacheDir(l.cfg.binPath(), filepath.Join(l.cfg.StateDir, cniCacheSubdir), nil)
}

func runtimeConf(p *Pod, netns string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.ContainerID,
		NetNS:       netns,
		IfName:      podIfName,
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", p.Namespace},
			{"K8S_POD_NAME", p.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.ContainerID},
			{"K8S_POD_UID", p.UID},
		},
	}
}

// cniAdd runs ADD of the node's chain for p from inside the node's namespace, where the
// bridge plugin makes cni0 and the host end of the pod's veth, and returns the pod's
// IPv4 address.
func (l *Lab) cniAdd(ctx context.Context, n Node, p *Pod) (netip.Addr, error) {
	list, err := loadConflist(n)
	if err != nil {
		return netip.Addr{}, err
	}
	var res types.Result
	err = doIn(n.NetnsPath, func() error {
		var err error
		res, err = l.cniConfig().AddNetworkList(ctx, list, runtimeConf(p, p.NetnsPath))
		return err
	})
	if err != nil {
		return netip.Addr{}, fmt.Errorf("CNI ADD %s/%s on %s: %w", p.Namespace, p.Name, n.Name, err)
	}
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("CNI ADD %s/%s: convert result: %w", p.Namespace, p.Name, err)
	}
	for _, ipc := range r.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			return a.Unmap(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("CNI ADD %s/%s: result has no IPv4 address: %v", p.Namespace, p.Name, r.IPs)
}

// cniDel runs DEL of the node's chain for p. It is a no-op when the node's namespace is
// gone (nothing of the pod is left there). The pod's netns is passed only while it exists,
// as runtimes do.
func (l *Lab) cniDel(ctx context.Context, n Node, p *Pod) error {
	if !netnsExists(n.NetnsPath) {
		return nil
	}
	list, err := loadConflist(n)
	if err != nil {
		return err
	}
	podNetns := p.NetnsPath
	if !netnsExists(podNetns) {
		podNetns = ""
	}
	err = doIn(n.NetnsPath, func() error {
		return l.cniConfig().DelNetworkList(ctx, list, runtimeConf(p, podNetns))
	})
	if err != nil {
		return fmt.Errorf("CNI DEL %s/%s on %s: %w", p.Namespace, p.Name, n.Name, err)
	}
	return nil
}
