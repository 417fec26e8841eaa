/* Definitions shared by every Sluice BPF program.
 *
 * Every map is pinned by name, so each object file loaded into the same pin directory
 * shares one instance of each map, and an agent restart finds the maps it left behind.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* also IP6T_SO_ORIGINAL_DST */

/* Bits of struct config.flags. */
#define CFG_CAPTURE_DNS 1
#define CFG_ACCELERATE 2

/* Directions of struct pod_stats_key. */
#define DIR_OUTBOUND 0
#define DIR_INBOUND 1

struct config {
	__u32 flags;
	__u32 mark;      /* ztunnel's socket mark: such sockets are never captured */
	__u32 mark_mask;
	__u16 outbound_port; /* ztunnel's in-pod outbound listener, host order */
	__u16 inbound_port;  /* ztunnel's in-pod plaintext inbound listener */
	__u16 hbone_port;
	__u16 dns_port;
};

/* An address in IPv6 form; IPv4 addresses are stored v4-mapped (::ffff:a.b.c.d). */
struct addr {
	__u32 a[4];
};

struct orig_dst {
	struct addr addr;
	__u16 port;   /* network order */
	__u16 family; /* family of the original destination: AF_INET or AF_INET6 */
};

/* Key of orig_by_tuple: the captured client's address as the proxy sees it as peer. */
struct tuple_key {
	__u64 netns;
	struct addr addr;
	__u32 port; /* host order */
	__u32 pad;  /* explicit: lookups hash padding bytes too */
};

struct enrollment {
	__u32 flags; /* reserved */
};

struct pod_stats_key {
	__u64 netns;
	__u32 dir;
	__u32 pad;
};

struct pod_stats {
	__u64 opened;
	__u64 closed;
	__u64 bytes_sent;
	__u64 bytes_received;
	__u64 retransmits;
	__u64 rtt_sum_us;
	__u64 rtt_samples;
};

/* Key of the local-hop SOCKHASH (both ends of app <-> ztunnel connections). */
struct sock_key {
	__u64 netns;
	struct addr local;
	struct addr remote;
	__u32 local_port;  /* host order */
	__u32 remote_port; /* host order */
};

/* A TCP connection as its receiving end sees it. */
struct flow_key {
	struct addr local;
	struct addr remote;
	__u32 local_port;  /* host order */
	__u32 remote_port; /* host order */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_config SEC(".maps");

/* Network namespaces of enrolled pods, by netns cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct enrollment);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled SEC(".maps");

/* Original destination of captured sockets, by socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, __u64);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} orig_by_cookie SEC(".maps");

/* Original destination of captured sockets, by the client's local address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct tuple_key);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} orig_by_tuple SEC(".maps");

/* The node's network namespace: connections its own sockets open to the pods enrolled
 * on it (kubelet's probes) reach them past inbound capture. */
struct node_config {
	__u64 netns;              /* cookie of the node's network namespace; 0 until set */
	__u64 handshake_grace_ns; /* see HANDSHAKE_SEEN */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_node SEC(".maps");

/* Addresses of the pods enrolled on this node, with their netns cookies. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct addr);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pod_addrs SEC(".maps");

/* ztunnel's plaintext inbound listener for each pod address. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16384);
	__type(key, struct addr);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 32768);
	__type(key, struct pod_stats_key);
	__type(value, struct pod_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pod_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} local_hop SEC(".maps");

/* Handshakes sk_lookup lets through, filed by sockops.c: ztunnel's deliveries to the
 * application of the pod it is connecting in (from the client's address), and the node's
 * own connections to enrolled pods (kubelet's probes). Keyed as sk_lookup in the pod sees
 * the connection; the value is its state (HANDSHAKE_*). An entry lives from connect until
 * the pod accepts the connection or the connecting socket closes; once the connecting side
 * is established, it is dropped if its SYN never reached the pod as filed, and otherwise
 * honoured for node_config's handshake_grace_ns more. Two maps of one shape, so that a
 * flood of one kind (deliveries churned by a pod) cannot evict the other's entries. */
#define HANDSHAKE_FILED 0 /* filed; no SYN of it has reached the pod's sk_lookup yet */
#define HANDSHAKE_SEEN 1  /* sk_lookup let its SYN through */
#define HANDSHAKE_DROPPED 2 /* being forgotten: never honoured again (any deadline is later) */
/* Any larger value: the connecting side is established, and the entry is honoured until
 * this time (bpf_ktime_get_ns), for an ACK that completes a SYN cookie: node_config's
 * handshake_grace_ns after the connecting side was established (bpf.Config.HandshakeGrace). */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} delivery_handshakes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} probe_handshakes SEC(".maps");

