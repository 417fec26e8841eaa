//go:build ignore

/* TCP lifecycle events of sockets in enrolled pods.
 *
 * - Files the handshakes inbound capture (sk_lookup.c) must let through: ztunnel's own
 *   connections delivering to the application, and the node's own connections to pods
 *   enrolled on it (kubelet's probes), from connect until the pod accepts the connection
 *   or the connecting socket closes (and, once it is established, not for long: see
 *   HANDSHAKE_SEEN in common.h).
 * - Files the original destination of each captured connection under the client's local
 *   address, which is how the proxy's accepted socket finds it (sockopt.c).
 * - Counts, per pod and direction, connections opened and closed, bytes sent (acked) and
 *   received, retransmits and RTT samples. Only the application's sockets are counted
 *   (never ztunnel's marked ones, though the application's end of a connection ztunnel
 *   delivered is), and loopback only for captured connections.
 * - Puts both ends of the application <-> ztunnel loopback hop into local_hop when
 *   acceleration is on (sk_msg.c).
 */
#include "include/common.h"

char __license[] SEC("license") = "Dual MIT/GPL";

/* enum BPF_TCP_* */
#define TCP_SYN_SENT 2
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_CLOSING 11

/* Per-socket bookkeeping: what has already been added to pod_stats. */
struct sock_state {
	__u64 netns;
	__u64 sent;
	__u64 received;
	__u32 dir;
	__u8 captured;
	__u8 fin_sent;     /* we sent a FIN: once acked, bytes_acked counts it */
	__u8 fin_received; /* the peer's FIN is in bytes_received */
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} sock_state SEC(".maps");

static __always_inline void local_addr(struct bpf_sock_ops *skops, struct addr *a)
{
	volatile struct bpf_sock_ops *v = skops; /* see addr_pick */
	__u32 family = v->family, ip4 = v->local_ip4;
	__u32 w0 = v->local_ip6[0], w1 = v->local_ip6[1];
	__u32 w2 = v->local_ip6[2], w3 = v->local_ip6[3];

	addr_pick(a, family == AF_INET, ip4, w0, w1, w2, w3);
}

static __always_inline void remote_addr(struct bpf_sock_ops *skops, struct addr *a)
{
	volatile struct bpf_sock_ops *v = skops; /* see addr_pick */
	__u32 family = v->family, ip4 = v->remote_ip4;
	__u32 w0 = v->remote_ip6[0], w1 = v->remote_ip6[1];
	__u32 w2 = v->remote_ip6[2], w3 = v->remote_ip6[3];

	addr_pick(a, family == AF_INET, ip4, w0, w1, w2, w3);
}

static __always_inline struct pod_stats *stats_for(__u64 netns, __u32 dir)
{
	struct pod_stats_key key = {.netns = netns, .dir = dir};
	struct pod_stats zero = {};
	struct pod_stats *st = bpf_map_lookup_elem(&pod_metrics, &key);

	if (st)
		return st;
	bpf_map_update_elem(&pod_metrics, &key, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&pod_metrics, &key);
}

static __always_inline void accelerate(struct bpf_sock_ops *skops, __u64 netns)
{
	struct sock_key key = {.netns = netns};

	local_addr(skops, &key.local);
	remote_addr(skops, &key.remote);
	key.local_port = skops->local_port;
	key.remote_port = bpf_ntohl(skops->remote_port);
	bpf_sock_hash_update(skops, &local_hop, &key, BPF_NOEXIST);
}

/* file_original files the original destination under the client's local address. */
static __always_inline void file_original(struct bpf_sock_ops *skops, __u64 netns,
					  struct orig_dst *orig)
{
	struct tuple_key key = {.netns = netns, .port = skops->local_port};

	/* An IPv4-mapped connect runs on IPv4 underneath: the proxy sees an IPv4 peer. */
	if (orig->family == AF_INET)
		addr_from_v4(&key.addr, skops->local_ip4);
	else
		local_addr(skops, &key.addr);
	bpf_map_update_elem(&orig_by_tuple, &key, orig, BPF_ANY);
}

/* handshake_key is how the receiving end (sk_lookup in the same pod) will see this
 * connection. */
static __always_inline void handshake_key(struct bpf_sock_ops *skops, struct flow_key *key)
{
	local_addr(skops, &key->remote);
	remote_addr(skops, &key->local);
	key->remote_port = skops->local_port;
	key->local_port = bpf_ntohl(skops->remote_port);
}

/* handshake_map says whether a connecting socket's handshake must be filed for
 * sk_lookup, and where:
 * - ztunnel's own connections delivering to the application of the pod they are made in
 *   (from the client's address): the destination is an address pod_addrs gives to the
 *   socket's own netns. Not ztunnel's connections anywhere else (HBONE, plaintext passed
 *   through to another pod of the node on a stale view of it): the destination's capture
 *   must meet those like any other connection;
 * - the node's own connections to pods enrolled on it (kubelet's probes).
 * NULL for every other socket. */
