//go:build ignore

/* Local-hop acceleration between an application and ztunnel's outbound listener in the
 * same pod: data written on one end is put straight on the other end's receive queue,
 * skipping the loopback TCP stack. sockops.c fills local_hop; only sockets in it are seen
 * here. Bytes moved this way never reach TCP's counters, so they are counted here.
 */
#include "include/common.h"

char __license[] SEC("license") = "Dual MIT/GPL";

SEC("sk_msg")
int sluice_sk_msg(struct sk_msg_md *msg)
{
	struct config *cfg = get_config();
	struct pod_stats_key skey = {};
	struct sock_key key = {};
	struct pod_stats *st;
	__u32 size = msg->size;

	if (!cfg)
		return SK_PASS;
	key.netns = bpf_get_netns_cookie(msg);
	volatile struct sk_msg_md *v = msg; /* see addr_pick */

	addr_pick(&key.local, msg->family == AF_INET, v->remote_ip4, v->remote_ip6[0],
		  v->remote_ip6[1], v->remote_ip6[2], v->remote_ip6[3]);
	addr_pick(&key.remote, msg->family == AF_INET, v->local_ip4, v->local_ip6[0],
		  v->local_ip6[1], v->local_ip6[2], v->local_ip6[3]);
	key.local_port = bpf_ntohl(msg->remote_port); /* the port sits in the top half, network order */
	key.remote_port = msg->local_port;

	if (bpf_msg_redirect_hash(msg, &local_hop, &key, BPF_F_INGRESS) != SK_PASS)
		return SK_PASS; /* peer not accelerated: plain TCP carries it */

	skey.netns = key.netns;
	skey.dir = DIR_OUTBOUND;
	st = bpf_map_lookup_elem(&pod_metrics, &skey);
	if (st) {
		if (msg->local_port == cfg->outbound_port)
			st->bytes_received += size; /* ztunnel -> application */
		else
			st->bytes_sent += size; /* application -> ztunnel */
	}
	return SK_PASS;
}
