//go:build linux

package zds

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func web(name string) Workload {
	return Workload{
		Name: name, Namespace: "shop", ServiceAccount: "web", Node: "node-1",
		IPs: []string{"10.0.0.5"}, Labels: map[string]string{"app": "web"},
	}
}

func TestSnapshotThenDeltas(t *testing.T) {
	s := &Server{}
	// Recorded before any ztunnel connects: these go out in the snapshot.
	for _, uid := range []string{"p2", "p1"} {
		if err := s.Add(uid, web(uid), selfNetns); err != nil {
			t.Fatalf("Add(%s) with no ztunnel = %v, want nil", uid, err)
		}
	}
	s.Keep("p3", web("p3"))
	path := socketPath(t)
	serve(t, s, path)
	h := newRecorder()
	runClient(t, path, h, "ztunnel")

	got := h.expect(t, "add p1", "add p2", "keep p3", "snapshot-done")
	want := statNetns(t)
	for _, e := range got[:2] {
		if !sameFile(e.netns, want) {
			t.Errorf("%s got fd for dev %d ino %d, want the netns at %s (dev %d ino %d)",
				e.uid, e.netns.Dev, e.netns.Ino, selfNetns, want.Dev, want.Ino)
		}
	}
	if w := got[0].w; w.Name != "p1" || w.Namespace != "shop" || w.ServiceAccount != "web" || w.Node != "node-1" ||
		!slices.Equal(w.IPs, []string{"10.0.0.5"}) || w.Labels["app"] != "web" {
		t.Errorf("workload arrived as %+v", w)
	}
	if !s.Connected() {
		t.Error("Connected() = false after snapshot")
	}

	if err := s.Add("p4", web("p4"), selfNetns); err != nil {
		t.Fatalf("Add(p4) = %v", err)
	}
	if err := s.Delete("p1"); err != nil {
		t.Fatalf("Delete(p1) = %v", err)
	}
	h.expect(t, "add p4", "delete p1")
}

func TestAckErrorReturnedByAdd(t *testing.T) {
	s := &Server{}
	path := socketPath(t)
	serve(t, s, path)
	h := newRecorder()
	h.failFor("bad", errors.New("no address of the pod found in its netns"))
	runClient(t, path, h, "ztunnel")
	h.expect(t, "snapshot-done")

	err := s.Add("bad", web("bad"), selfNetns)
	if err == nil || !strings.Contains(err.Error(), "no address of the pod found in its netns") {
		t.Fatalf("Add(bad) = %v, want ztunnel's error", err)
	}
	h.expect(t, "add bad")

	// A refusal is about one pod; the connection carries on.
	if err := s.Add("good", web("good"), selfNetns); err != nil {
		t.Fatalf("Add(good) after a refusal = %v", err)
	}
	h.expect(t, "add good")

	h.failFor("good", errors.New("listeners busy"))
	if err := s.Delete("good"); err == nil || !strings.Contains(err.Error(), "listeners busy") {
		t.Fatalf("Delete(good) = %v, want ztunnel's error", err)
	}
}

func TestAddFailsForMissingNetns(t *testing.T) {
	s := &Server{}
	err := s.Add("p1", web("p1"), filepath.Join(t.TempDir(), "gone"))
	if err == nil || !strings.Contains(err.Error(), "open netns of pod p1") {
		t.Fatalf("Add = %v, want open error", err)
	}
	if err := s.Add("", web("p1"), selfNetns); err == nil {
		t.Fatal("Add with empty uid succeeded")
	}
}

// A ztunnel that reconnects, here to an agent that restarted with a changed pod set,
// ends up with exactly the agent's pods.
func TestReconnectGetsFreshSnapshot(t *testing.T) {
	path := socketPath(t)
	first := &Server{}
	first.Add("a", web("a"), selfNetns)
	first.Add("b", web("b"), selfNetns)
	stopFirst := serve(t, first, path)
	h := newRecorder()
	runClient(t, path, h, "ztunnel")
	h.expect(t, "add a", "add b", "snapshot-done")

	stopFirst()
	second := &Server{}
	second.Add("b", web("b"), selfNetns)
	second.Keep("c", web("c"))
	serve(t, second, path)
	// a went away while ztunnel was not connected: the client deletes it before
	// telling the handler the snapshot is done.
	h.expect(t, "add b", "keep c", "delete a", "snapshot-done")

	if err := second.Add("d", web("d"), selfNetns); err != nil {
		t.Fatalf("Add(d) after reconnect = %v", err)
	}
	h.expect(t, "add d")
}

