//go:build linux

// Package proxy is ztunnel's data path: the in-pod listeners (15001 outbound, 15006
// plaintext inbound, 15008 HBONE) opened inside each enrolled pod's network namespace,
// and the code that carries connections between them. Where a connection goes and whether
// it may is decided by pure functions (route.go, ztunnel/policy); this package only does
// what they say.
package proxy

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/big"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/cni/zds"
	"github.com/sluicemesh/sluice/internal/hbone"
	"github.com/sluicemesh/sluice/internal/rawio"
	"github.com/sluicemesh/sluice/internal/spiffe"
	"github.com/sluicemesh/sluice/ztunnel/identity"
	"github.com/sluicemesh/sluice/ztunnel/state"
)

// Config wires the proxy. Store and Identity are required.
type Config struct {
	Store    *state.Store
	Identity *identity.Manager
	// Metrics may be nil (no metrics).
	Metrics *Metrics
	// PinDir is the node agent's BPF pin directory, where plaintext inbound listeners are
	// registered (default: the default capture instance).
	PinDir string
	// NodeName labels logs and baggage.
	NodeName string
	// ConnectTimeout bounds dialing an upstream (default 10s).
	ConnectTimeout time.Duration
	// Pick chooses among a service's endpoints (default: uniformly at random).
	Pick Picker
	// Logger for operational messages; AccessLog (default Logger) gets one line per
	// connection.
	Logger, AccessLog *slog.Logger
}

// Proxy serves every pod the node agent hands it.
type Proxy struct {
	cfg  Config
	log  *slog.Logger
	pool *hbone.Pool

	mu     sync.Mutex
	pods   map[string]*podServer
	closed bool

	idMu   sync.Mutex
	wanted map[spiffe.ID]bool // the identities syncIdentities asked for

	conns  registry
	active sync.WaitGroup

	// draining is cancelled by Shutdown: HBONE connections then send GOAWAY, so peers
	// open new connections (to a successor ztunnel) while streams in flight finish.
	draining context.Context
	drainNow context.CancelFunc
}

