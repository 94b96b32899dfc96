/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Connection telemetry: for TCP connections of enrolled workloads, one
 * event when a socket opens and one when it closes (bytes each way from
 * the socket's own counters, duration, why it ended), per end: the client
 * socket (reporter=source) and the accepted one (reporter=destination),
 * and before those one at the client's connect naming the service.
 * connect4/6 write the connect; the inet_sock_set_state tracepoint the
 * rest (tele_state). Events go through a ring buffer; when it is full the
 * event is counted as lost (KMESH_STAT_TELE_LOST) and the connection goes
 * on untouched. Needs what Linux 5.10 has: BTF tracepoints, ring buffers,
 * bpf_skc_to_tcp_sock. Authorization denials are counted by authz.h.
 */
#ifndef __KMESH_LIB_TELEMETRY_H__
#define __KMESH_LIB_TELEMETRY_H__

#include "common.h"
#include "sock.h"

/* Set by the loader when telemetry is on (--telemetry). */
const volatile __u32 km_feat_telemetry = 0;

/* Sized by the loader (--telemetry-ring-bytes). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} km_tele_events SEC(".maps");

/* Queues an event reserved in km_tele_events. */
static __always_inline void tele_submit(void *e)
{
	/*
	 * The ring's own rule for waking the reader: only where it had read
	 * everything before this event. The reader drains every 10 ms while
	 * events come (src/telemetry/mod.rs), so that is about once per
	 * drain, not per event (each wake-up is an irq_work, an IPI to this
	 * CPU and a context switch of the reader). Asking the ring how full
	 * it is, to wake the reader past half full, took two helper calls per
	 * event (~30 ns) and helped nothing: between drains the reader sleeps
	 * rather than waits on the ring.
	 */
	bpf_ringbuf_submit(e, 0);
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
	if (!km_feat_telemetry)
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

/* The netns a socket lives in, by the cookie km_manage is keyed by. */
static __always_inline __u64 tele_netns_cookie(const struct sock *sk)
{
	struct net *net = sk->__sk_common.skc_net.net;
	if (!net)
		return 0;
	if (bpf_core_field_exists(struct net___old, net_cookie))
		return ((struct net___old *)(void *)net)->net_cookie.counter;
	return net->net_cookie;
}

/*
 * Whether the state change is one telemetry reports: an end established
 * (from SYN_SENT: the client; from SYN_RECV: the accepting end), or
 * closed. A socket reaches TCP_CLOSE again when closed after it ended, or
 * after a disconnect: only the first counts. A listener's close is no
 * connection's.
 */
static __always_inline bool tele_reported(int old, int new)
{
	if (new == BPF_TCP_ESTABLISHED)
		return old == BPF_TCP_SYN_SENT || old == BPF_TCP_SYN_RECV;
	return new == BPF_TCP_CLOSE && old != BPF_TCP_CLOSE && old != BPF_TCP_LISTEN;
}

/*
 * How a connection that reached TCP_CLOSE from `old` ended, and which FINs
 * the counters hold (each takes one sequence number, as the SYN does):
 * from LAST_ACK, FIN_WAIT2 (on to TIME_WAIT) and CLOSING our FIN went and
 * was acknowledged; from CLOSE_WAIT, ESTABLISHED and FIN_WAIT1 it ended in
 * a reset or a timeout. Whether the peer's FIN came in, the socket says.
 */
static __always_inline __u32 tele_close_reason(const struct sock *sk, int old, __u32 *fin_out,
					       __u32 *fin_in)
{
	__u32 reason = KMESH_TELE_NORMAL;
	*fin_out = 0;
	*fin_in = 0;
	if (old == BPF_TCP_SYN_SENT || old == BPF_TCP_SYN_RECV)
		return KMESH_TELE_CONNECT_FAILED;
	if (old == BPF_TCP_ESTABLISHED || old == BPF_TCP_FIN_WAIT1 || old == BPF_TCP_CLOSE_WAIT)
		reason = sk->sk_err == ETIMEDOUT ? KMESH_TELE_TIMEOUT : KMESH_TELE_RESET;
	else
		*fin_out = 1;
	/*
	 * Not from the state, which says so only roughly: FIN_WAIT2 also
	 * ends before the peer's FIN where the application closed first (the
	 * rest of the wait goes on in a timewait socket, which gets the FIN).
	 * SOCK_DONE is set exactly when it came in, and so is in
	 * bytes_received (sk_shutdown is not: close() sets it whole).
	 */
	unsigned long flags;
	if (bpf_core_field_exists(struct sock_common, skc_flags))
		flags = sk->__sk_common.skc_flags;
	else
		flags = ((struct sock___old *)(void *)sk)->sk_flags;
	*fin_in = !!(flags & (1UL << SOCK_DONE));
	return reason;
}

/*
 * inet_sock_set_state, for every TCP socket on the host: an enrolled
 * workload's socket (its netns is in km_manage) reports its open and its
 * close. A tracepoint rather than sockops: with sockops, each socket would
 * run the program at each of its state changes (about sixteen runs a
 * connection, with the callbacks sockops makes anyway), several times
 * what a tracepoint costs; and nothing needs marking on the socket.
 *
 * The kernel tells which end a socket is only at its open (from SYN_SENT:
 * the client). A close says so where it never opened, else leaves it to
 * the reader (src/telemetry/mod.rs), which joins it to the open by the
 * socket's addresses; the reader also takes the client's SYN out of its
 * bytes_acked (the accepting end's counters start past the handshake).
 */
static __always_inline void tele_state(struct sock *sk, int old, int new, const bool accel)
{
	if (!km_feat_telemetry || !tele_reported(old, new))
		return;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return;
	__u16 family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return;
	__u64 netns = tele_netns_cookie(sk);
	if (!bpf_map_lookup_elem(&km_manage, &netns))
		return;
	struct tele_event *e = bpf_ringbuf_reserve(&km_tele_events, sizeof(*e), 0);
	if (!e) {
		stat_inc(KMESH_STAT_TELE_LOST);
		return;
	}
	if (family == AF_INET) {
		addr_set_v4(&e->local, sk->__sk_common.skc_rcv_saddr);
		addr_set_v4(&e->remote, sk->__sk_common.skc_daddr);
	} else {
		for (int i = 0; i < 4; i++) {
			e->local.ip6[i] = sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[i];
			e->remote.ip6[i] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[i];
		}
	}
	e->local_port = bpf_ntohs(tp->inet_conn.icsk_inet.inet_sport);
	e->remote_port = bpf_ntohs(sk->__sk_common.skc_dport);
	e->cookie = sk->__sk_common.skc_cookie.counter;
	/*
	 * The socket's own clock (CLOCK_MONOTONIC in microseconds, as
	 * bpf_ktime_get_ns in nanoseconds), refreshed by the packet or the
	 * send that changes the state: a clock read less per event. Where
	 * close() resets a connection, the last packet's time.
	 */
	e->ts_ns = tp->tcp_mstamp * 1000;
	e->in_sockmap = 0;
	e->sent = 0;
	e->received = 0;
	e->redirected = 0;
	if (new == BPF_TCP_ESTABLISHED) {
		e->kind = KMESH_TELE_OPEN;
		e->reason = 0;
		e->end = old == BPF_TCP_SYN_RECV ? KMESH_TELE_PASSIVE : KMESH_TELE_ACTIVE;
		tele_submit(e);
		return;
	}
	e->kind = KMESH_TELE_CLOSE;
	e->end = old == BPF_TCP_SYN_SENT   ? KMESH_TELE_ACTIVE
		 : old == BPF_TCP_SYN_RECV ? KMESH_TELE_PASSIVE
					   : KMESH_TELE_END_UNKNOWN;
	__u32 fin_out, fin_in;
	e->reason = tele_close_reason(sk, old, &fin_out, &fin_in);
	if (e->reason != KMESH_TELE_CONNECT_FAILED) {
		/*
		 * Accelerated bytes bypass TCP's counters: this end's are
		 * added to what it sent; those its peer sent into it come
		 * with the peer's close, and the reader adds them to this
		 * end's report.
		 */
		if (accel && km_feat_accel) {
			struct sock_state *st = bpf_sk_storage_get(&km_sock_state, sk, 0, 0);
			if (st) {
				e->redirected = st->redirected;
				e->in_sockmap = 1;
			}
		}
		__u64 acked = tp->bytes_acked, received = tp->bytes_received;
		e->sent = (acked > fin_out ? acked - fin_out : 0) + e->redirected;
		e->received = received > fin_in ? received - fin_in : 0;
	}
	tele_submit(e);
}

#endif
