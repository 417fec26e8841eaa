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
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Server is the agent side of zds: it remembers which pods are enrolled and keeps the
// connected ztunnel in step with that, one acknowledged message at a time.
//
// Record the pods that already exist (Add or Keep) before calling Serve: the snapshot
// tells ztunnel that any pod it does not name is gone.
//
// Only the newest ztunnel connection receives updates. During a ztunnel rolling
// restart the new instance connects while the old one still serves traffic: the new
// one gets the snapshot and every later change; the old one is sent nothing after what
// was already queued for it, but its connection stays open until it hangs up. Sending
// to both would have two ztunnels chase the same pods, and closing the old connection
// would make the old ztunnel drop its pods before it has drained them.
//
// The zero Server is ready to use; its methods may be called from any goroutine.
type Server struct {
	// Logger receives connections, disconnections and rejected messages. Nil means
	// slog.Default().
	Logger *slog.Logger
	// AckTimeout bounds how long ztunnel may take to acknowledge one message, and to
	// send hello after connecting. A ztunnel that takes longer is disconnected, so a
	// hung ztunnel never holds up the agent for longer than this. Zero means 5s.
	AckTimeout time.Duration
	// QueueLen bounds how many updates may wait for one ztunnel connection. A
	// connection that falls further behind is disconnected. Zero means 256.
	QueueLen int

	mu     sync.Mutex
	pods   map[string]pod // by UID
	active *serverConn    // newest connection that said hello; nil if none
	connID atomic.Uint64
}

// pod is what the agent has recorded for one UID.
type pod struct {
	w         Workload
	netnsPath string // empty for keep: the agent could not reopen the netns
}

const (
	defaultAckTimeout = 5 * time.Second
	defaultQueueLen   = 256
)

var (
	errPeerClosed    = errors.New("ztunnel closed the connection")
	errServerStopped = errors.New("zds server stopped")
)

// Listen removes a stale socket left at path by an earlier agent and listens there.
// It refuses to remove anything that is not a socket.
func Listen(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create zds socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("zds socket path %s exists and is not a socket; remove it or choose another path", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale zds socket: %w", err)
		}
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("listen for ztunnel on %s: %w", path, err)
	}
	return ln, nil
}

// Serve accepts ztunnel connections on ln until ctx is done, then closes ln and every
// connection and returns nil. It returns an error only if accepting fails for good.
func (s *Server) Serve(ctx context.Context, ln *net.UnixListener) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer closeOnCancel(ctx, func() { ln.Close() })()
	defer cancel()

	var backoff time.Duration
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("accept ztunnel connection: %w", err)
			}
			// Out of fds and the like: wait for it to pass, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.logger().Warn("accepting ztunnel connection failed; retrying", "error", err, "retryIn", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		backoff = 0
		wg.Go(func() { s.serveConn(ctx, c) })
	}
}

// Add records uid as enrolled with its netns and sends add to the connected ztunnel.
// It returns once ztunnel has acknowledged: nil if ztunnel applied it, ztunnel's error
// if it did not, or an error if the connection was lost first. With no ztunnel
// connected it returns nil: ztunnel receives the pod in its snapshot when it connects.
// If ztunnel stops answering, Add returns within AckTimeout of its last answer.
// A repeated Add for a UID replaces the pod (its sandbox was recreated).
func (s *Server) Add(uid string, w Workload, netnsPath string) error {
	if uid == "" {
		return errors.New("zds add: empty pod uid")
	}
	w = w.clone()
	m := Message{Type: TypeAdd, UID: uid, Workload: &w}
	if _, err := encode(&m); err != nil {
		return err
	}
	netns, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("open netns of pod %s for ztunnel: %w", uid, err)
	}
	s.mu.Lock()
	s.recordLocked(uid, pod{w: w, netnsPath: netnsPath})
	u := s.publishLocked(m, netns)
	s.mu.Unlock()
	return u.wait()
}

