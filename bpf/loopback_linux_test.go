//go:build linux

package bpf

import (
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func nsExec(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", ns, args, err, out)
	}
	return string(out)
}

// With route_localnet=1 in the pod (a sysctl a pod may be allowed, or a CNI may set), a
// neighbour on the pod's link can reach its 127.0.0.1 from outside. Inbound capture
// passes only ztunnel's own loopback listeners; an application on loopback stays behind
// ztunnel.
func TestLoopbackOnlyFromInsideThePod(t *testing.T) {
	f := newFixture(t, Config{})
	serveName(f.pod.listen(t, "0.0.0.0:8080"), "app")
	inbound := f.pod.listen(t, "0.0.0.0:15006")
	serveName(inbound, "inbound")
	if err := RegisterInboundListener(f.cfg.PinDir(), mustAddr(podIP), inbound.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	pod, peer := f.pod.name, f.peer.name
	for _, ns := range []string{pod, peer} {
		nsExec(t, ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
		nsExec(t, ns, "sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1")
	}
	mac := strings.TrimSpace(nsExec(t, pod, "cat", "/sys/class/net/eth0/address"))
	peerMac := strings.TrimSpace(nsExec(t, peer, "cat", "/sys/class/net/eth0/address"))
	// The attacker (peer) sends to 127.0.0.1 over eth0: a fake address DNATed to it, so
	// that the SYN-ACK from 127.0.0.1 is un-NATed before the peer's own martian checks.
	nsExec(t, peer, "ip", "route", "del", "table", "local", "local", "127.0.0.0/8", "dev", "lo")
	nsExec(t, peer, "ip", "route", "del", "table", "local", "local", "127.0.0.1", "dev", "lo")
	nsExec(t, peer, "ip", "route", "add", "127.0.0.1/32", "dev", "eth0", "src", peerIP)
	nsExec(t, peer, "ip", "neigh", "replace", "127.0.0.1", "lladdr", mac, "dev", "eth0", "nud", "permanent")
	// The attacker's own stack must accept the SYN-ACK from 127.0.0.1 (still its lo address).
	nsExec(t, peer, "sysctl", "-qw", "net.ipv4.conf.all.accept_local=1")
	nsExec(t, peer, "sysctl", "-qw", "net.ipv4.conf.eth0.accept_local=1")
	// Stands in for the attacker answering the pod's ARP request (sent from 127.0.0.1).
	nsExec(t, pod, "ip", "neigh", "replace", peerIP, "lladdr", peerMac, "dev", "eth0", "nud", "permanent")
	dialLoopback := func(port string) (net.Conn, error) {
		var c net.Conn
		err := f.peer.do(func() (err error) {
			d := net.Dialer{Timeout: 3 * time.Second}
			c, err = d.Dial("tcp4", "127.0.0.1:"+port)
			return err
		})
		return c, err
	}
	// Control: the path works. ztunnel's outbound listener is reachable (it refuses
	// connections it has no original destination for).
	serveName(f.pod.listen(t, "127.0.0.1:15001"), "outbound")
	c, err := dialLoopback("15001")
	if err != nil {
		t.Fatalf("control: the neighbour could not reach the pod's 127.0.0.1:15001 (%v); the test setup no longer works", err)
	}
	readLine(t, c)
	c.Close()

	if c, err := dialLoopback("8080"); err == nil {
		defer c.Close()
		t.Errorf("plaintext from outside the pod reached its 127.0.0.1:8080, bypassing ztunnel: %q", readLine(t, c))
	}
}
