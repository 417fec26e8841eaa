package hbone

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Defaults are those of Istio's ztunnel and its Envoy HBONE listener. The connection
// window is four stream windows, as in current ztunnel releases (early ones advertised
// 4 MiB for both): with equal windows the streams of a connection share one stream's
// worth of data in flight, and one destination that stops reading takes all of it and
// stalls the rest. Four lets four streams run at full window (ztunnel's own iperf3 -P 4
// waited on the window most of the time at 4 MiB) and a stalled stream holds at most a
// quarter. The cost is memory only when destinations stop reading: a connection then
// holds up to 16 MiB for them, and never more than 4 MiB for any one.
const (
	defaultStreamWindow         = 4 << 20
	defaultConnWindow           = 16 << 20
	defaultMaxFrameSize         = 1 << 20
	defaultMaxHeaderListSize    = 16 << 10
	defaultMaxConcurrentStreams = 100
	defaultPingInterval         = 10 * time.Second
	defaultPingTimeout          = 20 * time.Second
	defaultHandshakeTimeout     = 10 * time.Second

	initialWindowSize = 65535     // RFC 9113 6.9.2
	minMaxFrameSize   = 1 << 14   // RFC 9113 6.5.2
	maxMaxFrameSize   = 1<<24 - 1 // RFC 9113 6.5.2
	maxWindowSize     = 1<<31 - 1 // RFC 9113 6.9.1
	maxStreamID       = 1<<31 - 1
	headerTableSize   = 4096 // HPACK dynamic table, both directions

	// readBufSize buffers frame headers and control frames; DATA payloads larger
	// than it are read straight into the stream's chunks.
	readBufSize = 8 << 10

	// maxDataFrame caps the DATA frames we send, so one stream's big Write does
	// not hold the connection's writer for long and a frame fits the write buffer.
	maxDataFrame = writeBufSize - 9

	// IdealWrite is the Stream.Write size that costs least: exactly one DATA frame
	// that, with its header, fills the write buffer and so whole TLS records, with no
	// small remainder frame (and tiny TLS record) behind it.
	IdealWrite = maxDataFrame

	// maxQueuedControl bounds the control frames (PING and SETTINGS ACKs,
	// RST_STREAMs, WINDOW_UPDATEs) waiting for the writer. A peer that makes us
	// queue more while not reading what we send is abusive.
	maxQueuedControl = 4096

	// closeFlushTimeout bounds how long a closing connection tries to deliver
	// its last frames (GOAWAY) to a peer that does not read.
	closeFlushTimeout = time.Second
)

type role uint8

const (
	roleClient role = iota
	roleServer
)

// localSettings are the values this side advertises.
type localSettings struct {
	streamWindow      uint32
	connWindow        uint32
	maxFrameSize      uint32
	maxHeaderListSize uint32
	maxStreams        uint32 // server: concurrent streams the peer may open
}

func (ls localSettings) frames() []http2.Setting {
	s := []http2.Setting{
		{ID: http2.SettingEnablePush, Val: 0},
		{ID: http2.SettingInitialWindowSize, Val: ls.streamWindow},
		{ID: http2.SettingMaxFrameSize, Val: ls.maxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: ls.maxHeaderListSize},
	}
	if ls.maxStreams > 0 {
		s = append(s, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: ls.maxStreams})
	}
	return s
}

// controlLimit is the largest non-DATA frame we read. Header blocks are bounded
// by the header list size (HPACK cannot expand much beyond it), everything else
// we accept is tiny, so a hostile peer cannot make the Framer grow its read
// buffer to our (large) maximum frame size.
func (ls localSettings) controlLimit() uint32 {
	return max(minMaxFrameSize, 2*ls.maxHeaderListSize+256)
}

type ctrlKind uint8

const (
	ctrlSettingsAck ctrlKind = iota
	ctrlPing
	ctrlPingAck
	ctrlWindowUpdate
	ctrlRST
	ctrlGoAway
	ctrlStatus // a bare response (HEADERS :status, END_STREAM) to a request we refuse
)

// ctrlFrame is a control frame waiting for the writer. Control frames are
// queued, never written by the reader goroutine itself: a reader blocked on a
// full socket while its peer is blocked the same way would deadlock both.
type ctrlFrame struct {
	kind   ctrlKind
	stream uint32 // WINDOW_UPDATE, RST_STREAM; last stream ID for GOAWAY
	val    uint32 // increment, error code; new HPACK table size+1 for SETTINGS ACK
	data   [8]byte
}