func TestDelete(t *testing.T) {
	s := &Server{}
	s.Add("a", web("a"), selfNetns)
	s.Add("b", web("b"), selfNetns)
	path := socketPath(t)
	serve(t, s, path)
	h := newRecorder()
	stop := runClient(t, path, h, "ztunnel")
	h.expect(t, "add a", "add b", "snapshot-done")

	if err := s.Delete("a"); err != nil {
		t.Fatalf("Delete(a) = %v", err)
	}
	h.expect(t, "delete a")
	if err := s.Delete("a"); err != nil {
		t.Fatalf("second Delete(a) = %v", err)
	}
	if err := s.Delete("never-added"); err != nil {
		t.Fatalf("Delete(never-added) = %v", err)
	}
	h.expectQuiet(t, 100*time.Millisecond)

	// Deleted while no ztunnel is connected: the next snapshot leaves it out.
	stop()
	waitUntil(t, "server notices the disconnect", func() bool { return !s.Connected() })
	if err := s.Delete("b"); err != nil {
		t.Fatalf("Delete(b) with no ztunnel = %v", err)
	}
	h2 := newRecorder()
	runClient(t, path, h2, "ztunnel-2")
	h2.expect(t, "snapshot-done")
}

func TestKeep(t *testing.T) {
	// The agent restarted: one pod's netns could not be reopened (Keep), another's
	// was reopened at Add time but is gone by the time ztunnel connects.
	netns := filepath.Join(t.TempDir(), "netns")
	if err := os.WriteFile(netns, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s := &Server{}
	s.Keep("kept", web("kept"))
	if err := s.Add("vanished", web("vanished"), netns); err != nil {
		t.Fatal(err)
	}
	os.Remove(netns)
	path := socketPath(t)
	serve(t, s, path)
	h := newRecorder()
	runClient(t, path, h, "ztunnel")
	got := h.expect(t, "keep kept", "keep vanished", "snapshot-done")
	if got[0].w.Name != "kept" || got[0].w.Labels["app"] != "web" {
		t.Errorf("keep carried workload %+v", got[0].w)
	}

	// Keep is only for snapshots: a connected ztunnel is not told.
	s.Keep("late", web("late"))
	h.expectQuiet(t, 100*time.Millisecond)

	// Add then replaces a kept pod with one ztunnel can serve fresh.
	if err := s.Add("kept", web("kept"), selfNetns); err != nil {
		t.Fatal(err)
	}
	h.expect(t, "add kept")
}

func TestNewClientTakesOver(t *testing.T) {
	s := &Server{}
	s.Add("a", web("a"), selfNetns)
	path := socketPath(t)
	serve(t, s, path)
	old := newRecorder()
	runClient(t, path, old, "ztunnel-old")
	old.expect(t, "add a", "snapshot-done")

	neu := newRecorder()
	runClient(t, path, neu, "ztunnel-new")
	neu.expect(t, "add a", "snapshot-done")

	if err := s.Add("b", web("b"), selfNetns); err != nil {
		t.Fatalf("Add(b) = %v", err)
	}
	if err := s.Delete("a"); err != nil {
		t.Fatalf("Delete(a) = %v", err)
	}
	neu.expect(t, "add b", "delete a")
	// The old ztunnel stays connected (it would get a fresh snapshot if it had been
	// cut off and reconnected) and hears nothing.
	old.expectQuiet(t, 200*time.Millisecond)
}

func TestHungClientIsDisconnected(t *testing.T) {
	const ackTimeout = 300 * time.Millisecond
	s := &Server{AckTimeout: ackTimeout}
	path := socketPath(t)
	serve(t, s, path)

	hung := dialRaw(t, path)
	hung.send(Message{Type: TypeHello, Version: Version}, nil)
	hung.mustRecv(TypeSnapshotDone)
	hung.send(Message{Type: TypeAck}, nil)
	waitUntil(t, "connected", s.Connected)

	// Several callers at once: the first add goes out and is never acknowledged; the
	// rest wait behind it. None may wait much longer than AckTimeout.
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		uid := string(rune('a' + i))
		wg.Go(func() { errs[i] = s.Add(uid, web(uid), selfNetns) })
	}
	wg.Wait()
	if took := time.Since(start); took > ackTimeout+time.Second {
		t.Errorf("Add calls took %s with AckTimeout %s", took, ackTimeout)
	}
	for i, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "did not acknowledge") {
			t.Errorf("Add %d = %v, want a not-acknowledged error", i, err)
		}
	}
	if s.Connected() {
		t.Error("Connected() = true after the hung ztunnel timed out")
	}
	hung.expectClosed()

	// With the hung ztunnel gone, Add records and returns at once.
	if err := s.Add("d", web("d"), selfNetns); err != nil {
		t.Fatalf("Add with no ztunnel = %v", err)
	}
	// A healthy ztunnel gets everything, including what the hung one never confirmed.
	h := newRecorder()
	runClient(t, path, h, "ztunnel")
	h.expect(t, "add a", "add b", "add c", "add d", "snapshot-done")
}