// New builds a proxy; serve pods by passing it to a zds.Client as its Handler.
func New(cfg Config) *Proxy {
	if cfg.PinDir == "" {
		cfg.PinDir = bpf.Config{}.PinDir()
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	if cfg.Pick == nil {
		cfg.Pick = randomPick
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.AccessLog == nil {
		cfg.AccessLog = cfg.Logger
	}
	p := &Proxy{cfg: cfg, log: cfg.Logger, pods: map[string]*podServer{}}
	p.draining, p.drainNow = context.WithCancel(context.Background())
	p.pool = &hbone.Pool{Dial: p.dialHBONE, Logger: cfg.Logger.With("component", "hbone-pool")}
	cfg.Store.Subscribe(func(_, _ *state.Snapshot) {
		p.syncIdentities()
		if n := p.conns.reevaluate(); n > 0 {
			p.log.Info("closed connections a policy change now denies", "count", n)
		}
	})
	return p
}

// syncIdentities asks for the certificate of every identity a served pod has in the
// current config, and lets go of those no served pod has any more (the identity manager
// keeps them for its grace period, then stops renewing them). It runs when a pod is
// added or deleted and when the config changes: a change can give a pod the identity it
// lacked when it was added.
func (p *Proxy) syncIdentities() {
	p.idMu.Lock()
	defer p.idMu.Unlock()
	snap := p.cfg.Store.Load() // the latest, whichever call comes last
	p.mu.Lock()
	pods := slices.Collect(maps.Values(p.pods))
	p.mu.Unlock()
	now := make(map[spiffe.ID]bool, len(pods))
	for _, ps := range pods {
		id := ps.workload(snap).Identity()
		now[id] = true
		p.cfg.Identity.Want(id)
	}
	for id := range p.wanted {
		if !now[id] {
			p.cfg.Identity.Forget(id)
		}
	}
	p.wanted = now
}

// wantEarly asks for id's certificate ahead of syncIdentities, recording it as wanted so
// that the next sync lets go of it if no served pod has it.
func (p *Proxy) wantEarly(id spiffe.ID) {
	p.idMu.Lock()
	defer p.idMu.Unlock()
	p.cfg.Identity.Want(id)
	if p.wanted == nil {
		p.wanted = map[spiffe.ID]bool{}
	}
	p.wanted[id] = true
}

func randomPick(n int) int {
	if n <= 1 {
		return 0
	}
	v, _ := rand.Int(rand.Reader, big.NewInt(int64(n)))
	return int(v.Int64())
}

// podServer is one pod's listeners and what ztunnel knows of it.
type podServer struct {
	uid       string
	info      zds.Workload
	ips       []netip.Addr
	netns     *PodNetns
	listeners []*net.TCPListener
	inbound   *net.TCPListener // the plaintext listener registered for sk_lookup
}

// workload is the pod as the current snapshot knows it, or as the node agent described
// it when the snapshot does not know it (yet).
func (ps *podServer) workload(snap *state.Snapshot) *state.Workload {
	if w, ok := snap.WorkloadByUID(ps.uid); ok {
		return w
	}
	for _, ip := range ps.ips {
		// A config that names the pod only by address (local mode) is it only if
		// it agrees with what the node agent says the pod is: an address reused by a
		// new pod before the config caught up must not lend it the old pod's identity.
		if w, ok := snap.WorkloadByIP(ip); ok && ps.sameWorkload(w) {
			return w
		}
	}
	return &state.Workload{UID: ps.uid, Name: ps.info.Name, Namespace: ps.info.Namespace,
		ServiceAccount: ps.info.ServiceAccount, Node: ps.info.Node, IPs: ps.ips, Labels: ps.info.Labels,
		Protocol: state.HBONE, TrustDomain: snap.TrustDomain}
}

// sameWorkload reports whether w, found by one of the pod's addresses, can be this pod:
// the same UID, or without one in the config the same name, namespace and service
// account as the node agent reports (a pod that reused a stale entry's address must not
// take its identity, nor its labels and with them its policies).
func (ps *podServer) sameWorkload(w *state.Workload) bool {
	if w.UID != "" {
		return w.UID == ps.uid
	}
	agrees := func(config, agent string) bool { return agent == "" || config == agent }
	return agrees(w.Name, ps.info.Name) && agrees(w.Namespace, ps.info.Namespace) &&
		agrees(orDefaultSA(w.ServiceAccount), orDefaultSA(ps.info.ServiceAccount))
}

func orDefaultSA(sa string) string {
	if sa == "" {
		return "default"
	}
	return sa
}

func (ps *podServer) owns(a netip.Addr) bool {
	for _, ip := range ps.ips {
		if ip == a.Unmap() {
			return true
		}
	}
	return false
}

// Add implements zds.Handler: open the pod's listeners inside its namespace. Connections
// accepted before the pod's certificate arrives wait for it.
func (p *Proxy) Add(uid string, w zds.Workload, netns *os.File) error {
	ps := &podServer{uid: uid, info: w, netns: NewPodNetns(netns)}
	for _, s := range w.IPs {
		if a, err := netip.ParseAddr(s); err == nil {
			ps.ips = append(ps.ips, a.Unmap())
		}
	}
	// Ask for the certificate before the listeners open, so that a connection arriving
	// at once waits for it rather than failing its handshake; syncIdentities below (or
	// on failure) settles what stays wanted.
	p.wantEarly(ps.workload(p.cfg.Store.Load()).Identity())
	if err := p.open(ps); err != nil {
		ps.close(p.cfg.PinDir)
		p.syncIdentities()
		return fmt.Errorf("serve pod %s/%s: %w", w.Namespace, w.Name, err)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		ps.close(p.cfg.PinDir)
		p.syncIdentities()
		return errors.New("ztunnel is shutting down")
	}
	old := p.pods[uid]
	p.pods[uid] = ps
	p.mu.Unlock()
	if old != nil {
		old.close(p.cfg.PinDir)
	}
	p.syncIdentities()
	p.log.Info("serving pod", "pod", w.Namespace+"/"+w.Name, "uid", uid, "ips", w.IPs)
	return nil
}

func (p *Proxy) open(ps *podServer) error {
	if err := ps.netns.prepareDelivery(); err != nil {
		return err
	}
	out, err := ps.netns.Listen(fmt.Sprintf("127.0.0.1:%d", bpf.DefaultOutboundPort))
	if err != nil {
		return err
	}
	ps.listeners = append(ps.listeners, out)
	if out6, err := ps.netns.Listen(fmt.Sprintf("[::1]:%d", bpf.DefaultOutboundPort)); err == nil {
		ps.listeners = append(ps.listeners, out6)
		go p.acceptLoop(ps, out6, p.handleOutbound)
	}
	in, err := ps.netns.Listen(fmt.Sprintf(":%d", bpf.DefaultInboundPort))
	if err != nil {
		return err
	}
	ps.listeners = append(ps.listeners, in)
	ps.inbound = in
	hb, err := ps.netns.Listen(fmt.Sprintf(":%d", HBONEPort))
	if err != nil {
		return err
	}
	ps.listeners = append(ps.listeners, hb)
	for _, ip := range ps.ips {
		if err := bpf.RegisterInboundListener(p.cfg.PinDir, ip, in); err != nil {
			return err
		}
	}
	go p.acceptLoop(ps, out, p.handleOutbound)
	go p.acceptLoop(ps, in, p.handlePlaintext)
	go p.acceptLoop(ps, hb, p.handleHBONE)
	return nil
}

func (p *Proxy) acceptLoop(ps *podServer, ln *net.TCPListener, handle func(*podServer, *net.TCPConn)) {
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.log.Warn("accept", "addr", ln.Addr(), "err", err)
			}
			return
		}
		p.active.Add(1)
		go func() {
			defer p.active.Done()
			handle(ps, c)
		}()
	}
}

