//go:build linux

package zds

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// waitFor bounds every wait in these tests; generous for -race on a busy machine.
const waitFor = 5 * time.Second

const selfNetns = "/proc/self/ns/net"

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// serve runs s on a fresh socket until the test ends, or until the returned stop is
// called; stop waits for Serve to return.
func serve(t *testing.T, s *Server, path string) (stop func()) {
	t.Helper()
	if s.Logger == nil {
		s.Logger = testLogger(t).With("side", "agent")
	}
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Serve = %v", err)
				}
			case <-time.After(waitFor):
				t.Errorf("Serve did not return after cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func socketPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "ztunnel.sock")
}

// event is one handler call, as the test sees it.
type event struct {
	op    string // add, keep, delete, snapshot-done
	uid   string
	w     Workload
	netns unix.Stat_t // add only: what the received fd refers to
}

// recorder is a Handler that reports each call on events and can be told to fail.
type recorder struct {
	events chan event
	mu     sync.Mutex
	fail   map[string]error // by uid
}

func newRecorder() *recorder {
	return &recorder{events: make(chan event, 100), fail: make(map[string]error)}
}

func (r *recorder) failFor(uid string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fail[uid] = err
}

func (r *recorder) result(uid string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fail[uid]
}

func (r *recorder) Add(uid string, w Workload, netns *os.File) error {
	defer netns.Close()
	e := event{op: TypeAdd, uid: uid, w: w}
	if err := unix.Fstat(int(netns.Fd()), &e.netns); err != nil {
		return err
	}
	r.events <- e
	return r.result(uid)
}

func (r *recorder) Keep(uid string, w Workload) error {
	r.events <- event{op: TypeKeep, uid: uid, w: w}
	return r.result(uid)
}

func (r *recorder) Delete(uid string) error {
	r.events <- event{op: TypeDelete, uid: uid}
	return r.result(uid)
}

func (r *recorder) SnapshotDone() error {
	r.events <- event{op: TypeSnapshotDone}
	return nil
}

// next returns the next handler call, failing the test if none comes.
func (r *recorder) next(t *testing.T) event {
	t.Helper()
	select {
	case e := <-r.events:
		return e
	case <-time.After(waitFor):
		t.Fatal("handler was not called")
		return event{}
	}
}

// expect checks the next calls are exactly ops, e.g. "add p1", "snapshot-done".
func (r *recorder) expect(t *testing.T, ops ...string) []event {
	t.Helper()
	var got []event
	for _, want := range ops {
		e := r.next(t)
		got = append(got, e)
		if s := strings.TrimSpace(e.op + " " + e.uid); s != want {
			t.Fatalf("handler call %d = %q, want %q (all wanted: %q)", len(got), s, want, ops)
		}
	}
	return got
}

// expectQuiet checks the handler is not called for a while.
func (r *recorder) expectQuiet(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case e := <-r.events:
		t.Fatalf("unexpected handler call %s %s", e.op, e.uid)
	case <-time.After(d):
	}
}

// runClient runs a Client against path until the test ends or stop is called.
func runClient(t *testing.T, path string, h Handler, name string) (stop func()) {
	t.Helper()
	c := &Client{Path: path, Logger: testLogger(t).With("side", name)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx, h) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run = %v", err)
				}
			case <-time.After(waitFor):
				t.Errorf("Run did not return after cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// statNetns is what a received netns fd must match.
func statNetns(t *testing.T) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(selfNetns, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func sameFile(a, b unix.Stat_t) bool { return a.Dev == b.Dev && a.Ino == b.Ino }

// rawConn speaks zds by hand, to play a misbehaving ztunnel or agent.
type rawConn struct {
	t *testing.T
	c *net.UnixConn
	r *packetReader
}

func dialRaw(t *testing.T, path string) *rawConn {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{t: t, c: c, r: newPacketReader(c)}
}

func (rc *rawConn) send(m Message, netns *os.File) {
	rc.t.Helper()
	if err := writeMessage(rc.c, &m, netns); err != nil {
		rc.t.Fatal(err)
	}
}

func (rc *rawConn) sendRaw(b []byte, fds ...int) {
	rc.t.Helper()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := rc.c.WriteMsgUnix(b, oob, nil); err != nil {
		rc.t.Fatal(err)
	}
}

// recv reads the next message, closing any fd it carries.
func (rc *rawConn) recv() (Message, error) {
	rc.t.Helper()
	rc.c.SetReadDeadline(time.Now().Add(waitFor))
	m, netns, err := rc.r.read()
	if netns != nil {
		netns.Close()
	}
	return m, err
}

func (rc *rawConn) mustRecv(typ string) Message {
	rc.t.Helper()
	m, err := rc.recv()
	if err != nil {
		rc.t.Fatalf("read %s: %v", typ, err)
	}
	if m.Type != typ {
		rc.t.Fatalf("got %s, want %s", describe(&m), typ)
	}
	return m
}

// expectClosed checks the peer hung up.
func (rc *rawConn) expectClosed() {
	rc.t.Helper()
	for {
		m, err := rc.recv()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			rc.t.Fatalf("read: %v, want EOF", err)
		}
		rc.t.Logf("draining %s before EOF", describe(&m))
	}
}

// openFDs lists this process's open fds and what they point to.
func openFDs(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var fds []string
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		fds = append(fds, e.Name()+" -> "+target)
	}
	sort.Strings(fds)
	return fds
}
