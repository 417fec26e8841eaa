// Package lab builds a small Kubernetes-shaped network on one Linux machine: nodes and
// pods are network namespaces, pods get their network from the real CNI chain (bridge +
// host-local, optionally followed by sluice-cni) run through libcni exactly as a
// container runtime runs it, and every pod has its own cgroup2 directory.
//
// It exists so that data-path tests (BPF capture, ztunnel, waypoints) and the local demo
// (`sluicectl lab up`) exercise the same kernel objects a real node has, without a
// cluster, and so that everything they create can be found and removed again, even after
// the process that created it crashed.
//
// Layout of a lab named N with two nodes:
//
//	netns N-fabric   bridge br0 172.30.0.1/24, routes 10.244.i.0/24 via node i ("the outside")
//	netns N-node0    eth0 172.30.0.10/24, cni0 10.244.0.1/24 (made by the bridge plugin),
//	                 route 10.244.1.0/24 via 172.30.0.11, default via 172.30.0.1, ip_forward=1
//	netns N-node1    eth0 172.30.0.11/24, cni0 10.244.1.1/24, ...
//	netns N-<ns>-<pod>  eth0 10.244.i.x/24 from host-local, lo up
//
//	cgroup2 <CgroupRoot>/N-node0/            parent of node0's pods (attach per-node programs here)
//	        <CgroupRoot>/N-node0/<ns>_<pod>/ one pod
//	        <CgroupRoot>/N-node0-host/       processes started with Node.Command (agents, ztunnel)
//
//	<StateDir>/state.json                    what exists, for Open, Down and Cleanup
//	<StateDir>/registry/{nodes,namespaces,pods}/*.yaml   Kubernetes manifests of the lab
//	<StateDir>/nodes/N-node0/net.d/10-lab.conflist        the node's CNI config
//
// Nothing is created in the root network namespace: the lab's links, addresses and routes
// all live in namespaces it owns, so two labs (with different names) can run side by side
// and a crash never leaves the host's network changed.
//
// Sockets made with Pod.Dial and Pod.Listen live in the pod's network namespace but belong
// to the calling process's cgroup; use Pod.Command for traffic that cgroup-attached BPF
// programs must see as coming from the pod.
package lab
