package proxy

import (
	"log/slog"
	"net/netip"
	"time"

	"github.com/sluicemesh/sluice/ztunnel/state"
)

// accessRecord collects what the access log line says about one connection.
type accessRecord struct {
	direction                string
	src, dst                 *state.Workload
	srcIdentity, dstIdentity string
	client, orig             netip.AddrPort
	up                       *Upstream
	mTLS, denied             bool
	sent, received           uint64
	start                    time.Time
	err                      error
	closedBy                 string
}

// logAccess writes one structured line per connection: who, where, how much, how long,
// and how it ended.
func (p *Proxy) logAccess(r *accessRecord) {
	attrs := []any{
		"direction", r.direction,
		"src.addr", r.client, "src.identity", r.srcIdentity,
		"dst.addr", r.orig,
		"bytes_sent", r.sent, "bytes_recv", r.received,
		"duration", time.Since(r.start).Round(time.Microsecond),
	}
	if r.src != nil {
		attrs = append(attrs, "src.workload", r.src.Name, "src.namespace", r.src.Namespace)
	}
	if r.dst != nil {
		attrs = append(attrs, "dst.workload", r.dst.Name, "dst.namespace", r.dst.Namespace)
	}
	if r.up != nil {
		attrs = append(attrs, "protocol", r.up.Protocol, "dst.hbone_addr", r.up.Gateway)
		if r.up.DstWorkload != nil {
			attrs = append(attrs, "dst.workload", r.up.DstWorkload.Name, "dst.namespace", r.up.DstWorkload.Namespace)
		}
		if r.up.DstService != nil {
			attrs = append(attrs, "dst.service", r.up.DstService.Key())
		}
		if !r.up.PeerIdentity.IsZero() {
			attrs = append(attrs, "dst.identity", r.up.PeerIdentity.String())
		}
	} else if r.dstIdentity != "" {
		attrs = append(attrs, "dst.identity", r.dstIdentity)
	}
	level := slog.LevelInfo
	switch {
	case r.closedBy != "":
		attrs = append(attrs, "outcome", "closed", "reason", r.closedBy)
	case r.denied:
		attrs = append(attrs, "outcome", "denied", "reason", r.err.Error())
	case r.err != nil:
		attrs = append(attrs, "outcome", "error", "error", r.err.Error())
		level = slog.LevelWarn
	default:
		attrs = append(attrs, "outcome", "ok")
	}
	p.cfg.AccessLog.Log(nil, level, "connection complete", attrs...)
}
