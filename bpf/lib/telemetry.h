/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Connection telemetry: for TCP connections of enrolled workloads, one
 * event when a socket opens and one when it closes (bytes each way from
 * the socket's own counters, duration, why it ended), per end: the client
 * socket (reporter=source) and the accepted one (reporter=destination).
 * Events go through a ring buffer; when it is full the event is counted
 * as lost (KMESH_STAT_TELE_LOST) and the connection goes on untouched.
 * Needs only what Linux 5.10 has: sk_storage and ring buffers in sockops;
 * no atomics, and bpf_get_netns_cookie only where the kernel has it.
 * Authorization denials are counted by authz.h, not here.
 */
#ifndef __KMESH_LIB_TELEMETRY_H__
#define __KMESH_LIB_TELEMETRY_H__

#include "common.h"
#include "redirect.h"
#include "sock.h"

/* bpf_ringbuf_query / bpf_ringbuf_submit flags (uapi enum values). */
#define KMESH_RB_NO_WAKEUP 1
#define KMESH_RB_FORCE_WAKEUP 2
#define KMESH_RB_AVAIL_DATA 0
#define KMESH_RB_RING_SIZE 1

/* Set by the loader when telemetry is on (--telemetry). */
const volatile __u32 km_feat_telemetry = 0;

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tele_sock);
} km_tele_sock SEC(".maps");

/* Sized by the loader (--telemetry-ring-bytes). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} km_tele_events SEC(".maps");

/*
 * connect4/6 of an enrolled socket: remember where it meant to go (the
 * service VIP and port, before the rewrite) and when.
 */
static __always_inline void tele_connect(struct bpf_sock_addr *ctx, const struct kmesh_addr *orig,
					 __u32 orig_port)
{
	if (!km_feat_telemetry)
		return;
	struct tele_sock *t =
		bpf_sk_storage_get(&km_tele_sock, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!t)
		return;
	t->orig = *orig;
	t->orig_port = bpf_ntohs((__u16)orig_port);
	t->flags = 0;
	t->start_ns = bpf_ktime_get_ns();
}

static __always_inline void tele_emit(struct bpf_sock_ops *skops, struct tele_sock *t, __u32 kind,
				      __u32 reason, __u32 fin_out, __u32 fin_in)
{
	struct tele_event *e = bpf_ringbuf_reserve(&km_tele_events, sizeof(*e), 0);
	if (!e) {
		stat_inc(KMESH_STAT_TELE_LOST);
		return;
	}
	struct sock_key k = {};
	FILL_KEY(&k, skops, 0);
	e->local = k.local;
	e->remote = k.remote;
	e->local_port = k.local_port;
	e->remote_port = k.remote_port;
	e->orig = t->orig;
	e->orig_port = t->orig_port;
	e->kind = kind;
	e->reason = reason;
	e->passive = !!(t->flags & KMESH_TELE_PASSIVE);
	e->duration_ns = bpf_ktime_get_ns() - t->start_ns;
	e->sent = 0;
	e->received = 0;
	if (kind == KMESH_TELE_CLOSE && (t->flags & KMESH_TELE_OPENED)) {
		__u64 acked = skops->bytes_acked, received = skops->bytes_received;
		__u64 base_a = t->base_acked + fin_out, base_r = t->base_received + fin_in;
		e->sent = acked > base_a ? acked - base_a : 0;
		e->received = received > base_r ? received - base_r : 0;
	}
	/*
	 * A wake-up per event costs the reader a context switch per
	 * connection end: at 20k connects/s that is a fifth of a core. The
	 * reader drains the ring every 50 ms on its own; it is woken only
	 * once an eighth of the ring is waiting, well before it fills.
	 */
	__u64 waiting = bpf_ringbuf_query(&km_tele_events, KMESH_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(&km_tele_events, KMESH_RB_RING_SIZE);
	bpf_ringbuf_submit(e, waiting < size / 8 ? KMESH_RB_NO_WAKEUP : KMESH_RB_FORCE_WAKEUP);
}

static __always_inline void tele_watch_state(struct bpf_sock_ops *skops)
{
	bpf_sock_ops_cb_flags_set(skops,
				  skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* The client starts its handshake: watch its state, so that a connect
 * that fails (never established) is reported too. */
static __always_inline void tele_connecting(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!km_feat_telemetry || !sk)
		return;
	if (bpf_sk_storage_get(&km_tele_sock, sk, 0, 0))
		tele_watch_state(skops);
}

/*
 * Whether an accepted socket belongs to a workload enrolled here: by its
 * netns where sockops can ask for the cookie (5.15); before that, by its
 * own address being a workload's (an accepted socket on this node with a
 * workload's address is that workload's).
 */
static __always_inline bool tele_server_enrolled(struct bpf_sock_ops *skops)
{
	if (km_feat_netns_helper) {
		__u64 cookie = bpf_get_netns_cookie(skops);
		return bpf_map_lookup_elem(&km_manage, &cookie) != NULL;
	}
	struct addr_key key = {};
	if (CTX_U32(skops->family) == AF_INET) {
		key.addr.ip6[2] = bpf_htonl(0x0000ffff);
		key.addr.ip6[3] = CTX_U32(skops->local_ip4);
	} else {
		key.addr.ip6[0] = CTX_U32(skops->local_ip6[0]);
		key.addr.ip6[1] = CTX_U32(skops->local_ip6[1]);
		key.addr.ip6[2] = CTX_U32(skops->local_ip6[2]);
		key.addr.ip6[3] = CTX_U32(skops->local_ip6[3]);
	}
	if (addr_is_loopback(&key.addr))
		return false;
	return bpf_map_lookup_elem(&km_workload, &key) != NULL;
}

static __always_inline void tele_established(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!km_feat_telemetry || !sk)
		return;
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return;
	struct tele_sock *t;
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		if (!tele_server_enrolled(skops))
			return;
		t = bpf_sk_storage_get(&km_tele_sock, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!t)
			return;
		t->flags = KMESH_TELE_PASSIVE;
		t->start_ns = bpf_ktime_get_ns();
	} else {
		t = bpf_sk_storage_get(&km_tele_sock, sk, 0, 0);
		if (!t)
			return;
	}
	t->flags |= KMESH_TELE_OPENED;
	t->base_acked = skops->bytes_acked;
	t->base_received = skops->bytes_received;
	tele_emit(skops, t, KMESH_TELE_OPEN, 0, 0, 0);
	tele_watch_state(skops);
}

