//go:build linux

// Package mesh_test runs ztunnel for real on the lab: node agents capture, ztunnel
// carries pod traffic over HBONE with mutual TLS between nodes and enforces policy.
package mesh_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/cni/zds"
	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/internal/spiffe"
	"github.com/sluicemesh/sluice/test/lab"
	"github.com/sluicemesh/sluice/test/meshlab"
	"github.com/sluicemesh/sluice/ztunnel/identity"
	"github.com/sluicemesh/sluice/ztunnel/proxy"
	"github.com/sluicemesh/sluice/ztunnel/state"
)

// ztunnel is one node's ztunnel, run in this process.
type ztunnel struct {
	ids     *identity.Manager
	proxy   *proxy.Proxy
	reg     *prometheus.Registry
	cancel  context.CancelFunc
	stopped chan struct{}
	logs    *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type mesh struct {
	*meshlab.World
	store     *state.Store
	authority *ca.CA
	caDir     string
	zt        []*ztunnel
	pods      []*lab.Pod
	// signDelay slows every certificate issuance down, as a busy CA would.
	signDelay time.Duration
	policies  string
	version   uint64
}

func startMesh(t *testing.T, certTTL time.Duration) *mesh {
	t.Helper()
	w := meshlab.Up(t, meshlab.Options{})
	caDir := t.TempDir()
	authority, err := ca.LoadOrCreate(caDir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	m := &mesh{World: w, store: &state.Store{}, authority: authority, caDir: caDir}
	m.apply(t, "")
	if err := w.Lab.LabelNamespace("mesh", meshlab.AmbientLabel, "ambient"); err != nil {
		t.Fatal(err)
	}
	for _, n := range w.Nodes {
		m.zt = append(m.zt, m.startZtunnel(t, n, certTTL))
	}
	return m
}

func (m *mesh) startZtunnel(t *testing.T, n *meshlab.Node, certTTL time.Duration) *ztunnel {
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(logs, os.Stderr), &slog.HandlerOptions{Level: slog.LevelInfo}))
	z := &ztunnel{logs: logs, reg: prometheus.NewRegistry(), stopped: make(chan struct{})}
	z.ids = &identity.Manager{Signer: slowSigner{identity.LocalSigner{CA: m.authority, TTL: certTTL}, &m.signDelay}, Logger: log}
	z.ids.SetRoots("cluster.local", m.authority.Roots())
	z.proxy = proxy.New(proxy.Config{Store: m.store, Identity: z.ids, Metrics: proxy.NewMetrics(z.reg),
		PinDir: n.PinDir(), NodeName: n.Name, Logger: log})
	ctx, cancel := context.WithCancel(context.Background())
	z.cancel = cancel
	go z.ids.Run(ctx)
	go func() {
		defer close(z.stopped)
		(&zds.Client{Path: n.ZDSSocket(), Logger: log}).Run(ctx, z.proxy)
	}()
	t.Cleanup(func() {
		cancel()
		<-z.stopped
		sctx, c := context.WithTimeout(context.Background(), time.Second)
		defer c()
		z.proxy.Shutdown(sctx)
	})
	return z
}

// apply rebuilds ztunnel's config from the lab's pods plus policies, as the controller
// will.
func (m *mesh) apply(t *testing.T, policies string) {
	t.Helper()
	m.policies = policies
	var b strings.Builder
	b.WriteString("workloads:\n")
	for _, p := range m.pods {
		proto := "TCP"
		if p.Namespace == "mesh" {
			proto = "HBONE"
		}
		fmt.Fprintf(&b, "- {uid: %q, name: %s, namespace: %s, serviceAccount: %s, node: %s, ips: [%s], protocol: %s, labels: {app: %s}}\n",
			p.UID, p.Name, p.Namespace, p.ServiceAccount, p.NodeName, p.IP, proto, p.Name)
	}
	if policies != "" {
		b.WriteString("policies:\n" + policies)
	}
	m.version++
	snap, warnings, err := state.ParseLocalConfig(m.version, []byte(b.String()))
	if err != nil {
		t.Fatalf("config: %v\n%s", err, b.String())
	}
	for _, w := range warnings {
		t.Logf("config warning: %v", w)
	}
	m.store.Replace(snap)
}

