//go:build linux

package lab_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/sluicemesh/sluice/internal/testutil"
	"github.com/sluicemesh/sluice/test/lab"
)

// fakePlugin is the name under which the test binary acts as a chained CNI plugin.
const fakePlugin = "lab-fake-cni"

func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == fakePlugin {
		os.Exit(runFakePlugin())
	}
	os.Exit(m.Run())
}

// runFakePlugin is a chained CNI plugin: it appends each call to the file named by
// "record", fails ADD when "failAdd" is set and otherwise passes prevResult on.
func runFakePlugin() int {
	var conf struct {
		CNIVersion string          `json:"cniVersion"`
		Record     string          `json:"record"`
		FailAdd    bool            `json:"failAdd"`
		PrevResult json.RawMessage `json:"prevResult"`
	}
	stdin, _ := io.ReadAll(os.Stdin)
	json.Unmarshal(stdin, &conf)
	command := os.Getenv("CNI_COMMAND")
	if command == "VERSION" {
		fmt.Println(`{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]}`)
		return 0
	}
	line, _ := json.Marshal(fakeCall{command, os.Getenv("CNI_CONTAINERID"), os.Getenv("CNI_NETNS"), os.Getenv("CNI_ARGS")})
	if f, err := os.OpenFile(conf.Record, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
		f.Write(append(line, '\n'))
		f.Close()
	}
	if command != "ADD" {
		return 0
	}
	if conf.FailAdd {
		fmt.Printf(`{"cniVersion":%q,"code":100,"msg":"fake plugin refuses"}`+"\n", conf.CNIVersion)
		return 1
	}
	os.Stdout.Write(conf.PrevResult)
	return 0
}

type fakeCall struct {
	Command, ContainerID, Netns, Args string
}

var (
	pluginsOnce sync.Once
	pluginsErr  error
)

// cniBin builds bridge and host-local once per test binary.
func cniBin(t *testing.T) string {
	t.Helper()
	dir := lab.DefaultCNIBinDir()
	pluginsOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		pluginsErr = lab.BuildPlugins(ctx, dir)
	})
	if pluginsErr != nil {
		t.Fatalf("build CNI plugins: %v", pluginsErr)
	}
	return dir
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// newLab brings up a lab named name (after clearing what an earlier crashed run may have
// left) and tears it down at the end of the test, checking that nothing stays behind.
func newLab(t *testing.T, name string, nodes int) *lab.Lab {
	t.Helper()
	testutil.RequireRoot(t)
	bin := cniBin(t)
	if err := lab.Cleanup(name); err != nil {
		t.Fatalf("clear leftovers of an earlier run: %v", err)
	}
	l, err := lab.Up(t.Context(), lab.Config{Name: name, Nodes: nodes, CNIBinDir: bin, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Up: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := l.Down(ctx); err != nil {
			t.Errorf("Down: %v", err)
		}
		assertGone(t, name)
	})
	return l
}

func addPod(t *testing.T, l *lab.Lab, spec lab.PodSpec) *lab.Pod {
	t.Helper()
	p, err := l.AddPod(t.Context(), spec)
	if err != nil {
		t.Fatalf("AddPod %s/%s: %v", spec.Namespace, spec.Name, err)
	}
	return p
}

// assertGone checks that nothing of lab name is left on the machine.
func assertGone(t *testing.T, name string) {
	t.Helper()
	entries, _ := os.ReadDir(lab.NetnsDir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), name+"-") {
			t.Errorf("netns %s left behind", e.Name())
		}
	}
	for _, dir := range []string{
		filepath.Join(lab.DefaultCgroupBase, name),
		filepath.Join(lab.DefaultStateBase, name),
	} {
		if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s left behind (stat: %v)", dir, err)
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatalf("list links: %v", err)
	}
	for _, link := range links {
		if strings.HasPrefix(link.Attrs().Name, name) {
			t.Errorf("link %s left behind in the root netns", link.Attrs().Name)
		}
	}
}

