/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Sockets the sk_msg program serves (waypoint TLV, acceleration): the
 * sockhash, per-socket state, the per-connection handshake between the two
 * ends, and the keys that name a connection from either end.
 */
#ifndef __KMESH_LIB_SOCK_H__
#define __KMESH_LIB_SOCK_H__

#include "common.h"

/* Sockets whose sends the sk_msg program sees (acceleration, TLV). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(max_entries, 1024);
} km_sock SEC(".maps");

/*
 * One entry per connection with an end in km_sock, keyed by the connecting
 * end's sock_key; created by that end's sockops, removed when it closes
 * (and by the daemon's sweep once neither end is in km_sock). An element
 * freed while a program still points to it can be reused for another
 * connection; a bit set or read there then makes an end stay in km_sock
 * or on TCP, which is safe, as its own connection's other end has closed.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sock_key);
	__type(value, struct conn_value);
	__uint(max_entries, 1024);
} km_conn SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} km_sock_state SEC(".maps");

/*
 * What connect4/6 leave for sockops about a client socket the circuit
 * breaker counts (struct conn_note), by socket cookie. Preallocated: an
 * update takes an element from a free list, where socket storage
 * allocated (charged to the memory cgroup) and freed after RCU for every
 * connect. sockops finds a socket that may have a note by
 * KMESH_CLIENT_MARK, set when its SYN goes out, and removes the note once
 * the breaker's count is returned at close. A note whose connect failed
 * before its SYN is never seen by sockops; the daemon removes such notes
 * by age (src/writer/limits.rs). Full: the breaker does not count that
 * connection (KMESH_STAT_NOTE_FULL). 8,192 notes (0.9 MB preallocated)
 * hold the connects in flight and, until they close, the connections a
 * breaker counts: services' max_connections on one node summed well past
 * that are not what a breaker is for.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct conn_note);
	__uint(max_entries, 8192);
} km_conn_note SEC(".maps");

/*
 * Marks a client socket the breaker counts from its SYN on (it has a
 * note). The retransmission callback it also asks for runs only on a
 * retransmission, and the sockops switch ignores it. (Daemons before
 * telemetry moved to a tracepoint also set the RTO flag on sockets
 * telemetry reported: ignored now.)
 */
#define KMESH_CLIENT_MARK BPF_SOCK_OPS_RETRANS_CB_FLAG

/* connect4/6, once the connect is let through: one update, if any concern filled n. */
static __always_inline void note_commit(struct bpf_sock_addr *ctx, struct conn_note *n)
{
	/* Without sockops nothing would take the note up (or away). */
	if (!n->flags || !km_feat_tlv)
		return;
	if (!n->start_ns)
		n->start_ns = bpf_ktime_get_ns();
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&km_conn_note, &cookie, n, BPF_ANY))
		stat_inc(KMESH_STAT_NOTE_FULL);
}

static __always_inline struct conn_note *note_get(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	return bpf_map_lookup_elem(&km_conn_note, &cookie);
}

static __always_inline void note_drop(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	bpf_map_delete_elem(&km_conn_note, &cookie);
}

/*
 * A socket's netns cookie in sockops and sk_msg: from the helper where the
 * kernel allows it there (5.15), else as connect4 stored it (a socket that
 * connect4 did not see is then taken as 0, which only loopback keys use:
 * such sockets are only in km_sock with acceleration, which needs the
 * helper anyway).
 */
#define SOCK_NETNS(ctx, st) \
	(km_feat_netns_helper ? bpf_get_netns_cookie(ctx) : ((st) ? (st)->netns : 0))

/*
 * The connection as seen from this end; see struct sock_key. Context
 * fields are read one by one through volatile: clang otherwise merges
 * them into 8-byte loads or computed context pointers, which the verifier
 * refuses. ns: the socket's netns cookie, evaluated only for loopback.
 */
#define CTX_U32(x) (*(volatile __u32 *)&(x))
#define FILL_KEY(key, c, ns)                                                        \
	do {                                                                      \
		bool v4_ = CTX_U32((c)->family) == AF_INET;                      \
		__u32 l4_ = CTX_U32((c)->local_ip4), r4_ = CTX_U32((c)->remote_ip4); \
		__u32 l0_ = CTX_U32((c)->local_ip6[0]), l1_ = CTX_U32((c)->local_ip6[1]); \
		__u32 l2_ = CTX_U32((c)->local_ip6[2]), l3_ = CTX_U32((c)->local_ip6[3]); \
		__u32 r0_ = CTX_U32((c)->remote_ip6[0]), r1_ = CTX_U32((c)->remote_ip6[1]); \
		__u32 r2_ = CTX_U32((c)->remote_ip6[2]), r3_ = CTX_U32((c)->remote_ip6[3]); \
		(key)->local.ip6[0] = v4_ ? 0 : l0_;                              \
		(key)->local.ip6[1] = v4_ ? 0 : l1_;                              \
		(key)->local.ip6[2] = v4_ ? bpf_htonl(0x0000ffff) : l2_;          \
		(key)->local.ip6[3] = v4_ ? l4_ : l3_;                            \
		(key)->remote.ip6[0] = v4_ ? 0 : r0_;                             \
		(key)->remote.ip6[1] = v4_ ? 0 : r1_;                             \
		(key)->remote.ip6[2] = v4_ ? bpf_htonl(0x0000ffff) : r2_;         \
		(key)->remote.ip6[3] = v4_ ? r4_ : r3_;                           \
		(key)->local_port = CTX_U32((c)->local_port);                     \
		(key)->remote_port = bpf_ntohl(CTX_U32((c)->remote_port));        \
		(key)->netns = addr_is_loopback(&(key)->local) ? (ns) : 0;        \
	} while (0)

/* k's mirror image: the key of the connection's other end. */
static __always_inline void mirror_key(const struct sock_key *k, struct sock_key *m)
{
	m->local = k->remote;
	m->remote = k->local;
	m->local_port = k->remote_port;
	m->remote_port = k->local_port;
	m->netns = k->netns;
}

/* Which end of its connection a socket is: 0 connected, 1 accepted. */
static __always_inline int sock_end(const struct sock_state *st)
{
	return st && (st->flags & KMESH_SOCK_PASSIVE) ? 1 : 0;
}

/* The connection's km_conn entry (keyed by the connecting end's view), from one end's own key. */
static __always_inline struct conn_value *conn_of(const struct sock_key *self, int end)
{
	struct sock_key ck = {};
	if (end)
		mirror_key(self, &ck);
	else
		ck = *self;
	return bpf_map_lookup_elem(&km_conn, &ck);
}

/*
 * Atomics on km_conn, only in the programs built with `accel` (a constant
 * after inlining): kernels before 5.12 refuse a program that merely
 * contains the instruction, so the TLV-only variants must not have it.
 */
static __always_inline __u32 conn_fetch_or(struct conn_value *c, __u32 bits, const bool accel)
{
	if (!accel || !km_feat_accel)
		return 0;
	return __sync_fetch_and_or(&c->bits, bits);
}

static __always_inline void conn_and(struct conn_value *c, __u32 bits, const bool accel)
{
	if (accel && km_feat_accel)
		__sync_fetch_and_and(&c->bits, bits);
}

#endif
