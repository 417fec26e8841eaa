//go:build ignore

/* Inbound capture, attached to each enrolled pod's network namespace.
 *
 * A TCP connection arriving for any pod port is handed to ztunnel's plaintext inbound
 * listener (registered per pod address in inbound_listeners), except HBONE (15008, which
 * ztunnel serves itself), connections from loopback or from the pod's own address,
 * connections to ztunnel's loopback listeners (outbound 15001, DNS 15053), and two kinds
 * of connection sockops.c files while they handshake: ztunnel's own, delivering to the
 * application, and the node's own (kubelet's probes). A connection is let through, never
 * an address: traffic that merely carries a node address, such as NodePort traffic that
 * kube-proxy SNATs to it, is captured. If the pod's listener is missing, the connection
 * is dropped: a pod in the mesh never accepts plaintext behind ztunnel's back.
 */
#include "include/common.h"

char __license[] SEC("license") = "Dual MIT/GPL";

SEC("sk_lookup")
int sluice_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct config *cfg = get_config();
	struct addr local, remote;
	struct bpf_sock *sk;
	long err;

	if (!cfg || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (is_ztunnel_port(cfg, (__u16)ctx->local_port))
		return SK_PASS;
	volatile struct bpf_sk_lookup *v = ctx; /* see addr_pick */

	addr_pick(&local, ctx->family == AF_INET, v->local_ip4, v->local_ip6[0],
		  v->local_ip6[1], v->local_ip6[2], v->local_ip6[3]);
	addr_pick(&remote, ctx->family == AF_INET, v->remote_ip4, v->remote_ip6[0],
		  v->remote_ip6[1], v->remote_ip6[2], v->remote_ip6[3]);
	if (addr_is_loopback(&remote) || addr_equal(&local, &remote))
		return SK_PASS;
	/* A captured outbound connection (or DNS query) from an application that bound its
	 * pod address first reaches ztunnel's loopback listener from that address. Only
	 * those ports: with route_localnet=1 in the pod, a neighbour can reach 127.0.0.1
	 * from outside, and every other loopback port must stay out of its reach. */
	if (addr_is_loopback(&local) &&
	    (ctx->local_port == cfg->outbound_port || ctx->local_port == cfg->dns_port))
		return SK_PASS;
	{
		struct flow_key flow = {.local = local, .remote = remote,
					.local_port = ctx->local_port,
					.remote_port = bpf_ntohs(ctx->remote_port)};

		if (handshake_passes(&delivery_handshakes, &flow) ||
		    handshake_passes(&probe_handshakes, &flow))
			return SK_PASS;
	}

	sk = bpf_map_lookup_elem(&inbound_listeners, &local);
	if (!sk)
		return SK_DROP;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}
