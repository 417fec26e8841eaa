package hbone

import (
	"errors"
	"fmt"
	"io"
	"time"

	"golang.org/x/net/http2"
)

// readLoop is the connection's only reader: it reads frames and dispatches them
// until the connection fails.
func (c *conn) readLoop() {
	defer close(c.readerDone)
	err := c.readFrames()
	var ce connError
	var hce http2.ConnectionError
	switch {
	case errors.As(err, &ce), errors.As(err, &hce):
		c.goAway(err)
	case errors.Is(err, io.EOF):
		c.shutdown(fmt.Errorf("peer closed the connection: %w", err), false)
	default:
		c.shutdown(err, false)
	}
}

func (c *conn) readFrames() error {
	first := true
	for {
		fh, err := c.fr.ReadFrameHeader()
		if err != nil && !errors.Is(err, http2.ErrFrameTooLarge) {
			return err
		}
		if first {
			if fh.Type != http2.FrameSettings {
				return protocolErr("first frame is %v, not SETTINGS", fh.Type)
			}
			// The handshake deadline has served its purpose.
			_ = c.nc.SetReadDeadline(time.Time{})
			first = false
		}
		if fh.Type == http2.FrameData {
			if err := c.readData(fh); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			// A non-DATA frame above controlLimit.
			if err := c.readLargeControl(fh); err != nil {
				return err
			}
			continue
		}
		f, err := c.fr.ReadFrameForHeader(fh)
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				// A malformed header block (the HPACK state is intact): reset
				// that stream only.
				c.streamError(se.StreamID, se.Code)
				continue
			}
			return err
		}
		if err := c.dispatch(f); err != nil {
			return err
		}
	}
}

// readLargeControl handles a non-DATA frame larger than controlLimit: unknown
// frames are skipped and a GOAWAY's long debug data is dropped; anything else is
// a peer trying to make us buffer.
func (c *conn) readLargeControl(fh http2.FrameHeader) error {
	if fh.Length > c.local.maxFrameSize {
		return connError{http2.ErrCodeFrameSize, fmt.Sprintf("%v frame of %d bytes exceeds SETTINGS_MAX_FRAME_SIZE", fh.Type, fh.Length)}
	}
	switch fh.Type {
	case http2.FrameHeaders, http2.FrameContinuation, http2.FramePushPromise:
		return connError{http2.ErrCodeProtocol, fmt.Sprintf("%v frame of %d bytes exceeds the header list limit", fh.Type, fh.Length)}
	case http2.FrameGoAway:
		if fh.StreamID != 0 {
			return protocolErr("GOAWAY on stream %d", fh.StreamID)
		}
		var b [8]byte
		if _, err := io.ReadFull(c.br, b[:]); err != nil {
			return err
		}
		if _, err := c.br.Discard(int(fh.Length) - 8); err != nil {
			return err
		}
		last := (uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])) & maxStreamID
		code := http2.ErrCode(uint32(b[4])<<24 | uint32(b[5])<<16 | uint32(b[6])<<8 | uint32(b[7]))
		c.onGoAway(last, code)
		return nil
	case http2.FrameSettings, http2.FramePing, http2.FrameRSTStream, http2.FrameWindowUpdate, http2.FramePriority:
		return connError{http2.ErrCodeFrameSize, fmt.Sprintf("%v frame of %d bytes", fh.Type, fh.Length)}
	default:
		_, err := c.br.Discard(int(fh.Length))
		return err
	}
}

func (c *conn) dispatch(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.PingFrame:
		if f.StreamID != 0 {
			return protocolErr("PING on stream %d", f.StreamID)
		}
		if f.IsAck() {
			c.onPingAck(f.Data)
		} else {
			c.queueControl(ctrlFrame{kind: ctrlPingAck, data: f.Data})
		}
		return nil
	case *http2.RSTStreamFrame:
		return c.onRSTStream(f)
	case *http2.GoAwayFrame:
		c.onGoAway(f.LastStreamID, f.ErrCode)
		return nil
	case *http2.PushPromiseFrame:
		return protocolErr("PUSH_PROMISE though push is disabled")
	case *http2.PriorityFrame:
		if f.StreamID == f.StreamDep {
			c.streamError(f.StreamID, http2.ErrCodeProtocol)
		}
		return nil
	default:
		// Unknown and extension frames (PRIORITY_UPDATE, ...) are ignored.
		return nil
	}
}

