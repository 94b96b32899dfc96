// SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0)
/*
 * The data path's programs, one object so every program shares the maps;
 * each concern lives in its header under bpf/lib/:
 *
 * cgroup/connect4, cgroup/connect6: an enrolled socket connecting to a
 *   service VIP:port is rewritten to one of the service's backends (and its
 *   target port) before the kernel builds the connection, so no packet ever
 *   carries the VIP and no proxy hop is needed. Where the service, or the
 *   picked backend, or a directly addressed workload has a waypoint, the
 *   connection goes to the waypoint instead and the original destination is
 *   kept in the socket's storage.
 * sockops: puts established sockets that need the sk_msg program (a pending
 *   waypoint TLV, or same-host acceleration) into km_sock, and takes them
 *   out again once their data goes through TCP for good and nothing can be
 *   redirected to them (see km_conn).
 * sk_msg: on a waypoint socket's first send, prepends the TLV carrying the
 *   original destination; with acceleration, sends go straight into the
 *   peer socket's receive queue when the peer is a local enrolled socket.
 * Telemetry (lib/telemetry.h): connect4/6 report an enrolled socket's
 *   connect with its original destination; the inet_sock_set_state
 *   tracepoint reports each end's open and close.
 * Limits (lib/limits.h): a service's circuit breaker and per-pod connect
 *   rate limit refuse a connect at connect4/6; sockops keeps the counts,
 *   by the same note.
 * sk_lookup (on each enrolled netns): refuses a connection that an
 *   authorization policy of its destination denies, before any listener
 *   can take it (the client gets a reset: connection refused). The connect
 *   programs refuse it earlier still where the client is enrolled here.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "kmesh.h"
#include "lib/common.h"
#include "lib/redirect.h"
#include "lib/sock.h"
#include "lib/waypoint.h"
#include "lib/accel.h"
#include "lib/authz.h"
#include "lib/telemetry.h"
#include "lib/limits.h"

SEC("cgroup/connect4")
int kmesh_connect4(struct bpf_sock_addr *ctx)
{
	/*
	 * Enrollment first: attached at the cgroup2 root, most sockets on a node
	 * are not enrolled, and they then pay one lookup.
	 */
	if (ctx->type != SOCK_STREAM)
		return 1;
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct manage_value *m = bpf_map_lookup_elem(&km_manage, &netns);
	if (!m)
		return 1;
	stat_inc(KMESH_STAT_ENROLLED_CONNECT);

	struct kmesh_addr addr = {
		.ip6 = { 0, 0, bpf_htonl(0x0000ffff), ctx->user_ip4 },
	};
	__u32 port = ctx->user_port;
	const struct kmesh_addr dst = addr;
	const __u32 dst_port = port;
	struct sock_state orig = {};
	struct conn_note note = {};
	const struct service_value *hit = NULL;
	enum verdict v = redirect(&addr, &port, true, m->flags & KMESH_NETNS_WAYPOINT, &orig, &hit);
	if (v == V_REJECT)
		return 0;
	if (hit && !limits_connect(hit, netns, &note))
		return 0;
	/* No way to carry the original destination: fail closed. */
	if (v == V_WAYPOINT && !remember_orig(ctx, &orig, netns))
		return 0;
	if (v == V_REWRITE || v == V_WAYPOINT) {
		ctx->user_ip4 = addr.ip6[3];
		ctx->user_port = port;
	}
	/* A waypoint's own policies are its destination's business. */
	if (v != V_WAYPOINT && !authz_connect(m, &addr, port, true))
		return 0;
	tele_connect(ctx, &dst, dst_port);
	note_commit(ctx, &note);
	return 1;
}

SEC("cgroup/connect6")
int kmesh_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct manage_value *m = bpf_map_lookup_elem(&km_manage, &netns);
	if (!m)
		return 1;
	stat_inc(KMESH_STAT_ENROLLED_CONNECT);

	struct kmesh_addr addr;
	addr.ip6[0] = ctx->user_ip6[0];
	addr.ip6[1] = ctx->user_ip6[1];
	addr.ip6[2] = ctx->user_ip6[2];
	addr.ip6[3] = ctx->user_ip6[3];
	__u32 port = ctx->user_port;
	const struct kmesh_addr dst = addr;
	const __u32 dst_port = port;
	struct sock_state orig = {};
	struct conn_note note = {};
	const struct service_value *hit = NULL;
	enum verdict v = redirect(&addr, &port, addr_is_v4(&addr), m->flags & KMESH_NETNS_WAYPOINT,
				  &orig, &hit);
	if (v == V_REJECT)
		return 0;
	if (hit && !limits_connect(hit, netns, &note))
		return 0;
	if (v == V_WAYPOINT && !remember_orig(ctx, &orig, netns))
		return 0;
	if (v == V_REWRITE || v == V_WAYPOINT) {
		ctx->user_ip6[0] = addr.ip6[0];
		ctx->user_ip6[1] = addr.ip6[1];
		ctx->user_ip6[2] = addr.ip6[2];
		ctx->user_ip6[3] = addr.ip6[3];
		ctx->user_port = port;
	}
	if (v != V_WAYPOINT && !authz_connect(m, &addr, port, addr_is_v4(&addr)))
		return 0;
	tele_connect(ctx, &dst, dst_port);
	note_commit(ctx, &note);
	return 1;
}

