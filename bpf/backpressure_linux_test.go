//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// sk_msg's redirect to the peer's ingress queue has no flow control: the kernel
// queues whatever the application writes on the proxy's socket, however little the
// proxy reads, until TCP's memory limit for the whole node is reached and writes fail
// with ENOMEM. TCP, by contrast, stops the writer once the socket buffers are full.
// This is why the node agent offers no way to turn acceleration on
// (docs/capture-design.md). If this test starts failing, a kernel learned to push back
// on redirected data, and acceleration deserves another look.
func TestAccelerationHasNoBackpressure(t *testing.T) {
	// Well above the socket buffers of a fresh netns (a few MB), and below tcp_mem on
	// a small machine; ENOMEM, should it come, is the missing back-pressure too.
	const payload = 32 << 20
	for _, accel := range []bool{false, true} {
		t.Run(fmt.Sprintf("accelerate=%v", accel), func(t *testing.T) {
			f := newFixture(t, Config{Accelerate: accel})
			// A proxy that accepts and never reads: a ztunnel whose upstream is slow.
			ln := f.pod.listen(t, "127.0.0.1:15001")
			c, err := f.pod.dial("tcp4", peerIP+":8080", 0)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ln.(*net.TCPListener).SetDeadline(time.Now().Add(3 * time.Second))
			pc, err := ln.Accept()
			if err != nil {
				t.Fatalf("the proxy did not accept the captured connection: %v", err)
			}
			defer pc.Close()
			if n, err := f.cap.AcceleratedSockets(); err != nil || (accel && n != 2) {
				t.Fatalf("accelerated sockets = %d, %v; want both ends of the hop", n, err)
			}
			c.SetWriteDeadline(time.Now().Add(2 * time.Second))
			n, err := c.Write(make([]byte, payload))
			switch {
			case !accel && (n >= payload || !errors.Is(err, os.ErrDeadlineExceeded)):
				t.Errorf("plain TCP took %d of %d bytes (%v); want the writer stopped by a full buffer", n, payload, err)
			case accel && n < payload && !errors.Is(err, syscall.ENOMEM):
				t.Errorf("accelerated: the writer was stopped after %d of %d bytes (%v): redirected data now meets flow control; reconsider offering acceleration", n, payload, err)
			default:
				t.Logf("accelerate=%v: the kernel took %d bytes the proxy never read (%v)", accel, n, err)
			}
		})
	}
}
