/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Waypoints: connect4 keeps the original destination of a connection it
 * sends to a waypoint in the socket's storage; sockops puts the socket in
 * km_sock; its first send carries the TLV (DESIGN.md, Waypoint TLV) ahead
 * of the application's bytes.
 */
#ifndef __KMESH_LIB_WAYPOINT_H__
#define __KMESH_LIB_WAYPOINT_H__

#include "common.h"
#include "sock.h"

/* Keeps the original destination on the socket for the sk_msg program. */
static __always_inline bool remember_orig(struct bpf_sock_addr *ctx, const struct sock_state *orig,
					  __u64 netns)
{
	/* No sockops/sk_msg on this kernel: the TLV could not be sent, and a
	 * waypoint must not get a connection without it. */
	if (!km_feat_tlv) {
		stat_inc(KMESH_STAT_TLV_FAILED);
		return false;
	}
	struct sock_state *st =
		bpf_sk_storage_get(&km_sock_state, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		stat_inc(KMESH_STAT_TLV_FAILED);
		return false;
	}
	st->orig_addr = orig->orig_addr;
	st->orig_port = orig->orig_port;
	st->flags = KMESH_SOCK_TLV_PENDING;
	st->netns = netns;
	return true;
}

/*
 * Prepends the DESIGN.md TLV: type 0x01, u32 BE length (IP + port), IP,
 * port, then the end marker 0xFE with a zero length. Inlined with constant
 * ip_len, so the verifier sees fixed sizes.
 */
static __always_inline int write_tlv(struct sk_msg_md *msg, const void *ip, __u32 ip_len,
				     __u16 port)
{
	__u32 len = 5 + ip_len + 2 + 5;
	if (bpf_msg_push_data(msg, 0, len, 0) || bpf_msg_pull_data(msg, 0, len, 0))
		return -1;
	__u8 *d = msg->data;
	if ((void *)(d + len) > msg->data_end)
		return -1;
	d[0] = 0x01;
	d[1] = 0;
	d[2] = 0;
	d[3] = 0;
	d[4] = ip_len + 2;
	__builtin_memcpy(d + 5, ip, ip_len);
	__builtin_memcpy(d + 5 + ip_len, &port, 2);
	d[7 + ip_len] = 0xfe;
	d[8 + ip_len] = 0;
	d[9 + ip_len] = 0;
	d[10 + ip_len] = 0;
	d[11 + ip_len] = 0;
	return 0;
}

/* The original destination's TLV: 16 bytes for IPv4, 28 for IPv6. */
static __always_inline int push_tlv(struct sk_msg_md *msg, const struct sock_state *st)
{
	__u16 port = (__u16)st->orig_port; /* already network order */
	if (addr_is_v4(&st->orig_addr))
		return write_tlv(msg, &st->orig_addr.ip6[3], 4, port);
	return write_tlv(msg, &st->orig_addr.ip6[0], 16, port);
}

/*
 * sk_msg's waypoint step: the TLV on a waypoint socket's first send.
 * Returns -1 when the socket has no TLV pending (the caller goes on).
 */
static __always_inline int waypoint_sendmsg(struct sk_msg_md *msg, struct sock_state *st)
{
	if (!st || !(st->flags & KMESH_SOCK_TLV_PENDING))
		return -1;
	/* Waypoint connections are never accelerated: the waypoint must see
	 * the TLV, and each direction keeps one path. */
	st->flags = KMESH_SOCK_DECIDED;
	if (push_tlv(msg, st)) {
		stat_inc(KMESH_STAT_TLV_FAILED);
		return SK_DROP;
	}
	stat_inc(KMESH_STAT_TLV_SENT);
	return SK_PASS;
}

#endif
