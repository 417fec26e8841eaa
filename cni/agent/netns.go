//go:build linux

package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// findNetns looks for the network namespace holding one of ips, for pods the agent never
// saw a CNI ADD for (running before the agent was installed, or its records were lost).
// Runtimes keep named namespaces under /var/run/netns (containerd, CRI-O, the lab); any
// other namespace is reachable through a process in it.
func findNetns(ips []string, netnsDirs []string) (string, error) {
	want := map[netip.Addr]bool{}
	addrs, _ := parseAddrs(ips)
	for _, a := range addrs {
		want[a] = true
	}
	if len(want) == 0 {
		return "", fmt.Errorf("pod has no IP yet")
	}
	var candidates []string
	for _, d := range netnsDirs {
		entries, _ := os.ReadDir(d)
		for _, e := range entries {
			candidates = append(candidates, filepath.Join(d, e.Name()))
		}
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err == nil {
			candidates = append(candidates, filepath.Join("/proc", p.Name(), "ns", "net"))
		}
	}
	seen := map[[2]uint64]bool{}
	for _, path := range candidates {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			continue
		}
		id := [2]uint64{st.Dev, st.Ino}
		if seen[id] {
			continue
		}
		seen[id] = true
		if holds(path, want) {
			return path, nil
		}
	}
	return "", fmt.Errorf("no network namespace on this node holds %v", ips)
}

func holds(path string, want map[netip.Addr]bool) bool {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return false
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return false
	}
	defer h.Close()
	addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && want[ip.Unmap()] {
			return true
		}
	}
	return false
}

// parseAddrs parses ips, returning the ones that parse and an error naming the others.
func parseAddrs(ips []string) ([]netip.Addr, error) {
	var (
		out  []netip.Addr
		errs []error
	)
	for _, s := range ips {
		a, err := netip.ParseAddr(s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, a.Unmap())
	}
	return out, errors.Join(errs...)
}
