//go:build linux

package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/hbone"
	"github.com/sluicemesh/sluice/internal/rawio"
	"github.com/sluicemesh/sluice/internal/spiffe"
	"github.com/sluicemesh/sluice/ztunnel/policy"
	"github.com/sluicemesh/sluice/ztunnel/state"
)

type peerKey struct{}

// peer is the authenticated far end of an HBONE connection.
type peer struct {
	id   spiffe.ID
	addr netip.AddrPort
}

// handleHBONE terminates mutual TLS for the pod on 15008 and serves its CONNECT streams.
func (p *Proxy) handleHBONE(ps *podServer, c *net.TCPConn) {
	defer c.Close()
	local := func(*tls.ClientHelloInfo) (spiffe.ID, error) {
		return ps.workload(p.cfg.Store.Load()).Identity(), nil
	}
	rw, err := rawio.NewConn(c)
	if err != nil {
		return
	}
	tc := hbone.TLSServer(rw, p.cfg.Identity.ServerTLS(local))
	hsCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	err = tc.HandshakeContext(hsCtx)
	cancel()
	if err != nil {
		p.log.Info("HBONE handshake rejected", "pod", ps.info.Namespace+"/"+ps.info.Name, "peer", c.RemoteAddr(), "err", err)
		return
	}
	certs := tc.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return
	}
	id, err := spiffe.FromCertificate(certs[0])
	if err != nil {
		p.log.Info("HBONE peer without a SPIFFE identity", "peer", c.RemoteAddr(), "err", err)
		return
	}
	ctx := context.WithValue(p.draining, peerKey{}, peer{id: id, addr: netip.MustParseAddrPort(c.RemoteAddr().String())})
	srv := &hbone.Server{Handler: func(ctx context.Context, req *hbone.Request, s *hbone.Stream) {
		p.handleInbound(ctx, ps, req, s)
	}, Logger: p.log}
	srv.ServeConn(ctx, tc)
}

// handleInbound authorizes one HBONE stream and delivers it to the application with the
// client's address as the source.
func (p *Proxy) handleInbound(ctx context.Context, ps *podServer, req *hbone.Request, s *hbone.Stream) {
	pr := ctx.Value(peerKey{}).(peer)
	start := time.Now()
	snap := p.cfg.Store.Load()
	dstW := ps.workload(snap)
	rec := &accessRecord{direction: "inbound", dst: dstW, dstIdentity: dstW.Identity().String(),
		srcIdentity: pr.id.String(), client: pr.addr, start: start, mTLS: true}
	detached := false
	defer func() {
		if !detached {
			p.logAccess(rec)
		}
	}()
	target, err := netip.ParseAddrPort(req.Authority)
	if err != nil || !ps.owns(target.Addr()) {
		rec.err = fmt.Errorf("CONNECT authority %q is not an address of this pod", req.Authority)
		s.Respond(400)
		return
	}
	rec.orig = target
	if ownPort(target.Port()) {
		rec.err = fmt.Errorf("CONNECT to %s: port %d is ztunnel's own", target, target.Port())
		s.Respond(400)
		return
	}
	rec.src, _ = snap.WorkloadByIP(pr.addr.Addr())
	conn := policy.Conn{SrcIdentity: pr.id.String(), SrcIP: pr.addr.Addr(), DstIP: target.Addr(), DstPort: target.Port()}
	if d := authorize(snap, dstW, conn); !d.Allow {
		rec.err, rec.denied = fmt.Errorf("denied by policy: %s", d), true
		s.Respond(401)
		return
	}
	// Not derived from the stream's context: a child would leave that context holding
	// an (empty) map of children for as long as the tunnel is held. A stream that dies
	// meanwhile fails at Respond below. Nor from the drain: a stream accepted before the
	// drain began must still be delivered, or a restart would refuse connections.
	dctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	app, err := ps.netns.DialFrom(dctx, netip.AddrPortFrom(pr.addr.Addr(), 0), target)
	cancel()
	if err != nil {
		rec.err = fmt.Errorf("deliver to %s: %w", target, err)
		s.Respond(503)
		return
	}
	if err := s.Respond(200); err != nil {
		app.Close()
		rec.err = err
		return
	}
	// Carry the stream on fresh goroutines and let this handler's deep stack go.
	end := s.Detach()
	detached = true
	p.carryInbound(ps, rec, s, app, conn, snap, connLabels{reporter: "destination", src: rec.src, dst: dstW,
		srcIdentity: rec.srcIdentity, dstIdentity: rec.dstIdentity, mTLS: true}, func() {
		app.Close()
		p.logAccess(rec)
		end()
	})
}