// conn is one HTTP/2 connection, either side. One reader goroutine reads and
// dispatches frames; writes are serialized by wmu and coalesced in a write
// buffer flushed when no other writer waits; control frames go through a queue
// drained by whoever holds wmu next, or by the writer goroutine.
//
// Lock order: wmu, then Stream.mu, then mu. cmu and recvMu are leaves.
type conn struct {
	nc    net.Conn
	role  role
	log   *slog.Logger
	local localSettings

	br      *bufio.Reader
	fr      *http2.Framer // reads: reader goroutine only; writes: under wmu
	scratch [smallChunkSize]byte

	wmu      sync.Mutex
	wwaiters atomic.Int32
	wb       writeBuffer
	henc     *hpack.Encoder // under wmu
	hbuf     bytes.Buffer   // under wmu

	cmu       sync.Mutex
	ctrl      []ctrlFrame
	ctrlSpare []ctrlFrame // under wmu
	ctrlWake  chan struct{}

	recvMu      sync.Mutex
	recvWindow  int64 // connection credit the peer has left
	recvUnacked int64 // consumed by the application, not yet returned

	mu             sync.Mutex
	streams        map[uint32]*Stream
	reserved       int    // client: slots taken by Connect calls not yet sent
	nextStreamID   uint32 // client
	lastPeerStream uint32 // server: highest stream ID the peer opened
	sendWindow     int64
	sendWindowWait chan struct{} // closed when sendWindow turns positive
	peerMaxFrame   uint32
	peerInitWindow int64
	peerMaxStreams uint32
	peerMaxHeaders uint32
	goAwaySent     bool
	goAwayRecv     bool
	goAwayLast     uint32 // from the peer's GOAWAY
	err            error  // why the connection closed; set once
	flushOnClose   bool
	idleSince      time.Time
	pingWaiting    bool
	pingData       [8]byte
	pingSeq        uint64

	pingInterval, pingTimeout time.Duration
	pingTimer                 *time.Timer
	idleTimeout               time.Duration
	idleTimer                 *time.Timer

	closing    chan struct{} // closed by shutdown
	done       chan struct{} // closed when the socket is closed
	readerDone chan struct{}

	// role hooks
	onHeaders func(*http2.MetaHeadersFrame) error
	onClosed  func()
}

func newConn(nc net.Conn, r role, ls localSettings, log *slog.Logger) *conn {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &conn{
		nc:             nc,
		role:           r,
		log:            log.With("peer", nc.RemoteAddr().String()),
		local:          ls,
		br:             bufio.NewReaderSize(nc, readBufSize),
		ctrlWake:       make(chan struct{}, 1),
		recvWindow:     initialWindowSize,
		streams:        make(map[uint32]*Stream),
		nextStreamID:   1,
		sendWindow:     initialWindowSize,
		peerMaxFrame:   minMaxFrameSize,
		peerInitWindow: initialWindowSize,
		peerMaxStreams: ^uint32(0),
		peerMaxHeaders: ^uint32(0),
		closing:        make(chan struct{}),
		done:           make(chan struct{}),
		readerDone:     make(chan struct{}),
		idleSince:      time.Now(),
	}
	c.wb.w = nc
	c.fr = http2.NewFramer(&c.wb, c.br)
	c.fr.SetMaxReadFrameSize(ls.controlLimit())
	c.fr.ReadMetaHeaders = hpack.NewDecoder(headerTableSize, nil)
	c.fr.MaxHeaderListSize = ls.maxHeaderListSize
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.henc.SetMaxDynamicTableSizeLimit(headerTableSize)
	return c
}

// writePreface sends our SETTINGS and opens the connection window, preceded by
// the client preface on the client side.
func (c *conn) writePreface() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.role == roleClient {
		if _, err := io.WriteString(&c.wb, http2.ClientPreface); err != nil {
			return err
		}
	}
	if err := c.fr.WriteSettings(c.local.frames()...); err != nil {
		return err
	}
	if inc := int64(c.local.connWindow) - initialWindowSize; inc > 0 {
		if err := c.fr.WriteWindowUpdate(0, uint32(inc)); err != nil {
			return err
		}
		c.recvMu.Lock()
		c.recvWindow += inc
		c.recvMu.Unlock()
	}
	return c.wb.Flush()
}