/*
 * TCP_CLOSE: the state it came from tells how the connection ended, and
 * which FINs the counters hold (each takes one sequence number, as the
 * SYN does): LAST_ACK, FIN_WAIT2 (on to TIME_WAIT) and CLOSING mean both
 * FINs went and ours was acknowledged; CLOSE_WAIT, that the peer's came
 * in before a reset; ESTABLISHED and FIN_WAIT1, a reset or a timeout.
 */
static __always_inline void tele_closed(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!km_feat_telemetry || !sk)
		return;
	struct tele_sock *t = bpf_sk_storage_get(&km_tele_sock, sk, 0, 0);
	if (!t || (t->flags & KMESH_TELE_CLOSED))
		return;
	__u32 old = skops->args[0];
	__u32 reason = KMESH_TELE_NORMAL, fin_out = 0, fin_in = 0;
	if (old == BPF_TCP_SYN_SENT || old == BPF_TCP_SYN_RECV) {
		reason = KMESH_TELE_CONNECT_FAILED;
	} else if (old == BPF_TCP_ESTABLISHED || old == BPF_TCP_FIN_WAIT1) {
		reason = KMESH_TELE_RESET;
	} else if (old == BPF_TCP_CLOSE_WAIT) {
		reason = KMESH_TELE_RESET;
		fin_in = 1;
	} else {
		fin_out = 1;
		fin_in = 1;
	}
	if (reason != KMESH_TELE_NORMAL && km_feat_probe_read) {
		struct sock *ks = NULL;
		int err = 0;
		if (!bpf_core_read(&ks, sizeof(ks),
				   &((struct bpf_sock_ops_kern *)(void *)skops)->sk) &&
		    ks && !bpf_core_read(&err, sizeof(err), &ks->sk_err) && err == ETIMEDOUT)
			reason = KMESH_TELE_TIMEOUT;
	}
	/* A connect that failed was never opened; it is reported once, closed. */
	t->flags |= KMESH_TELE_CLOSED;
	tele_emit(skops, t, KMESH_TELE_CLOSE, reason, fin_out, fin_in);
}

#endif
