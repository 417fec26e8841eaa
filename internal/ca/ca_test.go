package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/spiffe"
)

var (
	sleepID  = spiffe.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "sleep"}
	oidSAN   = asn1.ObjectIdentifier{2, 5, 29, 17}
	emptyDN  = []byte{0x30, 0x00} // an empty RDNSequence
	testTime = time.Minute        // slack for "about now" comparisons
)

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newCA(t *testing.T) *CA {
	t.Helper()
	c, err := LoadOrCreate(t.TempDir(), "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func sign(t *testing.T, c *CA, id spiffe.ID, ttl time.Duration) *x509.Certificate {
	t.Helper()
	csr, err := NewCSR(newKey(t), id)
	if err != nil {
		t.Fatal(err)
	}
	der, err := c.Sign(csr, id, ttl)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func pool(c *CA) *x509.CertPool {
	p := x509.NewCertPool()
	for _, r := range c.Roots() {
		p.AddCert(r)
	}
	return p
}

// TestWorkloadProfile checks every field Istio's peers look at, with a CSR that asks for
// a different identity, a subject and DNS names: none of it may reach the certificate.
func TestWorkloadProfile(t *testing.T) {
	c := newCA(t)
	key := newKey(t)
	evil, _ := url.Parse("spiffe://cluster.local/ns/kube-system/sa/admin")
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}},
		URIs:     []*url.URL{evil},
		DNSNames: []string{"kubernetes.default.svc"},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	der, err := c.Sign(csr, sleepID, 0)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}

	if !bytes.Equal(cert.RawSubject, emptyDN) {
		t.Errorf("subject = %q, want empty", cert.Subject)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != sleepID.String() {
		t.Errorf("URI SANs = %v, want [%s]", cert.URIs, sleepID)
	}
	if len(cert.DNSNames)+len(cert.IPAddresses)+len(cert.EmailAddresses) != 0 {
		t.Errorf("extra SANs: %v %v %v", cert.DNSNames, cert.IPAddresses, cert.EmailAddresses)
	}
	var sanCritical, found bool
	for _, ext := range cert.Extensions {
		if ext.Id.Equal(oidSAN) {
			found, sanCritical = true, ext.Critical
		}
	}
	if !found || !sanCritical {
		t.Errorf("SAN extension present=%v critical=%v, want critical (empty subject)", found, sanCritical)
	}
	if want := x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment; cert.KeyUsage != want {
		t.Errorf("key usage = %b, want %b", cert.KeyUsage, want)
	}
	if want := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}; !equalEKU(cert.ExtKeyUsage, want) {
		t.Errorf("ext key usage = %v, want %v", cert.ExtKeyUsage, want)
	}
	if cert.IsCA || !cert.BasicConstraintsValid {
		t.Errorf("IsCA=%v BasicConstraintsValid=%v, want a CA:FALSE leaf", cert.IsCA, cert.BasicConstraintsValid)
	}
	if d := cert.NotBefore.Sub(start.Add(-ClockSkew)); d < -testTime || d > testTime {
		t.Errorf("NotBefore = %s, want about %s", cert.NotBefore, start.Add(-ClockSkew))
	}
	if d := cert.NotAfter.Sub(start.Add(DefaultTTL)); d < -testTime || d > testTime {
		t.Errorf("NotAfter = %s, want about %s (default 24h)", cert.NotAfter, start.Add(DefaultTTL))
	}
	if cert.SerialNumber.Sign() <= 0 || cert.SerialNumber.BitLen() > 128 {
		t.Errorf("serial %x is not a positive 128-bit number", cert.SerialNumber)
	}
	root := c.Roots()[0]
	if len(root.SubjectKeyId) == 0 || !bytes.Equal(cert.AuthorityKeyId, root.SubjectKeyId) {
		t.Errorf("AuthorityKeyId = %x, want root's SubjectKeyId %x", cert.AuthorityKeyId, root.SubjectKeyId)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		t.Error("certificate is not for the CSR's key")
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: pool(c), KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("verify for %v: %v", usage, err)
		}
	}
	id, err := spiffe.FromCertificate(cert)
	if err != nil || id != sleepID {
		t.Errorf("FromCertificate = %v, %v", id, err)
	}
	other := sign(t, c, sleepID, 0)
	if other.SerialNumber.Cmp(cert.SerialNumber) == 0 {
		t.Error("two certificates got the same serial")
	}
}