static __always_inline void *handshake_map(struct bpf_sock_ops *skops, struct flow_key *key)
{
	struct node_config *node = get_node_config();
	struct config *cfg = get_config();
	struct bpf_sock *sk = skops->sk;
	__u64 netns, *owner;

	if (!cfg || !sk)
		return NULL;
	handshake_key(skops, key);
	owner = bpf_map_lookup_elem(&pod_addrs, &key->local);
	if (!owner)
		return NULL;
	netns = bpf_get_netns_cookie(skops);
	if (is_ztunnel_mark(cfg, sk->mark))
		return *owner == netns ? &delivery_handshakes : NULL;
	if (node && netns == node->netns)
		return &probe_handshakes;
	return NULL;
}

/* connecting files the handshake, and asks for the socket's state changes so that it is
 * forgotten when the socket closes, if the pod has not accepted the connection first. */
static __always_inline void connecting(struct bpf_sock_ops *skops)
{
	struct flow_key key = {};
	void *map = handshake_map(skops, &key);
	__u64 filed = HANDSHAKE_FILED;

	if (!map)
		return;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	bpf_map_update_elem(map, &key, &filed, BPF_ANY);
}

/* forget deletes a handshake's 4-tuple from both maps without asking why it was filed,
 * which may have changed since (the pod unenrolled, an older program filed it). */
static __always_inline void forget_handshake(const struct flow_key *key)
{
	bpf_map_delete_elem(&probe_handshakes, key);
	bpf_map_delete_elem(&delivery_handshakes, key);
}

/* accepted forgets the handshake of a connection the pod has just accepted: only from
 * here on does the pod's stack find the connection without a listener lookup, and so
 * without sk_lookup. (When the application's listener answered with a SYN cookie, the
 * connecting side is established before the pod holds any socket of it, and the final
 * ACK goes through sk_lookup again.) */
static __always_inline void accepted(struct bpf_sock_ops *skops)
{
	struct flow_key key = {};

	if (!is_enrolled(bpf_get_netns_cookie(skops)))
		return;
	local_addr(skops, &key.local);
	remote_addr(skops, &key.remote);
	key.local_port = skops->local_port;
	key.remote_port = bpf_ntohl(skops->remote_port);
	forget_handshake(&key);
}

/* answer updates the connection's entry in map, if any, for answered(). */
static __always_inline void answer(void *map, const struct flow_key *key, __u64 until)
{
	__u64 *state = bpf_map_lookup_elem(map, key);

	if (!state)
		return;
	/* Atomic against sk_lookup on another CPU marking the entry SEEN. */
	if (__sync_val_compare_and_swap(state, HANDSHAKE_FILED, HANDSHAKE_DROPPED) == HANDSHAKE_FILED)
		bpf_map_delete_elem(map, key);
	else
		__sync_val_compare_and_swap(state, HANDSHAKE_SEEN, until);
}

/* answered is the connecting socket leaving SYN_SENT for a state other than CLOSE
 * (established, or SYN_RECV in a simultaneous open). A handshake whose SYN never reached
 * the pod as filed (conntrack rewrote its source port, or the other side's SYN crossed
 * it) is forgotten: it would only wait for some other connection's SYN. One that did is
 * honoured a while longer, for the ACK that completes a SYN cookie, and no longer: a
 * connection the pod never accepts must not keep its 4-tuple open to others. */
static __always_inline void answered(struct bpf_sock_ops *skops)
{
	struct node_config *node = get_node_config();
	struct flow_key key = {};
	__u64 until;

	/* Without a node config nothing was filed as the node's, but deliveries were:
	 * honour theirs a moment only. */
	until = bpf_ktime_get_ns() + (node ? node->handshake_grace_ns : 0) + HANDSHAKE_DROPPED + 1;
	handshake_key(skops, &key);
	answer(&probe_handshakes, &key, until);
	answer(&delivery_handshakes, &key, until);
}

/* closed forgets the handshake of a connecting socket that closes, whichever way
 * (refused, reset, timed out, closed by its owner, or closing long after it was
 * established): no entry outlives the socket it was filed for, so none can let a later
 * SYN with the same addresses and ports through. */
static __always_inline void closed(struct bpf_sock_ops *skops)
{
	struct flow_key key = {};

	handshake_key(skops, &key);
	forget_handshake(&key);
}

