//go:build ignore

/* getsockopt(SO_ORIGINAL_DST) for ztunnel's accepted sockets.
 *
 * Without conntrack the kernel answers ENOPROTOOPT; this program looks up what
 * connect.c/sockops.c recorded for the client's address (the accepted socket's peer) and
 * answers as iptables' REDIRECT would, so a proxy written for iptables works unchanged.
 */
#include "include/common.h"

char __license[] SEC("license") = "Dual MIT/GPL";

struct sockaddr_in4 {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

struct sockaddr_in6x {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

SEC("cgroup/getsockopt")
int sluice_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct tuple_key key = {};
	struct orig_dst *orig;

	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	if (!sk)
		return 1;
	key.netns = bpf_get_netns_cookie(ctx);
	{
		/* volatile: one load per field at a constant offset, which is all the verifier
		 * allows on a socket pointer. */
		volatile struct bpf_sock *vsk = sk;

		addr_pick(&key.addr, vsk->family == AF_INET, vsk->dst_ip4, vsk->dst_ip6[0],
			  vsk->dst_ip6[1], vsk->dst_ip6[2], vsk->dst_ip6[3]);
		key.port = bpf_ntohs(vsk->dst_port);
	}
	orig = bpf_map_lookup_elem(&orig_by_tuple, &key);
	if (!orig)
		return 1;

	if (ctx->level == SOL_IP) {
		struct sockaddr_in4 *sa = ctx->optval;

		if (orig->family != AF_INET || (void *)(sa + 1) > ctx->optval_end)
			return 1;
		__builtin_memset(sa, 0, sizeof(*sa));
		sa->family = AF_INET;
		sa->port = orig->port;
		sa->addr = orig->addr.a[3];
		ctx->optlen = sizeof(*sa);
	} else {
		struct sockaddr_in6x *sa = ctx->optval;

		if ((void *)(sa + 1) > ctx->optval_end)
			return 1;
		__builtin_memset(sa, 0, sizeof(*sa));
		sa->family = AF_INET6;
		sa->port = orig->port;
		sa->addr[0] = orig->addr.a[0];
		sa->addr[1] = orig->addr.a[1];
		sa->addr[2] = orig->addr.a[2];
		sa->addr[3] = orig->addr.a[3];
		ctx->optlen = sizeof(*sa);
	}
	ctx->retval = 0;
	return 1;
}
