package hbone

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

const (
	defaultPoolIdleTimeout = 5 * time.Minute // ztunnel's pool_unused_release_timeout
	defaultDialTimeout     = 10 * time.Second
	maxConnectAttempts     = 3
)

// PoolKey says which connections may carry a stream: the same source and
// destination identities to the same HBONE endpoint.
type PoolKey struct {
	// Src and Dst are the SPIFFE IDs of the source workload (whose certificate
	// the connection presents) and of the destination expected to answer.
	Src, Dst string
	// Addr is the HBONE endpoint, normally the destination's ip:15008.
	Addr netip.AddrPort
	// SrcAddr is the source address the connection is bound to when the client
	// address is preserved (spoofed); zero when it is not.
	SrcAddr netip.Addr
}

func (k PoolKey) String() string {
	return fmt.Sprintf("%s->%s@%s", k.Src, k.Dst, k.Addr)
}

// Pool shares HBONE connections between streams with the same PoolKey. Set Dial
// before use; other fields are optional. A Pool must not be copied after use.
type Pool struct {
	// Dial returns an established connection for key, normally mutual TLS 1.3
	// with ALPN h2 whose peer was verified as key.Dst.
	Dial func(ctx context.Context, key PoolKey) (net.Conn, error)
	// MaxStreamsPerConn is the most streams on one connection; 0 means 100.
	// The server's SETTINGS_MAX_CONCURRENT_STREAMS lowers it.
	MaxStreamsPerConn int
	// IdleTimeout closes a connection after it had no stream that long; 0 means
	// 5 minutes, negative never.
	IdleTimeout time.Duration
	// DialTimeout bounds Dial plus the HTTP/2 preface; 0 means 10 s. A dial is
	// shared by all the callers waiting for it, so it is not bound to the
	// context of any one of them.
	DialTimeout time.Duration
	// Options configures the connections; its MaxConcurrentStreams and
	// IdleTimeout are replaced by the fields above.
	Options ClientOptions
	// Logger receives pool and connection events; nil discards them.
	Logger *slog.Logger

	mu     sync.Mutex
	conns  map[PoolKey][]*ClientConn
	dials  map[PoolKey]*dialCall
	closed bool

	dialCount, dialErrors, opened atomic.Uint64
}

// dialCall is a dial in progress, shared by every Connect for its key.
type dialCall struct {
	done chan struct{}
	err  error
}

// PoolStats is a snapshot of a Pool's state and counters.
type PoolStats struct {
	Conns      int    // open connections
	Streams    int    // open streams on them
	Dials      uint64 // connections dialed
	DialErrors uint64 // dials that failed
	Opened     uint64 // streams opened
}

// Connect opens a stream for req on a connection for key: one with a free
// stream slot if there is one, else a new one. Concurrent callers for a key
// share a dial, so a burst opens as many connections as it needs and no more.
// A stream the server refused before processing it is retried on another
// connection.
func (p *Pool) Connect(ctx context.Context, key PoolKey, req Request) (*Stream, error) {
	var err error
	for range maxConnectAttempts {
		var cc *ClientConn
		cc, err = p.acquire(ctx, key)
		if err != nil {
			return nil, err
		}
		var s *Stream
		s, err = cc.connectReserved(ctx, req)
		if err == nil {
			p.opened.Add(1)
			return s, nil
		}
		if !errors.Is(err, ErrStreamRefused) || ctx.Err() != nil {
			return nil, err
		}
		p.logger().Debug("hbone stream refused; retrying on another connection", "key", key.String(), "err", err)
	}
	return nil, err
}

// acquire returns a connection for key with a stream slot reserved.
func (p *Pool) acquire(ctx context.Context, key PoolKey) (*ClientConn, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrPoolClosed
		}
		for _, cc := range p.conns[key] {
			if cc.reserve() {
				p.mu.Unlock()
				return cc, nil
			}
		}
		d := p.dials[key]
		if d == nil {
			if p.dials == nil {
				p.dials = make(map[PoolKey]*dialCall)
			}
			d = &dialCall{done: make(chan struct{})}
			p.dials[key] = d
			go p.dial(context.WithoutCancel(ctx), key, d)
		}
		p.mu.Unlock()
		select {
		case <-d.done:
			if d.err != nil {
				return nil, d.err
			}
			// The new connection is in the pool; reserve a slot on it (or on any
			// other), or dial again if a burst took them all.
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (p *Pool) dial(ctx context.Context, key PoolKey, d *dialCall) {
	ctx, cancel := context.WithTimeout(ctx, orDefault(p.DialTimeout, defaultDialTimeout))
	defer cancel()
	p.dialCount.Add(1)
	var cc *ClientConn
	nc, err := p.Dial(ctx, key)
	if err == nil {
		opts := p.Options
		opts.MaxConcurrentStreams = orDefault(p.MaxStreamsPerConn, defaultMaxConcurrentStreams)
		opts.IdleTimeout = orDefault(p.IdleTimeout, defaultPoolIdleTimeout)
		if opts.IdleTimeout < 0 {
			opts.IdleTimeout = 0
		}
		if opts.Logger == nil {
			opts.Logger = p.Logger
		}
		var self *ClientConn
		var once sync.Once
		ready := make(chan struct{})
		self, err = newClientConn(nc, opts, func() {
			once.Do(func() {
				<-ready
				p.remove(key, self)
			})
		})
		cc = self
		close(ready)
	}
	if err != nil {
		p.dialErrors.Add(1)
		err = fmt.Errorf("hbone: connect to %s (%s): %w", key.Addr, key.Dst, err)
		p.logger().Warn("hbone dial failed", "key", key.String(), "err", err)
	}
	p.mu.Lock()
	delete(p.dials, key)
	if err == nil && p.closed {
		err = ErrPoolClosed
	} else if err == nil {
		if p.conns == nil {
			p.conns = make(map[PoolKey][]*ClientConn)
		}
		p.conns[key] = append(p.conns[key], cc)
	}
	d.err = err
	p.mu.Unlock()
	close(d.done)
	if errors.Is(err, ErrPoolClosed) && cc != nil {
		cc.Close()
	}
}

// remove drops a closed connection from the pool.
func (p *Pool) remove(key PoolKey, cc *ClientConn) {
	if cc == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	conns := slices.DeleteFunc(p.conns[key], func(x *ClientConn) bool { return x == cc })
	if len(conns) == 0 {
		delete(p.conns, key)
	} else {
		p.conns[key] = conns
	}
}

// Stats returns the pool's state and counters.
func (p *Pool) Stats() PoolStats {
	st := PoolStats{
		Dials:      p.dialCount.Load(),
		DialErrors: p.dialErrors.Load(),
		Opened:     p.opened.Load(),
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, conns := range p.conns {
		for _, cc := range conns {
			st.Conns++
			st.Streams += cc.ActiveStreams()
		}
	}
	return st
}

// Close closes every connection of the pool; their streams fail. Connect
// fails with ErrPoolClosed afterwards.
func (p *Pool) Close() error {
	p.mu.Lock()
	p.closed = true
	var all []*ClientConn
	for _, conns := range p.conns {
		all = append(all, conns...)
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, cc := range all {
		wg.Go(func() { cc.Close() })
	}
	wg.Wait()
	return nil
}

func (p *Pool) logger() *slog.Logger {
	if p.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return p.Logger
}
