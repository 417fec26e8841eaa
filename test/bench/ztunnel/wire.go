//go:build linux

package main

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/test/lab"
)

// The benchmark does not take the cipher suite on trust: it records the TLS ServerHello
// of each tunnel on the link between the nodes (in TLS 1.3 it is the last clear-text
// handshake message) and the report shows the cipher suite and key exchange group each
// tunnel actually negotiated.

// helloKey names a server endpoint on the wire.
type helloKey = netip.AddrPort

// serverHello is what a ServerHello says about a session.
type serverHello struct {
	version     uint16 // from supported_versions; 0x0304 is TLS 1.3
	cipherSuite uint16
	group       tls.CurveID // key_share
}

func (h serverHello) String() string {
	v := "TLS 1.2 or older"
	if h.version == tls.VersionTLS13 {
		v = "TLS 1.3"
	}
	return fmt.Sprintf("%s, %s, key exchange %s", v, tls.CipherSuiteName(h.cipherSuite), h.group)
}

// parseServerHello reads a ServerHello from the start of a TLS record stream.
func parseServerHello(b []byte) (serverHello, error) {
	var h serverHello
	if len(b) < 5 || b[0] != 22 { // handshake record
		return h, errors.New("not a TLS handshake record")
	}
	rec := b[5:min(len(b), 5+int(binary.BigEndian.Uint16(b[3:5])))]
	if len(rec) < 4 || rec[0] != 2 { // server_hello
		return h, errors.New("not a ServerHello")
	}
	body := rec[4:]
	// legacy_version(2) random(32) session_id<1> cipher_suite(2) compression(1) extensions<2>
	if len(body) < 35 {
		return h, errors.New("short ServerHello")
	}
	p := body[34:]
	sid := int(p[0])
	if len(p) < 1+sid+2+1+2 {
		return h, errors.New("short ServerHello")
	}
	p = p[1+sid:]
	h.cipherSuite = binary.BigEndian.Uint16(p)
	p = p[3:]
	ext := p[2:min(len(p), 2+int(binary.BigEndian.Uint16(p)))]
	for len(ext) >= 4 {
		typ, n := binary.BigEndian.Uint16(ext), int(binary.BigEndian.Uint16(ext[2:]))
		if len(ext) < 4+n {
			break
		}
		data := ext[4 : 4+n]
		switch typ {
		case 43: // supported_versions
			if n >= 2 {
				h.version = binary.BigEndian.Uint16(data)
			}
		case 51: // key_share
			if n >= 2 {
				h.group = tls.CurveID(binary.BigEndian.Uint16(data))
			}
		}
		ext = ext[4+n:]
	}
	return h, nil
}

// sniffer records the first ServerHello each server endpoint of interest sends, on one
// interface of a namespace (AF_PACKET).
type sniffer struct {
	fd    int
	want  map[helloKey]bool
	mu    sync.Mutex
	first map[helloKey][]byte
	quit  atomic.Bool
	done  chan struct{}
}

func sniff(n lab.Node, ifname string, servers []helloKey) (*sniffer, error) {
	s := &sniffer{want: map[helloKey]bool{}, first: map[helloKey][]byte{}, done: make(chan struct{})}
	for _, k := range servers {
		s.want[k] = true
	}
	err := n.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_IP)))
		if err != nil {
			return err
		}
		ifi, err := net.InterfaceByName(ifname)
		if err == nil {
			err = unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: ifi.Index})
		}
		if err != nil {
			unix.Close(fd)
			return err
		}
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
		s.fd = fd
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("packet capture on %s/%s: %w", n.Name, ifname, err)
	}
	go s.run()
	return s, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (s *sniffer) run() {
	defer close(s.done)
	buf := make([]byte, 1<<18) // GRO'd frames can be large
	for !s.quit.Load() {
		k, _, err := unix.Recvfrom(s.fd, buf, 0)
		if k > 0 {
			s.frame(buf[:k])
		}
		if err != nil && err != unix.EAGAIN && err != unix.EINTR {
			return
		}
	}
}

// frame keeps the TCP payload of an Ethernet/IPv4 frame if it is the first ServerHello
// from a wanted endpoint.
func (s *sniffer) frame(f []byte) {
	if len(f) < 14+20 || binary.BigEndian.Uint16(f[12:]) != unix.ETH_P_IP {
		return
	}
	ip := f[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[9] != unix.IPPROTO_TCP || len(ip) < ihl+20 {
		return
	}
	total := min(len(ip), int(binary.BigEndian.Uint16(ip[2:])))
	tcp := ip[ihl:total]
	src := netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[12:16])), binary.BigEndian.Uint16(tcp))
	off := int(tcp[12]>>4) * 4
	if !s.want[src] || len(tcp) <= off {
		return
	}
	payload := tcp[off:]
	// Only a segment that opens with a ServerHello: a connection of an earlier process
	// may still be closing from the same endpoint.
	if len(payload) < 6 || payload[0] != 22 || payload[5] != 2 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, seen := s.first[src]; !seen {
		s.first[src] = append([]byte(nil), payload...)
	}
}

// stop ends the capture and returns the ServerHello each wanted endpoint sent.
func (s *sniffer) stop() map[helloKey]serverHello {
	// The read loop wakes every 100 ms (SO_RCVTIMEO); the socket is closed only after
	// it ended, so its descriptor cannot be reused under it.
	s.quit.Store(true)
	<-s.done
	unix.Close(s.fd)
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[helloKey]serverHello{}
	for k, b := range s.first {
		if h, err := parseServerHello(b); err == nil {
			out[k] = h
		}
	}
	return out
}
