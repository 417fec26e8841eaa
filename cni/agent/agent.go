//go:build linux

package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/util/workqueue"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/cni/cniapi"
	"github.com/sluicemesh/sluice/cni/install"
	"github.com/sluicemesh/sluice/cni/zds"
	"github.com/sluicemesh/sluice/internal/kubeworkload"
	"github.com/sluicemesh/sluice/internal/workload"
)

// Config is the agent's configuration. Zero values are the production defaults.
type Config struct {
	// NodeName is the Kubernetes node this agent serves (required).
	NodeName string
	// Source tells which pods run here and how they are labelled (required).
	Source Source
	// Capture configures the BPF programs.
	Capture bpf.Config
	// CNISocket is where the CNI plugin reaches the agent (default cniapi.DefaultAgentSocket).
	CNISocket string
	// MeshStateFile is written for the plugin's use while the agent is away (default
	// cniapi.DefaultStateFile).
	MeshStateFile string
	// ZtunnelSocket is where ztunnel connects for network namespaces (default zds.DefaultSocket).
	ZtunnelSocket string
	// StateDir keeps the agent's pod records across restarts (default /var/run/sluice/agent).
	StateDir string
	// NetnsDirs are searched for the namespaces of pods the agent saw no CNI ADD for
	// (default /var/run/netns and /run/netns).
	NetnsDirs []string
	// MetricsAddr serves Prometheus metrics; empty disables.
	MetricsAddr string
	// Installer, when set, installs the plugin into the node's CNI config at start.
	Installer *install.Installer
	// PodWait bounds how long CNI ADD waits for the source to learn of a new pod
	// (default 10s).
	PodWait time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Agent is a running node agent. Create it with New and start it with Run.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	records recordStore
	zds     *zds.Server
	queue   workqueue.TypedRateLimitingInterface[string]

	// ready is closed once capture is loaded and records are restored.
	ready chan struct{}

	mu        sync.Mutex // guards everything below and every enrollment change
	capture   *bpf.Capture
	pods      map[string]*record // by pod UID
	lastState []string
}

// New checks cfg and fills its defaults.
func New(cfg Config) (*Agent, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("agent: NodeName is required (set --node-name or NODE_NAME)")
	}
	if cfg.Source == nil {
		return nil, errors.New("agent: a pod Source is required")
	}
	if cfg.CNISocket == "" {
		cfg.CNISocket = cniapi.DefaultAgentSocket
	}
	if cfg.MeshStateFile == "" {
		cfg.MeshStateFile = cniapi.DefaultStateFile
	}
	if cfg.ZtunnelSocket == "" {
		cfg.ZtunnelSocket = zds.DefaultSocket
	}
	if cfg.StateDir == "" {
		cfg.StateDir = "/var/run/sluice/agent"
	}
	if cfg.NetnsDirs == nil {
		cfg.NetnsDirs = []string{"/var/run/netns", "/run/netns"}
	}
	if cfg.PodWait == 0 {
		cfg.PodWait = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.Capture.Logger = cfg.Logger
	return &Agent{
		cfg:     cfg,
		log:     cfg.Logger.With("node", cfg.NodeName),
		records: recordStore{dir: cfg.StateDir},
		zds:     &zds.Server{Logger: cfg.Logger.With("component", "zds")},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "pods"}),
		ready: make(chan struct{}),
		pods:  map[string]*record{},
	}, nil
}

// Run loads capture, restores what an earlier agent left, and serves until ctx ends.
// Capture stays in place when Run returns: pods keep their protection across restarts.
func (a *Agent) Run(ctx context.Context) error {
	capture, err := bpf.Load(a.cfg.Capture)
	if err != nil {
		return err
	}
	defer capture.Close()
	a.capture = capture
	if err := a.restore(); err != nil {
		return err
	}
	if a.cfg.Installer != nil {
		if err := a.cfg.Installer.Install(); err != nil {
			return fmt.Errorf("install CNI plugin: %w", err)
		}
	}

	for _, dir := range []string{filepath.Dir(a.cfg.CNISocket), filepath.Dir(a.cfg.ZtunnelSocket), filepath.Dir(a.cfg.MeshStateFile)} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	zln, err := zds.Listen(a.cfg.ZtunnelSocket)
	if err != nil {
		return fmt.Errorf("listen for ztunnel on %s: %w", a.cfg.ZtunnelSocket, err)
	}
	cniLn, err := listenUnix(a.cfg.CNISocket)
	if err != nil {
		zln.Close()
		return fmt.Errorf("listen for the CNI plugin on %s: %w", a.cfg.CNISocket, err)
	}
	cniSrv := &http.Server{Handler: a.cniHandler(), ReadHeaderTimeout: 5 * time.Second}

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.zds.Serve(ctx, zln) })
	g.Go(func() error { return serveUntil(ctx, cniSrv, cniLn) })
	if a.cfg.MetricsAddr != "" {
		g.Go(func() error { return a.serveMetrics(ctx) })
	}
	g.Go(func() error {
		return a.cfg.Source.Run(ctx, func(key string) { a.queue.Add(key) })
	})
	g.Go(func() error {
		<-ctx.Done()
		a.queue.ShutDown()
		return nil
	})
	g.Go(func() error { a.runWorker(ctx); return nil })
	close(a.ready)
	a.log.Info("node agent running", "cniSocket", a.cfg.CNISocket, "ztunnelSocket", a.cfg.ZtunnelSocket)
	return g.Wait()
}

