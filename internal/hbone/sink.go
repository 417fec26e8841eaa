package hbone

import (
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
)

// A stream that carries a TCP connection spends most of its life waiting, and most of
// its data only passes through on its way to a socket. SendTo lets the connection's
// reader goroutine write a stream's data straight to that socket: no goroutine per
// stream waits for data, no hand-off wakes one for every frame, and a frame the socket
// takes at once never waits in a chunk. Only when the socket is full does a goroutine
// start, to write what is queued as the socket drains; it ends when the queue is empty.
// The reader itself never blocks on a destination. A destination that does not read
// holds back at most its stream's window of the connection's window, as unread data
// does with Read. The default connection window is four stream windows, so that takes a
// quarter of it; with windows of equal size one stalled destination would stall the
// connection's other streams until it reads or is closed.
//
// The destination must be a non-blocking socket (a *net.TCPConn is): the reader writes
// to it with raw system calls (package rawio), which also means the race detector does
// not see those writes read their buffers.

// sink is where a stream in SendTo mode delivers. Its fields other than w, count and
// done are under the stream's mu. w is used by one goroutine at a time: the reader
// while no flusher runs, the flusher while it does.
type sink struct {
	w     *sinkWriter
	count func(int)
	done  func(error)

	flushing bool  // a flusher goroutine owns the queue and the socket
	err      error // writing to the socket failed; later data is discarded
	finished bool  // done has been called (or is being)
}

var errSinkSet = errors.New("hbone: stream already reading or sending to a sink")

// sinkPiece is how much of a DATA frame the reader hands a sink at once: a whole frame
// as ztunnel writes them (IdealWrite), so each becomes one write(2) on the destination.
const sinkPiece = writeBufSize

var sinkPieces = sync.Pool{New: func() any {
	b := make([]byte, sinkPiece)
	return &b
}}

// sending reports whether the stream's data goes to a sink.
func (s *Stream) sending() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sink != nil
}

// SendTo delivers everything the stream receives to dst as it arrives, instead of Read
// or WriteTo: the connection's reader goroutine writes it to dst without blocking, and a
// goroutine is started only while dst cannot take more. count, if not nil, is told of
// every write. done is called once, on a goroutine of its own: with nil when the peer
// ended its direction (or reset the stream with NO_ERROR) and all its data reached dst,
// otherwise with why delivery stopped (dst failed, the stream was reset or closed, the
// connection died). done does not close or half-close dst: that is the caller's choice.
// When the stream is closed or reset from elsewhere, a write already under way may still
// reach dst after done: close dst to stop delivery at once. SendTo fails (and the caller
// reads as usual) where raw socket writes are not available, outside Unix.
func (s *Stream) SendTo(dst syscall.Conn, count func(int), done func(error)) error {
	if !sinkSupported {
		return errors.ErrUnsupported
	}
	rc, err := dst.SyscallConn()
	if err != nil {
		return err
	}
	if count == nil {
		count = func(int) {}
	}
	s.mu.Lock()
	if s.sink != nil || s.reading {
		s.mu.Unlock()
		return errSinkSet
	}
	s.sink = &sink{w: newSinkWriter(rc), count: count, done: done}
	flush := false
	if s.head != nil {
		// Data that arrived before SendTo goes out first, on the flusher.
		s.sink.flushing, flush = true, true
	}
	fin, ferr := s.sinkEndLocked()
	s.mu.Unlock()
	switch {
	case flush:
		go s.flushSink()
	case fin:
		go done(ferr)
	}
	return nil
}

// sinkEndLocked reports whether the sink is done now (nothing left to deliver and nothing
// more will come), marking it finished, and with which error. mu is held.
func (s *Stream) sinkEndLocked() (bool, error) {
	k := s.sink
	if k == nil || k.finished || k.flushing || s.head != nil {
		return false, nil
	}
	var err error
	switch {
	case k.err != nil:
		err = k.err
	case s.closed:
		err = net.ErrClosed
	default:
		err = s.readErrLocked()
		if err == nil {
			return false, nil
		}
		if err == io.EOF {
			err = nil
		}
	}
	k.finished = true
	return true, err
}

