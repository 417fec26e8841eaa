//go:build linux

package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/internal/spiffe"
	"github.com/sluicemesh/sluice/test/lab"
)

// The TLS settings both peers are held to: what ztunnel negotiates between Go peers on
// hardware with AES instructions (the report shows what each mode's ServerHello carried
// on the wire, so a mismatch would be visible).
const (
	peerCipherSuite = "TLS_AES_128_GCM_SHA256"
	peerMinTLS      = "TLSv1.3"
)

// peerCert is one side's certificate and key, issued by the same CA as ztunnel's
// workload certificates: ECDSA P-256, the workload profile, a SPIFFE URI SAN.
type peerCert struct {
	certFile, keyFile, bundleFile string // bundleFile: certificate then key (HAProxy's crt)
}

func issuePeerCert(authority *ca.CA, dir, name string) (peerCert, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return peerCert{}, err
	}
	id := spiffe.ID{TrustDomain: trustDomain, Namespace: plainNS, ServiceAccount: name}
	csr, err := ca.NewCSR(key, id)
	if err != nil {
		return peerCert{}, err
	}
	der, err := authority.Sign(csr, id, 24*time.Hour)
	if err != nil {
		return peerCert{}, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return peerCert{}, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	pc := peerCert{
		certFile:   filepath.Join(dir, name+".crt"),
		keyFile:    filepath.Join(dir, name+".key"),
		bundleFile: filepath.Join(dir, name+".pem"),
	}
	for _, f := range []struct {
		path string
		data []byte
	}{{pc.certFile, certPEM}, {pc.keyFile, keyPEM}, {pc.bundleFile, append(certPEM, keyPEM...)}} {
		if err := os.WriteFile(f.path, f.data, 0o600); err != nil {
			return peerCert{}, err
		}
	}
	return pc, nil
}