// start runs the reader and writer goroutines and the keepalive.
func (c *conn) start(pingInterval, pingTimeout time.Duration) {
	c.pingInterval, c.pingTimeout = pingInterval, pingTimeout
	if pingInterval > 0 {
		c.mu.Lock()
		c.pingTimer = time.AfterFunc(pingInterval, c.keepalive)
		c.mu.Unlock()
	}
	go c.readLoop()
	go c.writeLoop()
}

// --- shutdown ---

// shutdown closes the connection because of err. With flush, frames already
// queued (a GOAWAY) are given closeFlushTimeout to leave first. Streams fail
// with an error wrapping ErrConnClosed and err.
func (c *conn) shutdown(err error, flush bool) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if err == nil {
		err = errGracefulClose
	}
	c.err = err
	c.flushOnClose = flush
	streams := make([]*Stream, 0, len(c.streams))
	for _, s := range c.streams {
		streams = append(streams, s)
	}
	clear(c.streams)
	c.reserved = 0
	if c.sendWindowWait != nil {
		close(c.sendWindowWait)
		c.sendWindowWait = nil
	}
	if c.pingTimer != nil {
		c.pingTimer.Stop()
	}
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	c.mu.Unlock()
	// Unblock writers stuck on a peer that does not read: at once, or after
	// the time we give the last frames to leave.
	if flush {
		_ = c.nc.SetWriteDeadline(time.Now().Add(closeFlushTimeout))
	} else {
		_ = c.nc.Close()
	}
	close(c.closing)

	serr := wrapConnErr(err)
	for _, s := range streams {
		s.connFailed(serr)
	}
	var ce connError
	switch {
	case errors.Is(err, errGracefulClose), errors.Is(err, io.EOF):
		c.log.Debug("hbone connection closed", "reason", err)
	case errors.As(err, &ce):
		c.log.Warn("hbone connection failed: peer broke HTTP/2", "err", err)
	default:
		c.log.Debug("hbone connection closed", "reason", err)
	}
}

// closeErr returns why the connection closed, nil while it is open.
func (c *conn) closeErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// --- writing ---

func (c *conn) lockWrite() {
	c.wwaiters.Add(1)
	c.wmu.Lock()
	c.wwaiters.Add(-1)
}

// unlockWrite flushes unless another writer is waiting (it will flush), then
// unlocks. Queued control frames go out first.
func (c *conn) unlockWrite() {
	c.drainControlLocked()
	if c.wwaiters.Load() == 0 {
		if err := c.wb.Flush(); err != nil {
			c.shutdown(fmt.Errorf("write: %w", err), false)
		}
	}
	c.wmu.Unlock()
}

func (c *conn) queueControl(f ctrlFrame) {
	c.cmu.Lock()
	if len(c.ctrl) >= maxQueuedControl {
		c.cmu.Unlock()
		// No GOAWAY: it would only join the queue the peer does not read.
		c.shutdown(connError{http2.ErrCodeEnhanceYourCalm, "too many control frames queued; peer does not read"}, false)
		return
	}
	c.ctrl = append(c.ctrl, f)
	c.cmu.Unlock()
	select {
	case c.ctrlWake <- struct{}{}:
	default:
	}
}

// drainControlLocked writes the queued control frames. wmu is held.
func (c *conn) drainControlLocked() {
	c.cmu.Lock()
	q := c.ctrl
	c.ctrl = c.ctrlSpare[:0]
	c.cmu.Unlock()
	if len(q) == 0 {
		c.ctrlSpare = q
		return
	}
	var err error
	for i := range q {
		if err != nil {
			break
		}
		f := &q[i]
		switch f.kind {
		case ctrlSettingsAck:
			if f.val > 0 {
				// The peer's new HPACK table size applies from this ACK on.
				c.henc.SetMaxDynamicTableSize(f.val - 1)
			}
			err = c.fr.WriteSettingsAck()
		case ctrlPing:
			err = c.fr.WritePing(false, f.data)
		case ctrlPingAck:
			err = c.fr.WritePing(true, f.data)
		case ctrlWindowUpdate:
			err = c.fr.WriteWindowUpdate(f.stream, f.val)
		case ctrlRST:
			err = c.fr.WriteRSTStream(f.stream, http2.ErrCode(f.val))
		case ctrlGoAway:
			err = c.fr.WriteGoAway(f.stream, http2.ErrCode(f.val), nil)
		case ctrlStatus:
			err = c.writeHeadersLocked(f.stream, true, []hpack.HeaderField{
				{Name: ":status", Value: strconv.Itoa(int(f.val))},
			})
		}
	}
	if cap(q) > 256 {
		q = nil // drop the backing array a burst left behind
	}
	c.ctrlSpare = q[:0]
	if err != nil {
		c.shutdown(fmt.Errorf("write: %w", err), false)
	}
}

