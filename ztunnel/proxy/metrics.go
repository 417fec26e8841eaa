package proxy

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicemesh/sluice/ztunnel/state"
)

// Istio's TCP metric names and labels, so existing Grafana and Kiali dashboards work.
var tcpLabels = []string{
	"reporter",
	"source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
	"source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_canonical_service", "destination_canonical_revision",
	"destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
	"destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// Metrics are ztunnel's Prometheus metrics.
type Metrics struct {
	opened, closed, sent, received *prometheus.CounterVec
	// Cluster fills source_cluster and destination_cluster (Istio's default "Kubernetes").
	Cluster string
}

// NewMetrics registers ztunnel's metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	vec := func(name, help string) *prometheus.CounterVec {
		v := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, tcpLabels)
		reg.MustRegister(v)
		return v
	}
	return &Metrics{
		opened:   vec("istio_tcp_connections_opened_total", "The total number of TCP connections opened."),
		closed:   vec("istio_tcp_connections_closed_total", "The total number of TCP connections closed."),
		sent:     vec("istio_tcp_sent_bytes_total", "The size of total bytes sent during response in case of a TCP connection."),
		received: vec("istio_tcp_received_bytes_total", "The size of total bytes received during request in case of a TCP connection."),
		Cluster:  "Kubernetes",
	}
}

// connLabels describes one connection for metrics: who talked to whom, reported by
// which side.
type connLabels struct {
	reporter    string // "source" or "destination"
	src, dst    *state.Workload
	srcIdentity string // SPIFFE ID, or "" when unknown (plaintext)
	dstIdentity string
	dstService  *state.Service
	mTLS        bool
}

// connCounters are the resolved counters of one connection, looked up once.
type connCounters struct {
	opened, closed, sent, received prometheus.Counter
}

func (m *Metrics) counters(l connLabels) *connCounters {
	if m == nil {
		return nil
	}
	v := l.values(m.Cluster)
	return &connCounters{
		opened:   m.opened.WithLabelValues(v...),
		closed:   m.closed.WithLabelValues(v...),
		sent:     m.sent.WithLabelValues(v...),
		received: m.received.WithLabelValues(v...),
	}
}

func (l connLabels) values(cluster string) []string {
	const unknown = "unknown"
	or := func(s string) string {
		if s == "" {
			return unknown
		}
		return s
	}
	side := func(w *state.Workload, identity string) []string {
		if w == nil {
			return []string{unknown, unknown, unknown, unknown, or(identity), unknown, unknown, unknown}
		}
		name := w.WorkloadName
		if name == "" {
			name = w.Name
		}
		app := w.Labels["app"]
		version := w.Labels["version"]
		return []string{name, or(w.CanonicalName), or(w.CanonicalRevision), w.Namespace, or(identity), or(app), or(version), cluster}
	}
	svc, svcNS, svcName := unknown, unknown, unknown
	if l.dstService != nil {
		svcName, svcNS = l.dstService.Name, l.dstService.Namespace
		svc = l.dstService.Hostname
		if svc == "" {
			svc = l.dstService.Name + "." + l.dstService.Namespace + ".svc.cluster.local"
		}
	} else if l.dst != nil {
		svc = l.dst.IPs[0].String()
	}
	policy := "unknown"
	if l.mTLS {
		policy = "mutual_tls"
	}
	src := side(l.src, l.srcIdentity)
	dst := side(l.dst, l.dstIdentity)
	v := make([]string, 0, len(tcpLabels))
	v = append(v, l.reporter)
	// source_workload, canonical_service, canonical_revision, workload_namespace,
	// principal, app, version, cluster
	v = append(v, src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7])
	v = append(v, svc, svcNS, svcName)
	// destination_workload, canonical_service, canonical_revision, workload_namespace,
	// principal, app, version, cluster
	v = append(v, dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], dst[6], dst[7])
	v = append(v, "tcp", "-", policy)
	return v
}
