package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sluicemesh/sluice/internal/ca"
	"github.com/sluicemesh/sluice/internal/spiffe"
)

func TestCertificateBlocksUntilFirstIssuance(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sig := &testSigner{inner: LocalSigner{CA: newCA(t)}, gate: make(chan struct{})}
		m := &Manager{Signer: sig}
		defer start(t, m)()
		m.Want(idA)

		done := make(chan struct{})
		var (
			cert *x509.Certificate
			err  error
		)
		go func() {
			defer close(done)
			var c *tls.Certificate
			if c, err = certFor(m, idA); c != nil {
				cert = c.Leaf
			}
		}()
		synctest.Wait()
		select {
		case <-done:
			t.Fatal("Certificate returned before the CA answered")
		default:
		}
		if s := m.Snapshot(); len(s) != 1 || s[0].State != StateInitializing {
			t.Fatalf("snapshot while waiting = %+v, want one Initializing entry", s)
		}
		close(sig.gate)
		<-done
		if err != nil {
			t.Fatal(err)
		}
		if id, _ := spiffe.FromCertificate(cert); id != idA {
			t.Fatalf("certificate is for %v, want %s", id, idA)
		}

		// An identity no local workload has is refused at once, not waited for.
		if _, err := certFor(m, idB); err == nil || !strings.Contains(err.Error(), "no workload on this node") {
			t.Fatalf("Certificate(unknown) = %v", err)
		}
	})
}

func TestCertificateTimesOutWithCause(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sig := &testSigner{inner: LocalSigner{CA: newCA(t)}, fail: errors.New("CA unreachable")}
		m := &Manager{Signer: sig}
		defer start(t, m)()
		m.Want(idA)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := m.Certificate(ctx, idA)
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "CA unreachable") {
			t.Fatalf("Certificate = %v, want deadline exceeded naming the CA failure", err)
		}
		if s := m.Snapshot(); s[0].State != StateUnavailable || !strings.Contains(s[0].LastError, "CA unreachable") {
			t.Fatalf("snapshot = %+v", s)
		}
	})
}

// TestRotation: renewal happens at half-life (jitter only makes it earlier, by a small
// bound), each renewal has a new key, and handshakes work across rotations while other
// goroutines read certificates concurrently (run with -race).
func TestRotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const ttl = time.Hour
		sig := &testSigner{inner: LocalSigner{CA: newCA(t), TTL: ttl}}
		m := &Manager{Signer: sig}
		defer start(t, m)()
		m.Want(idA)
		m.Want(idB)
		first, err := certFor(m, idA)
		if err != nil {
			t.Fatal(err)
		}
		leaf := first.Leaf
		lifetime := leaf.NotAfter.Sub(leaf.NotBefore)
		half := leaf.NotBefore.Add(lifetime / 2)
		earliest := half.Add(-renewJitter(lifetime))

		time.Sleep(time.Until(earliest) - time.Second)
		synctest.Wait()
		if _, issued := sig.counts(idA); len(issued) != 1 {
			t.Fatalf("%d issuances before half-life minus jitter, want 1", len(issued))
		}
		time.Sleep(time.Until(half) + time.Millisecond)
		synctest.Wait()
		_, issued := sig.counts(idA)
		if len(issued) != 2 {
			t.Fatalf("%d issuances just after half-life, want 2", len(issued))
		}
		if at := issued[1]; at.Before(earliest) || at.After(half) {
			t.Fatalf("renewed at %s, want within [%s, %s]", at, earliest, half)
		}
		second, err := certFor(m, idA)
		if err != nil {
			t.Fatal(err)
		}
		if second.Leaf.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
			t.Fatal("renewal returned the same certificate")
		}
		if second.PrivateKey.(*ecdsa.PrivateKey).Equal(first.PrivateKey) {
			t.Fatal("renewal reused the private key")
		}

		// Readers on the hot path while rotations happen.
		stopReaders := make(chan struct{})
		var readers sync.WaitGroup
		for range 4 {
			readers.Go(func() {
				for {
					select {
					case <-stopReaders:
						return
					case <-time.After(time.Second):
					}
					c, err := certFor(m, idB)
					if err != nil || !time.Now().Before(c.Leaf.NotAfter) {
						t.Errorf("Certificate during rotation: %v", err)
						return
					}
				}
			})
		}
		for range 36 { // three hours, a handshake every five minutes
			mustHandshake(t, m, m, idA, idB)
			time.Sleep(5 * time.Minute)
		}
		close(stopReaders)
		readers.Wait()
		if _, issued := sig.counts(idB); len(issued) < 6 {
			t.Fatalf("%d issuances for %s over 3.5 hours of 1-hour certificates, want at least 6", len(issued), idB)
		}
	})
}

