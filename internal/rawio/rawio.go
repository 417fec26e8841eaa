//go:build unix

// Package rawio reads and writes non-blocking sockets with raw system calls, which do
// not tell the Go scheduler that the thread entered the kernel.
//
// Go treats every system call as one that might block: if it lasts longer than the
// scheduler's monitor tick (20 µs), the monitor hands the thread's processor to another
// thread, which it wakes for the purpose. A proxy's writes to a TCP socket run the
// receiving end's network stack inline and often take that long, yet never block (the
// socket is non-blocking): with one processor, as ztunnel runs by default, every such
// write cost a thread wake-up and two context switches, and kept the monitor polling
// every 20 µs. Raw system calls on non-blocking sockets avoid all of it. Waiting for a
// socket to become ready still goes through the runtime's poller (syscall.RawConn).
package rawio

import (
	"syscall"
	"unsafe"
)

// Read is read(2) on a non-blocking fd: EAGAIN when nothing is ready, EINTR retried.
func Read(fd uintptr, p []byte) (int, error) {
	return do(syscall.SYS_READ, fd, p)
}

// Write is write(2) on a non-blocking fd: EAGAIN when the socket is full, EINTR retried.
func Write(fd uintptr, p []byte) (int, error) {
	return do(syscall.SYS_WRITE, fd, p)
}

func do(trap, fd uintptr, p []byte) (int, error) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	for {
		n, _, errno := syscall.RawSyscall(trap, fd, uintptr(ptr), uintptr(len(p)))
		switch errno {
		case 0:
			return int(n), nil
		case syscall.EINTR:
			continue
		}
		return 0, errno
	}
}
