//go:build ignore

/* Outbound capture: connect(2), sendmsg(2) and the address calls that must keep lying
 * consistently about where a captured socket is connected.
 *
 * A TCP connect from an enrolled pod's network namespace is rewritten to ztunnel's in-pod
 * outbound listener on loopback; the original destination is remembered by socket cookie
 * (for getpeername and for sockops, which files it under the client's port so the proxy can
 * read it with SO_ORIGINAL_DST). DNS (port 53, TCP and UDP) goes to ztunnel's DNS port when
 * the CFG_CAPTURE_DNS flag is set.
 */
#include "include/common.h"

char __license[] SEC("license") = "Dual MIT/GPL";

#define DNS_PORT 53

/* decide returns the port to redirect to (host order), or 0 to leave the socket alone. */
static __always_inline __u16 decide(struct bpf_sock_addr *ctx, struct config *cfg,
				    const struct addr *dst, __u16 dport)
{
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return 0;
	if (is_ztunnel_mark(cfg, sk->mark))
		return 0;
	if (!is_enrolled(bpf_get_netns_cookie(ctx)))
		return 0;
	if (addr_is_loopback(dst))
		return 0;
	if (dport == DNS_PORT && (cfg->flags & CFG_CAPTURE_DNS) &&
	    (ctx->type == SOCK_DGRAM || ctx->type == SOCK_STREAM))
		return cfg->dns_port;
	if (ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP)
		return cfg->outbound_port;
	return 0;
}

static __always_inline void remember(struct bpf_sock_addr *ctx, const struct addr *dst,
				     __u16 family)
{
	struct orig_dst orig = {
		.addr = *dst,
		.port = (__u16)ctx->user_port,
		.family = family,
	};
	__u64 cookie = bpf_get_socket_cookie(ctx);

	bpf_map_update_elem(&orig_by_cookie, &cookie, &orig, BPF_ANY);
}

static __always_inline int capture4(struct bpf_sock_addr *ctx)
{
	struct config *cfg = get_config();
	struct addr dst;
	__u16 port;

	if (!cfg)
		return 1;
	addr_from_v4(&dst, ctx->user_ip4);
	port = decide(ctx, cfg, &dst, bpf_ntohs((__u16)ctx->user_port));
	if (!port)
		return 1;
	remember(ctx, &dst, AF_INET);
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(port);
	return 1;
}

static __always_inline int capture6(struct bpf_sock_addr *ctx)
{
	struct config *cfg = get_config();
	struct addr dst;
	__u16 port;
	int mapped;

	if (!cfg)
		return 1;
	dst.a[0] = ctx->user_ip6[0];
	dst.a[1] = ctx->user_ip6[1];
	dst.a[2] = ctx->user_ip6[2];
	dst.a[3] = ctx->user_ip6[3];
	port = decide(ctx, cfg, &dst, bpf_ntohs((__u16)ctx->user_port));
	if (!port)
		return 1;
	mapped = addr_is_v4mapped(dst.a);
	remember(ctx, &dst, mapped ? AF_INET : AF_INET6);
	/* ::ffff:127.0.0.1 keeps an IPv4-mapped connect on IPv4; native IPv6 goes to ::1. */
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = mapped ? bpf_htonl(0x0000ffff) : 0;
	ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
	ctx->user_port = bpf_htons(port);
	return 1;
}

SEC("cgroup/connect4")
int sluice_connect4(struct bpf_sock_addr *ctx)
{
	return capture4(ctx);
}

SEC("cgroup/connect6")
int sluice_connect6(struct bpf_sock_addr *ctx)
{
	return capture6(ctx);
}

/* Unconnected UDP: only DNS is ever redirected, and only with CFG_CAPTURE_DNS. */
SEC("cgroup/sendmsg4")
int sluice_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct config *cfg = get_config();

	if (!cfg || !(cfg->flags & CFG_CAPTURE_DNS))
		return 1;
	return capture4(ctx);
}

SEC("cgroup/sendmsg6")
int sluice_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct config *cfg = get_config();

	if (!cfg || !(cfg->flags & CFG_CAPTURE_DNS))
		return 1;
	return capture6(ctx);
}

/* redirected reports whether the peer address the kernel is about to show the application
 * is one of ztunnel's in-pod ports on loopback, i.e. one this file rewrote. */
static __always_inline int redirected(struct bpf_sock_addr *ctx, const struct addr *peer)
{
	struct config *cfg = get_config();
	__u16 port = bpf_ntohs((__u16)ctx->user_port);

	if (!cfg || !addr_is_loopback(peer))
		return 0;
	return port == cfg->outbound_port || port == cfg->dns_port;
}

/* restore puts the original destination back into an address the application reads. */
static __always_inline int restore4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *orig;
	struct addr peer;

	addr_from_v4(&peer, ctx->user_ip4);
	if (!redirected(ctx, &peer))
		return 1;
	orig = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (!orig || orig->family != AF_INET)
		return 1;
	ctx->user_ip4 = orig->addr.a[3];
	ctx->user_port = orig->port;
	return 1;
}

static __always_inline int restore6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *orig;
	struct addr peer;

	peer.a[0] = ctx->user_ip6[0];
	peer.a[1] = ctx->user_ip6[1];
	peer.a[2] = ctx->user_ip6[2];
	peer.a[3] = ctx->user_ip6[3];
	if (!redirected(ctx, &peer))
		return 1;
	orig = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (!orig)
		return 1;
	ctx->user_ip6[0] = orig->addr.a[0];
	ctx->user_ip6[1] = orig->addr.a[1];
	ctx->user_ip6[2] = orig->addr.a[2];
	ctx->user_ip6[3] = orig->addr.a[3];
	ctx->user_port = orig->port;
	return 1;
}

SEC("cgroup/getpeername4")
int sluice_getpeername4(struct bpf_sock_addr *ctx)
{
	return restore4(ctx);
}

SEC("cgroup/getpeername6")
int sluice_getpeername6(struct bpf_sock_addr *ctx)
{
	return restore6(ctx);
}

SEC("cgroup/recvmsg4")
int sluice_recvmsg4(struct bpf_sock_addr *ctx)
{
	return restore4(ctx);
}

SEC("cgroup/recvmsg6")
int sluice_recvmsg6(struct bpf_sock_addr *ctx)
{
	return restore6(ctx);
}