func TestSlowClientQueueOverflow(t *testing.T) {
	s := &Server{AckTimeout: time.Minute, QueueLen: 1}
	path := socketPath(t)
	serve(t, s, path)
	slow := dialRaw(t, path)
	slow.send(Message{Type: TypeHello, Version: Version}, nil)
	slow.mustRecv(TypeSnapshotDone)
	slow.send(Message{Type: TypeAck}, nil)
	waitUntil(t, "connected", s.Connected)

	results := make(chan error, 2)
	go func() { results <- s.Add("a", web("a"), selfNetns) }()
	slow.mustRecv(TypeAdd) // a is out, unacknowledged
	go func() { results <- s.Add("b", web("b"), selfNetns) }()
	waitUntil(t, "b is queued", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.active.queue) == 1
	})

	// The queue is full: rather than wait, the agent cuts the slow ztunnel off.
	start := time.Now()
	err := s.Add("c", web("c"), selfNetns)
	if err == nil || !strings.Contains(err.Error(), "ztunnel fell 1 updates behind") {
		t.Fatalf("Add(c) = %v, want queue overflow", err)
	}
	for range 2 {
		if err := <-results; err == nil {
			t.Error("an Add queued on the cut-off connection succeeded")
		}
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("overflow took %s to fail the callers", took)
	}
	slow.expectClosed()
}

func TestHungDuringSnapshot(t *testing.T) {
	s := &Server{AckTimeout: 200 * time.Millisecond}
	s.Add("a", web("a"), selfNetns)
	path := socketPath(t)
	serve(t, s, path)
	hung := dialRaw(t, path)
	hung.send(Message{Type: TypeHello, Version: Version}, nil)
	hung.mustRecv(TypeAdd)
	hung.expectClosed()

	silent := dialRaw(t, path) // never says hello
	silent.expectClosed()
}