// streamError resets one stream because the peer broke the protocol on it
// (RFC 9113 section 5.4.2).
func (c *conn) streamError(id uint32, code http2.ErrCode) {
	if s := c.lookup(id); s != nil {
		s.resetLocal(code)
		return
	}
	if c.role == roleServer {
		c.mu.Lock()
		if id%2 == 1 && id > c.lastPeerStream {
			c.lastPeerStream = id
		}
		c.mu.Unlock()
	}
	c.queueControl(ctrlFrame{kind: ctrlRST, stream: id, val: uint32(code)})
}

// readData reads a DATA frame's payload straight into the stream's chunks.
func (c *conn) readData(fh http2.FrameHeader) error {
	id := fh.StreamID
	if id == 0 {
		return protocolErr("DATA on stream 0")
	}
	if fh.Length > c.local.maxFrameSize {
		return connError{http2.ErrCodeFrameSize, fmt.Sprintf("DATA frame of %d bytes exceeds SETTINGS_MAX_FRAME_SIZE", fh.Length)}
	}
	n := int64(fh.Length) // flow control counts the whole payload, padding included
	data := n
	pad := int64(0)
	if fh.Flags.Has(http2.FlagDataPadded) {
		if n == 0 {
			return protocolErr("padded DATA frame without pad length")
		}
		b, err := c.br.ReadByte()
		if err != nil {
			return err
		}
		pad = int64(b)
		if pad >= n {
			return protocolErr("DATA padding %d exceeds payload %d", pad, n)
		}
		data = n - 1 - pad
	}
	end := fh.Flags.Has(http2.FlagDataEndStream)

	c.recvMu.Lock()
	if n > c.recvWindow {
		c.recvMu.Unlock()
		return connError{http2.ErrCodeFlowControl, fmt.Sprintf("peer sent %d bytes beyond the connection window", n-c.recvWindow)}
	}
	c.recvWindow -= n
	c.recvMu.Unlock()

	s := c.lookup(id)
	if s == nil {
		if c.isIdleID(id) {
			return protocolErr("DATA on idle stream %d", id)
		}
		// A stream we closed or reset: the peer may not know yet.
		c.returnConnCredit(n)
		_, err := c.br.Discard(int(data + pad))
		return err
	}
	if code := s.admitData(n); code != http2.ErrCodeNo {
		c.returnConnCredit(n)
		s.resetLocal(code)
		_, err := c.br.Discard(int(data + pad))
		return err
	}
	if overhead := n - data; overhead > 0 {
		// Padding is never delivered: give its credit back now.
		s.consumed(int(overhead))
		c.returnConnCredit(overhead)
	}
	if s.sending() {
		// Straight to the socket: a whole frame (up to sinkPiece) in one write, from a
		// buffer lent for the moment; only what the socket does not take is kept.
		for data > 0 {
			bp := sinkPieces.Get().(*[]byte)
			b := (*bp)[:min(data, int64(len(*bp)))]
			if _, err := io.ReadFull(c.br, b); err != nil {
				sinkPieces.Put(bp)
				return err
			}
			s.receive(b, nil)
			sinkPieces.Put(bp)
			data -= int64(len(b))
		}
	}
	for data > 0 {
		if data <= smallChunkSize {
			b := c.scratch[:data]
			if _, err := io.ReadFull(c.br, b); err != nil {
				return err
			}
			s.receive(b, nil)
			break
		}
		ck := bigChunks.Get().(*chunk)
		m := min(data, int64(len(ck.buf)))
		if _, err := io.ReadFull(c.br, ck.buf[:m]); err != nil {
			putChunk(ck)
			return err
		}
		ck.w = int(m)
		s.receive(ck.buf[:m], ck)
		data -= m
	}
	if pad > 0 {
		if _, err := c.br.Discard(int(pad)); err != nil {
			return err
		}
	}
	if end {
		s.onEndStream()
	}
	return nil
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	var tableSize uint32 // new HPACK table size + 1, 0 if unchanged
	var delta int64
	var streams []*Stream
	err := f.ForeachSetting(func(st http2.Setting) error {
		if err := st.Valid(); err != nil {
			return connError{http2.ErrCode(err.(http2.ConnectionError)), fmt.Sprintf("invalid setting %v", st)}
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		switch st.ID {
		case http2.SettingHeaderTableSize:
			tableSize = min(st.Val, headerTableSize) + 1
		case http2.SettingEnablePush:
			if c.role == roleClient && st.Val != 0 {
				return protocolErr("server sent SETTINGS_ENABLE_PUSH=1")
			}
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = st.Val
		case http2.SettingInitialWindowSize:
			delta += int64(st.Val) - c.peerInitWindow
			c.peerInitWindow = int64(st.Val)
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = st.Val
		case http2.SettingMaxHeaderListSize:
			c.peerMaxHeaders = st.Val
		}
		return nil
	})
	if err != nil {
		return err
	}
	if delta != 0 {
		c.mu.Lock()
		for _, s := range c.streams {
			streams = append(streams, s)
		}
		c.mu.Unlock()
		for _, s := range streams {
			if !s.adjustSendWindow(delta) {
				return connError{http2.ErrCodeFlowControl, "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window"}
			}
		}
	}
	c.queueControl(ctrlFrame{kind: ctrlSettingsAck, val: tableSize})
	return nil
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	if f.StreamID == 0 {
		c.mu.Lock()
		c.sendWindow += int64(f.Increment)
		if c.sendWindow > maxWindowSize {
			c.mu.Unlock()
			return connError{http2.ErrCodeFlowControl, "WINDOW_UPDATE overflows the connection window"}
		}
		if c.sendWindow > 0 && c.sendWindowWait != nil {
			close(c.sendWindowWait)
			c.sendWindowWait = nil
		}
		c.mu.Unlock()
		return nil
	}
	s := c.lookup(f.StreamID)
	if s == nil {
		if c.isIdleID(f.StreamID) {
			return protocolErr("WINDOW_UPDATE on idle stream %d", f.StreamID)
		}
		return nil
	}
	if !s.adjustSendWindow(int64(f.Increment)) {
		s.resetLocal(http2.ErrCodeFlowControl)
	}
	return nil
}

func (c *conn) onRSTStream(f *http2.RSTStreamFrame) error {
	s := c.lookup(f.StreamID)
	if s == nil {
		if c.isIdleID(f.StreamID) {
			return protocolErr("RST_STREAM on idle stream %d", f.StreamID)
		}
		return nil
	}
	s.onReset(f.ErrCode)
	return nil
}

// onGoAway stops new streams; a client also fails the streams the server says
// it never processed, so that they can be retried elsewhere.
func (c *conn) onGoAway(last uint32, code http2.ErrCode) {
	if code != http2.ErrCodeNo {
		c.log.Warn("hbone peer sent GOAWAY with an error", "code", code.String(), "last_stream", last)
	} else {
		c.log.Debug("hbone peer sent GOAWAY", "last_stream", last)
	}
	c.mu.Lock()
	if !c.goAwayRecv || last < c.goAwayLast {
		c.goAwayLast = last
	}
	c.goAwayRecv = true
	var refused []*Stream
	if c.role == roleClient {
		for id, s := range c.streams {
			if id > c.goAwayLast {
				refused = append(refused, s)
				delete(c.streams, id)
			}
		}
	}
	empty := len(c.streams) == 0 && c.reserved == 0
	c.mu.Unlock()
	for _, s := range refused {
		s.connFailed(fmt.Errorf("%w (GOAWAY)", ErrStreamRefused))
	}
	if empty {
		c.shutdown(errGracefulClose, true)
	}
}