func (m *mesh) addPod(t *testing.T, ns, name string, node int) *lab.Pod {
	t.Helper()
	p := m.AddPod(t, lab.PodSpec{Name: name, Namespace: ns, Node: node, ServiceAccount: "sa-" + name})
	m.pods = append(m.pods, p)
	m.apply(t, m.policies)
	return p
}

// sniffer records every frame on one interface of a namespace (AF_PACKET), to check what
// crossed the wire.
type sniffer struct {
	fd       int
	mu       sync.Mutex
	data     bytes.Buffer
	stopping atomic.Bool
	done     chan struct{}
}

func sniff(t *testing.T, n lab.Node, ifname string) *sniffer {
	t.Helper()
	s := &sniffer{done: make(chan struct{})}
	err := n.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return err
		}
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
		s.fd = fd
		return nil
	})
	if err != nil {
		t.Fatalf("packet capture on %s/%s: %v", n.Name, ifname, err)
	}
	go func() {
		defer close(s.done)
		buf := make([]byte, 65536)
		// Read until told to stop; the receive timeout only lets the loop notice that.
		for !s.stopping.Load() {
			k, _, err := unix.Recvfrom(s.fd, buf, 0)
			if k > 0 {
				s.mu.Lock()
				s.data.Write(buf[:k])
				s.mu.Unlock()
			}
			if err == unix.EBADF {
				return
			}
		}
	}()
	return s
}