func TestServerRejectsMisbehavingClient(t *testing.T) {
	s := &Server{}
	s.Add("a", web("a"), selfNetns)
	path := socketPath(t)
	serve(t, s, path)
	netns, err := os.Open(selfNetns)
	if err != nil {
		t.Fatal(err)
	}
	defer netns.Close()

	tests := []struct {
		name string
		run  func(rc *rawConn)
	}{
		{"not JSON", func(rc *rawConn) { rc.sendRaw([]byte("hello, agent")) }},
		{"oversized", func(rc *rawConn) { rc.sendRaw(make([]byte, MaxMessageSize+1)) }},
		{"fd on hello", func(rc *rawConn) { rc.send(Message{Type: TypeHello, Version: Version}, netns) }},
		{"ack before hello", func(rc *rawConn) { rc.send(Message{Type: TypeAck}, nil) }},
		{"not an ack after hello", func(rc *rawConn) {
			rc.send(Message{Type: TypeHello, Version: Version}, nil)
			rc.mustRecv(TypeAdd)
			rc.send(Message{Type: TypeHello, Version: Version}, nil)
		}},
		{"ack with nothing outstanding", func(rc *rawConn) {
			rc.send(Message{Type: TypeHello, Version: Version}, nil)
			rc.mustRecv(TypeAdd)
			rc.send(Message{Type: TypeAck}, nil)
			rc.mustRecv(TypeSnapshotDone)
			rc.send(Message{Type: TypeAck}, nil)
			rc.send(Message{Type: TypeAck}, nil)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rc := dialRaw(t, path)
			tt.run(rc)
			rc.expectClosed()
		})
	}

	t.Run("unsupported version", func(t *testing.T) {
		rc := dialRaw(t, path)
		rc.send(Message{Type: TypeHello, Version: 99}, nil)
		m := rc.mustRecv(TypeAck)
		if !strings.Contains(m.Error, "zds version 99 is not supported") {
			t.Errorf("refusal = %q", m.Error)
		}
		rc.expectClosed()
	})

	// None of that disturbed the server.
	h := newRecorder()
	runClient(t, path, h, "ztunnel")
	h.expect(t, "add a", "snapshot-done")
}

// fakeAgent accepts one ztunnel connection on path and returns it after hello.
func fakeAgent(t *testing.T, path string) *rawConn {
	t.Helper()
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ln.SetDeadline(time.Now().Add(waitFor))
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rc := &rawConn{t: t, c: c, r: newPacketReader(c)}
	if m := rc.mustRecv(TypeHello); m.Version != Version {
		t.Fatalf("hello version %d", m.Version)
	}
	return rc
}

func TestClientRejectsMalformed(t *testing.T) {
	path := socketPath(t)
	h := newRecorder()
	runClient(t, path, h, "ztunnel")
	agent := fakeAgent(t, path)
	netns, err := os.Open(selfNetns)
	if err != nil {
		t.Fatal(err)
	}
	defer netns.Close()
	fd := int(netns.Fd())
	w := web("a")

	tests := []struct {
		name string
		send func()
		want string
	}{
		{"not JSON", func() { agent.sendRaw([]byte("{add")) }, "not JSON"},
		{"oversized", func() { agent.sendRaw(make([]byte, MaxMessageSize+1)) }, "over the 65536 byte limit"},
		{"unknown type", func() { agent.send(Message{Type: "rename", UID: "a"}, nil) }, `unknown type "rename"`},
		{"add without fd", func() { agent.send(Message{Type: TypeAdd, UID: "a", Workload: &w}, nil) }, "add carries 0 file descriptors, want 1"},
		{"add with two fds", func() {
			agent.sendRaw([]byte(`{"type":"add","uid":"a","workload":{"name":"a","namespace":"b"}}`), fd, fd)
		}, "add carries 2 file descriptors, want 1"},
		{"delete with fd", func() { agent.send(Message{Type: TypeDelete, UID: "a"}, netns) }, "delete carries 1 file descriptors"},
		{"add without workload", func() { agent.send(Message{Type: TypeAdd, UID: "a"}, netns) }, "add for pod a without workload"},
		{"hello from the agent", func() { agent.send(Message{Type: TypeHello, Version: 1}, nil) }, "ztunnel does not accept hello"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.send()
			ack := agent.mustRecv(TypeAck)
			if !strings.Contains(ack.Error, tt.want) {
				t.Fatalf("ack error = %q, want it to contain %q", ack.Error, tt.want)
			}
		})
	}
	h.expectQuiet(t, 50*time.Millisecond)

	// The connection is still good for a proper message.
	agent.send(Message{Type: TypeAdd, UID: "a", Workload: &w}, netns)
	if ack := agent.mustRecv(TypeAck); ack.Error != "" {
		t.Fatalf("ack of a valid add = %q", ack.Error)
	}
	h.expect(t, "add a")
}

func TestClientReportsRefusal(t *testing.T) {
	path := socketPath(t)
	h := newRecorder()
	runClient(t, path, h, "ztunnel")
	agent := fakeAgent(t, path)
	agent.send(Message{Type: TypeAck, Error: "zds version 1 is not supported"}, nil)
	// The client hangs up and tries again later.
	agent.expectClosed()
	fakeAgent(t, path)
}

