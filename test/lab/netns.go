//go:build linux

package lab

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NetnsDir is where named network namespaces are bind-mounted, the directory `ip netns`
// lists.
const NetnsDir = "/run/netns"

// netnsPath is the bind mount of the named network namespace.
func netnsPath(name string) string { return filepath.Join(NetnsDir, name) }

// createNetns makes a new network namespace bind-mounted at NetnsDir/name, the way
// `ip netns add` does, with lo up. It fails if the name is taken.
func createNetns(name string) (path string, err error) {
	if err := ensureNetnsDir(); err != nil {
		return "", err
	}
	path = netnsPath(name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("netns %s already exists (left over from an earlier run? lab.Cleanup or `sluicectl lab down --name` with that lab's name removes it)", name)
		}
		return "", fmt.Errorf("create netns file: %w", err)
	}
	f.Close()

	errc := make(chan error, 1)
	go func() {
		// The thread's netns changes and is never restored: keep it locked so it exits
		// with this goroutine instead of going back to the scheduler.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		if err := unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind-mount netns to %s: %w", path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return "", fmt.Errorf("create netns %s: %w", name, err)
	}
	if err := withNetlink(path, func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		return h.LinkSetUp(lo)
	}); err != nil {
		return path, fmt.Errorf("netns %s: set lo up: %w", name, err)
	}
	return path, nil
}

// ensureNetnsDir makes NetnsDir a shared mount point, as iproute2 does, so namespaces
// mounted there later are seen by other mount namespaces (`ip netns exec`, containers).
func ensureNetnsDir() error {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", NetnsDir, err)
	}
	madeMount := false
	for {
		err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EINVAL) || madeMount {
			return fmt.Errorf("make %s a shared mount: %w", NetnsDir, err)
		}
		// Not a mount point yet: bind it onto itself, then retry.
		if err := unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind-mount %s onto itself: %w", NetnsDir, err)
		}
		madeMount = true
	}
}

// deleteNetns unmounts and removes a named network namespace. The namespace itself lives
// on while processes or sockets still use it. A missing namespace is not an error.
func deleteNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// listNetns returns the paths of named network namespaces whose name starts with prefix.
func listNetns(prefix string) ([]string, error) {
	entries, err := os.ReadDir(NetnsDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var paths []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			paths = append(paths, netnsPath(e.Name()))
		}
	}
	return paths, nil
}

func netnsExists(path string) bool {
	return ns.IsNSorErr(path) == nil
}

// withNetlink runs fn with a netlink handle bound to the namespace at path, without
// switching any thread's namespace.
func withNetlink(path string, fn func(*netlink.Handle) error) error {
	nsh, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fmt.Errorf("netlink handle in %s: %w", path, err)
	}
	defer h.Delete()
	return fn(h)
}

// doIn runs fn on a locked OS thread switched into the namespace at path. Sockets and
// child processes created by fn from that thread belong to the namespace.
func doIn(path string, fn func() error) error {
	return ns.WithNetNSPath(path, func(ns.NetNS) error { return fn() })
}

// dialIn connects from inside the namespace. addr should hold an IP literal: name lookups
// run on other threads, outside the namespace.
func dialIn(ctx context.Context, path, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := doIn(path, func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

func listenIn(path, network, addr string) (net.Listener, error) {
	var l net.Listener
	err := doIn(path, func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

func listenPacketIn(path, network, addr string) (net.PacketConn, error) {
	var c net.PacketConn
	err := doIn(path, func() error {
		var err error
		c, err = net.ListenPacket(network, addr)
		return err
	})
	return c, err
}

// sysctlIn writes a /proc/sys/net value of the namespace at path: /proc/sys/net shows
// the namespace of the thread that opens it.
func sysctlIn(path, key, value string) error {
	return doIn(path, func() error {
		p := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
		if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", key, value, err)
		}
		return nil
	})
}

// commandIn returns a command that runs name in the network namespace at netnsPath and,
// when cgroupPath is set, in that cgroup2 directory from its first instruction
// (clone3 CLONE_INTO_CGROUP). The namespace is entered by nsenter(1) from util-linux,
// which execs name in place, so cmd.Process.Pid is name's pid.
func commandIn(netnsPath, cgroupPath, name string, args ...string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--net=" + netnsPath, "--", name}, args...)...)
	if cmd.Err != nil {
		cmd.Err = fmt.Errorf("running %s in netns %s needs nsenter from util-linux: %w", name, netnsPath, cmd.Err)
		return cmd
	}
	if cgroupPath == "" {
		return cmd
	}
	fd, err := unix.Open(cgroupPath, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		cmd.Err = fmt.Errorf("open cgroup %s for %s: %w", cgroupPath, name, err)
		return cmd
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	// The fd must stay open until Start, and nothing tells us when the caller is done
	// with cmd: close it once cmd is garbage.
	runtime.AddCleanup(cmd, func(fd int) { unix.Close(fd) }, fd)
	return cmd
}