// Keep records uid as enrolled without a netns: the agent restarted, still has the pod
// enrolled, but could not reopen its netns. Snapshots then carry keep, telling ztunnel
// to go on serving the pod with what it has. Keep sends nothing to a ztunnel that is
// already connected, since keep only means something inside a snapshot.
func (s *Server) Keep(uid string, w Workload) {
	if uid == "" {
		return
	}
	s.mu.Lock()
	s.recordLocked(uid, pod{w: w.clone()})
	s.mu.Unlock()
}

// Delete forgets uid and tells the connected ztunnel to stop serving it, returning like
// Add. Deleting a UID that was never recorded does nothing.
func (s *Server) Delete(uid string) error {
	s.mu.Lock()
	_, known := s.pods[uid]
	delete(s.pods, uid)
	var u *update
	if known {
		u = s.publishLocked(Message{Type: TypeDelete, UID: uid}, nil)
	}
	s.mu.Unlock()
	return u.wait()
}

// Connected reports whether a ztunnel is connected and receiving updates.
func (s *Server) Connected() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.liveLocked() != nil
}

func (s *Server) recordLocked(uid string, p pod) {
	if s.pods == nil {
		s.pods = make(map[string]pod)
	}
	s.pods[uid] = p
}

// liveLocked returns the connection updates go to, or nil.
func (s *Server) liveLocked() *serverConn {
	if s.active == nil || s.active.isClosed() {
		return nil
	}
	return s.active
}

// publishLocked queues m for the live connection, taking ownership of netns. It returns
// nil when no ztunnel is connected. Queueing under s.mu, in the same critical section
// as the change to s.pods, keeps every connection's view consistent: a change is
// either in its snapshot or queued after it, never both or neither.
func (s *Server) publishLocked(m Message, netns *os.File) *update {
	sc := s.liveLocked()
	if sc == nil {
		if netns != nil {
			netns.Close()
		}
		return nil
	}
	u := &update{msg: m, netns: netns, done: make(chan error, 1)}
	sc.enqueue(u)
	return u
}

// snapshotLocked lists the recorded pods in UID order, so snapshots are reproducible.
func (s *Server) snapshotLocked() []snapshotEntry {
	entries := make([]snapshotEntry, 0, len(s.pods))
	for uid, p := range s.pods {
		entries = append(entries, snapshotEntry{uid: uid, pod: p})
	}
	slices.SortFunc(entries, func(a, b snapshotEntry) int { return strings.Compare(a.uid, b.uid) })
	return entries
}

