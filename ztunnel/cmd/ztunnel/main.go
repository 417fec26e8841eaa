// Command ztunnel is Sluice's per-node L4 proxy (DaemonSet). It takes enrolled pods'
// network namespaces from the node agent, serves 15001/15006/15008 inside each, and
// carries their traffic over HBONE with mutual TLS, enforcing L4 policy.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"regexp"
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/cni/zds"
	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/ztunnel/identity"
	"github.com/sluicemesh/sluice/ztunnel/proxy"
	"github.com/sluicemesh/sluice/ztunnel/state"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "ztunnel:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		configPath  = flag.String("config", "", "local mode: a YAML file of workloads, services and Istio policies, or a directory of Kubernetes manifests (Pods, Namespaces, Services, AuthorizationPolicy, PeerAuthentication); required until the controller lands")
		zdsSocket   = flag.String("zds-socket", zds.DefaultSocket, "the node agent's socket for pod network namespaces")
		bpfInstance = flag.String("bpf-instance", bpf.DefaultInstance, "the node agent's BPF pin instance (where inbound listeners are registered)")
		caDir       = flag.String("ca-dir", "", "local CA mode: directory with root-cert.pem and ca-key.pem (created if missing)")
		trustDomain = flag.String("trust-domain", state.DefaultTrustDomain, "trust domain of the local CA")
		certTTL     = flag.Duration("cert-ttl", 24*time.Hour, "lifetime of workload certificates from the local CA")
		nodeName    = flag.String("node-name", os.Getenv("NODE_NAME"), "this node's name")
		adminAddr   = flag.String("admin-addr", "127.0.0.1:15000", "admin endpoint (config_dump, certs, pprof); keep it on localhost")
		metricsAddr = flag.String("metrics-addr", ":15020", "Prometheus metrics")
		readyAddr   = flag.String("readiness-addr", ":15021", "readiness probe (/healthz/ready)")
		drain       = flag.Duration("drain-timeout", 5*time.Second, "how long open connections may finish on shutdown")
		logJSON     = flag.Bool("log-json", false, "log JSON lines")
		workers     = flag.Int("workers", defaultWorkers(), "how many CPUs ztunnel's Go runtime uses (GOMAXPROCS), like Istio's ZTUNNEL_WORKER_THREADS; default a quarter of the node's CPUs, at least 1, unless GOMAXPROCS is set")
	)
	flag.Parse()
	if os.Getenv("GOMAXPROCS") == "" && *workers > 0 {
		// A per-node proxy shares the node with the workloads it carries. Fewer Go
		// threads also means fewer hand-offs between them: on a 2-core node one worker
		// carried 25-40% more than two (docs/bench/ztunnel.md).
		runtime.GOMAXPROCS(*workers)
	}
	var handler slog.Handler = slog.NewTextHandler(os.Stderr, nil)
	if *logJSON {
		handler = slog.NewJSONHandler(os.Stderr, nil)
	}
	log := slog.New(handler).With("node", *nodeName)
	if *configPath == "" {
		return errors.New("--config is required: Sluice's controller is not available yet, so ztunnel runs in local mode")
	}
	if *caDir == "" {
		return errors.New("--ca-dir is required: certificates come from the local CA until the controller's CA lands")
	}
	authority, err := ca.LoadOrCreate(*caDir, *trustDomain)
	if err != nil {
		return err
	}

	reg := newRegistry()
	store := &state.Store{}
	ids := &identity.Manager{Signer: identity.LocalSigner{CA: authority, TTL: *certTTL}, Logger: log.With("component", "identity")}
	ids.SetRoots(authority.TrustDomain(), authority.Roots())
	px := proxy.New(proxy.Config{
		Store: store, Identity: ids, Metrics: proxy.NewMetrics(reg),
		PinDir: bpf.Config{Instance: *bpfInstance}.PinDir(), NodeName: *nodeName,
		Logger: log, AccessLog: log.With("log", "access"),
	})

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var ready atomic.Bool
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return ids.Run(gctx) })
	loaded := make(chan struct{})
	g.Go(func() error {
		store.Subscribe(func(_, _ *state.Snapshot) {
			select {
			case <-loaded:
			default:
				close(loaded)
			}
		})
		return state.WatchLocalConfig(gctx, *configPath, store, log.With("component", "config"))
	})
	g.Go(func() error {
		select {
		case <-loaded:
		case <-gctx.Done():
			return nil
		}
		client := &zds.Client{Path: *zdsSocket, Logger: log.With("component", "zds")}
		ready.Store(true)
		return client.Run(gctx, px)
	})
	g.Go(func() error { return serve(gctx, *adminAddr, adminMux(store, ids)) })
	g.Go(func() error {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.Handle("/stats/prometheus", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		return serve(gctx, *metricsAddr, mux)
	})
	g.Go(func() error { return serve(gctx, *readyAddr, readinessMux(&ready)) })
	err = g.Wait()
	drainCtx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	log.Info("draining", "timeout", *drain)
	return errors.Join(err, px.Shutdown(drainCtx))
}

// defaultWorkers is ZTUNNEL_WORKER_THREADS if set, else a quarter of the CPUs, at least 1.
func defaultWorkers() int {
	if v, err := strconv.Atoi(os.Getenv("ZTUNNEL_WORKER_THREADS")); err == nil && v > 0 {
		return v
	}
	return max(1, runtime.NumCPU()/4)
}

// readinessMux answers /healthz/ready: 503 until the first config is loaded.
func readinessMux(ready *atomic.Bool) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, "not ready: waiting for config", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

func adminMux(store *state.Store, ids *identity.Manager) *http.ServeMux {
	mux := http.NewServeMux()
	writeJSON := func(w http.ResponseWriter, v any) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(v)
	}
	mux.HandleFunc("/config_dump", func(w http.ResponseWriter, _ *http.Request) {
		snap := store.Load()
		writeJSON(w, map[string]any{
			"version": snap.Version, "trustDomain": snap.TrustDomain,
			"workloads": snap.Workloads(), "services": snap.Services(),
			"policyNotes": snap.Policy.Notes(), "certificates": ids.Snapshot(),
		})
	})
	mux.HandleFunc("/certs", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, ids.Snapshot()) })
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

func serve(ctx context.Context, addr string, h http.Handler) error {
	if addr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// newRegistry holds ztunnel's metrics, with the Go runtime's and the process's.
func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(collectors.WithGoCollectorRuntimeMetrics(
		// How long runnable goroutines waited for a worker: with one or two workers per
		// node, the first place to look when proxied latency grows.
		collectors.GoRuntimeMetricsRule{Matcher: regexp.MustCompile(`^/sched/latencies:seconds$`)},
	)), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}
