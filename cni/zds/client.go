//go:build linux

package zds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"time"
)

// Handler is ztunnel's side of zds: it applies what the agent sends. Client calls it
// from one goroutine, in message order, and sends back the error it returns (nil meaning
// applied) as the message's ack.
type Handler interface {
	// Add starts serving the pod inside netns, replacing what the handler had for uid.
	// The handler owns netns and must close it, whether or not it returns an error.
	Add(uid string, w Workload, netns *os.File) error
	// Keep tells the handler that the pod is still enrolled but the agent has no netns
	// to hand over: go on serving it with what it already has.
	Keep(uid string, w Workload) error
	// Delete stops serving the pod and closes the handler's listeners in its netns.
	// Deleting a UID the handler does not serve should succeed.
	Delete(uid string) error
	// SnapshotDone ends a snapshot. Client has by then called Delete for every pod the
	// handler got on an earlier connection and the new snapshot left out, so the
	// handler serves exactly the agent's pods.
	SnapshotDone() error
}

// Client is the ztunnel side of zds. It keeps a connection to the node agent, feeds
// what arrives to a Handler, and acknowledges each message with the handler's answer.
type Client struct {
	// Path is the agent's socket. Empty means DefaultSocket.
	Path string
	// Logger receives connections and disconnections. Nil means slog.Default().
	Logger *slog.Logger
}

const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// Run connects to the agent and applies its messages to h until ctx is done, then
// returns nil. When the connection fails or drops it reconnects, backing off up to 5s
// between attempts, and the new connection starts with a fresh snapshot.
func (c *Client) Run(ctx context.Context, h Handler) error {
	if h == nil {
		return errors.New("zds client: nil handler")
	}
	// held outlives connections: it is what the handler serves, and what a snapshot
	// is compared with to find pods that went away while ztunnel was disconnected.
	held := make(map[string]struct{})
	backoff := minBackoff
	for {
		synced, err := c.session(ctx, h, held)
		if ctx.Err() != nil {
			return nil
		}
		if synced {
			backoff = minBackoff
		}
		c.logger().Warn("no zds connection to node agent; retrying", "path", c.path(), "error", err, "retryIn", backoff)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return nil
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

func (c *Client) path() string {
	if c.Path != "" {
		return c.Path
	}
	return DefaultSocket
}

func (c *Client) logger() *slog.Logger {
	if c.Logger != nil {
		return c.Logger
	}
	return slog.Default()
}

// session runs one connection. synced reports whether it got as far as snapshot-done,
// which is when the connection counts as healthy for backoff.
func (c *Client) session(ctx context.Context, h Handler, held map[string]struct{}) (synced bool, err error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unixpacket", c.path())
	if err != nil {
		return false, fmt.Errorf("connect to node agent: %w; is the sluice agent running on this node?", err)
	}
	conn := nc.(*net.UnixConn)
	defer conn.Close()
	defer closeOnCancel(ctx, func() { conn.Close() })()

	if err := writeMessage(conn, &Message{Type: TypeHello, Version: Version}, nil); err != nil {
		return false, fmt.Errorf("send hello: %w", err)
	}
	c.logger().Info("connected to node agent; waiting for snapshot", "path", c.path())

	s := &clientSession{h: h, held: held, seen: make(map[string]struct{})}
	r := newPacketReader(conn)
	for {
		m, netns, err := r.read()
		var result error
		switch {
		case errors.Is(err, errMalformed):
			// Refuse the packet, keep the connection: the agent sees why in the ack.
			result = err
		case errors.Is(err, io.EOF):
			return s.seen == nil, errors.New("node agent closed the connection")
		case err != nil:
			return s.seen == nil, err
		case m.Type == TypeAck:
			// The only ack an agent sends refuses our hello.
			return false, fmt.Errorf("node agent refused the connection: %s", m.Error)
		default:
			result = s.apply(&m, netns)
		}
		ack := &Message{Type: TypeAck}
		if result != nil {
			ack.Error = result.Error()
		}
		if err := writeMessage(conn, ack, nil); err != nil {
			return s.seen == nil, fmt.Errorf("send ack: %w", err)
		}
	}
}

// clientSession is the state of one connection.
type clientSession struct {
	h    Handler
	held map[string]struct{}
	seen map[string]struct{} // pods named by this connection's snapshot; nil after it
}

// apply hands one message to the handler. netns is set only for add, and passes to
// the handler.
func (s *clientSession) apply(m *Message, netns *os.File) error {
	switch m.Type {
	case TypeAdd:
		s.hold(m.UID)
		return s.h.Add(m.UID, *m.Workload, netns)
	case TypeKeep:
		s.hold(m.UID)
		return s.h.Keep(m.UID, *m.Workload)
	case TypeDelete:
		delete(s.held, m.UID)
		return s.h.Delete(m.UID)
	case TypeSnapshotDone:
		if s.seen == nil {
			return errors.New("snapshot-done outside a snapshot")
		}
		err := s.dropStale()
		s.seen = nil
		return errors.Join(err, s.h.SnapshotDone())
	default:
		return fmt.Errorf("ztunnel does not accept %s from the agent", m.Type)
	}
}

// hold notes uid as given to the handler. Counted even if the handler fails it, so a
// later snapshot without it still clears whatever the handler kept.
func (s *clientSession) hold(uid string) {
	s.held[uid] = struct{}{}
	if s.seen != nil {
		s.seen[uid] = struct{}{}
	}
}

// dropStale deletes the pods the handler holds from before this connection that the
// snapshot did not name: the agent removed them while ztunnel was not listening.
func (s *clientSession) dropStale() error {
	var stale []string
	for uid := range s.held {
		if _, ok := s.seen[uid]; !ok {
			stale = append(stale, uid)
		}
	}
	slices.Sort(stale)
	var errs []error
	for _, uid := range stale {
		delete(s.held, uid)
		if err := s.h.Delete(uid); err != nil {
			errs = append(errs, fmt.Errorf("delete pod %s, gone from the snapshot: %w", uid, err))
		}
	}
	return errors.Join(errs...)
}