// sinkCheck ends the sink if nothing more will come; called after any state change.
func (s *Stream) sinkCheck() {
	s.mu.Lock()
	fin, err := s.sinkEndLocked()
	done := s.sink
	s.mu.Unlock()
	if fin {
		go done.done(err)
	}
}

// sinkReceive delivers b (held in ck when ck is not nil, otherwise in the reader's
// scratch space) from the reader goroutine: written at once when nothing is queued ahead
// of it and dst takes it, otherwise queued for the flusher.
func (s *Stream) sinkReceive(b []byte, ck *chunk) {
	c := s.c
	k := s.sink
	s.mu.Lock()
	if s.discardingLocked() || k.err != nil {
		s.mu.Unlock()
		c.returnConnCredit(int64(len(b)))
		if ck != nil {
			putChunk(ck)
		}
		return
	}
	if k.flushing {
		s.queueLocked(b, ck)
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()

	// Only this goroutine writes to dst while no flusher runs.
	n, err := k.w.WriteNow(b)
	if n > 0 {
		s.delivered(n)
	}
	if err != nil {
		if ck != nil {
			putChunk(ck)
		}
		c.returnConnCredit(int64(len(b) - n))
		s.sinkFail(err)
		return
	}
	if n == len(b) {
		if ck != nil {
			putChunk(ck)
		}
		return
	}
	s.mu.Lock()
	if s.discardingLocked() {
		s.mu.Unlock()
		c.returnConnCredit(int64(len(b) - n))
		if ck != nil {
			putChunk(ck)
		}
		s.sinkCheck()
		return
	}
	if ck != nil {
		ck.r += n
	}
	s.queueLocked(b[n:], ck)
	k.flushing = true
	s.mu.Unlock()
	go s.flushSink()
}

// queueLocked queues b, in ck itself when given (ck.buf[ck.r:ck.w] is b). mu is held.
func (s *Stream) queueLocked(b []byte, ck *chunk) {
	if ck == nil {
		s.appendBytesLocked(b)
		return
	}
	s.appendChunkLocked(ck)
}

// delivered accounts n bytes written to the sink: flow-control credit goes back to the
// peer, as if the application had read them.
func (s *Stream) delivered(n int) {
	s.sink.count(n)
	s.consumed(n)
	s.c.returnConnCredit(int64(n))
}

// sinkFail stops delivery because writing to dst failed: what is queued is dropped and
// what arrives later is discarded.
func (s *Stream) sinkFail(err error) {
	s.mu.Lock()
	if s.sink.err == nil {
		s.sink.err = err
	}
	dropped := s.dropLocked()
	s.mu.Unlock()
	s.c.returnConnCredit(int64(dropped))
	s.sinkCheck()
}

// flushSink writes the queue to dst as dst drains, then hands the socket back to the
// reader goroutine.
func (s *Stream) flushSink() {
	k := s.sink
	for {
		s.mu.Lock()
		h := s.head
		if h == nil || k.err != nil {
			k.flushing = false
			fin, err := s.sinkEndLocked()
			s.mu.Unlock()
			if fin {
				k.done(err)
			}
			return
		}
		// The chunk leaves the list while it is written, so neither Close nor the
		// reader touches it meanwhile.
		s.head = h.next
		if s.head == nil {
			s.tail = nil
		}
		h.next = nil
		s.buffered -= h.w - h.r
		s.mu.Unlock()

		n, err := k.w.Write(h.buf[h.r:h.w])
		if n > 0 {
			s.delivered(n)
		}
		left := h.w - h.r - n
		putChunk(h)
		if err != nil {
			s.mu.Lock()
			if k.err == nil {
				k.err = err
			}
			dropped := s.dropLocked()
			s.mu.Unlock()
			// Outside mu: returning credit may queue a WINDOW_UPDATE, and a full
			// control queue shuts the connection down, which takes every stream's mu.
			s.c.returnConnCredit(int64(left + dropped))
		}
	}
}
