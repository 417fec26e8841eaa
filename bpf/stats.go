//go:build linux

package bpf

import "fmt"

const (
	dirOutbound = 0
	dirInbound  = 1
)

// Counters are one pod's TCP figures in one direction, as seen by the kernel.
type Counters struct {
	Opened, Closed           uint64
	BytesSent, BytesReceived uint64
	Retransmits              uint64
	RTTSumMicros, RTTSamples uint64
}

// PodCounters are a pod's counters for connections it made and connections it accepted.
type PodCounters struct {
	Outbound, Inbound Counters
}

// Stats sums the per-CPU counters of every enrolled pod, by netns cookie.
func (c *Capture) Stats() (map[uint64]PodCounters, error) {
	out := map[uint64]PodCounters{}
	var (
		key    sockopsPodStatsKey
		percpu []sockopsPodStats
	)
	it := c.sockops.PodMetrics.Iterate()
	for it.Next(&key, &percpu) {
		var sum Counters
		for _, v := range percpu {
			sum.Opened += v.Opened
			sum.Closed += v.Closed
			sum.BytesSent += v.BytesSent
			sum.BytesReceived += v.BytesReceived
			sum.Retransmits += v.Retransmits
			sum.RTTSumMicros += v.RttSumUs
			sum.RTTSamples += v.RttSamples
		}
		pc := out[key.Netns]
		if key.Dir == dirInbound {
			pc.Inbound = sum
		} else {
			pc.Outbound = sum
		}
		out[key.Netns] = pc
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read pod metrics: %w", err)
	}
	return out, nil
}

// AcceleratedSockets counts the sockets in the local-hop SOCKHASH: both ends of every
// application <-> ztunnel connection that sk_msg currently short-cuts.
func (c *Capture) AcceleratedSockets() (int, error) {
	var (
		n   int
		key sockopsSockKey
	)
	it := c.sockops.LocalHop.Iterate()
	var val uint64
	for it.Next(&key, &val) {
		n++
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("read local_hop: %w", err)
	}
	return n, nil
}
