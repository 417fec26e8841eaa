//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/netnsexec"
)

// Enroll puts the pod whose network namespace is at netnsPath under capture: its netns
// cookie joins the enrolled map (outbound) and sk_lookup is attached to the namespace
// (inbound). addrs are the pod's addresses: inbound capture lets the node's own
// connections to them (kubelet's probes) through. Enrolling an enrolled namespace again
// only updates its addresses. It returns the cookie, which names the pod's capture from
// then on.
func (c *Capture) Enroll(netnsPath string, addrs []netip.Addr) (uint64, error) {
	ns, err := os.Open(netnsPath)
	if err != nil {
		return 0, fmt.Errorf("open pod network namespace: %w", err)
	}
	defer ns.Close()
	cookie, err := netnsCookie(ns)
	if err != nil {
		return 0, err
	}
	pin := cookiePin(c.netnsDir(), cookie)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		err = l.Update(c.sklookup.SluiceSkLookup)
		l.Close()
		if err != nil {
			return 0, fmt.Errorf("update sk_lookup in %s: %w", netnsPath, err)
		}
	} else {
		l, err := link.AttachNetNs(int(ns.Fd()), c.sklookup.SluiceSkLookup)
		if err != nil {
			return 0, fmt.Errorf("attach sk_lookup to %s: %w", netnsPath, err)
		}
		err = l.Pin(pin)
		l.Close()
		if err != nil {
			return 0, fmt.Errorf("pin sk_lookup link for %s: %w", netnsPath, err)
		}
	}
	if err := c.putPodAddrs(cookie, addrs); err != nil {
		return 0, err
	}
	// Inbound is in place before outbound, so no connection is half captured.
	if err := c.sockops.Enrolled.Put(cookie, sockopsEnrollment{}); err != nil {
		_, derr := c.deletePodAddrs(cookie, nil)
		return 0, errors.Join(fmt.Errorf("enroll netns cookie %d: %w", cookie, err), derr)
	}
	return cookie, nil
}

// Unenroll takes the pod with netns cookie out of capture; traffic goes direct again.
// Unenrolling an unknown cookie is not an error.
func (c *Capture) Unenroll(cookie uint64) error {
	var errs []error
	if err := c.sockops.Enrolled.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, fmt.Errorf("unenroll netns cookie %d: %w", cookie, err))
	}
	addrs, err := c.deletePodAddrs(cookie, nil)
	errs = append(errs, unpinLink(cookiePin(c.netnsDir(), cookie)), err, c.forgetHandshakesTo(addrs))
	for _, dir := range []uint32{dirOutbound, dirInbound} {
		key := sockopsPodStatsKey{Netns: cookie, Dir: dir}
		if err := c.sockops.PodMetrics.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete pod metrics: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Enrolled lists the netns cookies under capture.
func (c *Capture) Enrolled() ([]uint64, error) {
	var (
		cookies []uint64
		key     uint64
		val     sockopsEnrollment
	)
	it := c.sockops.Enrolled.Iterate()
	for it.Next(&key, &val) {
		cookies = append(cookies, key)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list enrolled: %w", err)
	}
	return cookies, nil
}

func toAddr(a netip.Addr) sockopsAddr {
	b := a.As16() // IPv4 becomes ::ffff:a.b.c.d, as the programs store it
	var out sockopsAddr
	for i := range out.A {
		out.A[i] = uint32(b[4*i]) | uint32(b[4*i+1])<<8 | uint32(b[4*i+2])<<16 | uint32(b[4*i+3])<<24
	}
	return out
}

// RegisterInboundListener makes ln (ztunnel's plaintext inbound listener in a pod's
// network namespace) the socket that inbound connections to podIP are steered to. pinDir
// is the capture instance's pin directory (Config.PinDir). Until a listener is registered,
// inbound connections to an enrolled pod are dropped.
func RegisterInboundListener(pinDir string, podIP netip.Addr, ln syscall.Conn) error {
	m, err := ebpf.LoadPinnedMap(pinDir+"/inbound_listeners", nil)
	if err != nil {
		return fmt.Errorf("open inbound_listeners map in %s (is the node agent running?): %w", pinDir, err)
	}
	defer m.Close()
	rc, err := ln.SyscallConn()
	if err != nil {
		return err
	}
	var putErr error
	err = rc.Control(func(fd uintptr) {
		putErr = m.Put(toAddr(podIP.Unmap()), uint64(fd))
	})
	if err == nil {
		err = putErr
	}
	if err != nil {
		return fmt.Errorf("register inbound listener for %s: %w", podIP, err)
	}
	return nil
}

// UnregisterInboundListener removes the listener registered for podIP, but only if it is
// still ln: during a handover the successor has registered its own, which must stay.
func UnregisterInboundListener(pinDir string, podIP netip.Addr, ln syscall.Conn) error {
	m, err := ebpf.LoadPinnedMap(pinDir+"/inbound_listeners", nil)
	if err != nil {
		return err
	}
	defer m.Close()
	key := toAddr(podIP.Unmap())
	var registered uint64 // a SOCKHASH answers lookups with the socket's cookie
	if err := m.Lookup(key, &registered); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return err
	}
	mine, err := socketCookie(ln)
	if err != nil {
		return err
	}
	if registered != mine {
		return nil
	}
	if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return nil
}

func socketCookie(c syscall.Conn) (uint64, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		cookie uint64
		gerr   error
	)
	if err := rc.Control(func(fd uintptr) { cookie, gerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) }); err != nil {
		return 0, err
	}
	return cookie, gerr
}

// NetnsCookie returns the kernel's cookie for the network namespace at path.
func NetnsCookie(path string) (uint64, error) {
	ns, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer ns.Close()
	return netnsCookie(ns)
}

// netnsCookie reads SO_NETNS_COOKIE from a socket made inside ns.
func netnsCookie(ns *os.File) (uint64, error) {
	var cookie uint64
	err := netnsexec.Do(ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket in %s: %w", ns.Name(), err)
		}
		defer unix.Close(fd)
		if cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE); err != nil {
			return fmt.Errorf("read netns cookie of %s: %w", ns.Name(), err)
		}
		return nil
	})
	return cookie, err
}
