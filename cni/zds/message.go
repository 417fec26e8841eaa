package zds

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
)

// Version is the protocol version this package speaks; ztunnel sends it in hello.
const Version = 1

// DefaultSocket is where the agent serves zds unless told otherwise.
const DefaultSocket = "/var/run/sluice/ztunnel.sock"

// MaxMessageSize bounds one packet's JSON. It is far above any real pod (labels are the
// only unbounded part) and well below the kernel's default unix socket buffer, so a
// message that fits here is never refused by the kernel.
const MaxMessageSize = 64 << 10

// Message types. The direction is fixed: hello and ack go from ztunnel to the agent,
// everything else from the agent to ztunnel (ack also, once, to refuse a hello).
const (
	TypeHello        = "hello"
	TypeAdd          = "add"
	TypeKeep         = "keep"
	TypeDelete       = "delete"
	TypeSnapshotDone = "snapshot-done"
	TypeAck          = "ack"
)

// Message is one packet on the socket.
type Message struct {
	Type     string    `json:"type"`
	Version  int       `json:"version,omitempty"`  // on hello
	UID      string    `json:"uid,omitempty"`      // pod UID, on add, keep and delete
	Workload *Workload `json:"workload,omitempty"` // on add and keep
	Error    string    `json:"error,omitempty"`    // on ack: empty means applied
}

// Workload is what ztunnel needs to know about a pod to serve it.
type Workload struct {
	Name           string            `json:"name"`
	Namespace      string            `json:"namespace"`
	ServiceAccount string            `json:"serviceAccount,omitempty"`
	Node           string            `json:"node,omitempty"`
	IPs            []string          `json:"ips,omitempty"`
	Labels         map[string]string `json:"labels,omitempty"`
}

// clone returns a copy that shares nothing with w, so a caller may reuse its maps.
func (w Workload) clone() Workload {
	w.IPs = slices.Clone(w.IPs)
	w.Labels = maps.Clone(w.Labels)
	return w
}

// describe names a message in logs and errors: "add of pod 1234" or "snapshot-done".
func describe(m *Message) string {
	if m.UID == "" {
		return m.Type
	}
	return m.Type + " of pod " + m.UID
}

// errMalformed marks a packet that was read whole but cannot be accepted. The
// connection itself is fine; what to do about the packet is the reader's choice.
var errMalformed = errors.New("malformed zds message")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errMalformed, fmt.Sprintf(format, args...))
}

// encode marshals m and refuses what the peer would refuse.
func encode(m *Message) ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode zds %s: %w", m.Type, err)
	}
	if len(b) > MaxMessageSize {
		return nil, fmt.Errorf("zds %s for pod %s is %d bytes, over the %d byte limit; does the pod carry unusually many labels?",
			m.Type, m.UID, len(b), MaxMessageSize)
	}
	return b, nil
}

// decode parses one packet carrying nfds file descriptors and checks that the fds are
// the ones its type calls for.
func decode(b []byte, nfds int) (Message, error) {
	var m Message
	if err := json.Unmarshal(b, &m); err != nil {
		return Message{}, malformed("not JSON: %v", err)
	}
	if err := check(&m, nfds); err != nil {
		return Message{}, err
	}
	return m, nil
}

// check enforces the per-type rules of doc.go on a received message.
func check(m *Message, nfds int) error {
	wantFDs := 0
	switch m.Type {
	case TypeHello:
		if m.Version == 0 {
			return malformed("hello without version")
		}
	case TypeAdd, TypeKeep:
		if m.UID == "" {
			return malformed("%s without uid", m.Type)
		}
		if m.Workload == nil {
			return malformed("%s for pod %s without workload", m.Type, m.UID)
		}
		if m.Type == TypeAdd {
			wantFDs = 1
		}
	case TypeDelete:
		if m.UID == "" {
			return malformed("delete without uid")
		}
	case TypeSnapshotDone, TypeAck:
	case "":
		return malformed("no type")
	default:
		return malformed("unknown type %q", m.Type)
	}
	if nfds != wantFDs {
		return malformed("%s carries %d file descriptors, want %d", m.Type, nfds, wantFDs)
	}
	return nil
}
