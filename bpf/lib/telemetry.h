/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Connection telemetry: for TCP connections of enrolled workloads, one
 * event when a socket opens and one when it closes (bytes each way from
 * the socket's own counters, duration, why it ended), per end: the client
 * socket (reporter=source) and the accepted one (reporter=destination),
 * and before those one at the client's connect naming the service.
 * Events go through a ring buffer; when it is full the event is counted
 * as lost (KMESH_STAT_TELE_LOST) and the connection goes on untouched.
 * Needs only what Linux 5.10 has: ring buffers in sockops and connect4/6;
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
/* An event's room in the ring: its 8-byte header, rounded to 8. */
#define KMESH_TELE_RECORD ((sizeof(struct tele_event) + 8 + 7) / 8 * 8)

/* Set by the loader when telemetry is on (--telemetry). */
const volatile __u32 km_feat_telemetry = 0;

/* Sized by the loader (--telemetry-ring-bytes). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} km_tele_events SEC(".maps");

/*
 * Marks on the sockets telemetry reports, as callback flags rather than
 * storage of their own: creating and freeing sk_storage (an allocation
 * charged to the memory cgroup, freed after an RCU grace period) was a
 * third of telemetry's cost per connection. The RTO callback the mark also
 * asks for runs only when a retransmission timer fires, and the sockops
 * switch ignores it. On a client socket (KMESH_CLIENT_MARK, lib/sock.h) it
 * means that no note needs looking up for it: telemetry is all it is
 * watched for. Alone, it marks an accepting end.
 */
#define KMESH_TELE_MARK BPF_SOCK_OPS_RTO_CB_FLAG

/* Queues an event reserved in km_tele_events. */
static __always_inline void tele_submit(void *e)
{
	/*
	 * No wake-up per event: each is an irq_work, an IPI to this CPU and
	 * a context switch of the reader, about a tenth of a bare connect's
	 * cost. The reader drains the ring on its own (every 10 ms while
	 * events come, see src/telemetry/mod.rs); it is woken only when this
	 * event takes the ring past half full, in case it fell behind. Two
	 * CPUs may both step over that line unseen: the next drain still
	 * comes in time, as 10 ms of events fill a fraction of the ring.
	 */
	__u64 waiting = bpf_ringbuf_query(&km_tele_events, KMESH_RB_AVAIL_DATA);
	__u64 half = bpf_ringbuf_query(&km_tele_events, KMESH_RB_RING_SIZE) / 2;
	bool crossed = waiting >= half && waiting < half + KMESH_TELE_RECORD;
	bpf_ringbuf_submit(e, crossed ? KMESH_RB_FORCE_WAKEUP : KMESH_RB_NO_WAKEUP);
}

/*
 * connect4/6 let an enrolled socket's connect through: where it meant to
 * go (the service VIP and port, before the rewrite) and when, as an event
 * the reader joins to the socket's open, or to its close where the
 * connect fails, by the socket's cookie. This replaced a note in a hash by
 * the same cookie: its update, lookups and delete took several times what
 * an event does. A connect that fails before its SYN leaves an event
 * nothing joins; the reader drops those by age.
 */
static __always_inline void tele_connect(struct bpf_sock_addr *ctx, const struct kmesh_addr *orig,
					 __u32 orig_port)
{
	/* Without sockops nothing would report the socket. */
	if (!km_feat_telemetry || !km_feat_tlv)
		return;
	struct tele_connect_event *e = bpf_ringbuf_reserve(&km_tele_events, sizeof(*e), 0);
	if (!e) {
		stat_inc(KMESH_STAT_TELE_LOST);
		return;
	}
	e->kind = KMESH_TELE_CONNECT;
	e->pad = 0;
	e->orig_port = bpf_ntohs((__u16)orig_port);
	e->pad2 = 0;
	e->orig = *orig;
	e->cookie = bpf_get_socket_cookie(ctx);
	e->ts_ns = bpf_ktime_get_ns();
	tele_submit(e);
}

/* What one open or close says besides the socket's addresses. */
struct tele_what {
	__u32 kind, reason, passive;
	__u32 opened; /* a close: the open went out (else no bytes) */
	__u32 fin_out, fin_in;
	__u64 base_a;     /* bytes_acked at the open */
	__u64 redirected; /* sent into the peer's queue (acceleration) */
	__u32 in_sockmap; /* had acceleration state (see tele_event) */
};

static __always_inline void tele_emit(struct bpf_sock_ops *skops, const struct tele_what *w)
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
	e->kind = w->kind;
	e->reason = w->reason;
	e->passive = w->passive;
	e->in_sockmap = w->in_sockmap;
	/*
	 * Only a client's events are joined by cookie (to its connect). An
	 * accepted socket has none yet, and making one is an atomic on a
	 * counter every CPU shares.
	 */
	e->cookie = w->passive ? 0 : bpf_get_socket_cookie(skops);
	e->ts_ns = bpf_ktime_get_ns();
	e->sent = 0;
	e->received = 0;
	if (w->kind == KMESH_TELE_CLOSE && w->opened) {
		__u64 acked = skops->bytes_acked, received = skops->bytes_received;
		__u64 base_a = w->base_a + w->fin_out, base_r = w->fin_in;
		e->sent = (acked > base_a ? acked - base_a : 0) + w->redirected;
		e->received = received > base_r ? received - base_r : 0;
	}
	e->redirected = w->redirected;
	tele_submit(e);
}

/*
 * A socket of an enrolled workload, as sockops can tell: by its netns
 * where sockops can ask for the cookie (5.15); before that, by its own
 * address being a workload's (a socket on this node with a workload's
 * address is that workload's).
 */