// TestSignerFailureKeepsCertificate: a failing CA never costs a valid certificate;
// retries back off exponentially up to the cap; the first success replaces the
// certificate. Once the old one expires, callers wait for the next.
func TestSignerFailureKeepsCertificate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sig := &testSigner{inner: LocalSigner{CA: newCA(t), TTL: time.Hour}}
		m := &Manager{Signer: sig, RetryBackoff: Backoff{Initial: time.Second, Max: 8 * time.Second}}
		defer start(t, m)()
		m.Want(idA)
		first, err := certFor(m, idA)
		if err != nil {
			t.Fatal(err)
		}
		sig.setFail(errors.New("CA unreachable"))
		half := first.Leaf.NotBefore.Add(first.Leaf.NotAfter.Sub(first.Leaf.NotBefore) / 2)
		time.Sleep(time.Until(half) + time.Minute)
		synctest.Wait()

		c, err := certFor(m, idA)
		if err != nil || c != first {
			t.Fatalf("while renewals fail, Certificate = %v, %v; want the current certificate", c, err)
		}
		attempts, _ := sig.counts(idA)
		fails := attempts[1:]
		if len(fails) < 5 {
			t.Fatalf("%d retries in a minute, want several", len(fails))
		}
		for i := 1; i < len(fails); i++ {
			gap := fails[i].Sub(fails[i-1])
			want := min(time.Second<<(i-1), 8*time.Second)
			if gap < want*9/10-time.Millisecond || gap > want {
				t.Errorf("retry %d after %s, want about %s", i, gap, want)
			}
		}
		s := m.Snapshot()[0]
		if s.State != StateAvailable || !strings.Contains(s.LastError, "CA unreachable") || s.Failures != len(fails) {
			t.Fatalf("snapshot = %+v, want Available with the failure recorded", s)
		}

		sig.setFail(nil)
		time.Sleep(8 * time.Second)
		synctest.Wait()
		second, err := certFor(m, idA)
		if err != nil || second == first {
			t.Fatalf("after the CA recovered: %v, same certificate: %v", err, second == first)
		}
		if s := m.Snapshot()[0]; s.LastError != "" || s.Failures != 0 {
			t.Fatalf("snapshot after recovery = %+v", s)
		}

		// The CA stays down past expiry: the certificate is no longer handed out, and
		// callers wait (here, until their deadline) instead of getting an expired one.
		sig.setFail(errors.New("CA unreachable"))
		time.Sleep(time.Until(second.Leaf.NotAfter) + time.Second)
		short, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := m.Certificate(short, idA); err == nil || !strings.Contains(err.Error(), "CA unreachable") {
			t.Fatalf("Certificate after expiry = %v, want a wait ending in the CA error", err)
		}
		if s := m.Snapshot()[0]; s.State != StateUnavailable {
			t.Fatalf("state after expiry = %s, want Unavailable", s.State)
		}
		sig.setFail(nil)
		third, err := certFor(m, idA)
		if err != nil || !time.Now().Before(third.Leaf.NotAfter) {
			t.Fatalf("after recovery from expiry: %v", err)
		}
	})
}

func TestForget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sig := &testSigner{inner: LocalSigner{CA: newCA(t), TTL: time.Hour}}
		m := &Manager{Signer: sig, ForgetGrace: 10 * time.Minute}
		defer start(t, m)()
		m.Want(idA)
		if _, err := certFor(m, idA); err != nil {
			t.Fatal(err)
		}
		m.Forget(idA)
		time.Sleep(5 * time.Minute)
		if _, err := certFor(m, idA); err != nil {
			t.Fatalf("within the grace period: %v", err)
		}
		if s := m.Snapshot(); len(s) != 1 || !s[0].Forgotten {
			t.Fatalf("snapshot = %+v, want one forgotten entry", s)
		}
		time.Sleep(6 * time.Minute)
		synctest.Wait()
		if _, err := certFor(m, idA); err == nil {
			t.Fatal("certificate still available after the grace period")
		}
		if s := m.Snapshot(); len(s) != 0 {
			t.Fatalf("snapshot = %+v, want empty", s)
		}

		// Forgotten identities are not renewed; wanting one again fetches it again.
		m.Want(idA)
		m.Forget(idA)
		m.Want(idA)
		if _, err := certFor(m, idA); err != nil {
			t.Fatal(err)
		}
		m.Forget(idA)
		time.Sleep(2 * time.Hour)
		synctest.Wait()
		if _, issued := sig.counts(idA); len(issued) != 2 {
			t.Fatalf("%d issuances, want 2 (one per Want, no renewals while forgotten)", len(issued))
		}
	})
}

