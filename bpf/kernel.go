//go:build linux

package bpf

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
)

// CheckKernel refuses a kernel that lacks what capture needs, naming the missing piece,
// rather than running half-captured.
func CheckKernel() error {
	checks := []struct {
		what string
		err  error
	}{
		{"program type cgroup/sock_addr (connect hooks)", features.HaveProgramType(ebpf.CGroupSockAddr)},
		{"program type cgroup/sockopt (SO_ORIGINAL_DST)", features.HaveProgramType(ebpf.CGroupSockopt)},
		{"program type sockops", features.HaveProgramType(ebpf.SockOps)},
		{"program type sk_lookup (kernel 5.9+)", features.HaveProgramType(ebpf.SkLookup)},
		{"program type sk_msg", features.HaveProgramType(ebpf.SkMsg)},
		{"map type SOCKHASH", features.HaveMapType(ebpf.SockHash)},
		{"map type sk_storage", features.HaveMapType(ebpf.SkStorage)},
		{"helper bpf_get_netns_cookie in cgroup/sock_addr", features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnGetNetnsCookie)},
		{"helper bpf_get_netns_cookie in sockops (kernel 5.15+)", features.HaveProgramHelper(ebpf.SockOps, asm.FnGetNetnsCookie)},
		{"helper bpf_sk_assign in sk_lookup", features.HaveProgramHelper(ebpf.SkLookup, asm.FnSkAssign)},
	}
	var errs []error
	for _, c := range checks {
		if c.err != nil {
			errs = append(errs, fmt.Errorf("kernel lacks %s: %w", c.what, c.err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("this kernel cannot run Sluice capture (need 5.15 or newer with BPF enabled): %w", errors.Join(errs...))
	}
	return nil
}

// Cgroup2Root finds where the unified (v2) cgroup hierarchy is mounted: /sys/fs/cgroup on
// pure v2 hosts, /sys/fs/cgroup/unified on hybrid ones.
func Cgroup2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		// ... mount-point ... - fstype source options
		fields := strings.Fields(s.Text())
		for i, fl := range fields {
			if fl == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return fields[4], nil
			}
		}
	}
	if err := s.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 filesystem mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or pass the cgroup path")
}