static __always_inline bool tele_enrolled(struct bpf_sock_ops *skops)
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

/*
 * The bases of the counters, so that no end keeps them on its socket: an
 * accepting end's count neither the peer's SYN nor the ACK of its own
 * (the child socket starts past both), so everything there is data and
 * FINs; data in a fast-open SYN is counted, as it should be. A connecting
 * end's bytes_acked holds its SYN (one sequence number) and then data;
 * its bytes_received starts past the peer's SYN.
 */
#define KMESH_TELE_SERVER_BASE 0
#define KMESH_TELE_CLIENT_BASE 1

/*
 * A client's SYN goes out: whether telemetry reports it (it was enrolled
 * at its connect, whose event names it).
 */
static __always_inline bool tele_connecting(struct bpf_sock_ops *skops)
{
	if (!km_feat_telemetry)
		return false;
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return false;
	return tele_enrolled(skops);
}

/*
 * Either end established. A client is reported when it was marked at its
 * SYN (see connecting() in kmesh.bpf.c): by KMESH_TELE_MARK, or, where the
 * breaker keeps a note on it, by the note's KMESH_NOTE_TELE.
 */
static __always_inline void tele_established(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!km_feat_telemetry || !sk)
		return;
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return;
	struct tele_what w = { .kind = KMESH_TELE_OPEN };
	__u32 flags = skops->bpf_sock_ops_cb_flags;
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		if (!tele_enrolled(skops))
			return;
		w.passive = 1;
		tele_emit(skops, &w);
		bpf_sock_ops_cb_flags_set(skops,
					  flags | BPF_SOCK_OPS_STATE_CB_FLAG | KMESH_TELE_MARK);
		return;
	}
	if (!(flags & KMESH_CLIENT_MARK))
		return;
	if (!(flags & KMESH_TELE_MARK)) {
		struct conn_note *n = note_get(skops);
		if (!n || !(n->flags & KMESH_NOTE_TELE))
			return;
	}
	tele_emit(skops, &w);
}

/*
 * TCP_CLOSE of a socket telemetry reports: the state it came from tells
 * how the connection ended, and which FINs the counters hold (each takes
 * one sequence number, as the SYN does): LAST_ACK, FIN_WAIT2 (on to
 * TIME_WAIT) and CLOSING mean both FINs went and ours was acknowledged;
 * CLOSE_WAIT, that the peer's came in before a reset; ESTABLISHED and
 * FIN_WAIT1, a reset or a timeout.
 */
static __always_inline void tele_closed(struct bpf_sock_ops *skops, bool passive)
{
	struct bpf_sock *sk = skops->sk;
	if (!km_feat_telemetry || !sk)
		return;
	struct tele_what w = { .kind = KMESH_TELE_CLOSE, .passive = passive };
	__u32 old = skops->args[0];
	/* A connect that failed was never opened. */
	w.opened = old != BPF_TCP_SYN_SENT && old != BPF_TCP_SYN_RECV;
	w.base_a = passive ? KMESH_TELE_SERVER_BASE : KMESH_TELE_CLIENT_BASE;
	/*
	 * Accelerated bytes bypass TCP's counters: this end's are added to
	 * what it sent; those its peer sent into it come with the peer's
	 * close, and the reader adds them to this end's report
	 * (src/telemetry/mod.rs).
	 */
	struct sock_state *st = bpf_sk_storage_get(&km_sock_state, sk, 0, 0);
	if (st) {
		w.redirected = st->redirected;
		w.in_sockmap = 1;
	}
	w.reason = KMESH_TELE_NORMAL;
	if (old == BPF_TCP_SYN_SENT || old == BPF_TCP_SYN_RECV) {
		w.reason = KMESH_TELE_CONNECT_FAILED;
	} else if (old == BPF_TCP_ESTABLISHED || old == BPF_TCP_FIN_WAIT1) {
		w.reason = KMESH_TELE_RESET;
	} else if (old == BPF_TCP_CLOSE_WAIT) {
		w.reason = KMESH_TELE_RESET;
		w.fin_in = 1;
	} else {
		w.fin_out = 1;
		w.fin_in = 1;
	}
	struct sock *ks = NULL;
	if (km_feat_probe_read &&
	    !bpf_core_read(&ks, sizeof(ks), &((struct bpf_sock_ops_kern *)(void *)skops)->sk) &&
	    ks) {
		int err = 0;
		if (w.reason != KMESH_TELE_NORMAL && !bpf_core_read(&err, sizeof(err), &ks->sk_err) &&
		    err == ETIMEDOUT)
			w.reason = KMESH_TELE_TIMEOUT;
		/*
		 * The state says whether the peer's FIN came in only
		 * roughly: FIN_WAIT2 also ends before it where the
		 * application closed first (the rest of the wait goes on in
		 * a timewait socket, which gets the FIN). SOCK_DONE is set
		 * exactly when it came in, and so is in bytes_received
		 * (sk_shutdown is not: close() sets it whole).
		 */
		unsigned long sflags = 0;
		long rerr = -1;
		if (bpf_core_field_exists(struct sock_common, skc_flags))
			rerr = bpf_core_read(&sflags, sizeof(sflags), &ks->__sk_common.skc_flags);
		else if (bpf_core_field_exists(struct sock___old, sk_flags))
			rerr = bpf_core_read(&sflags, sizeof(sflags),
					     &((struct sock___old *)(void *)ks)->sk_flags);
		if (!rerr)
			w.fin_in = !!(sflags & (1UL << SOCK_DONE));
	}
	tele_emit(skops, &w);
}

#endif
