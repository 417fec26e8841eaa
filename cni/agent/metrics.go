//go:build linux

package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/kubeworkload"
	"github.com/sluicemesh/sluice/internal/workload"
)

// podCollector turns the kernel's per-pod TCP counters into Prometheus metrics with
// workload labels, read at scrape time so the numbers are never stale.
type podCollector struct{ agent *Agent }

var (
	podLabels  = []string{"namespace", "pod", "workload", "direction"}
	descOpened = prometheus.NewDesc("sluice_pod_tcp_connections_opened_total",
		"TCP connections opened by (outbound) or to (inbound) an enrolled pod, seen by the kernel.", podLabels, nil)
	descClosed = prometheus.NewDesc("sluice_pod_tcp_connections_closed_total",
		"TCP connections of an enrolled pod that closed.", podLabels, nil)
	descSent = prometheus.NewDesc("sluice_pod_tcp_sent_bytes_total",
		"Payload bytes an enrolled pod sent and its peer acknowledged.", podLabels, nil)
	descReceived = prometheus.NewDesc("sluice_pod_tcp_received_bytes_total",
		"Payload bytes an enrolled pod received.", podLabels, nil)
	descRetrans = prometheus.NewDesc("sluice_pod_tcp_retransmits_total",
		"TCP segments an enrolled pod retransmitted.", podLabels, nil)
	descRTT = prometheus.NewDesc("sluice_pod_tcp_rtt_seconds",
		"Smoothed TCP round-trip time samples of an enrolled pod's connections.", podLabels, nil)
	descEnrolled = prometheus.NewDesc("sluice_agent_enrolled_pods",
		"Pods whose traffic this node agent captures.", nil, nil)
)

func (c *podCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descOpened, descClosed, descSent, descReceived, descRetrans, descRTT, descEnrolled} {
		ch <- d
	}
}

func (c *podCollector) Collect(ch chan<- prometheus.Metric) {
	a := c.agent
	stats, err := a.capture.Stats()
	if err != nil {
		a.log.Warn("read kernel metrics", "err", err)
		return
	}
	a.mu.Lock()
	type who struct{ ns, pod, workload string }
	byCookie := map[uint64]who{}
	for _, r := range a.pods {
		if r.Cookie == 0 {
			continue
		}
		w := who{r.Namespace, r.Name, r.Name}
		if pod, ok := a.cfg.Source.Pod(r.key()); ok {
			w.workload = workload.Name(kubeworkload.Pod(pod))
		}
		byCookie[r.Cookie] = w
	}
	a.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(descEnrolled, prometheus.GaugeValue, float64(len(byCookie)))
	for cookie, pc := range stats {
		w, ok := byCookie[cookie]
		if !ok {
			continue // a pod unenrolled between the two reads
		}
		for _, d := range []struct {
			dir string
			c   bpf.Counters
		}{{"outbound", pc.Outbound}, {"inbound", pc.Inbound}} {
			lv := []string{w.ns, w.pod, w.workload, d.dir}
			ch <- prometheus.MustNewConstMetric(descOpened, prometheus.CounterValue, float64(d.c.Opened), lv...)
			ch <- prometheus.MustNewConstMetric(descClosed, prometheus.CounterValue, float64(d.c.Closed), lv...)
			ch <- prometheus.MustNewConstMetric(descSent, prometheus.CounterValue, float64(d.c.BytesSent), lv...)
			ch <- prometheus.MustNewConstMetric(descReceived, prometheus.CounterValue, float64(d.c.BytesReceived), lv...)
			ch <- prometheus.MustNewConstMetric(descRetrans, prometheus.CounterValue, float64(d.c.Retransmits), lv...)
			ch <- prometheus.MustNewConstSummary(descRTT, d.c.RTTSamples, float64(d.c.RTTSumMicros)/1e6, nil, lv...)
		}
	}
}
