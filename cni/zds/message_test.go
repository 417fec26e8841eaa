package zds

import (
	"errors"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	w := &Workload{Name: "web-0", Namespace: "shop"}
	tests := []struct {
		name string
		m    Message
		fds  int
		want string // substring of the error; empty means valid
	}{
		{"hello", Message{Type: TypeHello, Version: 1}, 0, ""},
		{"hello without version", Message{Type: TypeHello}, 0, "hello without version"},
		{"add", Message{Type: TypeAdd, UID: "u1", Workload: w}, 1, ""},
		{"add without fd", Message{Type: TypeAdd, UID: "u1", Workload: w}, 0, "add carries 0 file descriptors, want 1"},
		{"add with two fds", Message{Type: TypeAdd, UID: "u1", Workload: w}, 2, "add carries 2 file descriptors, want 1"},
		{"add without uid", Message{Type: TypeAdd, Workload: w}, 1, "add without uid"},
		{"add without workload", Message{Type: TypeAdd, UID: "u1"}, 1, "add for pod u1 without workload"},
		{"keep", Message{Type: TypeKeep, UID: "u1", Workload: w}, 0, ""},
		{"keep with fd", Message{Type: TypeKeep, UID: "u1", Workload: w}, 1, "keep carries 1 file descriptors, want 0"},
		{"keep without workload", Message{Type: TypeKeep, UID: "u1"}, 0, "without workload"},
		{"delete", Message{Type: TypeDelete, UID: "u1"}, 0, ""},
		{"delete without uid", Message{Type: TypeDelete}, 0, "delete without uid"},
		{"delete with fd", Message{Type: TypeDelete, UID: "u1"}, 1, "delete carries 1 file descriptors"},
		{"snapshot-done", Message{Type: TypeSnapshotDone}, 0, ""},
		{"ack", Message{Type: TypeAck, Error: "no"}, 0, ""},
		{"ack with fd", Message{Type: TypeAck}, 1, "ack carries 1 file descriptors"},
		{"no type", Message{UID: "u1"}, 0, "no type"},
		{"unknown type", Message{Type: "update"}, 0, `unknown type "update"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := check(&tt.m, tt.fds)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("check = %v, want valid", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("check = %v, want error containing %q", err, tt.want)
			case err != nil && !errors.Is(err, errMalformed):
				t.Fatalf("check = %v, want it to wrap errMalformed", err)
			}
		})
	}
}

func TestDecodeRejectsNonJSON(t *testing.T) {
	for _, b := range []string{"", "add", `{"type":`, `["ack"]`} {
		if _, err := decode([]byte(b), 0); !errors.Is(err, errMalformed) {
			t.Errorf("decode(%q) = %v, want malformed", b, err)
		}
	}
}

func TestEncodeRefusesOversized(t *testing.T) {
	labels := map[string]string{"big": strings.Repeat("x", MaxMessageSize)}
	m := Message{Type: TypeAdd, UID: "u1", Workload: &Workload{Name: "a", Namespace: "b", Labels: labels}}
	_, err := encode(&m)
	if err == nil || !strings.Contains(err.Error(), "over the 65536 byte limit") {
		t.Fatalf("encode = %v, want size error", err)
	}
}

func TestWireFormat(t *testing.T) {
	m := Message{Type: TypeAdd, UID: "u1", Workload: &Workload{
		Name: "web-0", Namespace: "shop", ServiceAccount: "web", Node: "n1",
		IPs: []string{"10.0.0.5"}, Labels: map[string]string{"app": "web"},
	}}
	b, err := encode(&m)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"type":"add","uid":"u1","workload":{"name":"web-0","namespace":"shop","serviceAccount":"web","node":"n1","ips":["10.0.0.5"],"labels":{"app":"web"}}}`
	if string(b) != want {
		t.Fatalf("encoded\n%s\nwant\n%s", b, want)
	}
}