/*
 * Reads one context field where it is written: the verifier refuses a
 * context pointer plus offset, which the compiler would otherwise form by
 * sharing one load between the two families' branches.
 */
#define ctx_read(dst, field)                  \
	do {                                  \
		__u32 __v = (field);          \
		asm volatile("" : "+r"(__v)); \
		(dst) = __v;                  \
	} while (0)

SEC("sk_lookup")
int kmesh_authz_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	struct kmesh_addr src = {}, dst = {};
	__u32 port;
	ctx_read(port, ctx->local_port);
	if (ctx->family == AF_INET) {
		src.ip6[2] = bpf_htonl(0x0000ffff);
		dst.ip6[2] = bpf_htonl(0x0000ffff);
		ctx_read(src.ip6[3], ctx->remote_ip4);
		ctx_read(dst.ip6[3], ctx->local_ip4);
	} else {
		ctx_read(src.ip6[0], ctx->remote_ip6[0]);
		ctx_read(src.ip6[1], ctx->remote_ip6[1]);
		ctx_read(src.ip6[2], ctx->remote_ip6[2]);
		ctx_read(src.ip6[3], ctx->remote_ip6[3]);
		ctx_read(dst.ip6[0], ctx->local_ip6[0]);
		ctx_read(dst.ip6[1], ctx->local_ip6[1]);
		ctx_read(dst.ip6[2], ctx->local_ip6[2]);
		ctx_read(dst.ip6[3], ctx->local_ip6[3]);
	}
	return authz_destination(&src, &dst, port) ? SK_PASS : SK_DROP;
}

/*
 * A client socket's SYN goes out: the breaker counts it in if its note
 * says so, and the socket is marked so that later callbacks look for a
 * note only where there may be one.
 */
static __always_inline void connecting(struct bpf_sock_ops *skops)
{
	struct conn_note *n = note_get(skops);
	if (!n)
		return;
	if (!limits_connecting(n)) {
		note_drop(skops);
		return;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | KMESH_CLIENT_MARK |
						 BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void closed(struct bpf_sock_ops *skops, const bool accel)
{
	__u32 flags = skops->bpf_sock_ops_cb_flags;
	if (flags & KMESH_CLIENT_MARK) {
		/* Once: a socket can be connected again after a disconnect. */
		bpf_sock_ops_cb_flags_set(skops, flags & ~KMESH_CLIENT_MARK);
		struct conn_note *n = note_get(skops);
		if (n) {
			limits_closed(n);
			note_drop(skops);
		}
	}
	sock_closed(skops, accel);
}

/*
 * Each socket program comes twice: with acceleration, and without it for
 * kernels that cannot run it (their verifier refuses an object that holds
 * the atomic instructions at all, even unreachable). The loader loads one
 * of each pair.
 */
static __always_inline int sockops(struct bpf_sock_ops *skops, const bool accel)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		connecting(skops);
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		return sockops_established(skops, accel);
	case BPF_SOCK_OPS_RTT_CB:
		return leave_if_on_tcp(skops, accel);
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			closed(skops, accel);
		return 1;
	}
	return 1;
}

SEC("sockops")
int kmesh_sockops(struct bpf_sock_ops *skops)
{
	return sockops(skops, true);
}

SEC("sockops")
int kmesh_sockops_tlv(struct bpf_sock_ops *skops)
{
	return sockops(skops, false);
}

/*
 * Telemetry's opens and closes (lib/telemetry.h), also in two variants:
 * only with acceleration can a socket have redirected bytes to add, and
 * tracing programs may read socket storage only from Linux 5.11.
 */
SEC("tp_btf/inet_sock_set_state")
int kmesh_tele_state(__u64 *ctx)
{
	tele_state((struct sock *)ctx[0], (int)ctx[1], (int)ctx[2], true);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int kmesh_tele_state_plain(__u64 *ctx)
{
	tele_state((struct sock *)ctx[0], (int)ctx[1], (int)ctx[2], false);
	return 0;
}

static __always_inline int sendmsg(struct sk_msg_md *msg, const bool accel)
{
	struct sock_state *st = bpf_sk_storage_get(&km_sock_state, msg->sk, 0, 0);
	int verdict = waypoint_sendmsg(msg, st);
	if (verdict >= 0)
		return verdict;
	if (!accel || !km_feat_accel)
		return SK_PASS;
	if (!st) {
		st = bpf_sk_storage_get(&km_sock_state, msg->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!st)
			return SK_PASS;
	}
	return accel_sendmsg(msg, st);
}

SEC("sk_msg")
int kmesh_sendmsg(struct sk_msg_md *msg)
{
	return sendmsg(msg, true);
}

SEC("sk_msg")
int kmesh_sendmsg_tlv(struct sk_msg_md *msg)
{
	return sendmsg(msg, false);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