type snapshotEntry struct {
	uid string
	pod
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

func (s *Server) ackTimeout() time.Duration {
	if s.AckTimeout > 0 {
		return s.AckTimeout
	}
	return defaultAckTimeout
}

func (s *Server) queueLen() int {
	if s.QueueLen > 0 {
		return s.QueueLen
	}
	return defaultQueueLen
}

// serveConn runs one ztunnel connection from hello to close.
func (s *Server) serveConn(ctx context.Context, c *net.UnixConn) {
	sc := &serverConn{
		c:       c,
		log:     s.logger().With("ztunnelConn", s.connID.Add(1), "ztunnelPID", peerPID(c)),
		timeout: s.ackTimeout(),
		queue:   make(chan *update, s.queueLen()),
		acks:    make(chan Message, 1),
		closed:  make(chan struct{}),
	}
	defer closeOnCancel(ctx, func() { sc.close(errServerStopped) })()
	r := newPacketReader(c)

	if err := sc.readHello(r); err != nil {
		sc.close(err)
		sc.log.Warn("rejected ztunnel connection", "error", err)
		return
	}

	s.mu.Lock()
	old := s.liveLocked()
	s.active = sc
	snapshot := s.snapshotLocked()
	s.mu.Unlock()
	sc.log.Info("ztunnel connected; sending snapshot", "pods", len(snapshot))
	if old != nil {
		old.log.Info("a newer ztunnel connection took over; this one gets no further updates")
	}

	var wg sync.WaitGroup
	wg.Go(func() { sc.sendToZtunnel(snapshot) })
	sc.readAcks(r)
	wg.Wait()

	switch reason := sc.reason(); {
	case errors.Is(reason, errPeerClosed), errors.Is(reason, errServerStopped):
		sc.log.Info("ztunnel connection closed", "reason", reason)
	default:
		sc.log.Warn("disconnected ztunnel", "reason", reason)
	}
}

// peerPID is for logs only; 0 if the kernel would not say.
func peerPID(c *net.UnixConn) int32 {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	var cred *unix.Ucred
	_ = rc.Control(func(fd uintptr) {
		cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if cred == nil {
		return 0
	}
	return cred.Pid
}

// serverConn is one ztunnel connection. One goroutine writes (sendToZtunnel), one
// reads (readAcks); they meet on acks.
type serverConn struct {
	c       *net.UnixConn
	log     *slog.Logger
	timeout time.Duration
	queue   chan *update
	acks    chan Message
	// awaiting is set while a message is out without its ack, so readAcks can tell
	// an answer from an ack for nothing.
	awaiting atomic.Bool

	mu     sync.Mutex
	err    error         // why the connection closed; set once
	closed chan struct{} // closed with err set
}

// update is one change queued for a connection. Whoever takes it off the queue calls
// finish exactly once.
type update struct {
	msg   Message
	netns *os.File // add only; owned by the update
	done  chan error
}

func (u *update) finish(err error) {
	if u.netns != nil {
		u.netns.Close()
	}
	u.done <- err
}

// wait returns the update's result; a nil update (nothing was sent) succeeds.
func (u *update) wait() error {
	if u == nil {
		return nil
	}
	return <-u.done
}

// enqueue never blocks: a connection whose queue is full is disconnected instead, so a
// slow ztunnel cannot stall the agent.
func (sc *serverConn) enqueue(u *update) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.err == nil {
		select {
		case sc.queue <- u:
			return
		default:
			sc.closeLocked(fmt.Errorf("ztunnel fell %d updates behind", cap(sc.queue)))
		}
	}
	u.finish(sc.notApplied(&u.msg))
}

func (sc *serverConn) close(err error) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.closeLocked(err)
}

func (sc *serverConn) closeLocked(err error) {
	if sc.err != nil {
		return
	}
	sc.err = err
	close(sc.closed)
	sc.c.Close()
}

func (sc *serverConn) isClosed() bool {
	select {
	case <-sc.closed:
		return true
	default:
		return false
	}
}

// reason is why the connection closed; only valid once closed.
func (sc *serverConn) reason() error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.err
}

// notApplied is what a caller hears when the connection closed before ztunnel
// acknowledged its message. Only valid once closed: err is written before closed is.
func (sc *serverConn) notApplied(m *Message) error {
	return fmt.Errorf("ztunnel did not acknowledge %s: %w (it gets a fresh snapshot when it reconnects)", describe(m), sc.err)
}

func (sc *serverConn) readHello(r *packetReader) error {
	sc.c.SetReadDeadline(time.Now().Add(sc.timeout))
	m, netns, err := r.read()
	if netns != nil {
		netns.Close()
	}
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("no hello within %s of connecting", sc.timeout)
	case err != nil:
		return fmt.Errorf("read hello: %w", err)
	case m.Type != TypeHello:
		return fmt.Errorf("protocol error: first message is %s, want hello", m.Type)
	case m.Version != Version:
		// Say why before hanging up, so ztunnel's log explains the refusal.
		refusal := &Message{Type: TypeAck, Error: fmt.Sprintf(
			"zds version %d is not supported; this agent speaks version %d; upgrade the agent and ztunnel together", m.Version, Version)}
		sc.c.SetWriteDeadline(time.Now().Add(sc.timeout))
		_ = writeMessage(sc.c, refusal, nil)
		return errors.New(refusal.Error)
	}
	return sc.c.SetReadDeadline(time.Time{})
}