// Ready is closed once the agent serves requests.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// restore rebuilds the agent's view after a restart from its records and the pinned BPF
// state: capture never lapsed, so this only reconnects bookkeeping and drops what died
// while the agent was away.
func (a *Agent) restore() error {
	recs, err := a.records.load()
	if err != nil {
		a.log.Warn("some pod records could not be read", "err", err)
	}
	enrolled, err := a.capture.Enrolled()
	if err != nil {
		return err
	}
	live := map[uint64]bool{}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range recs {
		a.pods[r.UID] = r
		if r.Cookie == 0 {
			continue
		}
		cookie, err := bpf.NetnsCookie(r.Netns)
		if err != nil || cookie != r.Cookie {
			// The pod's namespace is gone (or was replaced): nothing left to capture.
			a.log.Info("dropping capture of a pod whose network namespace is gone", "pod", r.key(), "netns", r.Netns)
			a.capture.Unenroll(r.Cookie)
			a.forgetLocked(r)
			continue
		}
		live[r.Cookie] = true
		// No ztunnel is connected yet: this queues the pod for the snapshot ztunnel gets
		// when it (re)connects, with the namespace reopened from its path.
		if err := a.zds.Add(r.UID, a.workloadOf(r, nil), r.Netns); err != nil {
			a.log.Warn("queue restored pod for ztunnel", "pod", r.key(), "err", err)
		}
	}
	for _, c := range enrolled {
		if !live[c] {
			a.log.Info("unenrolling a namespace no record claims", "cookie", c)
			if err := a.capture.Unenroll(c); err != nil {
				a.log.Warn("unenroll orphan", "cookie", c, "err", err)
			}
		}
	}
	a.log.Info("restored state", "pods", len(a.pods), "enrolled", len(live))
	return nil
}

func (a *Agent) runWorker(ctx context.Context) {
	for {
		key, quit := a.queue.Get()
		if quit {
			return
		}
		err := a.reconcile(ctx, key)
		if err != nil {
			a.log.Warn("reconcile pod", "pod", key, "err", err)
			a.queue.AddRateLimited(key)
		} else {
			a.queue.Forget(key)
		}
		a.queue.Done(key)
	}
}

// reconcile brings one pod's capture in line with its labels.
func (a *Agent) reconcile(_ context.Context, key string) error {
	pod, ok := a.cfg.Source.Pod(key)
	a.mu.Lock()
	defer a.mu.Unlock()
	defer a.writeMeshStateLocked()

	rec := a.recordByKeyLocked(key, pod)
	if !ok {
		if rec != nil {
			a.log.Info("pod gone", "pod", key)
			err := a.unenrollLocked(rec)
			a.forgetLocked(rec)
			return err
		}
		return nil
	}
	ns, _ := a.cfg.Source.Namespace(pod.Namespace)
	want := InMesh(pod, ns)
	if rec == nil {
		if !want {
			return nil
		}
		ips := podIPs(pod)
		if len(ips) == 0 || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			return nil // not started yet: CNI ADD will enroll it
		}
		path, err := findNetns(ips, a.cfg.NetnsDirs)
		if err != nil {
			return fmt.Errorf("find network namespace of %s: %w", key, err)
		}
		rec = &record{UID: string(pod.UID), Namespace: pod.Namespace, Name: pod.Name, Netns: path, IPs: ips}
		a.pods[rec.UID] = rec
		if err := a.records.save(rec); err != nil {
			return err
		}
	}
	switch {
	case want && rec.Cookie == 0:
		return a.enrollLocked(rec, pod)
	case !want && rec.Cookie != 0:
		return a.unenrollLocked(rec)
	}
	return nil
}