// exchange has from connect to a listener in to and swap a line each way; the server
// checks that it sees from's own address (no NAT on the way).
func exchange(t *testing.T, from *lab.Pod, to interface {
	Listen(network, addr string) (net.Listener, error)
}, dst netip.AddrPort, wantSrc netip.Addr) {
	t.Helper()
	ln, err := to.Listen("tcp", fmt.Sprintf(":%d", dst.Port()))
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	srvErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srvErr <- err
			return
		}
		defer c.Close()
		src := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		if src != wantSrc {
			srvErr <- fmt.Errorf("server saw the client as %s, want %s", src, wantSrc)
			return
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			srvErr <- err
			return
		}
		_, err = io.WriteString(c, "pong "+line)
		srvErr <- err
	}()

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", dst.String())
	if err != nil {
		t.Fatalf("%s dial %s: %v", from, dst, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := "ping from " + from.String() + "\n"
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("%s read from %s: %v", from, dst, err)
	}
	if want := "pong " + msg; got != want {
		t.Errorf("%s got %q from %s, want %q", from, got, dst, want)
	}
	if err := <-srvErr; err != nil {
		t.Errorf("server in %s: %v", dst, err)
	}
}

func TestPodsTalkWithinAndAcrossNodes(t *testing.T) {
	t.Parallel()
	l := newLab(t, "ltnet", 2)

	pods := map[string]*lab.Pod{}
	for node := range 2 {
		for j := range 2 {
			name := fmt.Sprintf("app-%d-%d", node, j)
			pods[name] = addPod(t, l, lab.PodSpec{Name: name, Namespace: "demo", Node: node, Labels: map[string]string{"app": name}, ServiceAccount: "app"})
		}
	}

	seen := map[netip.Addr]string{}
	for name, p := range pods {
		n := l.Node(p.Node)
		if !n.PodCIDR.Contains(p.IP) || p.IP == n.Gateway {
			t.Errorf("%s got %s, want an address of %s other than the gateway %s", name, p.IP, n.PodCIDR, n.Gateway)
		}
		if other, dup := seen[p.IP]; dup {
			t.Errorf("%s and %s both got %s", name, other, p.IP)
		}
		seen[p.IP] = name
		if fi, err := os.Stat(p.CgroupPath); err != nil || !fi.IsDir() {
			t.Errorf("%s: cgroup %s missing: %v", name, p.CgroupPath, err)
		}
		if want := filepath.Join(n.CgroupPath, "demo_"+name); p.CgroupPath != want {
			t.Errorf("%s: cgroup %s, want %s", name, p.CgroupPath, want)
		}
		if want := filepath.Join(lab.NetnsDir, "ltnet-demo-"+name); p.NetnsPath != want {
			t.Errorf("%s: netns %s, want %s", name, p.NetnsPath, want)
		}
	}

	t.Run("same node", func(t *testing.T) {
		exchange(t, pods["app-0-0"], pods["app-0-1"], pods["app-0-1"].AddrPort(8080), pods["app-0-0"].IP)
	})
	t.Run("across nodes", func(t *testing.T) {
		exchange(t, pods["app-0-0"], pods["app-1-0"], pods["app-1-0"].AddrPort(8080), pods["app-0-0"].IP)
		exchange(t, pods["app-1-1"], pods["app-0-1"], pods["app-0-1"].AddrPort(9090), pods["app-1-1"].IP)
	})
	t.Run("to the fabric", func(t *testing.T) {
		f := l.Fabric()
		exchange(t, pods["app-1-1"], f, netip.AddrPortFrom(f.IP, 80), pods["app-1-1"].IP)
	})

	t.Run("registry", func(t *testing.T) {
		var pod corev1.Pod
		readManifest(t, filepath.Join(l.RegistryDir(), "pods", "demo_app-1-0.yaml"), &pod)
		p := pods["app-1-0"]
		if pod.Spec.NodeName != l.Node(1).Name || pod.Status.PodIP != p.IP.String() ||
			len(pod.Status.PodIPs) != 1 || pod.Status.PodIPs[0].IP != p.IP.String() ||
			string(pod.UID) != p.UID || pod.Spec.ServiceAccountName != "app" ||
			pod.Labels["app"] != "app-1-0" || pod.Status.Phase != corev1.PodRunning {
			t.Errorf("manifest does not match the pod %+v:\n%+v", p, pod)
		}
		var ns corev1.Namespace
		readManifest(t, filepath.Join(l.RegistryDir(), "namespaces", "demo.yaml"), &ns)
		if ns.Name != "demo" {
			t.Errorf("namespace manifest: %+v", ns)
		}
		var node corev1.Node
		readManifest(t, filepath.Join(l.RegistryDir(), "nodes", l.Node(1).Name+".yaml"), &node)
		if node.Spec.PodCIDR != "10.244.1.0/24" || node.Status.Addresses[0].Address != "172.30.0.11" {
			t.Errorf("node manifest: %+v", node)
		}
	})
}

