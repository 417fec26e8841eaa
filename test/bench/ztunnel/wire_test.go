//go:build linux

package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"
)

// recordingConn keeps what the client read: the server's side of the handshake.
type recordingConn struct {
	net.Conn
	read bytes.Buffer
}

func (c *recordingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.read.Write(b[:n])
	return n, err
}

// serverHelloBytes runs a TLS 1.3 handshake between Go peers and returns the bytes the
// server sent first, as they would cross the wire.
func serverHelloBytes(t *testing.T, curves []tls.CurveID) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	srv := tls.Server(b, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS13})
	go srv.Handshake()
	rec := &recordingConn{Conn: a}
	cli := tls.Client(rec, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, CurvePreferences: curves})
	if err := cli.Handshake(); err != nil {
		t.Fatal(err)
	}
	if got := cli.ConnectionState().CipherSuite; got == 0 {
		t.Fatal("no cipher suite negotiated")
	}
	return rec.read.Bytes()
}

func TestParseServerHelloReadsWhatWasNegotiated(t *testing.T) {
	for _, curve := range []tls.CurveID{tls.X25519, tls.CurveP256, tls.X25519MLKEM768} {
		t.Run(curve.String(), func(t *testing.T) {
			raw := serverHelloBytes(t, []tls.CurveID{curve})
			h, err := parseServerHello(raw)
			if err != nil {
				t.Fatal(err)
			}
			if h.version != tls.VersionTLS13 {
				t.Errorf("version %#x, want TLS 1.3", h.version)
			}
			if h.group != curve {
				t.Errorf("group %v, want %v", h.group, curve)
			}
			if tls.CipherSuiteName(h.cipherSuite) == "" || h.cipherSuite>>8 != 0x13 {
				t.Errorf("cipher suite %#x is not a TLS 1.3 suite", h.cipherSuite)
			}
		})
	}
}

func TestParseServerHelloRejectsOtherBytes(t *testing.T) {
	raw := serverHelloBytes(t, nil)
	// Every truncation must fail cleanly or parse, never panic; garbage must fail.
	for i := range len(raw) {
		parseServerHello(raw[:i])
	}
	for _, b := range [][]byte{nil, []byte("GET / HTTP/1.1\r\n"), {22, 3, 3, 0, 4, 1, 0, 0, 0}} {
		if _, err := parseServerHello(b); err == nil {
			t.Errorf("parsed %q as a ServerHello", b)
		}
	}
}