func (s *sniffer) stop() []byte {
	time.Sleep(100 * time.Millisecond) // frames still in the socket's queue
	s.stopping.Store(true)
	<-s.done
	unix.Close(s.fd)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.data.Bytes()
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func TestMeshEndToEnd(t *testing.T) {
	m := startMesh(t, 24*time.Hour)
	a := m.addPod(t, "mesh", "a", 0)
	b := m.addPod(t, "mesh", "b", 1)
	d := m.addPod(t, "mesh", "d", 0)
	c := m.addPod(t, "plain", "c", 0)
	for _, p := range []*lab.Pod{b, c} {
		meshlab.Serve(t, p, 8080)
	}
	bAddr := b.AddrPort(8080).String()

	t.Run("cross-node traffic is carried over HBONE with both identities", func(t *testing.T) {
		conn := meshlab.Dial(t, a, bAddr)
		if got := meshlab.Greeting(t, conn); !strings.HasPrefix(got, "b "+a.IP.String()+":") {
			t.Fatalf("b's application saw %q; want the connection from a's own address", got)
		}
		echo(t, conn, "hello over hbone")
		conn.Close() // the access log line is written when the connection ends
		waitLog(t, m.zt[0], "direction=outbound", "dst.identity=spiffe://cluster.local/ns/mesh/sa/sa-b", "protocol=HBONE", "outcome=ok")
		waitLog(t, m.zt[1], "direction=inbound", "src.identity=spiffe://cluster.local/ns/mesh/sa/sa-a", "outcome=ok")
	})

	t.Run("bulk data to a slow reader arrives intact and half-close crosses both ways", func(t *testing.T) {
		// b's application reads nothing for a while, so its socket fills and ztunnel
		// queues the rest (the flusher's path), then reads to the end; it answers only
		// after a's half-close reached it, and a reads the answer to b's half-close.
		const sent, reply = 24 << 20, 3 << 20
		ln, err := b.Listen("tcp", "0.0.0.0:8090")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		served := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				served <- err
				return
			}
			defer c.Close()
			time.Sleep(500 * time.Millisecond)
			h := sha256.New()
			n, err := io.Copy(h, c) // to EOF: a's CloseWrite
			if err != nil {
				served <- fmt.Errorf("b read: %w", err)
				return
			}
			fmt.Fprintf(c, "%d %x\n", n, h.Sum(nil))
			c.Write(bytes.Repeat([]byte("r"), reply))
			served <- c.(*net.TCPConn).CloseWrite()
		}()
		conn := meshlab.Dial(t, a, b.AddrPort(8090).String())
		defer conn.Close()
		data := make([]byte, sent)
		rand.Read(data)
		if _, err := conn.Write(data); err != nil {
			t.Fatalf("a write: %v", err)
		}
		conn.(*net.TCPConn).CloseWrite()
		conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		got, err := io.ReadAll(conn)
		if err != nil {
			t.Fatalf("a read: %v", err)
		}
		if err := <-served; err != nil {
			t.Fatal(err)
		}
		line, rest, _ := bytes.Cut(got, []byte("\n"))
		if want := fmt.Sprintf("%d %x", sent, sha256.Sum256(data)); string(line) != want {
			t.Fatalf("b received %q, want %q", line, want)
		}
		if len(rest) != reply {
			t.Fatalf("a received %d bytes of b's answer before EOF, want %d", len(rest), reply)
		}
	})

	t.Run("nothing crosses the nodes' link in clear text", func(t *testing.T) {
		secret := "SLUICE-SECRET-" + strings.Repeat("x", 64)
		s := sniff(t, m.Lab.Node(0), "eth0")
		conn := meshlab.Dial(t, a, bAddr)
		meshlab.Greeting(t, conn)
		echo(t, conn, secret)
		conn.Close()
		// Control: the same capture does see plaintext to a pod outside the mesh on the
		// other node... c is on node 0, so send from c to b (plaintext leaves node 0).
		plain := "PLAINTEXT-CONTROL-" + strings.Repeat("y", 64)
		cc := meshlab.Dial(t, c, bAddr)
		meshlab.Greeting(t, cc)
		echo(t, cc, plain)
		cc.Close()
		wire := s.stop()
		if bytes.Contains(wire, []byte(secret)) {
			t.Error("the payload of a mesh connection crossed the link in clear text")
		}
		if !bytes.Contains(wire, []byte(plain)) {
			t.Fatalf("the capture did not see the plaintext control (captured %d bytes): the check above proves nothing", len(wire))
		}
	})

	t.Run("peers without a valid mesh certificate are rejected", func(t *testing.T) {
		other := t.TempDir()
		if _, err := ca.LoadOrCreate(other, "cluster.local"); err != nil {
			t.Fatal(err)
		}
		now := time.Now()
		for _, tc := range []struct {
			name      string
			caDir     string
			notBefore time.Time
			notAfter  time.Time
		}{
			{"certificate from another CA", other, now.Add(-time.Minute), now.Add(time.Hour)},
			{"expired certificate", m.caDir, now.Add(-2 * time.Hour), now.Add(-time.Hour)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				cert := leaf(t, tc.caDir, "sa-a", tc.notBefore, tc.notAfter)
				if err := hboneHandshake(t, c, b, &tls.Config{Certificates: []tls.Certificate{cert}}); err == nil {
					t.Fatal("b's ztunnel accepted the handshake")
				}
			})
		}
		t.Run("control: a valid certificate is accepted", func(t *testing.T) {
			cert := leaf(t, m.caDir, "sa-a", now.Add(-time.Minute), now.Add(time.Hour))
			if err := hboneHandshake(t, c, b, &tls.Config{Certificates: []tls.Certificate{cert}}); err != nil {
				t.Fatalf("valid handshake failed: %v", err)
			}
		})
		t.Run("a server with the wrong SPIFFE ID is refused by the client", func(t *testing.T) {
			ids := &identity.Manager{Signer: identity.LocalSigner{CA: m.authority, TTL: time.Hour}}
			ids.SetRoots("cluster.local", m.authority.Roots())
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go ids.Run(ctx)
			src := spiffe.ID{TrustDomain: "cluster.local", Namespace: "mesh", ServiceAccount: "sa-a"}
			ids.Want(src)
			impostor := spiffe.ID{TrustDomain: "cluster.local", Namespace: "mesh", ServiceAccount: "sa-impostor"}
			err := hboneHandshake(t, c, b, ids.ClientTLS(src, impostor))
			if err == nil {
				t.Fatal("client accepted a server that is not the identity it asked for")
			}
			if err := hboneHandshake(t, c, b, ids.ClientTLS(src, spiffe.ID{TrustDomain: "cluster.local", Namespace: "mesh", ServiceAccount: "sa-b"})); err != nil {
				t.Fatalf("control with the right identity failed: %v", err)
			}
		})
	})

	t.Run("STRICT refuses plaintext, PERMISSIVE accepts it", func(t *testing.T) {
		conn := meshlab.Dial(t, c, bAddr)
		if got := meshlab.Greeting(t, conn); !strings.HasPrefix(got, "b "+c.IP.String()) {
			t.Errorf("PERMISSIVE (default): got %q", got)
		}
		conn.Close()
		m.apply(t, `
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: strict, namespace: mesh}
  spec: {mtls: {mode: STRICT}}
`)
		if refused(t, c, bAddr) == "" {
			t.Error("STRICT: plaintext from outside the mesh reached b")
		}
		conn = meshlab.Dial(t, a, bAddr)
		meshlab.Greeting(t, conn) // mTLS still works
		conn.Close()

		// kubelet's probes pass STRICT: capture lets the node's own connections through.
		node1 := m.Lab.Node(1)
		conn = meshlab.Dial(t, node1, bAddr)
		if got := meshlab.Greeting(t, conn); !strings.HasPrefix(got, "b "+node1.Gateway.String()+":") {
			t.Errorf("STRICT: the node's probe got %q, want b answering the node directly", got)
		}
		conn.Close()
		// NodePort traffic: from outside the cluster (the fabric), SNATed by the node to
		// its own address as kube-proxy does. It carries a node address but is plaintext
		// from outside like any other, and STRICT refuses it.
		fabric := m.Lab.Fabric()
		rule := []string{"POSTROUTING", "-s", fabric.IP.String(), "-d", b.IP.String(), "-j", "MASQUERADE"}
		iptablesIn(t, node1.NetnsPath, append([]string{"-t", "nat", "-A"}, rule...)...)
		defer iptablesIn(t, node1.NetnsPath, append([]string{"-t", "nat", "-D"}, rule...)...)
		if refused(t, fabric, bAddr) == "" {
			t.Error("STRICT: plaintext SNATed to the node's address reached b")
		}
		waitLog(t, m.zt[1], "direction=inbound", "src.addr="+node1.Gateway.String()+":", "outcome=denied")
		m.apply(t, "")
		conn = meshlab.Dial(t, fabric, bAddr)
		if got := meshlab.Greeting(t, conn); !strings.HasPrefix(got, "b "+node1.Gateway.String()+":") {
			t.Errorf("PERMISSIVE: SNATed plaintext got %q, want b answering the node's address", got)
		}
		conn.Close()
	})

	t.Run("connections to ztunnel's own ports are refused, not looped back into it", func(t *testing.T) {
		for _, from := range []*lab.Pod{a, c} { // over HBONE, and plaintext to 15006
			for _, port := range []uint16{15001, 15006} {
				addr := b.AddrPort(port).String()
				if refused(t, from, addr) == "" {
					t.Errorf("%s reached %s", from.Name, addr)
				}
			}
		}
		waitLog(t, m.zt[1], "CONNECT to "+b.IP.String()+":15006: port 15006 is ztunnel's own")
		waitLog(t, m.zt[1], "port 15006 is ztunnel's own")
	})

	t.Run("AuthorizationPolicy rules allow and deny", func(t *testing.T) {
		cases := []struct {
			name     string
			policy   string
			aOK, dOK bool
		}{
			{"allow by principal", `
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: p, namespace: mesh}
  spec:
    selector: {matchLabels: {app: b}}
    action: ALLOW
    rules: [{from: [{source: {principals: ["cluster.local/ns/mesh/sa/sa-a"]}}]}]
`, true, false},
			{"deny by principal", `
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: p, namespace: mesh}
  spec:
    action: DENY
    rules: [{from: [{source: {principals: ["cluster.local/ns/mesh/sa/sa-a"]}}]}]
`, false, true},
			{"allow by source IP", fmt.Sprintf(`
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: p, namespace: mesh}
  spec:
    action: ALLOW
    rules: [{from: [{source: {ipBlocks: ["%s/32"]}}]}]
`, d.IP), false, true},
			{"deny by port", `
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: p, namespace: mesh}
  spec:
    action: DENY
    rules: [{to: [{operation: {ports: ["8080"]}}]}]
`, false, false},
			{"allow by namespace, not-principal", `
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: p, namespace: mesh}
  spec:
    action: ALLOW
    rules: [{from: [{source: {namespaces: ["mesh"], notPrincipals: ["cluster.local/ns/mesh/sa/sa-d"]}}]}]
`, true, false},
			{"mesh-wide deny in the root namespace", `
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: p, namespace: istio-system}
  spec:
    action: DENY
    rules: [{from: [{source: {namespaces: ["mesh"]}}]}]
`, false, false},
			{"ALLOW with an HTTP-only rule never matches at L4", `
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: p, namespace: mesh}
  spec:
    action: ALLOW
    rules: [{to: [{operation: {methods: ["GET"]}}]}]
`, false, false},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				m.apply(t, tc.policy)
				defer m.apply(t, "")
				for _, who := range []struct {
					p  *lab.Pod
					ok bool
				}{{a, tc.aOK}, {d, tc.dOK}} {
					reason := refused(t, who.p, bAddr)
					if who.ok && reason != "" {
						t.Errorf("%s should be allowed but was refused: %s", who.p.Name, reason)
					}
					if !who.ok && reason == "" {
						t.Errorf("%s should be denied but got through", who.p.Name)
					}
				}
			})
		}
	})

	t.Run("a policy change closes an open connection it now denies", func(t *testing.T) {
		conn := meshlab.Dial(t, a, bAddr)
		defer conn.Close()
		meshlab.Greeting(t, conn)
		echo(t, conn, "before")
		m.apply(t, `
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: cut, namespace: mesh}
  spec:
    action: DENY
    rules: [{from: [{source: {principals: ["cluster.local/ns/mesh/sa/sa-a"]}}]}]
`)
		defer m.apply(t, "")
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 16)
		_, err := conn.Read(buf)
		if err == nil {
			t.Fatal("connection still open after a policy denying it")
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatal("connection was not closed within 5s of the policy change")
		}
		waitLog(t, m.zt[1], "outcome=closed")
	})

	t.Run("metrics use Istio's names and labels", func(t *testing.T) {
		conn := meshlab.Dial(t, a, bAddr)
		meshlab.Greeting(t, conn)
		echo(t, conn, "metrics")
		conn.Close()
		meshlab.WaitFor(t, "destination metrics", func() bool {
			return metricHas(m.zt[1].reg, "istio_tcp_connections_closed_total", map[string]string{
				"reporter": "destination", "source_principal": "spiffe://cluster.local/ns/mesh/sa/sa-a",
				"destination_workload": "b", "connection_security_policy": "mutual_tls", "source_workload_namespace": "mesh",
			})
		})
		if !metricHas(m.zt[0].reg, "istio_tcp_sent_bytes_total", map[string]string{"reporter": "source", "destination_principal": "spiffe://cluster.local/ns/mesh/sa/sa-b"}) {
			t.Error("source ztunnel has no istio_tcp_sent_bytes_total for a -> b")
		}
	})

	t.Run("shutdown drains open connections", func(t *testing.T) {
		conn := meshlab.Dial(t, a, bAddr)
		defer conn.Close()
		meshlab.Greeting(t, conn)
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			done <- m.zt[0].proxy.Shutdown(ctx)
		}()
		time.Sleep(200 * time.Millisecond)
		echo(t, conn, "still flowing while draining")
		select {
		case err := <-done:
			t.Fatalf("shutdown returned (%v) while a connection was open", err)
		default:
		}
		conn.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("drain: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("shutdown did not finish after the last connection closed")
		}
	})
}