func (a *Agent) recordByKeyLocked(key string, pod *corev1.Pod) *record {
	if pod != nil {
		if r, ok := a.pods[string(pod.UID)]; ok {
			return r
		}
	}
	for _, r := range a.pods {
		if r.key() == key && (pod == nil || pod.UID == "" || string(pod.UID) == r.UID) {
			return r
		}
	}
	return nil
}

func (a *Agent) enrollLocked(rec *record, pod *corev1.Pod) error {
	cookie, err := a.capture.Enroll(rec.Netns, a.podAddrs(rec))
	if err != nil {
		return fmt.Errorf("enroll %s: %w", rec.key(), err)
	}
	rec.Cookie = cookie
	w := a.workloadOf(rec, pod)
	if err := a.records.save(rec); err != nil {
		return err
	}
	a.log.Info("pod enrolled", "pod", rec.key(), "netns", rec.Netns, "cookie", cookie)
	if err := a.zds.Add(rec.UID, w, rec.Netns); err != nil {
		// Capture stays in place: the pod fails closed until ztunnel takes it.
		return fmt.Errorf("ztunnel refused pod %s: %w", rec.key(), err)
	}
	return nil
}

// podAddrs parses the pod's addresses. One that does not parse is left out (and logged):
// the node's probes to it are then captured like any other connection, never let through.
func (a *Agent) podAddrs(rec *record) []netip.Addr {
	addrs, err := parseAddrs(rec.IPs)
	if err != nil {
		a.log.Warn("pod address unreadable; the node's probes to it will be captured", "pod", rec.key(), "err", err)
	}
	return addrs
}

func (a *Agent) unenrollLocked(rec *record) error {
	if rec.Cookie == 0 {
		return nil
	}
	// Capture goes first: while ztunnel still serves the pod, its new connections go
	// direct at once, instead of meeting ztunnel's closed listeners in between.
	errs := []error{a.capture.Unenroll(rec.Cookie), a.zds.Delete(rec.UID)}
	a.log.Info("pod unenrolled", "pod", rec.key(), "cookie", rec.Cookie)
	rec.Cookie = 0
	errs = append(errs, a.records.save(rec))
	return errors.Join(errs...)
}

func (a *Agent) forgetLocked(rec *record) {
	delete(a.pods, rec.UID)
	if err := a.records.remove(rec.UID); err != nil {
		a.log.Warn("remove pod record", "pod", rec.key(), "err", err)
	}
}

func (a *Agent) workloadOf(rec *record, pod *corev1.Pod) zds.Workload {
	if pod != nil {
		rec.ServiceAccount = workload.ServiceAccount(kubeworkload.Pod(pod))
		rec.Labels = pod.Labels
	}
	return zds.Workload{Name: rec.Name, Namespace: rec.Namespace, Node: a.cfg.NodeName, IPs: rec.IPs,
		ServiceAccount: rec.ServiceAccount, Labels: rec.Labels}
}

// writeMeshStateLocked keeps the plugin's fallback file current.
func (a *Agent) writeMeshStateLocked() {
	var ambient []string
	for _, ns := range a.cfg.Source.Namespaces() {
		if workload.NamespaceAmbient(ns.Labels) {
			ambient = append(ambient, ns.Name)
		}
	}
	sort.Strings(ambient)
	if a.lastState != nil && slices.Equal(ambient, a.lastState) {
		return
	}
	b, _ := json.Marshal(cniapi.MeshState{AmbientNamespaces: ambient})
	tmp := a.cfg.MeshStateFile + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err == nil {
		err = os.Rename(tmp, a.cfg.MeshStateFile)
		if err == nil {
			a.lastState = append([]string{}, ambient...)
			return
		}
	}
	a.log.Warn("could not write mesh state file", "path", a.cfg.MeshStateFile)
}

func podIPs(pod *corev1.Pod) []string {
	var ips []string
	for _, ip := range pod.Status.PodIPs {
		ips = append(ips, ip.IP)
	}
	if len(ips) == 0 && pod.Status.PodIP != "" {
		ips = append(ips, pod.Status.PodIP)
	}
	return ips
}

func listenUnix(path string) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return net.Listen("unix", path)
}

func serveUntil(ctx context.Context, srv *http.Server, ln net.Listener) error {
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(shutdown)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// MetricsHandler serves the agent's Prometheus metrics (what MetricsAddr serves).
func (a *Agent) MetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(&podCollector{agent: a})
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

func (a *Agent) serveMetrics(ctx context.Context) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", a.MetricsHandler())
	ln, err := net.Listen("tcp", a.cfg.MetricsAddr)
	if err != nil {
		return fmt.Errorf("metrics listener on %s: %w", a.cfg.MetricsAddr, err)
	}
	return serveUntil(ctx, &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, ln)
}