static __always_inline void established(struct bpf_sock_ops *skops, __u32 dir)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	struct config *cfg = get_config();
	struct bpf_sock *sk = skops->sk;
	struct orig_dst *orig = NULL;
	struct sock_state *state;
	struct pod_stats *st;
	struct addr remote;
	__u64 cookie;
	int delivered;

	if (!cfg || !sk || !is_enrolled(netns))
		return;
	remote_addr(skops, &remote);
	if (dir == DIR_OUTBOUND) {
		cookie = bpf_get_socket_cookie(skops);
		orig = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
		if (orig) {
			file_original(skops, netns, orig);
			if (cfg->flags & CFG_ACCELERATE)
				accelerate(skops, netns);
		}
	} else if ((cfg->flags & CFG_ACCELERATE) && addr_is_loopback(&remote) &&
		   skops->local_port == cfg->outbound_port) {
		accelerate(skops, netns); /* ztunnel's end of the local hop */
	}

	/* ztunnel's own sockets are not the application's. An accepted socket takes its
	 * listener's mark, or the SYN's when the listener has none (tcp_fwmark_accept, which
	 * ztunnel sets in the pod): the application's end of a connection ztunnel delivered
	 * carries the delivery bit besides ztunnel's mark, and is the application's. */
	delivered = dir == DIR_INBOUND && is_ztunnel_mark(cfg, sk->mark) && (sk->mark & DELIVERY_MARK_BIT);
	if (is_ztunnel_mark(cfg, sk->mark) && !delivered)
		return;
	if (addr_is_loopback(&remote) && !orig)
		return;
	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return;
	state->netns = netns;
	state->dir = dir;
	/* Through ztunnel (captured outbound, or delivered inbound: the accepted socket
	 * carries ztunnel's mark), the socket's RTT is that of the hop to ztunnel. */
	state->captured = orig != NULL || delivered;
	st = stats_for(netns, dir);
	if (st)
		st->opened++;
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG |
						 BPF_SOCK_OPS_RETRANS_CB_FLAG);
}

/* account adds to the pod's counters what the socket moved since the last call. */
static __always_inline struct pod_stats *account(struct bpf_sock_ops *skops,
						 struct sock_state *state)
{
	struct pod_stats *st = stats_for(state->netns, state->dir);
	__u64 sent = skops->bytes_acked;
	__u64 received = skops->bytes_received;

	if (!st)
		return NULL;
	/* Count only payload: the counters also advance by one for a FIN, and bytes_acked of
	 * the connecting side for its SYN. */
	if (state->dir == DIR_OUTBOUND && sent > 0)
		sent--;
	if (state->fin_sent && skops->snd_una == skops->snd_nxt && sent > 0)
		sent--;
	if (state->fin_received && received > 0)
		received--;
	if (sent > state->sent) {
		st->bytes_sent += sent - state->sent;
		state->sent = sent;
	}
	if (received > state->received) {
		st->bytes_received += received - state->received;
		state->received = received;
	}
	return st;
}

/* forget drops what connect.c and file_original recorded for a closing captured socket. */
static __always_inline void forget(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *orig = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	struct tuple_key key = {.port = skops->local_port};

	if (!orig)
		return;
	key.netns = bpf_get_netns_cookie(skops);
	if (orig->family == AF_INET)
		addr_from_v4(&key.addr, skops->local_ip4);
	else
		local_addr(skops, &key.addr);
	bpf_map_delete_elem(&orig_by_tuple, &key);
	bpf_map_delete_elem(&orig_by_cookie, &cookie);
}

SEC("sockops")
int sluice_sockops(struct bpf_sock_ops *skops)
{
	struct sock_state *state;
	struct pod_stats *st;
	struct bpf_sock *sk;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		connecting(skops);
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		established(skops, DIR_OUTBOUND);
		return 1;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		accepted(skops);
		established(skops, DIR_INBOUND);
		return 1;
	}

	sk = skops->sk;
	if (!sk)
		return 1;
	if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == TCP_CLOSE)
		closed(skops);
	else if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[0] == TCP_SYN_SENT)
		answered(skops);
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state)
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_RTT_CB:
		st = account(skops, state);
		if (st && !state->captured) {
			st->rtt_sum_us += skops->srtt_us >> 3;
			st->rtt_samples++;
		}
		break;
	case BPF_SOCK_OPS_RETRANS_CB:
		st = stats_for(state->netns, state->dir);
		if (st)
			st->retransmits++;
		break;
	case BPF_SOCK_OPS_STATE_CB:
		switch (skops->args[1]) {
		case TCP_FIN_WAIT1:
			state->fin_sent = 1;
			break;
		case TCP_CLOSE_WAIT:
		case TCP_CLOSING:
			state->fin_received = 1;
			break;
		case TCP_LAST_ACK:
			state->fin_sent = 1;
			break;
		}
		if (skops->args[1] != TCP_CLOSE)
			break;
		/* The full socket skips TIME_WAIT (a timewait socket takes over), so leaving
		 * FIN_WAIT for CLOSE normally means the peer's FIN arrived; a reset there is
		 * off by one byte, which dashboards will survive. */
		if (skops->args[0] == TCP_FIN_WAIT1 || skops->args[0] == TCP_FIN_WAIT2)
			state->fin_received = 1;
		st = account(skops, state);
		if (st)
			st->closed++;
		if (state->captured)
			forget(skops);
		bpf_sk_storage_delete(&sock_state, sk);
		break;
	}
	return 1;
}