// leaf makes a workload certificate for mesh/sa signed by the CA in caDir, with any
// validity: what a misconfigured or malicious peer could present.
func leaf(t *testing.T, caDir, sa string, notBefore, notAfter time.Time) tls.Certificate {
	t.Helper()
	root, err := tls.LoadX509KeyPair(filepath.Join(caDir, ca.CertFile), filepath.Join(caDir, ca.KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	rootCert, err := x509.ParseCertificate(root.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id := spiffe.ID{TrustDomain: "cluster.local", Namespace: "mesh", ServiceAccount: sa}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    notBefore, NotAfter: notAfter,
		URIs:        []*url.URL{id.URL()},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, rootCert, &key.PublicKey, root.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// hboneHandshake connects from a pod outside the mesh (so the test's own socket is not
// captured) to dst's HBONE port with cfg and reports whether
// the TLS session was accepted. In TLS 1.3 the server judges the client's certificate
// after the client finished, so a rejection shows as an alert on the first read; a server
// that accepted waits for the HTTP/2 preface instead.
func hboneHandshake(t *testing.T, from, dst *lab.Pod, cfg *tls.Config) error {
	t.Helper()
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"h2"}
	cfg.MinVersion = tls.VersionTLS13
	if cfg.VerifyConnection == nil {
		cfg.InsecureSkipVerify = true // only the server's judgement is under test here
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw, err := from.Dial(ctx, "tcp", dst.AddrPort(15008).String())
	if err != nil {
		return err
	}
	defer raw.Close()
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return err
	}
	tc.SetReadDeadline(time.Now().Add(time.Second))
	_, err = tc.Read(make([]byte, 1))
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return nil
	}
	return err
}

// echo writes msg and expects it back.
func echo(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg + "\n")); err != nil {
		t.Fatalf("write: %v", err)
	}
	got, err := meshlab.ReadLine(c, 5*time.Second)
	if err != nil || got != msg {
		t.Fatalf("echo: got %q, %v; want %q", got, err, msg)
	}
}