// writeLoop writes control frames queued while no one else was writing, and
// closes the socket when the connection shuts down.
func (c *conn) writeLoop() {
	for {
		select {
		case <-c.ctrlWake:
			c.lockWrite()
			c.unlockWrite()
		case <-c.closing:
			c.mu.Lock()
			flush := c.flushOnClose
			c.mu.Unlock()
			if flush {
				c.lockWrite()
				c.drainControlLocked()
				_ = c.wb.Flush()
				c.wmu.Unlock()
			}
			_ = c.nc.Close()
			<-c.readerDone
			// Buffers of a dead connection go back to the pool.
			c.wmu.Lock()
			if c.wb.buf != nil {
				*c.wb.buf = (*c.wb.buf)[:0]
				writeBufs.Put(c.wb.buf)
				c.wb.buf = nil
			}
			c.wb.err = net.ErrClosed
			c.wmu.Unlock()
			close(c.done)
			if c.onClosed != nil {
				c.onClosed()
			}
			return
		}
	}
}

// writeHeadersLocked encodes fields and writes them as HEADERS plus
// CONTINUATION frames no larger than the peer allows. wmu is held.
func (c *conn) writeHeadersLocked(id uint32, endStream bool, fields []hpack.HeaderField) error {
	c.hbuf.Reset()
	for _, f := range fields {
		if err := c.henc.WriteField(f); err != nil {
			return err
		}
	}
	c.mu.Lock()
	maxFrame := int(c.peerMaxFrame)
	c.mu.Unlock()
	block := c.hbuf.Bytes()
	first := true
	for first || len(block) > 0 {
		frag := block[:min(len(block), maxFrame)]
		block = block[len(frag):]
		var err error
		if first {
			err = c.fr.WriteHeaders(http2.HeadersFrameParam{
				StreamID:      id,
				BlockFragment: frag,
				EndStream:     endStream,
				EndHeaders:    len(block) == 0,
			})
		} else {
			err = c.fr.WriteContinuation(id, len(block) == 0, frag)
		}
		if err != nil {
			return err
		}
		first = false
	}
	if c.hbuf.Cap() > 4<<10 {
		c.hbuf = bytes.Buffer{}
	}
	return nil
}

// writeDataLocked writes one DATA frame without copying p through the Framer:
// header and payload go straight into the write buffer. wmu is held.
func (c *conn) writeDataLocked(id uint32, p []byte, endStream bool) error {
	var flags http2.Flags
	if endStream {
		flags = http2.FlagDataEndStream
	}
	hdr := [9]byte{
		byte(len(p) >> 16), byte(len(p) >> 8), byte(len(p)),
		byte(http2.FrameData), byte(flags),
		byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id),
	}
	if _, err := c.wb.Write(hdr[:]); err != nil {
		return err
	}
	_, err := c.wb.Write(p)
	return err
}

// --- flow control ---

// connWindowWaitLocked returns a channel closed when the connection send
// window turns positive. mu is held.
func (c *conn) connWindowWaitLocked() chan struct{} {
	if c.sendWindowWait == nil {
		c.sendWindowWait = make(chan struct{})
	}
	return c.sendWindowWait
}

// returnConnCredit gives n received bytes back to the peer's connection window
// once enough have accumulated to be worth a WINDOW_UPDATE.
func (c *conn) returnConnCredit(n int64) {
	if n <= 0 {
		return
	}
	c.recvMu.Lock()
	c.recvUnacked += n
	inc := int64(0)
	if c.recvUnacked >= int64(c.local.connWindow)/4 {
		inc = c.recvUnacked
		c.recvUnacked = 0
		c.recvWindow += inc
	}
	c.recvMu.Unlock()
	if inc > 0 {
		c.queueControl(ctrlFrame{kind: ctrlWindowUpdate, stream: 0, val: uint32(inc)})
	}
}

// --- streams ---

