package hbone

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
)

// tlsPair returns both ends of a loopback TLS 1.3 connection made with TLSClient and
// TLSServer; they are closed when the test ends.
func tlsPair(t *testing.T) (client, server *TLSConn) {
	t.Helper()
	serverConf, clientConf := selfSignedTLS(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sraw := <-accepted
	if sraw == nil {
		raw.Close()
		t.Fatal("accept failed")
	}
	client, server = TLSClient(raw, clientConf), TLSServer(sraw, serverConf)
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// Records gathered by TLSConn reach the peer intact and in order, in both directions at
// once and for writes of every size around the record and buffer limits, and an idle
// connection keeps no gathering buffer.
func TestTLSConnBatchedWrites(t *testing.T) {
	client, server := tlsPair(t)

	sizes := []int{1, 100, 16 << 10, 16<<10 + 1, IdealWrite, writeBufSize, 3*writeBufSize + 17, 1 << 20}
	send := func(c *TLSConn, seed uint64) ([]byte, error) {
		var all []byte
		for i, n := range sizes {
			p := pattern(seed+uint64(i), n)
			all = append(all, p...)
			if _, err := c.Write(p); err != nil {
				return nil, err
			}
		}
		return all, nil
	}
	total := 0
	for _, n := range sizes {
		total += n
	}
	var wg sync.WaitGroup
	check := func(name string, from, to *TLSConn, seed uint64) {
		defer wg.Done()
		got := make(chan []byte, 1)
		go func() {
			b := make([]byte, total)
			_, err := io.ReadFull(to, b)
			if err != nil {
				t.Errorf("%s: read: %v", name, err)
			}
			got <- b
		}()
		sent, err := send(from, seed)
		if err != nil {
			t.Errorf("%s: write: %v", name, err)
			return
		}
		if !bytes.Equal(<-got, sent) {
			t.Errorf("%s: the bytes received differ from those sent", name)
		}
	}
	wg.Add(2)
	go check("client to server", client, server, 1)
	go check("server to client", server, client, 100)
	wg.Wait()
	for name, c := range map[string]*TLSConn{"client": client, "server": server} {
		c.raw.mu.Lock()
		held := c.raw.buf != nil
		c.raw.mu.Unlock()
		if held {
			t.Errorf("%s keeps a gathering buffer between writes", name)
		}
	}
}

// Concurrent Writes through one TLSConn each arrive whole: gathering one does not drop or
// interleave another's records.
func TestTLSConnConcurrentWrites(t *testing.T) {
	client, server := tlsPair(t)

	const writers, writes, size = 4, 40, 40 << 10
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			block := bytes.Repeat([]byte{byte('a' + w)}, size)
			for range writes {
				if _, err := client.Write(block); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
			}
		})
	}
	buf := make([]byte, size)
	for i := range writers * writes {
		if _, err := io.ReadFull(server, buf); err != nil {
			t.Fatalf("block %d: %v", i, err)
		}
		if c := buf[0]; bytes.Count(buf, []byte{c}) != size {
			t.Fatalf("block %d mixes the bytes of several writes", i)
		}
	}
	wg.Wait()
}
