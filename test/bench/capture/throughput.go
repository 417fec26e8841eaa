//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// throughputRound is one local-hop throughput measurement.
type throughputRound struct {
	round    int
	bytes    uint64
	elapsed  time.Duration
	gbps     float64
	tcpBytes uint64 // payload the client's TCP stack carried (tcpi_bytes_acked)
	// accelSockets counts the sockets in the local_hop SOCKHASH (eBPF modes only): 2 when
	// sockops put both ends of the hop there.
	accelSockets int
	foreign      float64
}

// measureThroughput streams 64 KiB writes from the client pod through capture to the
// in-pod listener, which reads and discards them, for the configured duration.
func (b *bench) measureThroughput(ctx context.Context, m mode, round int, d time.Duration) (r throughputRound, err error) {
	r.round = round
	capt, disable, err := b.enable(ctx, m.capture)
	if err != nil {
		return r, err
	}
	defer func() { err = errors.Join(err, disable()) }()

	b.proxy.sink.Store(true)
	defer b.proxy.sink.Store(false)
	fd := -1
	err = b.client.Do(func() error {
		var err error
		if fd, err = newClientSocket(false); err != nil {
			return err
		}
		return connect(fd, sockaddr(b.target(m)))
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return r, fmt.Errorf("mode %s: connect: %w", m.key, err)
	}
	if capt != nil {
		// Both ends are in local_hop once sockops has seen them established; give the
		// accepting side a moment.
		for i := 0; i < 100; i++ {
			if r.accelSockets, err = capt.AcceleratedSockets(); err != nil || r.accelSockets >= 2 {
				break
			}
			time.Sleep(time.Millisecond)
		}
		if err != nil {
			unix.Close(fd)
			return r, fmt.Errorf("mode %s: %w", m.key, err)
		}
	}
	// The writer stays on the CPU the reader does not use (see pinThread).
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer pinThread(connectCPU())()
	buf := make([]byte, 64<<10)
	var written uint64
	cpu0, err := takeCPUSnapshot()
	if err != nil {
		unix.Close(fd)
		return r, err
	}
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		n, err := unix.Write(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			unix.Close(fd)
			err = fmt.Errorf("mode %s: write after %d bytes: %w", m.key, written, err)
			select {
			case s := <-b.proxy.sinkDone:
				err = fmt.Errorf("%w (the reader got %d bytes, then: %v)", err, s.bytes, s.err)
			case <-time.After(5 * time.Second):
			}
			return r, err
		}
		written += uint64(n)
	}
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	unix.Close(fd) // orderly close: the reader gets everything, then end of stream
	if err != nil {
		return r, fmt.Errorf("mode %s: TCP_INFO: %w", m.key, err)
	}
	cpu1, err := takeCPUSnapshot()
	if err != nil {
		return r, err
	}
	r.foreign = cpu1.since(cpu0).foreign
	var s sinkResult
	select {
	case s = <-b.proxy.sinkDone:
	case <-time.After(30 * time.Second):
		return r, fmt.Errorf("mode %s: the reader never saw the end of the stream", m.key)
	}
	if s.err != nil {
		return r, fmt.Errorf("mode %s: reader: %w", m.key, s.err)
	}
	if s.bytes != written {
		return r, fmt.Errorf("mode %s: wrote %d bytes, the reader got %d", m.key, written, s.bytes)
	}
	if !m.direct && s.orig != b.serverAddr {
		return r, fmt.Errorf("mode %s: proxy sees original destination %v (err %v), want %s", m.key, s.orig, s.origErr, b.serverAddr)
	}
	r.bytes, r.elapsed = s.bytes, s.elapsed
	r.gbps = float64(s.bytes) * 8 / s.elapsed.Seconds() / 1e9
	// bytes_acked counts the SYN too.
	if info.Bytes_acked > 0 {
		r.tcpBytes = info.Bytes_acked - 1
	}
	b.log.Info("measured", "mode", m.key, "round", round, "gbps", fmt.Sprintf("%.2f", r.gbps),
		"localHopSockets", r.accelSockets, "tcpBytes", r.tcpBytes, "appBytes", r.bytes, "othersCPU", fmt.Sprintf("%.0f%%", 100*r.foreign))
	return r, nil
}