func (c *conn) lookup(id uint32) *Stream {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.streams[id]
}

// isIdleID reports whether id names a stream that was never opened, on which
// any frame but HEADERS (from the right side) is a protocol error.
func (c *conn) isIdleID(id uint32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.role == roleClient {
		return id%2 == 0 || id >= c.nextStreamID
	}
	return id%2 == 0 || id > c.lastPeerStream
}

// removeStream forgets a stream that is closed in both directions or reset.
func (c *conn) removeStream(s *Stream) {
	c.mu.Lock()
	if c.streams[s.id] != s {
		c.mu.Unlock()
		return
	}
	delete(c.streams, s.id)
	empty := len(c.streams) == 0 && c.reserved == 0
	drained := empty && (c.goAwaySent || c.goAwayRecv)
	if empty {
		c.noteIdleLocked()
	}
	c.mu.Unlock()
	if s.cancel != nil {
		s.cancel()
	}
	if drained {
		c.shutdown(nil, true)
	}
}

// noteIdleLocked starts the idle timer when the last stream went away. mu is held.
func (c *conn) noteIdleLocked() {
	c.idleSince = time.Now()
	if c.idleTimeout <= 0 || c.err != nil {
		return
	}
	if c.idleTimer == nil {
		c.idleTimer = time.AfterFunc(c.idleTimeout, c.idleCheck)
	} else {
		c.idleTimer.Reset(c.idleTimeout)
	}
}

func (c *conn) idleCheck() {
	c.mu.Lock()
	if c.err != nil || len(c.streams) > 0 || c.reserved > 0 {
		c.mu.Unlock()
		return
	}
	if left := c.idleTimeout - time.Since(c.idleSince); left > 0 {
		c.idleTimer.Reset(left)
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	c.log.Debug("closing idle hbone connection", "idle", c.idleTimeout)
	c.goAwayClose(http2.ErrCodeNo, errIdle)
}

var errIdle = errors.New("hbone: connection idle")

// goAwayClose sends GOAWAY with code and closes the connection.
func (c *conn) goAwayClose(code http2.ErrCode, err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	last := c.lastPeerStream
	c.goAwaySent = true
	c.mu.Unlock()
	c.queueControl(ctrlFrame{kind: ctrlGoAway, stream: last, val: uint32(code)})
	c.shutdown(err, true)
}

// goAway handles a connection error: report it and close.
func (c *conn) goAway(err error) {
	code := http2.ErrCodeInternal
	var ce connError
	var hce http2.ConnectionError
	switch {
	case errors.As(err, &ce):
		code = ce.code
	case errors.As(err, &hce):
		code = http2.ErrCode(hce)
	}
	c.goAwayClose(code, err)
}

// drain stops new streams: GOAWAY with the last stream we accepted, then close
// once the streams in progress have ended.
func (c *conn) drain() {
	c.mu.Lock()
	if c.goAwaySent || c.err != nil {
		c.mu.Unlock()
		return
	}
	c.goAwaySent = true
	last := c.lastPeerStream
	empty := len(c.streams) == 0 && c.reserved == 0
	c.mu.Unlock()
	c.queueControl(ctrlFrame{kind: ctrlGoAway, stream: last, val: uint32(http2.ErrCodeNo)})
	if empty {
		c.shutdown(nil, true)
	}
}

// --- keepalive ---

// keepalive runs on pingTimer: it sends a PING, or, when the last one is still
// unanswered after pingTimeout, declares the peer dead.
func (c *conn) keepalive() {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if c.pingWaiting {
		c.mu.Unlock()
		c.log.Warn("hbone peer did not answer PING; closing connection", "timeout", c.pingTimeout)
		c.shutdown(fmt.Errorf("peer did not answer PING within %v; is it alive and reading?", c.pingTimeout), false)
		return
	}
	c.pingSeq++
	var data [8]byte
	for i := range data {
		data[i] = byte(c.pingSeq >> (8 * i))
	}
	c.pingData = data
	c.pingWaiting = true
	c.pingTimer.Reset(c.pingTimeout)
	c.mu.Unlock()
	c.queueControl(ctrlFrame{kind: ctrlPing, data: data})
}

func (c *conn) onPingAck(data [8]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.pingWaiting || data != c.pingData || c.err != nil {
		return
	}
	c.pingWaiting = false
	c.pingTimer.Reset(c.pingInterval)
}