func TestNoFDLeak(t *testing.T) {
	// Warm up: the runtime opens its poller and the like on first use.
	warm := socketPath(t)
	stop := serve(t, &Server{}, warm)
	runClient(t, warm, newRecorder(), "warm-up")()
	stop()

	before := openFDs(t)
	func() {
		path := socketPath(t)
		s := &Server{AckTimeout: 200 * time.Millisecond}
		s.Add("a", web("a"), selfNetns)
		stopServer := serve(t, s, path)

		h := newRecorder()
		h.failFor("refused", errors.New("no"))
		stopClient := runClient(t, path, h, "ztunnel")
		h.expect(t, "add a", "snapshot-done")
		s.Add("b", web("b"), selfNetns)
		s.Add("refused", web("refused"), selfNetns)
		s.Delete("a")
		h.expect(t, "add b", "add refused", "delete a")

		// A takeover, then a hung ztunnel that times out holding an add.
		hung := dialRaw(t, path)
		netns, err := os.Open(selfNetns)
		if err != nil {
			t.Fatal(err)
		}
		hung.send(Message{Type: TypeHello, Version: Version}, netns) // rejected: fd on hello
		hung.expectClosed()
		hung.c.Close()
		hung = dialRaw(t, path)
		hung.send(Message{Type: TypeHello, Version: Version}, nil)
		hung.mustRecv(TypeAdd)
		hung.expectClosed()
		hung.c.Close()
		if err := s.Add("c", web("c"), selfNetns); err != nil {
			t.Fatalf("Add(c) with no ztunnel = %v", err)
		}

		stopClient()
		stopServer()

		// Malformed fd-carrying packets into the client.
		h2 := newRecorder()
		stopClient = runClient(t, path, h2, "ztunnel-2")
		agent := fakeAgent(t, path)
		agent.sendRaw([]byte(`{"type":"delete","uid":"a"}`), int(netns.Fd()), int(netns.Fd()))
		agent.mustRecv(TypeAck)
		agent.sendRaw([]byte(`garbage`), int(netns.Fd()))
		agent.mustRecv(TypeAck)
		agent.c.Close()
		stopClient()
		netns.Close()
	}()

	after := openFDs(t)
	if !slices.Equal(before, after) {
		t.Errorf("open fds changed\nbefore: %q\nafter:  %q", before, after)
	}
}

// TestReadClosesUnexpectedFDs drives the packet reader directly over a socketpair.
func TestReadClosesUnexpectedFDs(t *testing.T) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := unixConn(t, pair[0]), unixConn(t, pair[1])
	r := newPacketReader(b)
	netns, err := os.Open(selfNetns)
	if err != nil {
		t.Fatal(err)
	}
	defer netns.Close()
	fd := int(netns.Fd())

	before := openFDs(t)
	for _, tc := range []struct {
		payload string
		fds     []int
	}{
		{`{"type":"keep","uid":"u","workload":{"name":"a","namespace":"b"}}`, []int{fd}},
		{`{"type":"add","uid":"u","workload":{"name":"a","namespace":"b"}}`, []int{fd, fd, fd}},
		{`not json`, []int{fd}},
		// More fds than the reader makes room for: the kernel drops the rest.
		{`{"type":"ack"}`, slices.Repeat([]int{fd}, 40)},
	} {
		if _, _, err := a.WriteMsgUnix([]byte(tc.payload), unix.UnixRights(tc.fds...), nil); err != nil {
			t.Fatal(err)
		}
		m, f, err := r.read()
		if !errors.Is(err, errMalformed) || f != nil {
			t.Errorf("read(%s with %d fds) = %+v, %v, %v; want malformed", tc.payload, len(tc.fds), m, f, err)
		}
	}
	if after := openFDs(t); !slices.Equal(before, after) {
		t.Errorf("open fds changed\nbefore: %q\nafter:  %q", before, after)
	}
}

func unixConn(t *testing.T, fd int) *net.UnixConn {
	t.Helper()
	f := os.NewFile(uintptr(fd), "socketpair")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.UnixConn)
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