// handlePlaintext serves the pod's 15006: connections from outside the mesh, allowed or
// refused by PeerAuthentication, then authorized like any other.
func (p *Proxy) handlePlaintext(ps *podServer, c *net.TCPConn) {
	defer c.Close()
	start := time.Now()
	snap := p.cfg.Store.Load()
	dstW := ps.workload(snap)
	target := netip.MustParseAddrPort(c.LocalAddr().String()) // sk_lookup kept the destination
	target = netip.AddrPortFrom(target.Addr().Unmap(), target.Port())
	client := netip.MustParseAddrPort(c.RemoteAddr().String())
	client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	rec := &accessRecord{direction: "inbound", dst: dstW, dstIdentity: dstW.Identity().String(), client: client, orig: target, start: start}
	rec.src, _ = snap.WorkloadByIP(client.Addr())
	defer func() { p.logAccess(rec) }()
	if ownPort(target.Port()) {
		rec.err = fmt.Errorf("port %d is ztunnel's own", target.Port())
		c.SetLinger(0)
		return
	}
	pw := policy.Workload{Namespace: dstW.Namespace, Labels: dstW.Labels}
	if mode := snap.Policy.Mode(pw, target.Port()); !mode.AllowsPlaintext() {
		rec.err, rec.denied = fmt.Errorf("plaintext refused: PeerAuthentication mode is %s for port %d", mode, target.Port()), true
		c.SetLinger(0) // reset, so the client sees a refusal, not a clean close
		return
	}
	conn := policy.Conn{SrcIP: client.Addr(), DstIP: target.Addr(), DstPort: target.Port()}
	if d := authorize(snap, dstW, conn); !d.Allow {
		rec.err, rec.denied = fmt.Errorf("denied by policy: %s", d), true
		c.SetLinger(0)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	app, err := ps.netns.DialFrom(ctx, netip.AddrPortFrom(client.Addr(), 0), target)
	cancel()
	if err != nil {
		rec.err = fmt.Errorf("deliver to %s: %w", target, err)
		c.SetLinger(0)
		return
	}
	defer app.Close()
	p.carryInbound(ps, rec, c, app, conn, snap, connLabels{reporter: "destination", src: rec.src, dst: dstW, dstIdentity: rec.dstIdentity}, nil)
}

// carryInbound pipes an authorized inbound connection, registered so that a policy
// change that denies it closes it. With done nil it returns when the connection ends;
// otherwise it returns at once and calls done when the connection has ended.
func (p *Proxy) carryInbound(ps *podServer, rec *accessRecord, client halfCloser, app *net.TCPConn, conn policy.Conn, authorizedBy *state.Snapshot, labels connLabels, done func()) {
	var once sync.Once
	t := &tracked{
		pod: ps.uid,
		check: func() (bool, string) {
			snap := p.cfg.Store.Load()
			d := authorize(snap, ps.workload(snap), conn)
			return d.Allow, d.String()
		},
		close: func(reason string) {
			once.Do(func() {
				rec.closedBy = reason
				closeQuietly(client)
				app.Close()
			})
		},
	}
	remove := p.conns.add(t)
	// The connection was authorized under authorizedBy, before it was registered: a
	// policy change in between did not see it. If the config changed, check it again.
	if p.cfg.Store.Load() != authorizedBy {
		if ok, reason := t.check(); !ok {
			t.close(reason)
		}
	}
	cc := p.cfg.Metrics.counters(labels)
	sent, received := &counter{}, &counter{}
	if cc != nil {
		cc.opened.Inc()
		// Reported by the destination: "received" is what the client sent.
		received.add, sent.add = cc.received.Add, cc.sent.Add
	}
	finish := func(err error) {
		rec.err = err
		rec.received, rec.sent = received.n.Load(), sent.n.Load()
		if cc != nil {
			cc.closed.Inc()
		}
		remove()
		if done != nil {
			done()
		}
	}
	if done == nil {
		finish(pipe(client, app, received, sent))
		return
	}
	pipeDetached(client, app, received, sent, finish)
}

// ownPort reports whether port is one of ztunnel's listeners in the pod: delivering a
// connection there would loop it back into ztunnel, a connection more per hop.
func ownPort(port uint16) bool {
	switch port {
	case bpf.DefaultOutboundPort, bpf.DefaultInboundPort, bpf.DefaultHBONEPort:
		return true
	}
	return false
}

// authorize applies the snapshot's policies (a snapshot without a policy set denies:
// nothing has been loaded yet).
func authorize(snap *state.Snapshot, dst *state.Workload, c policy.Conn) policy.Decision {
	return snap.Policy.Authorize(policy.Workload{Namespace: dst.Namespace, Labels: dst.Labels}, c)
}
