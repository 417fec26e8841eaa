package spiffe

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"math/big"
	"net/url"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	cases := []struct {
		in      string
		want    ID
		wantErr string // substring of the error; "" means success
	}{
		{in: "spiffe://cluster.local/ns/default/sa/bookinfo-reviews", want: ID{"cluster.local", "default", "bookinfo-reviews"}},
		{in: "spiffe://td_1-x.example/ns/Team.A/sa/Svc_1", want: ID{"td_1-x.example", "Team.A", "Svc_1"}},
		{in: "", wantErr: `must start with "spiffe://"`},
		{in: "https://cluster.local/ns/a/sa/b", wantErr: `must start with "spiffe://"`},
		{in: "spiffe:/cluster.local/ns/a/sa/b", wantErr: `must start with "spiffe://"`},
		{in: "SPIFFE://cluster.local/ns/a/sa/b", wantErr: "scheme must be lower-case"},
		{in: "spiffe:///ns/a/sa/b", wantErr: "trust domain is empty"},
		{in: "spiffe://Cluster.Local/ns/a/sa/b", wantErr: `trust domain "Cluster.Local" contains 'C'`},
		{in: "spiffe://cluster.local:443/ns/a/sa/b", wantErr: "must not contain a port"},
		{in: "spiffe://user@cluster.local/ns/a/sa/b", wantErr: "must not contain user info"},
		{in: "spiffe://cluster.local", wantErr: `path "/" is not /ns/<namespace>/sa/<service-account>`},
		{in: "spiffe://cluster.local/", wantErr: "is not /ns/<namespace>/sa/<service-account>"},
		{in: "spiffe://cluster.local/ns/a", wantErr: "is not /ns/<namespace>/sa/<service-account>"},
		{in: "spiffe://cluster.local/ns/a/sa/b/", wantErr: "is not /ns/<namespace>/sa/<service-account>"},
		{in: "spiffe://cluster.local/ns/a/sa/b/c", wantErr: "is not /ns/<namespace>/sa/<service-account>"},
		{in: "spiffe://cluster.local/sa/b/ns/a", wantErr: "is not /ns/<namespace>/sa/<service-account>"},
		{in: "spiffe://cluster.local/NS/a/SA/b", wantErr: "is not /ns/<namespace>/sa/<service-account>"},
		{in: "spiffe://cluster.local//ns/a/sa/b", wantErr: "is not /ns/<namespace>/sa/<service-account>"},
		{in: "spiffe://cluster.local/ns//sa/b", wantErr: "namespace is empty"},
		{in: "spiffe://cluster.local/ns/a/sa/", wantErr: "service account is empty"},
		{in: "spiffe://cluster.local/ns/../sa/b", wantErr: `namespace must not be ".."`},
		{in: "spiffe://cluster.local/ns/a/sa/.", wantErr: `service account must not be "."`},
		{in: "spiffe://cluster.local/ns/a%2Fb/sa/c", wantErr: "percent-encoded"},
		{in: "spiffe://cluster.local/ns/a b/sa/c", wantErr: `contains ' '`},
		{in: "spiffe://cluster.local/ns/a/sa/b?x=1", wantErr: "must not have a query or fragment"},
		{in: "spiffe://cluster.local/ns/a/sa/b#frag", wantErr: "must not have a query or fragment"},
		{in: "spiffe://" + strings.Repeat("a", 256) + "/ns/a/sa/b", wantErr: "trust domain is longer than 255"},
		{in: "spiffe://cluster.local/ns/" + strings.Repeat("a", 2048) + "/sa/b", wantErr: "longer than 2048"},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			got, err := Parse(tc.in)
			if tc.wantErr != "" {
				if err == nil {
					t.Fatalf("Parse(%q) = %v, want error containing %q", tc.in, got, tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Parse(%q) error %q, want it to contain %q", tc.in, err, tc.wantErr)
				}
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("Parse(%q) error %q does not wrap ErrInvalid", tc.in, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tc.in, err)
			}
			if got != tc.want {
				t.Fatalf("Parse(%q) = %+v, want %+v", tc.in, got, tc.want)
			}
			if got.String() != tc.in {
				t.Fatalf("String() = %q, want %q", got.String(), tc.in)
			}
			if u := got.URL().String(); u != tc.in {
				t.Fatalf("URL() = %q, want %q", u, tc.in)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	cases := []struct {
		id ID
		ok bool
	}{
		{ID{"cluster.local", "default", "sleep"}, true},
		{ID{}, false},
		{ID{"cluster.local", "default", ""}, false},
		{ID{"cluster.local", "a/sa/b", "c"}, false},
		{ID{"cluster.local/ns/a", "b", "c"}, false},
	}
	for _, tc := range cases {
		if err := tc.id.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v.Validate() = %v, want ok=%v", tc.id, err, tc.ok)
		}
	}
}

func TestFromCertificate(t *testing.T) {
	u := func(s string) *url.URL {
		v, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	good := "spiffe://cluster.local/ns/default/sa/sleep"
	cases := []struct {
		name    string
		uris    []*url.URL
		wantErr string
	}{
		{name: "one SPIFFE URI", uris: []*url.URL{u(good)}},
		{name: "no URI SAN", wantErr: "has no URI SAN"},
		{name: "two URI SANs", uris: []*url.URL{u(good), u("spiffe://cluster.local/ns/default/sa/other")}, wantErr: "has 2 URI SANs"},
		{name: "not SPIFFE", uris: []*url.URL{u("https://example.com/")}, wantErr: "must start with"},
		{name: "escaped path", uris: []*url.URL{u("spiffe://cluster.local/ns/a%2Fb/sa/c")}, wantErr: "percent-encoded"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cert := &x509.Certificate{SerialNumber: big.NewInt(42), URIs: tc.uris, DNSNames: []string{"ignored.example"}}
			id, err := FromCertificate(cert)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("FromCertificate = %v, %v; want error containing %q", id, err, tc.wantErr)
				}
				return
			}
			if err != nil || id.String() != good {
				t.Fatalf("FromCertificate = %v, %v; want %s", id, err, good)
			}
		})
	}
	if _, err := FromCertificate(nil); err == nil {
		t.Fatal("FromCertificate(nil) succeeded")
	}
	if _, err := FromRawChain(nil); err == nil {
		t.Fatal("FromRawChain(nil) succeeded")
	}
	if _, err := FromRawChain([][]byte{[]byte("garbage")}); err == nil || !strings.Contains(err.Error(), "parse peer certificate") {
		t.Fatalf("FromRawChain(garbage) = %v", err)
	}
}

func TestTextRoundTrip(t *testing.T) {
	type doc struct {
		ID    ID `json:"id"`
		Empty ID `json:"empty"`
	}
	in := doc{ID: ID{"cluster.local", "default", "sleep"}}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"id":"spiffe://cluster.local/ns/default/sa/sleep","empty":""}`; string(b) != want {
		t.Fatalf("json = %s, want %s", b, want)
	}
	var out doc
	if err := json.Unmarshal(b, &out); err != nil || out != in {
		t.Fatalf("round trip = %+v, %v", out, err)
	}
	if err := json.Unmarshal([]byte(`{"id":"spiffe://x/ns/a"}`), &out); err == nil {
		t.Fatal("bad ID unmarshalled without error")
	}
}