func readManifest(t *testing.T, path string, obj any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, obj); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func TestCommandRunsInPodNetnsAndCgroup(t *testing.T) {
	t.Parallel()
	l := newLab(t, "ltcmd", 1)
	p := addPod(t, l, lab.PodSpec{Name: "shell", Namespace: "demo"})

	out, err := p.Command("sh", "-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net").CombinedOutput()
	if err != nil {
		t.Fatalf("command: %v\n%s", err, out)
	}
	rel, _ := filepath.Rel(lab.DefaultCgroupBase, p.CgroupPath)
	if !strings.Contains(string(out), "0::/"+rel+"\n") {
		t.Errorf("process not in the pod's cgroup /%s:\n%s", rel, out)
	}
	if want := fmt.Sprintf("net:[%d]", inode(t, p.NetnsPath)); !strings.Contains(string(out), want) {
		t.Errorf("process not in the pod's netns %s:\n%s", want, out)
	}

	// Node.Command: the node's netns, its host cgroup.
	n := l.Node(0)
	out, err = n.Command("sh", "-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net").CombinedOutput()
	if err != nil {
		t.Fatalf("node command: %v\n%s", err, out)
	}
	rel, _ = filepath.Rel(lab.DefaultCgroupBase, n.HostCgroupPath)
	if !strings.Contains(string(out), "0::/"+rel+"\n") || !strings.Contains(string(out), fmt.Sprintf("net:[%d]", inode(t, n.NetnsPath))) {
		t.Errorf("node command ran elsewhere:\n%s", out)
	}

	// Do: the pod sees its eth0 address.
	err = p.Do(func() error {
		link, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		if len(addrs) != 1 || addrs[0].IP.String() != p.IP.String() {
			return fmt.Errorf("eth0 addresses %v, want %s", addrs, p.IP)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestDeletePodRemovesItsSandbox(t *testing.T) {
	t.Parallel()
	l := newLab(t, "ltdel", 1)
	p := addPod(t, l, lab.PodSpec{Name: "victim", Namespace: "demo"})
	keep := addPod(t, l, lab.PodSpec{Name: "bystander", Namespace: "demo"})

	sleeper := p.Command("sleep", "600")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- sleeper.Wait() }()

	if err := l.DeletePod(t.Context(), "demo", "victim"); err != nil {
		t.Fatalf("DeletePod: %v", err)
	}
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		sleeper.Process.Kill()
		t.Error("DeletePod left the pod's process running")
	}
	for _, path := range []string{p.NetnsPath, p.CgroupPath, filepath.Join(l.RegistryDir(), "pods", "demo_victim.yaml")} {
		if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still there after DeletePod (stat: %v)", path, err)
		}
	}
	if _, ok := l.Pod("demo", "victim"); ok {
		t.Error("Pod still lists the deleted pod")
	}
	if err := l.DeletePod(t.Context(), "demo", "victim"); !errors.Is(err, lab.ErrNotFound) {
		t.Errorf("second DeletePod: %v, want ErrNotFound", err)
	}

	// host-local released the address: the next pod may get it, and the survivor still
	// talks to the newcomer.
	again := addPod(t, l, lab.PodSpec{Name: "victim", Namespace: "demo"})
	exchange(t, keep, again, again.AddrPort(8080), keep.IP)
}

func TestLabelsRewriteManifests(t *testing.T) {
	t.Parallel()
	l := newLab(t, "ltlbl", 1)
	// Labelling a namespace before any pod creates it, as one would for ambient.
	if err := l.LabelNamespace("mesh", "istio.io/dataplane-mode", "ambient"); err != nil {
		t.Fatal(err)
	}
	var ns corev1.Namespace
	readManifest(t, filepath.Join(l.RegistryDir(), "namespaces", "mesh.yaml"), &ns)
	if ns.Labels["istio.io/dataplane-mode"] != "ambient" || ns.Labels["kubernetes.io/metadata.name"] != "mesh" {
		t.Errorf("namespace labels %v", ns.Labels)
	}
	rv := ns.ResourceVersion

	addPod(t, l, lab.PodSpec{Name: "web", Namespace: "mesh", Labels: map[string]string{"app": "web"}})
	if err := l.LabelPod("mesh", "web", "istio.io/dataplane-mode", "none"); err != nil {
		t.Fatal(err)
	}
	if err := l.LabelPod("mesh", "web", "app", ""); err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	readManifest(t, filepath.Join(l.RegistryDir(), "pods", "mesh_web.yaml"), &pod)
	if len(pod.Labels) != 1 || pod.Labels["istio.io/dataplane-mode"] != "none" {
		t.Errorf("pod labels %v, want only istio.io/dataplane-mode=none", pod.Labels)
	}
	if pod.Status.PodIP == "" {
		t.Error("relabelling lost the pod's IP")
	}

	if err := l.LabelNamespace("mesh", "istio.io/dataplane-mode", ""); err != nil {
		t.Fatal(err)
	}
	var after corev1.Namespace
	readManifest(t, filepath.Join(l.RegistryDir(), "namespaces", "mesh.yaml"), &after)
	if _, ok := after.Labels["istio.io/dataplane-mode"]; ok {
		t.Errorf("label not removed: %v", after.Labels)
	}
	if a, b := atoi(t, rv), atoi(t, after.ResourceVersion); b <= a {
		t.Errorf("resourceVersion went from %d to %d", a, b)
	}
	if err := l.LabelPod("mesh", "nope", "a", "b"); !errors.Is(err, lab.ErrNotFound) {
		t.Errorf("LabelPod of a missing pod: %v, want ErrNotFound", err)
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestOpenSharesTheLabAcrossHandles(t *testing.T) {
	t.Parallel()
	l := newLab(t, "ltopen", 2)
	addPod(t, l, lab.PodSpec{Name: "first", Namespace: "demo", Node: 1})

	other, err := lab.Open(lab.Config{Name: "ltopen"})
	if err != nil {
		t.Fatal(err)
	}
	if p, ok := other.Pod("demo", "first"); !ok || !p.IP.IsValid() || p.Node != 1 {
		t.Fatalf("Open does not see the pod: %+v %v", p, ok)
	}
	if len(other.Nodes()) != 2 {
		t.Errorf("Open sees %d nodes, want 2", len(other.Nodes()))
	}
	second, err := other.AddPod(t.Context(), lab.PodSpec{Name: "second", Namespace: "demo"})
	if err != nil {
		t.Fatal(err)
	}
	// The first handle deletes what the second made: state is shared through the file.
	if err := l.DeletePod(t.Context(), "demo", "second"); err != nil {
		t.Fatalf("delete a pod made through another handle: %v", err)
	}
	if netnsExistsAt(second.NetnsPath) {
		t.Error("netns of the pod made through the other handle is still there")
	}
	if _, err := l.AddPod(t.Context(), lab.PodSpec{Name: "first", Namespace: "demo"}); err == nil {
		t.Error("adding a pod twice succeeded")
	}
	if _, err := l.AddPod(t.Context(), lab.PodSpec{Name: "x", Node: 7}); err == nil {
		t.Error("adding a pod to a missing node succeeded")
	}
	if _, err := lab.Up(t.Context(), lab.Config{Name: "ltopen", CNIBinDir: cniBin(t)}); err == nil {
		t.Error("Up of an existing lab succeeded")
	}
}

func netnsExistsAt(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func TestExtraPluginsJoinTheChain(t *testing.T) {
	t.Parallel()
	testutil.RequireRoot(t)
	const name = "ltplug"
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	extraBin := t.TempDir()
	if err := os.Symlink(exe, filepath.Join(extraBin, fakePlugin)); err != nil {
		t.Fatal(err)
	}
	if err := lab.Cleanup(name); err != nil {
		t.Fatal(err)
	}
	l, err := lab.Up(t.Context(), lab.Config{
		Name:         name,
		CNIBinDir:    cniBin(t) + ":" + extraBin,
		ExtraPlugins: []map[string]any{{"type": fakePlugin, "record": "${NODE_DIR}/calls.jsonl"}},
		Logger:       testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Down(context.Background()); err != nil {
			t.Errorf("Down: %v", err)
		}
		assertGone(t, name)
	})
	n := l.Node(0)
	record := filepath.Join(n.Dir, "calls.jsonl")

	ok := addPod(t, l, lab.PodSpec{Name: "ok", Namespace: "demo"})
	calls := readCalls(t, record)
	if len(calls) != 1 || calls[0].Command != "ADD" || calls[0].ContainerID != ok.ContainerID || calls[0].Netns != ok.NetnsPath {
		t.Fatalf("plugin calls %+v, want one ADD for %+v", calls, ok)
	}
	for _, arg := range []string{"K8S_POD_NAME=ok", "K8S_POD_NAMESPACE=demo", "K8S_POD_UID=" + ok.UID, "IgnoreUnknown=1"} {
		if !strings.Contains(calls[0].Args, arg) {
			t.Errorf("CNI_ARGS %q lacks %s", calls[0].Args, arg)
		}
	}

	// The node's conflist is read at every ADD: rewrite it, as an agent chaining itself
	// in would, to make the plugin refuse.
	confPath := filepath.Join(n.ConfDir, "10-lab.conflist")
	conf, err := os.ReadFile(confPath)
	if err != nil {
		t.Fatal(err)
	}
	conf = []byte(strings.Replace(string(conf), `"record"`, `"failAdd": true, "record"`, 1))
	if err := os.WriteFile(confPath, conf, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = l.AddPod(t.Context(), lab.PodSpec{Name: "refused", Namespace: "demo"})
	if err == nil || !strings.Contains(err.Error(), "fake plugin refuses") {
		t.Fatalf("AddPod with a refusing plugin: %v, want its message", err)
	}
	calls = readCalls(t, record)
	if len(calls) != 3 || calls[1].Command != "ADD" || calls[2].Command != "DEL" || calls[2].ContainerID != calls[1].ContainerID {
		t.Errorf("plugin calls %+v, want ADD then DEL of the refused pod", calls[1:])
	}
	if _, found := l.Pod("demo", "refused"); found {
		t.Error("refused pod is listed")
	}
	for _, path := range []string{
		filepath.Join(lab.NetnsDir, name+"-demo-refused"),
		filepath.Join(n.CgroupPath, "demo_refused"),
		filepath.Join(l.RegistryDir(), "pods", "demo_refused.yaml"),
	} {
		if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s left after the failed ADD (stat: %v)", path, err)
		}
	}
	// host-local gave the refused pod's address back.
	ipam, _ := os.ReadDir(filepath.Join(n.Dir, "ipam", name))
	var held []string
	for _, e := range ipam {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			held = append(held, e.Name())
		}
	}
	if len(held) != 1 || held[0] != ok.IP.String() {
		t.Errorf("host-local holds %v, want only %s", held, ok.IP)
	}
}

func readCalls(t *testing.T, path string) []fakeCall {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var calls []fakeCall
	for line := range strings.Lines(string(b)) {
		var c fakeCall
		if err := json.Unmarshal([]byte(line), &c); err != nil {
			t.Fatal(err)
		}
		calls = append(calls, c)
	}
	return calls
}

func TestConcurrentAddAndDelete(t *testing.T) {
	t.Parallel()
	l := newLab(t, "ltconc", 2)
	const n = 12
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			_, err := l.AddPod(t.Context(), lab.PodSpec{Name: fmt.Sprintf("p%d", i), Namespace: fmt.Sprintf("ns%d", i%3), Node: i % 2})
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	other, err := lab.Open(lab.Config{Name: "ltconc"})
	if err != nil {
		t.Fatal(err)
	}
	pods := other.Pods()
	seen := map[netip.Addr]bool{}
	for _, p := range pods {
		if !p.IP.IsValid() || seen[p.IP] {
			t.Errorf("pod %s has IP %s (missing or taken twice)", p, p.IP)
		}
		seen[p.IP] = true
	}
	if len(pods) != n || len(other.Namespaces()) != 3 {
		t.Fatalf("state lists %d pods in %d namespaces, want %d in 3", len(pods), len(other.Namespaces()), n)
	}
	entries, _ := os.ReadDir(filepath.Join(l.RegistryDir(), "pods"))
	if len(entries) != n {
		t.Errorf("registry has %d pod manifests, want %d", len(entries), n)
	}
	for i := range n / 2 {
		wg.Go(func() {
			if err := l.DeletePod(t.Context(), fmt.Sprintf("ns%d", i%3), fmt.Sprintf("p%d", i)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	other, _ = lab.Open(lab.Config{Name: "ltconc"})
	if got := len(other.Pods()); got != n-n/2 {
		t.Errorf("%d pods left, want %d", got, n-n/2)
	}
}

func TestUpFailingHalfwayLeavesNothing(t *testing.T) {
	t.Parallel()
	testutil.RequireRoot(t)
	const name = "ltfail"
	bin := cniBin(t)
	if err := lab.Cleanup(name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Cleanup(name) })
	// A squatter on node1's netns name makes Up fail after the fabric and node0 exist.
	os.MkdirAll(lab.NetnsDir, 0o755)
	if err := os.WriteFile(filepath.Join(lab.NetnsDir, name+"-node1"), nil, 0o444); err != nil {
		t.Fatal(err)
	}
	_, err := lab.Up(t.Context(), lab.Config{Name: name, Nodes: 2, CNIBinDir: bin, Logger: testLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("Up with a taken netns name: %v, want an error naming it", err)
	}
	t.Log(err)
	assertGone(t, name)

	// A CgroupRoot that exists is not the lab's to kill and remove.
	foreign := filepath.Join(lab.DefaultCgroupBase, name+"x")
	if err := os.Mkdir(foreign, 0o755); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(foreign)
	_, err = lab.Up(t.Context(), lab.Config{Name: name, CNIBinDir: bin, CgroupRoot: foreign})
	if err == nil {
		t.Fatal("Up accepted an existing CgroupRoot")
	}
	if _, serr := os.Stat(foreign); serr != nil {
		t.Errorf("failed Up removed the existing cgroup: %v", serr)
	}
	assertGone(t, name)
}

func TestHostNetworkPod(t *testing.T) {
	t.Parallel()
	l := newLab(t, "lthost", 1)
	p := addPod(t, l, lab.PodSpec{Name: "agent", Namespace: "kube-system", HostNetwork: true})
	n := l.Node(0)
	if p.IP != n.IP || p.NetnsPath != n.NetnsPath {
		t.Errorf("host-network pod got %s in %s, want the node's %s in %s", p.IP, p.NetnsPath, n.IP, n.NetnsPath)
	}
	if err := l.DeletePod(t.Context(), "kube-system", "agent"); err != nil {
		t.Fatal(err)
	}
	if !netnsExistsAt(n.NetnsPath) {
		t.Error("deleting a host-network pod removed the node's netns")
	}
}

func TestDownRemovesEverything(t *testing.T) {
	t.Parallel()
	testutil.RequireRoot(t)
	const name = "ltdown"
	bin := cniBin(t)
	if err := lab.Cleanup(name); err != nil {
		t.Fatal(err)
	}
	l, err := lab.Up(t.Context(), lab.Config{Name: name, Nodes: 2, CNIBinDir: bin, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Cleanup(name) }) // only matters if Down fails
	for i := range 2 {
		p := addPod(t, l, lab.PodSpec{Name: fmt.Sprintf("p%d", i), Namespace: "demo", Node: i})
		if err := p.Command("sleep", "600").Start(); err != nil {
			t.Fatal(err)
		}
	}
	daemon := l.Node(1).Command("sleep", "600")
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	if err := l.Down(t.Context()); err != nil {
		t.Fatalf("Down: %v", err)
	}
	assertGone(t, name)
	if err := daemon.Wait(); err == nil {
		t.Error("node daemon exited cleanly, want killed by Down")
	}
	if err := l.Down(t.Context()); err != nil {
		t.Errorf("second Down: %v", err)
	}
}

// TestCleanupAfterCrash has a child process build a lab and die without Down, then
// removes the remains with Cleanup, which knows only the name.
func TestCleanupAfterCrash(t *testing.T) {
	t.Parallel()
	testutil.RequireRoot(t)
	const name = "ltcrash"
	cniBin(t)
	if err := lab.Cleanup(name); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.v")
	cmd.Env = append(os.Environ(), "LAB_CRASH_CHILD="+name)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 3 {
		t.Fatalf("crash child: %v, want exit status 3\n%s", err, out)
	}
	var pids []int
	for line := range strings.Lines(string(out)) {
		if s, ok := strings.CutPrefix(strings.TrimSpace(line), "pid "); ok {
			pids = append(pids, atoi(t, s))
		}
	}
	if len(pids) != 2 {
		t.Fatalf("child reported pids %v, want 2\n%s", pids, out)
	}
	if !netnsExistsAt(filepath.Join(lab.NetnsDir, name+"-demo-p1")) {
		t.Fatalf("the crashed child left no pod netns: nothing to test\n%s", out)
	}

	if err := lab.Cleanup(name); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	assertGone(t, name)
	for _, pid := range pids {
		if alive(pid) {
			t.Errorf("process %d survived Cleanup", pid)
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if err := lab.Cleanup(name); err != nil {
		t.Errorf("Cleanup with nothing left: %v", err)
	}
}

func TestCleanupWithoutStateFile(t *testing.T) {
	t.Parallel()
	testutil.RequireRoot(t)
	const name = "ltnostate"
	if err := lab.Cleanup(name); err != nil {
		t.Fatal(err)
	}
	l, err := lab.Up(t.Context(), lab.Config{Name: name, Nodes: 2, CNIBinDir: cniBin(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Cleanup(name) })
	p := addPod(t, l, lab.PodSpec{Name: "p", Namespace: "demo", Node: 1})
	if err := p.Command("sleep", "600").Start(); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(l.StateDir()); err != nil {
		t.Fatal(err)
	}
	if err := lab.Cleanup(name); err != nil {
		t.Fatalf("Cleanup by name alone: %v", err)
	}
	assertGone(t, name)
}

// alive reports whether pid runs: a zombie (dead, not yet reaped by init) does not.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name in parentheses, which may contain spaces.
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z") && !strings.HasPrefix(rest, "X")
}

// TestCrashChild is the child of TestCleanupAfterCrash.
func TestCrashChild(t *testing.T) {
	name := os.Getenv("LAB_CRASH_CHILD")
	if name == "" {
		t.Skip("child process of TestCleanupAfterCrash")
	}
	l, err := lab.Up(t.Context(), lab.Config{Name: name, Nodes: 2, CNIBinDir: lab.DefaultCNIBinDir()})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		p, err := l.AddPod(t.Context(), lab.PodSpec{Name: fmt.Sprintf("p%d", i), Namespace: "demo", Node: i})
		if err != nil {
			t.Fatal(err)
		}
		// Setsid: the sleepers must outlive this process, as a crash leaves them.
		cmd := p.Command("sleep", "600")
		cmd.SysProcAttr.Setsid = true
		if i == 1 {
			cmd = l.Node(1).Command("sleep", "600")
			cmd.SysProcAttr.Setsid = true
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		fmt.Printf("pid %d\n", cmd.Process.Pid)
	}
	os.Exit(3) // crash: no Down, no t.Cleanup
}
