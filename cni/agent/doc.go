// Package agent is Sluice's node agent: the DaemonSet process that owns capture on one
// node. It installs the CNI plugin, loads and pins the BPF programs, answers the plugin's
// ADD/DEL/CHECK, enrolls and unenrolls pods as their labels say, hands each enrolled pod's
// network namespace to ztunnel, and exports the kernel's per-pod TCP counters.
//
// One reconcile function decides a pod's capture from its labels and what the agent
// knows of its network namespace; the CNI server, the pod source and the restart path all
// go through it, so they cannot disagree.
package agent