func equalEKU(a, b []x509.ExtKeyUsage) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestSignRejects(t *testing.T) {
	c := newCA(t)
	good, err := NewCSR(newKey(t), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	badSig := bytes.Clone(good)
	badSig[len(badSig)-1] ^= 0xff // last byte of the ECDSA signature's s
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	weak, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, p224)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		csr     []byte
		id      spiffe.ID
		wantErr string
	}{
		{"bad signature", badSig, sleepID, "CSR signature does not verify"},
		{"not a CSR", []byte("hello"), sleepID, "parse CSR"},
		{"weak key", weak, sleepID, "use P-256 or P-384"},
		{"other trust domain", good, spiffe.ID{TrustDomain: "evil.example", Namespace: "default", ServiceAccount: "sleep"}, `trust domain "cluster.local" only`},
		{"invalid identity", good, spiffe.ID{TrustDomain: "cluster.local", Namespace: "default"}, "service account is empty"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Sign(tc.csr, tc.id, time.Hour)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Sign error = %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestOtherCAFailsVerification(t *testing.T) {
	mine, theirs := newCA(t), newCA(t)
	cert := sign(t, theirs, sleepID, time.Hour)
	_, err := cert.Verify(x509.VerifyOptions{Roots: pool(mine), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &unknown) {
		t.Fatalf("verify against another CA's root = %v, want UnknownAuthorityError", err)
	}
}

func TestExpiry(t *testing.T) {
	c := newCA(t)
	cert := sign(t, c, sleepID, time.Second)
	if got := cert.NotAfter.Sub(cert.NotBefore); got != ClockSkew+time.Second {
		t.Fatalf("lifetime = %s, want ttl + clock skew", got)
	}
	_, err := cert.Verify(x509.VerifyOptions{Roots: pool(c), CurrentTime: cert.NotAfter.Add(time.Second), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	var invalid x509.CertificateInvalidError
	if !errors.As(err, &invalid) || invalid.Reason != x509.Expired {
		t.Fatalf("verify after NotAfter = %v, want Expired", err)
	}
}

// selfSigned returns a CA root valid for the given window.
func selfSigned(t *testing.T, key crypto.Signer, notBefore, notAfter time.Time, isCA bool) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{"test"}},
		NotBefore: notBefore, NotAfter: notAfter,
		IsCA: isCA, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func TestLifetimeCappedAtRootExpiry(t *testing.T) {
	key := newKey(t)
	now := time.Now()
	root := selfSigned(t, key, now.Add(-time.Hour), now.Add(time.Hour), true)
	c, err := New(root, key, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	cert := sign(t, c, sleepID, 24*time.Hour)
	if !cert.NotAfter.Equal(root.NotAfter) {
		t.Fatalf("NotAfter = %s, want the root's %s", cert.NotAfter, root.NotAfter)
	}

	expired := selfSigned(t, key, now.Add(-2*time.Hour), now.Add(-time.Hour), true)
	c, err = New(expired, key, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	csr, _ := NewCSR(newKey(t), sleepID)
	if _, err := c.Sign(csr, sleepID, time.Hour); err == nil || !strings.Contains(err.Error(), "root certificate expired") {
		t.Fatalf("Sign with expired root = %v", err)
	}
}

func TestNewRejects(t *testing.T) {
	key := newKey(t)
	now := time.Now()
	root := selfSigned(t, key, now, now.Add(time.Hour), true)
	leaf := selfSigned(t, key, now, now.Add(time.Hour), false)
	cases := []struct {
		name    string
		cert    *x509.Certificate
		key     crypto.Signer
		td      string
		wantErr string
	}{
		{"not a CA", leaf, key, "cluster.local", "not a CA certificate"},
		{"wrong key", root, newKey(t), "cluster.local", "does not belong"},
		{"bad trust domain", root, key, "Cluster.Local", "trust domain"},
		{"nil", nil, key, "cluster.local", "both required"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.cert, tc.key, tc.td); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("New error = %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestLoadOrCreate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	created, err := LoadOrCreate(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode = %v, want 0600", fi.Mode().Perm())
	}
	root := created.Roots()[0]
	if !root.IsCA || root.Subject.Organization[0] != "cluster.local" || root.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("root = CA:%v O=%v %v", root.IsCA, root.Subject.Organization, root.PublicKeyAlgorithm)
	}
	if got := root.NotAfter.Sub(root.NotBefore); got < RootTTL {
		t.Errorf("root lifetime = %s, want 10 years", got)
	}
	block, _ := pem.Decode(created.RootsPEM())
	if block == nil || !bytes.Equal(block.Bytes, root.Raw) {
		t.Error("RootsPEM does not hold the root")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Errorf("CA dir holds %d entries, want the two files only (temporary files left behind?)", len(entries))
	}

	loaded, err := LoadOrCreate(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(loaded.Roots()[0].Raw, root.Raw) {
		t.Fatal("second LoadOrCreate made a new root instead of loading the existing one")
	}
	// A certificate from the loaded CA verifies against the first one's root: same key.
	if _, err := sign(t, loaded, sleepID, time.Hour).Verify(x509.VerifyOptions{Roots: pool(created)}); err != nil {
		t.Fatal(err)
	}
	if loaded.TrustDomain() != "cluster.local" {
		t.Fatalf("TrustDomain = %q", loaded.TrustDomain())
	}
}

func TestLoadOrCreateInconsistent(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	if _, err := LoadOrCreate(a, "cluster.local"); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreate(b, "cluster.local"); err != nil {
		t.Fatal(err)
	}

	onlyKey := t.TempDir()
	copyFile(t, filepath.Join(a, KeyFile), filepath.Join(onlyKey, KeyFile))
	_, err := LoadOrCreate(onlyKey, "cluster.local")
	if err == nil || !strings.Contains(err.Error(), CertFile+" does not") {
		t.Errorf("key without cert: %v", err)
	}

	onlyCert := t.TempDir()
	copyFile(t, filepath.Join(a, CertFile), filepath.Join(onlyCert, CertFile))
	_, err = LoadOrCreate(onlyCert, "cluster.local")
	if err == nil || !strings.Contains(err.Error(), KeyFile+" does not") {
		t.Errorf("cert without key: %v", err)
	}

	mixed := t.TempDir()
	copyFile(t, filepath.Join(a, KeyFile), filepath.Join(mixed, KeyFile))
	copyFile(t, filepath.Join(b, CertFile), filepath.Join(mixed, CertFile))
	_, err = LoadOrCreate(mixed, "cluster.local")
	if err == nil || !strings.Contains(err.Error(), "does not belong") {
		t.Errorf("mismatched pair: %v", err)
	}

	garbage := t.TempDir()
	copyFile(t, filepath.Join(a, CertFile), filepath.Join(garbage, CertFile))
	if err := os.WriteFile(filepath.Join(garbage, KeyFile), []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err = LoadOrCreate(garbage, "cluster.local"); err == nil || !strings.Contains(err.Error(), "no PEM block") {
		t.Errorf("garbage key: %v", err)
	}
}

// TestLoadSEC1Key covers roots made with openssl ecparam, whose keys are "EC PRIVATE KEY".
func TestLoadSEC1Key(t *testing.T) {
	dir := t.TempDir()
	key := newKey(t)
	now := time.Now()
	root := selfSigned(t, key, now, now.Add(time.Hour), true)
	sec1, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, KeyFile), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1}))
	writeFile(t, filepath.Join(dir, CertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}))
	c, err := LoadOrCreate(dir, "example.org")
	if err != nil {
		t.Fatal(err)
	}
	if c.TrustDomain() != "example.org" {
		t.Fatalf("TrustDomain = %q", c.TrustDomain())
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, to, b)
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
