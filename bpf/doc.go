// Package bpf holds Sluice's eBPF programs and the one place that loads, attaches, pins
// and reads them.
//
// Capture is keyed by network namespace: an enrolled pod is one whose netns cookie is in
// the enrolled map. The cgroup programs (connect, sendmsg, getpeername, recvmsg,
// getsockopt, sockops) are attached once to a cgroup2 directory above every pod (the
// cgroup2 root by default), and sk_lookup is attached to each enrolled pod's network
// namespace. Everything is pinned under /sys/fs/bpf/sluice/<instance>/ so it outlives the
// node agent: a restarted agent finds its maps and swaps new programs into the pinned
// links without a moment uncaptured.
//
// See docs/capture-design.md for the contracts with the node agent and ztunnel.
package bpf
