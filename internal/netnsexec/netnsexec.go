//go:build linux

// Package netnsexec runs code inside another network namespace. Sockets made there stay
// in that namespace and may be used from any goroutine afterwards, which is how the node
// agent, ztunnel and the test fixtures open sockets inside pods.
package netnsexec

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs fn on a fresh OS thread that has entered ns. The thread is never unlocked, so
// it is thrown away when fn returns and nothing else ever runs in the namespace by
// accident.
func Do(ns *os.File, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with this goroutine
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", ns.Name(), err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}
