//go:build linux

package bpf

import (
	"fmt"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// OriginalDst returns where a connection accepted on ztunnel's outbound listener was
// originally going, with getsockopt(SO_ORIGINAL_DST): the same call a proxy makes under
// iptables REDIRECT, answered here by the cgroup/getsockopt program.
func OriginalDst(c syscall.Conn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var (
		ap     netip.AddrPort
		optErr error
	)
	err = rc.Control(func(fd uintptr) {
		ap, optErr = originalDst(int(fd))
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	return ap, optErr
}

// ip6tSoOriginalDst is IP6T_SO_ORIGINAL_DST from linux/netfilter_ipv6/ip6_tables.h.
const ip6tSoOriginalDst = 80

func originalDst(fd int) (netip.AddrPort, error) {
	var sa unix.RawSockaddrInet6 // large enough for either family
	size := uint32(unix.SizeofSockaddrInet4)
	err := getsockopt(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST, unsafe.Pointer(&sa), &size)
	if err != nil {
		size = unix.SizeofSockaddrInet6
		if err6 := getsockopt(fd, unix.SOL_IPV6, ip6tSoOriginalDst, unsafe.Pointer(&sa), &size); err6 != nil {
			return netip.AddrPort{}, fmt.Errorf("no original destination for this connection (was it captured by Sluice?): %w", err)
		}
	}
	port := uint16(sa.Port>>8) | uint16(sa.Port&0xff)<<8 // network order in memory
	switch sa.Family {
	case unix.AF_INET:
		v4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&sa))
		return netip.AddrPortFrom(netip.AddrFrom4(v4.Addr), port), nil
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port), nil
	}
	return netip.AddrPort{}, fmt.Errorf("original destination has unknown address family %d", sa.Family)
}

func getsockopt(fd, level, name int, val unsafe.Pointer, size *uint32) error {
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name),
		uintptr(val), uintptr(unsafe.Pointer(size)), 0)
	if e != 0 {
		return e
	}
	return nil
}
