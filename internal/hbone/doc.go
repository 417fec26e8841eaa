// Package hbone speaks HBONE, Istio's tunnel protocol: TCP connections carried as
// HTTP/2 CONNECT streams over mutual TLS 1.3, wire-compatible with Istio's ztunnel.
//
// It has its own small HTTP/2 engine, built on the frame codec of
// golang.org/x/net/http2 and its HPACK package, instead of net/http, for three
// reasons that matter on a mesh's hottest path:
//
//   - Half-close. A proxied TCP connection closes each direction on its own: each
//     side ends its direction with an empty DATA frame carrying END_STREAM while
//     still reading the other. Go's HTTP/2 server cannot end a response while the
//     request body is still being read.
//   - Memory. An idle stream holds no buffer: received DATA sits in pooled chunks
//     only until the application reads it, and the write buffer of a connection
//     goes back to a pool whenever it has been flushed. An idle stream costs a few
//     hundred bytes (see BenchmarkIdleStreamMemory).
//   - Control. Flow control, keepalive, limits and error handling follow RFC 9113
//     with the settings Istio's ztunnel uses (4 MiB stream and 16 MiB connection
//     windows, 1 MiB frames, 16 KiB header lists, 100 concurrent streams, PING every
//     10 s with a 20 s timeout),
//     and a hostile peer cannot make it allocate without bound.
//
// The engine handles CONNECT only. A ClientConn opens streams on one connection,
// a Pool shares connections between callers with the same PoolKey, and a Server
// serves the streams of accepted connections. TLS, certificates and SPIFFE
// identities are the caller's job: both sides take an established net.Conn.
package hbone