func (ps *podServer) close(pinDir string) {
	ps.unregister(pinDir)
	for _, l := range ps.listeners {
		l.Close()
	}
	ps.listeners = nil
	ps.netns.Close()
}

// unregister withdraws the pod's plaintext listener from sk_lookup, unless a successor
// ztunnel has registered its own already.
func (ps *podServer) unregister(pinDir string) {
	if ps.inbound == nil {
		return
	}
	for _, ip := range ps.ips {
		bpf.UnregisterInboundListener(pinDir, ip, ps.inbound)
	}
}

// Keep implements zds.Handler: the agent restarted and still captures the pod; keep
// serving it as we do.
func (p *Proxy) Keep(string, zds.Workload) error { return nil }

// SnapshotDone implements zds.Handler.
func (p *Proxy) SnapshotDone() error {
	p.log.Info("node agent snapshot applied", "pods", p.podCount())
	return nil
}

// Delete implements zds.Handler: the pod left; stop serving it and close its connections.
func (p *Proxy) Delete(uid string) error {
	p.mu.Lock()
	ps := p.pods[uid]
	delete(p.pods, uid)
	p.mu.Unlock()
	if ps == nil {
		return nil
	}
	ps.close(p.cfg.PinDir)
	p.conns.closePod(uid, "pod removed from ztunnel")
	p.syncIdentities()
	p.log.Info("stopped serving pod", "pod", ps.info.Namespace+"/"+ps.info.Name, "uid", uid)
	return nil
}

func (p *Proxy) podCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pods)
}

func (p *Proxy) pod(uid string) (*podServer, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ps, ok := p.pods[uid]
	return ps, ok
}

// Shutdown stops accepting in every pod, lets open connections finish for up to the
// context's deadline, then closes what is left. A new ztunnel bound to the same ports
// (SO_REUSEPORT) takes new connections meanwhile.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closed = true
	pods := p.pods
	p.pods = map[string]*podServer{}
	p.mu.Unlock()
	for _, ps := range pods {
		// Withdraw the plaintext listener before closing it, so sk_lookup finds the
		// successor's (or drops) rather than a closed socket.
		ps.unregister(p.cfg.PinDir)
		for _, l := range ps.listeners {
			l.Close()
		}
	}
	p.drainNow()
	done := make(chan struct{})
	go func() { p.active.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("drain ended with %d connections open: %w", p.conns.len(), ctx.Err())
		for uid := range pods {
			p.conns.closePod(uid, "ztunnel shut down")
		}
	}
	for _, ps := range pods {
		ps.unregister(p.cfg.PinDir)
		ps.netns.Close()
	}
	p.pool.Close()
	return err
}

// dialHBONE opens a mutual-TLS connection for the HBONE pool from inside the source pod.
// The pool key's Src is "<pod uid> <spiffe id>": connections are per pod because each
// leaves from the pod's own namespace and address.
func (p *Proxy) dialHBONE(ctx context.Context, key hbone.PoolKey) (net.Conn, error) {
	uid, srcID, ok := strings.Cut(key.Src, " ")
	if !ok {
		return nil, fmt.Errorf("bad pool key %q", key.Src)
	}
	ps, ok := p.pod(uid)
	if !ok {
		return nil, fmt.Errorf("pod %s is no longer served", uid)
	}
	src, err := spiffe.Parse(srcID)
	if err != nil {
		return nil, err
	}
	dst, err := spiffe.Parse(key.Dst)
	if err != nil {
		return nil, err
	}
	raw, err := ps.netns.Dial(ctx, key.Addr)
	if err != nil {
		return nil, dialError(key.Addr, err)
	}
	rw, err := rawio.NewConn(raw)
	if err != nil {
		raw.Close()
		return nil, err
	}
	tc := hbone.TLSClient(rw, p.cfg.Identity.ClientTLS(src, dst))
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("mutual TLS with %s (expecting %s) failed: %w", key.Addr, dst, err)
	}
	return tc, nil
}

// dialError says what a user should check.
func dialError(addr netip.AddrPort, err error) error {
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return fmt.Errorf("connection to %s timed out; is HBONE port %d blocked by a NetworkPolicy? %w", addr, HBONEPort, err)
	case errors.Is(err, errConnRefused):
		return fmt.Errorf("connection to %s refused; is ztunnel running on the destination's node? %w", addr, err)
	}
	return fmt.Errorf("connect to %s: %w", addr, err)
}
