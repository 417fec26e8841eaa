package hbone

import (
	"io"
	"sync"
	"time"
)

// Received DATA waits for the application in a list of chunks. Chunks come from
// two pools, small for the few bytes of interactive traffic and big for bulk
// transfers, so that a stream whose data has been read holds no buffer at all.
// Each chunk type is sized so that header and array together fill one Go size
// class exactly.
const (
	chunkHeaderSize = 48 // next, r, w, buf
	smallChunkSize  = 2048 - chunkHeaderSize
	bigChunkSize    = 32768 - chunkHeaderSize
)

type chunk struct {
	next *chunk
	r, w int    // unread data is buf[r:w]
	buf  []byte // backed by the array of the enclosing smallChunk or bigChunk
}

type smallChunk struct {
	chunk
	arr [smallChunkSize]byte
}

type bigChunk struct {
	chunk
	arr [bigChunkSize]byte
}

var (
	smallChunks = sync.Pool{New: func() any {
		c := new(smallChunk)
		c.buf = c.arr[:]
		return &c.chunk
	}}
	bigChunks = sync.Pool{New: func() any {
		c := new(bigChunk)
		c.buf = c.arr[:]
		return &c.chunk
	}}
)

// getChunk returns an empty chunk big enough for n bytes, or a big one.
func getChunk(n int) *chunk {
	if n <= smallChunkSize {
		return smallChunks.Get().(*chunk)
	}
	return bigChunks.Get().(*chunk)
}

func putChunk(c *chunk) {
	c.next, c.r, c.w = nil, 0, 0
	if len(c.buf) == smallChunkSize {
		smallChunks.Put(c)
	} else {
		bigChunks.Put(c)
	}
}

// writeBufSize is the size of a connection's write buffer: frames are written
// into it and it is flushed when no other writer is waiting, so small frames
// (a DATA frame's header, WINDOW_UPDATEs) leave in one write with their
// neighbours. It goes back to the pool after each flush, so an idle connection
// holds none.
const writeBufSize = 64 << 10

var writeBufs = sync.Pool{New: func() any {
	b := make([]byte, 0, writeBufSize)
	return &b
}}

// writeBuffer is the io.Writer below the connection's Framer. It is only used
// with the connection's write lock held.
type writeBuffer struct {
	w   io.Writer
	buf *[]byte // nil when nothing is buffered
	err error   // sticky: once a write failed the connection is dead
}

func (b *writeBuffer) Write(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	n := 0
	for len(p) > 0 {
		if b.buf == nil {
			b.buf = writeBufs.Get().(*[]byte)
		}
		buf := *b.buf
		if len(buf) == 0 && len(p) >= cap(buf) {
			// Nothing to coalesce with: skip the copy.
			m, err := b.w.Write(p)
			n += m
			if err != nil {
				b.err = err
			}
			return n, err
		}
		k := copy(buf[len(buf):cap(buf)], p)
		*b.buf = buf[:len(buf)+k]
		p = p[k:]
		n += k
		if len(*b.buf) == cap(buf) {
			if err := b.Flush(); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// Flush writes what is buffered and returns the buffer to the pool.
func (b *writeBuffer) Flush() error {
	if b.err != nil {
		return b.err
	}
	if b.buf == nil {
		return nil
	}
	buf := *b.buf
	if len(buf) > 0 {
		if _, err := b.w.Write(buf); err != nil {
			b.err = err
			return err
		}
	}
	*b.buf = buf[:0]
	writeBufs.Put(b.buf)
	b.buf = nil
	return nil
}

// deadline is a settable point in time whose passing closes a channel, in the
// manner of net.Pipe's deadlines. The zero value has no deadline.
type deadline struct {
	mu     sync.Mutex
	timer  *time.Timer
	cancel chan struct{} // closed when the deadline passes; nil means none set
}

// set changes the deadline; the zero time removes it.
func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		<-d.cancel // the timer fired and is closing it (or closed it): wait
	}
	d.timer = nil
	expired := d.cancel != nil && isClosed(d.cancel)
	if t.IsZero() {
		if expired {
			d.cancel = nil
		}
		return
	}
	if d.cancel == nil || expired {
		d.cancel = make(chan struct{})
	}
	dur := time.Until(t)
	if dur <= 0 {
		close(d.cancel)
		return
	}
	ch := d.cancel
	d.timer = time.AfterFunc(dur, func() { close(ch) })
}

// wait returns a channel closed when the deadline passes, nil without one.
func (d *deadline) wait() <-chan struct{} {
	if d == nil {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cancel
}

func (d *deadline) stop() {
	if d == nil {
		return
	}
	d.mu.Lock()
	if d.timer != nil {
		d.timer.Stop()
	}
	d.mu.Unlock()
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