// startPeers starts stunnel and HAProxy on the same path as ztunnel: the client-side
// tunnel inside the client pod (the application connects to it on 127.0.0.1, as it would
// to a sidecar), the server-side tunnel inside the server pod, delivering to the
// application there; mutual TLS 1.3 with the cipher suite above and certificates from the
// mesh's CA, verified against its root.
func startPeers(ctx context.Context, w *world, authority *ca.CA) error {
	dir := filepath.Join(w.work, "peers")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rootFile := filepath.Join(dir, "root.pem")
	if err := os.WriteFile(rootFile, authority.RootsPEM(), 0o644); err != nil {
		return err
	}
	client, err := issuePeerCert(authority, dir, "client")
	if err != nil {
		return err
	}
	server, err := issuePeerCert(authority, dir, "server")
	if err != nil {
		return err
	}
	serverIP := w.serverPlain.IP.String()

	// stunnel: one process per side, a service per application.
	common := fmt.Sprintf("foreground = yes\npid =\ndebug = 4\nCAfile = %s\nverifyChain = yes\nsslVersionMin = %s\nciphersuites = %s\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
		rootFile, peerMinTLS, peerCipherSuite)
	var sc, ss strings.Builder
	sc.WriteString(common + fmt.Sprintf("cert = %s\nkey = %s\n", client.certFile, client.keyFile))
	ss.WriteString(common + fmt.Sprintf("cert = %s\nkey = %s\n", server.certFile, server.keyFile))
	for i, a := range apps {
		fmt.Fprintf(&sc, "\n[%s]\nclient = yes\naccept = 127.0.0.1:%d\nconnect = %s:%d\n", a.name, stunnelClientBase+i, serverIP, stunnelServerBase+i)
		fmt.Fprintf(&ss, "\n[%s]\naccept = %s:%d\nconnect = %s:%d\n", a.name, serverIP, stunnelServerBase+i, serverIP, a.port)
	}
	// HAProxy: TCP mode, a frontend and backend per application. The global maxconn is
	// left to HAProxy, which derives it from the open-files limit (a larger one makes it
	// refuse to start when it cannot raise that limit); the frontends' is lifted from
	// its default so that only the global one applies.
	global := fmt.Sprintf(`global
  ssl-default-bind-ciphersuites %[1]s
  ssl-default-bind-options ssl-min-ver %[2]s
  ssl-default-server-ciphersuites %[1]s
  ssl-default-server-options ssl-min-ver %[2]s
defaults
  mode tcp
  maxconn 40000
  timeout connect 5s
  timeout client 1h
  timeout server 1h
`, peerCipherSuite, peerMinTLS)
	hc, hs := strings.Builder{}, strings.Builder{}
	w.haproxySockets = []string{filepath.Join(dir, "haproxy-client.sock"), filepath.Join(dir, "haproxy-server.sock")}
	hc.WriteString(strings.Replace(global, "global\n", "global\n  stats socket "+w.haproxySockets[0]+" mode 600\n", 1))
	hs.WriteString(strings.Replace(global, "global\n", "global\n  stats socket "+w.haproxySockets[1]+" mode 600\n", 1))
	for i, a := range apps {
		fmt.Fprintf(&hc, "frontend %[1]s\n  bind 127.0.0.1:%[2]d\n  default_backend %[1]s_up\nbackend %[1]s_up\n  server s %[3]s:%[4]d ssl crt %[5]s ca-file %[6]s verify required\n",
			a.name, haproxyClientBase+i, serverIP, haproxyServerBase+i, client.bundleFile, rootFile)
		fmt.Fprintf(&hs, "frontend %[1]s\n  bind %[2]s:%[3]d ssl crt %[4]s ca-file %[5]s verify required\n  default_backend %[1]s_app\nbackend %[1]s_app\n  server app %[2]s:%[6]d\n",
			a.name, serverIP, haproxyServerBase+i, server.bundleFile, rootFile, a.port)
	}

	// The plain relays: the same HAProxy, TCP mode, no TLS. What they cost is what any
	// tunnel with a user-space proxy at each end pays before encrypting a byte.
	rc, rs := strings.Builder{}, strings.Builder{}
	plainGlobal := "global\ndefaults\n  mode tcp\n  maxconn 40000\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
	rc.WriteString(plainGlobal)
	rs.WriteString(plainGlobal)
	for i, a := range apps {
		fmt.Fprintf(&rc, "frontend %[1]s\n  bind 127.0.0.1:%[2]d\n  default_backend %[1]s_up\nbackend %[1]s_up\n  server s %[3]s:%[4]d\n",
			a.name, relayClientBase+i, serverIP, relayServerBase+i)
		fmt.Fprintf(&rs, "frontend %[1]s\n  bind %[2]s:%[3]d\n  default_backend %[1]s_app\nbackend %[1]s_app\n  server app %[2]s:%[4]d\n",
			a.name, serverIP, relayServerBase+i, a.port)
	}

	// Each side is started server first, so the client side's first connection finds
	// it; the lists hold the client side first, like the ztunnels (node0, node1).
	type side struct {
		pod        *lab.Pod
		file, conf string
		listenBase int
	}
	start := func(kind, tool string, s side, args ...string) (*proc, error) {
		path := filepath.Join(dir, s.file)
		if err := os.WriteFile(path, []byte(s.conf), 0o644); err != nil {
			return nil, err
		}
		mk := func() *exec.Cmd { return s.pod.Command(tool, append(slices.Clone(args), path)...) }
		return spawn(ctx, kind+" in "+s.pod.String(), mk, filepath.Join(w.work, s.file+".log"), func(ctx context.Context, p *proc) error {
			for i := range apps {
				if err := waitListening(ctx, s.pod, p, uint16(s.listenBase+i)); err != nil {
					return err
				}
			}
			return nil
		})
	}
	for _, t := range []struct {
		kind, tool     string
		args           []string
		procs          *[]*proc
		server, client side
	}{
		{"stunnel", w.tools.stunnel, nil, &w.stunnels,
			side{w.serverPlain, "stunnel-server.conf", ss.String(), stunnelServerBase},
			side{w.clientPlain, "stunnel-client.conf", sc.String(), stunnelClientBase}},
		{"haproxy", w.tools.haproxy, []string{"-db", "-f"}, &w.haproxies,
			side{w.serverPlain, "haproxy-server.cfg", hs.String(), haproxyServerBase},
			side{w.clientPlain, "haproxy-client.cfg", hc.String(), haproxyClientBase}},
		{"plain relay (haproxy)", w.tools.haproxy, []string{"-db", "-f"}, &w.relays,
			side{w.serverPlain, "relay-server.cfg", rs.String(), relayServerBase},
			side{w.clientPlain, "relay-client.cfg", rc.String(), relayClientBase}},
	} {
		srv, err := start(t.kind, t.tool, t.server, t.args...)
		if srv != nil {
			*t.procs = append(*t.procs, srv)
		}
		if err != nil {
			return err
		}
		cli, err := start(t.kind, t.tool, t.client, t.args...)
		if cli != nil {
			*t.procs = []*proc{cli, srv}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// haproxyInfo asks HAProxy, on its stats socket, for its connection limits and use: what
// explains connections it does not take.
func haproxyInfo(sock string) (string, error) {
	c, err := net.DialTimeout("unix", sock, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("show info\n")); err != nil {
		return "", err
	}
	b, _ := io.ReadAll(c)
	var out []string
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if ok && (k == "Maxconn" || k == "Ulimit-n" || k == "CurrConns") {
			out = append(out, k+" "+strings.TrimSpace(v))
		}
	}
	return strings.Join(out, ", "), nil
}

// haproxyLimits reports both HAProxy processes' connection limits and use.
func (w *world) haproxyLimits() error {
	var errs []error
	for i, sock := range w.haproxySockets {
		if i >= len(w.haproxies) {
			break
		}
		info, err := haproxyInfo(sock)
		if err != nil {
			info = "stats socket: " + err.Error()
		}
		errs = append(errs, fmt.Errorf("%s reports %s", w.haproxies[i].name, info))
	}
	return errors.Join(errs...)
}