/* handshake_passes says whether sk_lookup lets a connection through as a filed
 * handshake of map, and records that its SYN was seen. */
static __always_inline int handshake_passes(void *map, const struct flow_key *flow)
{
	__u64 *state = bpf_map_lookup_elem(map, flow);
	__u64 seen;

	if (!state)
		return 0;
	/* Atomic against sockops' answered() on another CPU: only a FILED entry becomes
	 * SEEN, so a deadline (or a drop) is never overwritten. */
	if (__sync_val_compare_and_swap(state, HANDSHAKE_FILED, HANDSHAKE_SEEN) == HANDSHAKE_FILED)
		return 1;
	seen = *state;
	return seen == HANDSHAKE_SEEN || bpf_ktime_get_ns() < seen;
}

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&sluice_config, &zero);
}

static __always_inline struct node_config *get_node_config(void)
{
	__u32 zero = 0;
	struct node_config *node = bpf_map_lookup_elem(&sluice_node, &zero);

	return node && node->netns ? node : NULL;
}

static __always_inline void addr_from_v4(struct addr *a, __u32 ip4)
{
	a->a[0] = 0;
	a->a[1] = 0;
	a->a[2] = bpf_htonl(0x0000ffff);
	a->a[3] = ip4;
}

/* addr_pick stores ip4 (v4-mapped) or ip6. Context fields must be read into locals by the
 * caller unconditionally: clang merges loads from different context offsets behind one
 * computed pointer, which the verifier rejects ("dereference of modified ctx ptr"). */
static __always_inline void addr_pick(struct addr *a, int v4, __u32 ip4, __u32 w0, __u32 w1,
				      __u32 w2, __u32 w3)
{
	if (v4) {
		addr_from_v4(a, ip4);
		return;
	}
	a->a[0] = w0;
	a->a[1] = w1;
	a->a[2] = w2;
	a->a[3] = w3;
}

static __always_inline int addr_is_v4mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int addr_equal(const struct addr *x, const struct addr *y)
{
	return x->a[0] == y->a[0] && x->a[1] == y->a[1] && x->a[2] == y->a[2] && x->a[3] == y->a[3];
}

static __always_inline int addr_is_loopback(const struct addr *a)
{
	if (addr_is_v4mapped(a->a))
		return (bpf_ntohl(a->a[3]) >> 24) == 127;
	return a->a[0] == 0 && a->a[1] == 0 && a->a[2] == 0 && a->a[3] == bpf_htonl(1);
}

static __always_inline int is_enrolled(__u64 netns)
{
	return bpf_map_lookup_elem(&enrolled, &netns) != NULL;
}

static __always_inline int is_ztunnel_mark(struct config *cfg, __u32 mark)
{
	return cfg->mark != 0 && (mark & cfg->mark_mask) == cfg->mark;
}

/* is_ztunnel_port: the one pod port inbound capture leaves alone, ztunnel's HBONE
 * listener. Its admin, metrics and readiness ports live in the node's netns, not the
 * pod's: in a pod, 15000/15020/15021/15053 are the application's, and leaving them
 * alone would let plaintext reach it past STRICT and every AuthorizationPolicy (as
 * Istio's in-pod rules, only 15008 is exempt). */
static __always_inline int is_ztunnel_port(struct config *cfg, __u16 port)
{
	return port == cfg->hbone_port;
}

/* ztunnel's delivery sockets (connecting to the application from the client's address)
 * carry this bit besides its mark (ztunnel/proxy, bpf.DeliveryMarkBit). */
#define DELIVERY_MARK_BIT 0x1000
