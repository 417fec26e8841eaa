//go:build linux

package lab

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
)

func TestConfigDefaultsAndAddressing(t *testing.T) {
	cfg, err := Config{Name: "demo", Nodes: 3}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.StateDir != "/run/sluice-lab/demo" || cfg.CgroupRoot != "/sys/fs/cgroup/unified/demo" {
		t.Errorf("dirs %s %s", cfg.StateDir, cfg.CgroupRoot)
	}
	for i, want := range []struct{ node, cidr string }{
		{"172.30.0.10", "10.244.0.0/24"},
		{"172.30.0.11", "10.244.1.0/24"},
		{"172.30.0.12", "10.244.2.0/24"},
	} {
		if got := cfg.nodeIP(i).String(); got != want.node {
			t.Errorf("node %d IP %s, want %s", i, got, want.node)
		}
		if got := cfg.podCIDR(i).String(); got != want.cidr {
			t.Errorf("node %d pod CIDR %s, want %s", i, got, want.cidr)
		}
	}
	st := planState(cfg)
	if n := st.Nodes[2]; n.Name != "demo-node2" || n.Gateway.String() != "10.244.2.1" || n.NetnsPath != "/run/netns/demo-node2" {
		t.Errorf("node 2 planned as %+v", n)
	}
	if st.Fabric.IP.String() != "172.30.0.1" {
		t.Errorf("fabric IP %s", st.Fabric.IP)
	}
}

func TestConfigRejects(t *testing.T) {
	for name, cfg := range map[string]Config{
		"dash in name":      {Name: "my-lab"},
		"upper case name":   {Name: "Lab"},
		"too many nodes":    {Nodes: 201},
		"pod net too small": {Nodes: 3, PodNet: netip.MustParsePrefix("10.1.0.0/23")},
		"overlap":           {PodNet: netip.MustParsePrefix("172.30.0.0/16")},
		"relative dir":      {StateDir: "state"},
		"plugin no type":    {ExtraPlugins: []map[string]any{{"agentSocket": "/x"}}},
	} {
		if _, err := cfg.withDefaults(); err == nil {
			t.Errorf("%s: accepted %+v", name, cfg)
		}
	}
}

func TestNodeConflistChainsExtraPluginsPerNode(t *testing.T) {
	cfg, err := Config{Name: "demo", ExtraPlugins: []map[string]any{{
		"type":        "sluice-cni",
		"agentSocket": "${NODE_DIR}/cni.sock",
		"exclude":     []any{"${NODE}"},
	}}}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	n := planState(cfg).Nodes[0]
	b, err := nodeConflist(cfg, n)
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		CNIVersion string           `json:"cniVersion"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Plugins) != 2 || list.Plugins[0]["type"] != "bridge" || list.Plugins[1]["type"] != "sluice-cni" {
		t.Fatalf("chain %s", b)
	}
	if got := list.Plugins[1]["agentSocket"]; got != n.Dir+"/cni.sock" {
		t.Errorf("agentSocket %v, want %s/cni.sock", got, n.Dir)
	}
	if got := list.Plugins[1]["exclude"].([]any)[0]; got != n.Name {
		t.Errorf("exclude %v, want %s", got, n.Name)
	}
	if !strings.Contains(string(b), `"subnet": "10.244.0.0/24"`) || list.Plugins[0]["isGateway"] != true {
		t.Errorf("bridge entry %s", b)
	}
	// The extra plugin map in cfg is not modified by expansion.
	if cfg.ExtraPlugins[0]["agentSocket"] != "${NODE_DIR}/cni.sock" {
		t.Error("expansion changed the config")
	}
}
