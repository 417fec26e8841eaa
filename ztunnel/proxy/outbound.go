//go:build linux

package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/hbone"
	"github.com/sluicemesh/sluice/ztunnel/state"
)

var errConnRefused = syscall.ECONNREFUSED

// handleOutbound carries one connection an application in the pod made: find where it
// was going, decide the upstream, and tunnel or pass it through.
func (p *Proxy) handleOutbound(ps *podServer, c *net.TCPConn) {
	start := time.Now()
	detached := false
	defer func() {
		if !detached {
			c.Close()
		}
	}()
	orig, err := bpf.OriginalDst(c)
	if err != nil {
		p.log.Warn("outbound connection without an original destination; closing", "pod", ps.info.Namespace+"/"+ps.info.Name, "err", err)
		return
	}
	snap := p.cfg.Store.Load()
	src := ps.workload(snap)
	client := netip.MustParseAddrPort(c.RemoteAddr().String())
	rec := &accessRecord{direction: "outbound", src: src, srcIdentity: src.Identity().String(),
		client: netip.AddrPortFrom(ps.ipOr(client.Addr()), client.Port()), orig: orig, start: start}
	defer func() {
		if !detached {
			p.logAccess(rec)
		}
	}()

	up, err := buildUpstream(snap, src, orig, p.cfg.Pick)
	if err != nil {
		rec.err = err
		return
	}
	rec.up = &up
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	defer cancel() // released right after connecting too: it must not live as long as the connection
	labels := connLabels{reporter: "source", src: src, dst: up.DstWorkload, srcIdentity: rec.srcIdentity,
		dstService: up.DstService, mTLS: up.Protocol == state.HBONE}
	if !up.PeerIdentity.IsZero() {
		labels.dstIdentity = up.PeerIdentity.String()
	}
	var upstream halfCloser
	switch up.Protocol {
	case state.TCP:
		uc, err := ps.netns.Dial(ctx, up.Gateway)
		if err != nil {
			rec.err = dialError(up.Gateway, err)
			return
		}
		upstream = uc
	case state.HBONE:
		key := hbone.PoolKey{Src: ps.uid + " " + src.Identity().String(), Dst: up.PeerIdentity.String(), Addr: up.Gateway}
		s, err := p.pool.Connect(ctx, key, hbone.Request{Authority: up.Target.String(), Header: p.headers(src, client.Addr())})
		if err != nil {
			rec.err = err
			return
		}
		upstream = s
	}
	cancel()
	cc := p.cfg.Metrics.counters(labels)
	sent, received := &counter{}, &counter{}
	if cc != nil {
		cc.opened.Inc()
		sent.add, received.add = cc.sent.Add, cc.received.Add
	}
	// Carry the connection on fresh goroutines and let this one's deep stack go; the
	// drain on shutdown still waits for it (active).
	detached = true
	p.active.Add(1)
	pipeDetached(c, upstream, sent, received, func(err error) {
		rec.err = err
		rec.sent, rec.received = sent.n.Load(), received.n.Load()
		if cc != nil {
			cc.closed.Inc()
		}
		closeQuietly(upstream)
		c.Close()
		p.logAccess(rec)
		p.active.Done()
	})
}

// ipOr is the pod's own address: the application's socket sits on loopback, but the
// connection is the pod's.
func (ps *podServer) ipOr(a netip.Addr) netip.Addr {
	if len(ps.ips) > 0 && a.IsLoopback() {
		return ps.ips[0]
	}
	return a
}

// headers are what Istio's ztunnel sends with each CONNECT: the original client address,
// W3C baggage describing the source, and a fresh trace context.
func (p *Proxy) headers(src *state.Workload, client netip.Addr) http.Header {
	h := http.Header{}
	h.Set("Forwarded", "for="+forwardedFor(client))
	baggage := fmt.Sprintf("k8s.namespace.name=%s,k8s.pod.name=%s", src.Namespace, src.Name)
	if src.WorkloadName != "" {
		baggage += ",k8s.deployment.name=" + src.WorkloadName
	}
	if src.CanonicalName != "" {
		baggage += ",service.name=" + src.CanonicalName
	}
	if src.CanonicalRevision != "" {
		baggage += ",service.version=" + src.CanonicalRevision
	}
	h.Set("Baggage", baggage)
	var trace [16]byte
	var span [8]byte
	rand.Read(trace[:])
	rand.Read(span[:])
	h.Set("Traceparent", "00-"+hex.EncodeToString(trace[:])+"-"+hex.EncodeToString(span[:])+"-01")
	return h
}

// forwardedFor formats an address for RFC 7239 (IPv6 quoted and bracketed).
func forwardedFor(a netip.Addr) string {
	if a.Is6() && !a.Is4In6() {
		return `"[` + a.String() + `]"`
	}
	return a.Unmap().String()
}

func closeQuietly(c interface{}) {
	if cl, ok := c.(interface{ Close() error }); ok {
		cl.Close()
	}
}
