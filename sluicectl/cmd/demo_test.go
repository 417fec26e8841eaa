//go:build linux

package cmd

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/test/lab"
)

// needRoot skips without root, except in CI, where a skip would pass silently.
func needRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("builds a lab with node agents; skipped with -short")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root (network namespaces, cgroups, eBPF), and CI must run it")
		}
		t.Skip("needs root (network namespaces, cgroups, eBPF)")
	}
}

// buildSluice builds the binaries `make build` makes into a temporary directory.
func buildSluice(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/sluicemesh/sluice/cni/cmd/...", "github.com/sluicemesh/sluice/ztunnel/cmd/ztunnel", "github.com/sluicemesh/sluice/sluicectl")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}

// assertLabGone fails if anything of lab name is left on the machine.
func assertLabGone(t *testing.T, name string) {
	t.Helper()
	for _, pattern := range []string{
		filepath.Join(lab.NetnsDir, name+"-*"),
		filepath.Join(bpf.DefaultPinRoot, name+"-*"),
		filepath.Join(lab.DefaultStateBase, name),
		filepath.Join(lab.DefaultCgroupBase, name),
	} {
		if left, _ := filepath.Glob(pattern); len(left) > 0 {
			t.Errorf("left behind: %v", left)
		}
	}
}

// TestDemo runs `sluicectl lab demo`, which fails on any capture that is not as
// expected, and checks it removes everything.
func TestDemo(t *testing.T) {
	needRoot(t)
	bin := buildSluice(t)
	const name = "demotest"
	t.Cleanup(func() { labDown(context.Background(), lab.Config{Name: name}) })
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	err := RunDemo(ctx, DemoOptions{Name: name, SluiceBinDir: bin, Out: &out})
	t.Logf("demo output:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"outbound by :15001 in demo/app-0-0", "inbound  by :15006 in demo/app-1-0", "original destination 10.96.0.10:80"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	assertLabGone(t, name)
}

// TestMeshDemo runs `sluicectl lab mesh-demo`: the real ztunnels carry a connection
// over HBONE with both identities, a DENY policy closes one already open and refuses new
// ones, and its removal lets them through again.
func TestMeshDemo(t *testing.T) {
	needRoot(t)
	bin := buildSluice(t)
	const name = "meshdemotest"
	t.Cleanup(func() { labDown(context.Background(), lab.Config{Name: name}) })
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	err := RunMeshDemo(ctx, DemoOptions{Name: name, SluiceBinDir: bin, Out: &out})
	t.Logf("mesh demo output:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	// RunMeshDemo fails on its own when a step is not as expected; these check what it
	// prints beyond that.
	for _, want := range []string{"src.identity  spiffe://cluster.local/ns/demo/sa/default",
		"dst.identity  spiffe://cluster.local/ns/demo/sa/default", "reason        deny by demo/deny-demo",
		`connection_security_policy="mutual_tls"`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("mesh demo output lacks %q", want)
		}
	}
	assertLabGone(t, name)
}

// TestLabUpWithSluice brings a lab up as `sluicectl lab up --with-sluice` does, with
// agents and stand-ins as detached processes, and checks that a connection between
// two mesh pods is captured on both ends and that `lab down` leaves nothing.
func TestLabUpWithSluice(t *testing.T) {
	needRoot(t)
	bin := buildSluice(t)
	const name = "uptest"
	t.Cleanup(func() { labDown(context.Background(), lab.Config{Name: name}) })
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	l, err := LabUp(ctx, LabUpOptions{Name: name, Nodes: 2, PodsPerNode: 1, Ambient: true, WithSluice: true, SluiceBinDir: bin, Recreate: true})
	if err != nil {
		t.Fatal(err)
	}
	server, _ := l.Pod("demo", "app-1-0")
	client, _ := l.Pod("demo", "app-0-0")
	ln, err := listenNoMPTCP(server.Do, ":8080")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveEcho(ln, server.String())
	c, err := client.Dial(ctx, "tcp", server.AddrPort(8080).String())
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(c, "hello")
	reply, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || !strings.HasPrefix(reply, server.String()+"|") {
		t.Fatalf("reply %q, %v; want one from %s", reply, err, server)
	}
	for i, want := range []string{
		"direction=outbound client=127.0.0.1:",
		"direction=inbound client=" + client.IP.String() + ":",
	} {
		log := pathsOf(l.Node(i)).ztunnelLog
		b, _ := os.ReadFile(log)
		if !strings.Contains(string(b), want) || !strings.Contains(string(b), "original="+server.AddrPort(8080).String()) {
			t.Errorf("%s lacks a capture with %q and original=%s:\n%s", log, want, server.AddrPort(8080), b)
		}
	}
	if err := labDown(ctx, l.Config()); err != nil {
		t.Fatal(err)
	}
	assertLabGone(t, name)
}

func TestParseMetrics(t *testing.T) {
	text := `# HELP sluice_agent_enrolled_pods Pods whose traffic this node agent captures.
# TYPE sluice_agent_enrolled_pods gauge
sluice_agent_enrolled_pods 2
sluice_pod_tcp_connections_opened_total{direction="outbound",namespace="demo",pod="app-0-0",workload="app"} 3
sluice_pod_tcp_rtt_seconds_sum{direction="inbound",namespace="demo",pod="app-1-0",workload="app"} 8.4e-05
`
	got, err := parseMetrics(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("got %d samples, want 3: %+v", len(got), got)
	}
	if got[0].name != "sluice_agent_enrolled_pods" || got[0].value != 2 {
		t.Errorf("sample 0 = %+v", got[0])
	}
	if s := got[1]; s.labels["pod"] != "app-0-0" || s.labels["direction"] != "outbound" || s.value != 3 {
		t.Errorf("sample 1 = %+v", s)
	}
	if s := got[2]; s.name != "sluice_pod_tcp_rtt_seconds_sum" || s.value != 8.4e-05 {
		t.Errorf("sample 2 = %+v", s)
	}
}