// readAcks runs for the life of the connection, handing each ack to the writer. Anything
// else closes the connection: a ztunnel that breaks the protocol is not trusted further.
func (sc *serverConn) readAcks(r *packetReader) {
	for {
		m, netns, err := r.read()
		if netns != nil {
			netns.Close()
		}
		switch {
		case errors.Is(err, io.EOF):
			err = errPeerClosed
		case err != nil:
		case m.Type != TypeAck:
			err = fmt.Errorf("protocol error: ztunnel sent %s, but only ack may follow hello", m.Type)
		case !sc.awaiting.CompareAndSwap(true, false):
			err = errors.New("protocol error: ztunnel sent an ack with no message outstanding")
		}
		if err != nil {
			sc.close(err)
			return
		}
		sc.acks <- m
	}
}

// sendToZtunnel is the connection's only writer: the snapshot, snapshot-done, then
// queued updates in order, each sent only once the previous one was acknowledged.
// Whatever is still queued when the connection closes is failed, not dropped.
func (sc *serverConn) sendToZtunnel(snapshot []snapshotEntry) {
	defer sc.failQueued()
	for _, e := range snapshot {
		if err := sc.sendSnapshotEntry(e); err != nil && sc.isClosed() {
			return
		}
	}
	if err := sc.roundTrip(&Message{Type: TypeSnapshotDone}, nil); err != nil {
		if sc.isClosed() {
			return
		}
		sc.log.Warn("ztunnel reported errors completing the snapshot", "error", err)
	}
	for {
		select {
		case <-sc.closed:
			return
		case u := <-sc.queue:
			u.finish(sc.roundTrip(&u.msg, u.netns))
		}
	}
}

func (sc *serverConn) sendSnapshotEntry(e snapshotEntry) error {
	m := Message{Type: TypeKeep, UID: e.uid, Workload: &e.w}
	var netns *os.File
	if e.netnsPath != "" {
		f, err := os.Open(e.netnsPath)
		if err != nil {
			sc.log.Warn("cannot reopen pod netns for snapshot; sending keep so ztunnel serves the pod with what it has",
				"pod", e.uid, "error", err)
		} else {
			defer f.Close()
			m.Type, netns = TypeAdd, f
		}
	}
	err := sc.roundTrip(&m, netns)
	if err != nil && !sc.isClosed() {
		sc.log.Warn("ztunnel refused a snapshot entry", "error", err)
	}
	return err
}

// roundTrip sends m and waits for its ack. It returns ztunnel's refusal as an error
// and leaves the connection open; on a timeout or I/O error it closes the connection.
func (sc *serverConn) roundTrip(m *Message, netns *os.File) error {
	if sc.isClosed() {
		return sc.notApplied(m)
	}
	b, err := encode(m)
	if err != nil {
		return err
	}
	sc.awaiting.Store(true)
	sc.c.SetWriteDeadline(time.Now().Add(sc.timeout))
	if err := writePacket(sc.c, b, netns); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("ztunnel did not read %s within %s", describe(m), sc.timeout)
		}
		sc.close(err)
		return sc.notApplied(m)
	}
	t := time.NewTimer(sc.timeout)
	defer t.Stop()
	select {
	case ack := <-sc.acks:
		if ack.Error != "" {
			return fmt.Errorf("ztunnel could not apply %s: %s", describe(m), ack.Error)
		}
		return nil
	case <-t.C:
		sc.close(fmt.Errorf("ztunnel did not acknowledge %s within %s", describe(m), sc.timeout))
		return sc.notApplied(m)
	case <-sc.closed:
		return sc.notApplied(m)
	}
}

// failQueued fails what is left in the queue once the connection has closed. enqueue
// refuses new updates after close, so nothing can arrive after this drains.
func (sc *serverConn) failQueued() {
	for {
		select {
		case u := <-sc.queue:
			u.finish(sc.notApplied(&u.msg))
		default:
			return
		}
	}
}