// refused tries a connection and reports why it did not get the server's greeting, or
// "" when it did.
func refused(t *testing.T, from meshlab.Dialer, addr string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", addr)
	if err != nil {
		return err.Error()
	}
	defer c.Close()
	line, err := meshlab.ReadLine(c, 3*time.Second)
	if err != nil {
		return fmt.Sprintf("no greeting: %v", err)
	}
	if line == "" {
		return "empty greeting"
	}
	return ""
}

// iptablesIn runs iptables in the network namespace at netnsPath.
func iptablesIn(t *testing.T, netnsPath string, args ...string) {
	t.Helper()
	out, err := exec.Command("nsenter", append([]string{"--net=" + netnsPath, "iptables"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("iptables %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func waitLog(t *testing.T, z *ztunnel, parts ...string) {
	t.Helper()
	meshlab.WaitFor(t, "access log "+strings.Join(parts, " "), func() bool {
		for _, line := range strings.Split(z.logs.String(), "\n") {
			ok := true
			for _, p := range parts {
				if !strings.Contains(line, p) {
					ok = false
					break
				}
			}
			if ok {
				return true
			}
		}
		return false
	})
}

func metricHas(reg *prometheus.Registry, name string, labels map[string]string) bool {
	mfs, err := reg.Gather()
	if err != nil {
		return false
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, mt := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range mt.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			for k, v := range labels {
				if got[k] != v {
					continue metrics
				}
			}
			if mt.GetCounter().GetValue() > 0 {
				return true
			}
		}
	}
	return false
}

func TestCertificateRotationUnderTraffic(t *testing.T) {
	// A 4 s certificate is renewed every 2 s: several rotations while traffic flows.
	m := startMesh(t, 4*time.Second)
	a := m.addPod(t, "mesh", "a", 0)
	b := m.addPod(t, "mesh", "b", 1)
	meshlab.Serve(t, b, 8080)
	bAddr := b.AddrPort(8080).String()
	serial := func(z *ztunnel) string {
		for _, c := range z.ids.Snapshot() {
			if c.Identity.ServiceAccount == "sa-b" {
				return c.Serial
			}
		}
		return ""
	}
	held := meshlab.Dial(t, a, bAddr)
	defer held.Close()
	meshlab.Greeting(t, held)
	first := serial(m.zt[1])
	rotations := 0
	for end := time.Now().Add(7 * time.Second); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		echo(t, held, "held across rotations")
		c := meshlab.Dial(t, a, bAddr)
		meshlab.Greeting(t, c)
		c.Close()
		if s := serial(m.zt[1]); s != first && s != "" {
			rotations++
			first = s
		}
	}
	if rotations < 2 {
		t.Errorf("saw %d certificate rotations in 7 s, want at least 2: the test did not exercise rotation", rotations)
	}
}

func TestRestartRefusesNoConnection(t *testing.T) {
	m := startMesh(t, time.Hour)
	a := m.addPod(t, "mesh", "a", 0)
	b := m.addPod(t, "mesh", "b", 1)
	meshlab.Serve(t, b, 8080)
	bAddr := b.AddrPort(8080).String()
	old := m.zt[1]
	var (
		wg       sync.WaitGroup
		stop     atomic.Bool
		ok, fail atomic.Int64
		lastErr  atomic.Value
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			c, err := a.Dial(ctx, "tcp", bAddr)
			cancel()
			if err == nil {
				_, err = meshlab.ReadLine(c, 3*time.Second)
				c.Close()
			}
			if err != nil {
				fail.Add(1)
				lastErr.Store(err.Error())
			} else {
				ok.Add(1)
			}
		}
	}()
	time.Sleep(300 * time.Millisecond)
	// The new ztunnel takes the pods over (the agent serves the newest connection), then
	// the old one drains away.
	m.zt[1] = m.startZtunnel(t, m.Nodes[1], time.Hour)
	meshlab.WaitFor(t, "the new ztunnel serves b", func() bool { return strings.Contains(m.zt[1].logs.String(), "serving pod") })
	time.Sleep(300 * time.Millisecond)
	old.cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	old.proxy.Shutdown(ctx)
	cancel()
	time.Sleep(500 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	if fail.Load() > 0 {
		t.Errorf("%d of %d connections failed during the handover (last: %v)", fail.Load(), fail.Load()+ok.Load(), lastErr.Load())
	}
	if ok.Load() < 20 {
		t.Errorf("only %d connections made: the test did not exercise the handover", ok.Load())
	}
	if !strings.Contains(m.zt[1].logs.String(), "direction=inbound") {
		t.Error("the new ztunnel carried no connection")
	}
}

// slowSigner delays each issuance by *delay.
type slowSigner struct {
	identity.LocalSigner
	delay *time.Duration
}

func (s slowSigner) Sign(ctx context.Context, csr []byte, id spiffe.ID) ([][]byte, []*x509.Certificate, error) {
	select {
	case <-time.After(*s.delay):
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
	return s.LocalSigner.Sign(ctx, csr, id)
}

func TestConnectionsWaitForTheFirstCertificate(t *testing.T) {
	m := startMesh(t, time.Hour)
	m.signDelay = 1500 * time.Millisecond
	b := m.addPod(t, "mesh", "b", 1)
	meshlab.Serve(t, b, 8080)
	a := m.addPod(t, "mesh", "a", 0)
	// a's certificate is still being issued: the connection must wait for it, not fail
	// and not go out in the clear.
	start := time.Now()
	c := meshlab.Dial(t, a, b.AddrPort(8080).String())
	got := meshlab.Greeting(t, c)
	c.Close()
	if !strings.HasPrefix(got, "b ") {
		t.Fatalf("greeting %q", got)
	}
	if waited := time.Since(start); waited < 500*time.Millisecond {
		t.Errorf("connection went through after %v, before a certificate could exist", waited)
	}
	waitLog(t, m.zt[0], "direction=outbound", "protocol=HBONE")
}