// TestRejectsBadIssuance: a CA answer that peers would reject must not replace anything.
func TestRejectsBadIssuance(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		good, other := newCA(t), newCA(t)
		cases := []struct {
			name    string
			sign    SignerFunc
			wantErr string
		}{
			{"wrong identity", func(_ context.Context, csr []byte, _ spiffe.ID) ([][]byte, []*x509.Certificate, error) {
				der, err := good.Sign(csr, idB, 0)
				return [][]byte{der}, good.Roots(), err
			}, "certificate is for " + idB.String()},
			{"wrong key", func(_ context.Context, _ []byte, id spiffe.ID) ([][]byte, []*x509.Certificate, error) {
				key, _ := (&Manager{}).newKey()
				csr, _ := ca.NewCSR(key, id)
				der, err := good.Sign(csr, id, 0)
				return [][]byte{der}, good.Roots(), err
			}, "not for the key"},
			{"roots do not match", func(_ context.Context, csr []byte, id spiffe.ID) ([][]byte, []*x509.Certificate, error) {
				der, err := good.Sign(csr, id, 0)
				return [][]byte{der}, other.Roots(), err
			}, "does not verify against the returned roots"},
			{"empty chain", func(context.Context, []byte, spiffe.ID) ([][]byte, []*x509.Certificate, error) {
				return nil, nil, nil
			}, "empty certificate chain"},
		}
		for _, tc := range cases {
			m := &Manager{Signer: tc.sign}
			stop := start(t, m)
			m.Want(idA)
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := m.Certificate(ctx, idA)
			cancel()
			stop()
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: Certificate = %v, want an error containing %q", tc.name, err, tc.wantErr)
			}
			if m.Roots(td) != nil {
				t.Errorf("%s: roots from a rejected answer were installed", tc.name)
			}
		}
	})
}

func TestRootsFollowSigner(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c1, c2 := newCA(t), newCA(t)
		var mu sync.Mutex
		bundle := c1.Roots()
		sign := SignerFunc(func(_ context.Context, csr []byte, id spiffe.ID) ([][]byte, []*x509.Certificate, error) {
			mu.Lock()
			defer mu.Unlock()
			der, err := c1.Sign(csr, id, time.Hour)
			return [][]byte{der}, bundle, err
		})
		m := &Manager{Signer: sign}
		defer start(t, m)()
		if m.Roots(td) != nil {
			t.Fatal("roots before any issuance")
		}
		m.Want(idA)
		first, err := certFor(m, idA)
		if err != nil {
			t.Fatal(err)
		}
		if !m.Roots(td).Equal(pool(c1.Roots()...)) {
			t.Fatal("roots are not the signer's bundle after issuance")
		}

		m.SetRoots(td, c2.Roots())
		if !m.Roots(td).Equal(pool(c2.Roots()...)) {
			t.Fatal("SetRoots did not replace the bundle")
		}
		m.SetRoots("example.org", c2.Roots())
		m.SetRoots("example.org", nil)
		if m.Roots("example.org") != nil {
			t.Fatal("SetRoots(nil) did not remove the bundle")
		}

		// A root rotation: the CA starts returning both roots; the next issuance
		// installs them.
		mu.Lock()
		bundle = append(c1.Roots(), c2.Roots()...)
		mu.Unlock()
		time.Sleep(time.Until(first.Leaf.NotAfter))
		synctest.Wait()
		if !m.Roots(td).Equal(pool(append(c1.Roots(), c2.Roots()...)...)) {
			t.Fatal("roots not updated from the renewal")
		}
	})
}

func TestRunMisuse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		if err := (&Manager{}).Run(context.Background()); err == nil {
			t.Fatal("Run without Signer succeeded")
		}
		m := &Manager{Signer: LocalSigner{CA: newCA(t)}}
		defer start(t, m)()
		synctest.Wait()
		if err := m.Run(context.Background()); err == nil {
			t.Fatal("second concurrent Run succeeded")
		}
		m.Want(spiffe.ID{TrustDomain: td}) // invalid: logged and ignored
		if s := m.Snapshot(); len(s) != 0 {
			t.Fatalf("invalid identity was recorded: %+v", s)
		}
	})
}

func TestRefreshTime(t *testing.T) {
	base := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		name          string
		nb, na, now   time.Time
		earliest, lat time.Time
	}{
		{"24h certificate: half-life, at most 5m early",
			base.Add(-2 * time.Minute), base.Add(24 * time.Hour), base,
			base.Add(12*time.Hour - time.Minute - 5*time.Minute), base.Add(12*time.Hour - time.Minute)},
		{"lifetime shorter than the backdating: half of what remains",
			base.Add(-2 * time.Minute), base.Add(10 * time.Second), base,
			base.Add(5 * time.Second), base.Add(5 * time.Second)},
	}
	for _, tc := range cases {
		for range 50 {
			got := refreshTime(&x509.Certificate{NotBefore: tc.nb, NotAfter: tc.na}, tc.now)
			if got.Before(tc.earliest) || got.After(tc.lat) {
				t.Fatalf("%s: refresh at %s, want within [%s, %s]", tc.name, got, tc.earliest, tc.lat)
			}
		}
	}
}

func pool(certs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}
