/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Same-host acceleration: sockops puts both ends of an enrolled connection
 * in km_sock, and sk_msg sends each direction straight into the peer's
 * receive queue, falling back to TCP when the peer stops reading. Runs only
 * where the loader set km_feat_accel (atomic fetch-or, the psock's queue
 * length, bpf_get_netns_cookie in sockops and sk_msg).
 */
#ifndef __KMESH_LIB_ACCEL_H__
#define __KMESH_LIB_ACCEL_H__

#include "common.h"
#include "redirect.h"
#include "sock.h"

/*
 * A connecting end enters km_sock together with its connection's km_conn
 * entry. An accepting end enters only if its client did: otherwise nothing
 * can be redirected either way, and the map would only slow its sends and
 * reads (sk_msg and the psock's recvmsg run for every call).
 */
static __always_inline int sockops_established(struct bpf_sock_ops *skops, const bool accel)
{
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	bool passive = skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
	struct sock_state *st = NULL;
	struct conn_value *conn = NULL;
	bool tlv = false;
	if (!passive) {
		st = bpf_sk_storage_get(&km_sock_state, sk, 0, 0);
		tlv = st && (st->flags & KMESH_SOCK_TLV_PENDING);
	}
	/* A pending TLV means connect4 found the netns enrolled. Otherwise
	 * only acceleration needs the socket, and with it the helper. */
	if (!tlv && !(accel && accelerate_on()))
		return 1;
	if (!tlv) {
		__u64 cookie = km_feat_netns_helper ? bpf_get_netns_cookie(skops) : 0;
		if (!bpf_map_lookup_elem(&km_manage, &cookie))
			return 1;
	}
	/* Every socket in km_sock has state: sock_closed looks there first
	 * (sendmsg would create it at the first send anyway). */
	if (!passive && !st) {
		st = bpf_sk_storage_get(&km_sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!st)
			return 1;
	}
	struct sock_key key = {};
	FILL_KEY(&key, skops, SOCK_NETNS(skops, st));
	if (passive) {
		conn = conn_of(&key, 1);
		if (!conn) {
			stat_inc(KMESH_STAT_ACCEL_SKIPPED);
			return 1;
		}
		st = bpf_sk_storage_get(&km_sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!st)
			return 1;
	}
	long err = bpf_sock_hash_update(skops, &km_sock, &key, BPF_NOEXIST);
	/* EBUSY: the socket is in already, added by a second sockops program
	 * during a daemon handover. EEXIST: another socket holds the key. */
	if (err == -EBUSY || err == -EEXIST)
		return 1;
	if (err) {
		stat_inc(tlv ? KMESH_STAT_TLV_FAILED : KMESH_STAT_ACCEL_FULL);
		return 1;
	}
	/* A socket reconnected after connect(AF_UNSPEC) keeps its storage:
	 * its directions start undecided again (connect4 has just set what a
	 * waypoint needs). */
	if (st) {
		st->flags = passive ? KMESH_SOCK_PASSIVE : (st->flags & KMESH_SOCK_TLV_PENDING);
		st->unchecked_bytes = 0;
		st->unchecked_sends = 0;
		st->redirected = 0;
	}
	if (conn)
		conn_fetch_or(conn, KMESH_CONN_ACCEPTED_IN, accel);
	/* Without acceleration nothing reads km_conn. */
	if (!passive && accel && km_feat_accel) {
		/* After the socket entered, so that while a km_conn entry exists
		 * its connecting end is in km_sock or has been (the daemon's
		 * sweep relies on it). BPF_ANY: replaces what a closed connection
		 * with the same addresses left. */
		struct conn_value zero = {};
		if (bpf_map_update_elem(&km_conn, &key, &zero, BPF_ANY) && !tlv) {
			bpf_map_delete_elem(&km_sock, &key);
			stat_inc(KMESH_STAT_ACCEL_FULL);
			return 1;
		}
	}
	stat_inc(KMESH_STAT_ACCEL_ADDED);
	/* RTT: an ACK of data sent through TCP (see leave_if_on_tcp). STATE:
	 * TCP_CLOSE (see sock_closed). */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTT_CB_FLAG |
						 BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

/*
 * Bytes queued in sk's psock for its reader (msg_tot_len); false where
 * sk has no psock or the kernel lacks the field.
 */
static __always_inline bool psock_queued(struct sock *sk, __u32 *queued)
{
	unsigned long ud = 0;
	if (!km_feat_probe_read || !bpf_core_field_exists(struct sk_psock, msg_tot_len) ||
	    bpf_core_read(&ud, sizeof(ud), &sk->sk_user_data) || !(ud & SK_USER_DATA_PSOCK))
		return false;
	struct sk_psock *psock = (void *)(ud & SK_USER_DATA_PTRMASK);
	return !bpf_core_read(queued, sizeof(*queued), &psock->msg_tot_len);
}

/*
 * Whether a socket reaching TCP_CLOSE ended in order (the peer's FIN
 * received after its own, or its own acknowledged after the peer's; no
 * error) with redirected bytes its application has not read yet. TCP
 * keeps such bytes readable until close(): a client that half-closed
 * before the reply and the server's FIN arrived enters TIME_WAIT, and
 * TCP_CLOSE with it, before it reads them. Unknown (no psock field):
 * kept, as losing bytes is worse than holding a key.
 */
static __always_inline bool ended_in_order_unread(struct bpf_sock_ops *skops, const bool accel)
{
	/* Nothing is redirected into a socket without acceleration. */
	if (!accel || !km_feat_accel)
		return false;
	__u32 old = skops->args[0];
	if (old != BPF_TCP_FIN_WAIT1 && old != BPF_TCP_FIN_WAIT2 && old != BPF_TCP_CLOSING &&
	    old != BPF_TCP_LAST_ACK)
		return false;
	struct sock *sk = NULL;
	if (bpf_core_read(&sk, sizeof(sk), &((struct bpf_sock_ops_kern *)(void *)skops)->sk) ||
	    !sk)
		return false;
	int err = 0;
	__u8 shut = 0;
	if (bpf_core_read(&err, sizeof(err), &sk->sk_err) || err ||
	    bpf_core_read(&shut, sizeof(shut), &sk->sk_shutdown) || !(shut & RCV_SHUTDOWN))
		return false;
	__u32 queued = 0;
	return !psock_queued(sk, &queued) || queued;
}

/*
 * TCP_CLOSE. The kernel takes a TCP socket out of a sockhash only when the
 * application closes it (sock_map_close, before this runs), not when the
 * connection ends otherwise. Left in, the socket would hold its old key: a
 * new connection with the same addresses (after a reset the client port is
 * free again) would redirect into it, and after connect(AF_UNSPEC) its own
 * bytes of the old connection would stay readable and the socket could not
 * enter again (EBUSY). So it leaves here, unless it ended in order with
 * bytes unread (then close() takes it out; TIME_WAIT keeps its addresses
 * from a new connection meanwhile). Bytes not read before a reset or a
 * disconnect go with it, as RFC 793 has a reset flush the queues (Linux TCP
 * lets them be read first after a reset; a disconnect drops them too).
 */
static __always_inline void sock_closed(struct bpf_sock_ops *skops, const bool accel)
{
	struct sock_key key = {};
	struct sock_state *st = NULL;
	/* Only sockets with state enter km_sock (see sockops_established);
	 * telemetry watches the others' state too, which then costs no
	 * map deletes. */
	if (skops->sk)
		st = bpf_sk_storage_get(&km_sock_state, skops->sk, 0, 0);
	if (!st)
		return;
	FILL_KEY(&key, skops, SOCK_NETNS(skops, st));
	/* km_conn holds connecting ends' keys: no-op for an accepting end. */
	bpf_map_delete_elem(&km_conn, &key);
	if (!ended_in_order_unread(skops, accel))
		bpf_map_delete_elem(&km_sock, &key);
}

/*
 * Runs for an ACK of data this socket sent through TCP. If its own
 * direction is on TCP for good (plain from its first send, the waypoint TLV
 * sent, or pushed back), the map only costs it, so it leaves, provided the
 * other end never redirected into it (then its queue is empty) and, by the
 * LEAVING bit, never will. One try: the other end's REDIRECT bit stays.
 */
static __always_inline int leave_if_on_tcp(struct bpf_sock_ops *skops, const bool accel)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	struct sock_state *st = bpf_sk_storage_get(&km_sock_state, sk, 0, 0);
	if (!st || !(st->flags & KMESH_SOCK_DECIDED) ||
	    (st->flags & (KMESH_SOCK_ACCEL | KMESH_SOCK_TLV_PENDING)))
		return 1;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_RTT_CB_FLAG);
	int end = sock_end(st);
	struct sock_key key = {};
	FILL_KEY(&key, skops, SOCK_NETNS(skops, st));
	if (accel && km_feat_accel) {
		struct conn_value *c = conn_of(&key, end);
		if (!c)
			return 1;
		__u32 old = conn_fetch_or(c, KMESH_CONN_LEAVING(end), accel);
		if (old & KMESH_CONN_REDIRECT(!end))
			return 1;
	}
	if (bpf_map_delete_elem(&km_sock, &key) == 0)
		stat_inc(KMESH_STAT_ACCEL_LEFT);
	return 1;
}

/*
 * Kernel memory a queued message takes besides its payload: the struct
 * sk_msg bpf_tcp_ingress allocates for it (about 1 KiB with slab rounding;
 * 1-byte writes to a stalled reader measured 0.98 KiB each).
 */
static __always_inline __u64 msg_overhead(void)
{
	return bpf_core_type_size(struct sk_msg);
}

/*
 * Whether the peer msg was just redirected to holds more unread memory
 * than it may: the configured limit, or its SO_RCVBUF if the application
 * set one. Like TCP's truesize, the count includes per-message overhead,
 * which for small writes dwarfs the payload the kernel tracks
 * (msg_tot_len); the number of queued messages is estimated from the
 * sender's recent average write. Redirected bytes bypass the receive
 * buffer TCP would fill, so without this a sender to a stalled reader
 * never sees EAGAIN, and 1-byte writes pin 1 KiB of slab each.
 *
 * sk_msg programs cannot release a socket reference, so the peer is not
 * looked up again: the context is the kernel's struct sk_msg, whose
 * sk_redir bpf_msg_redirect_hash has just set (the socket is pinned by its
 * psock for the program's run). Kernel memory is read with
 * bpf_probe_read_kernel, which cannot fault.
 */
static __always_inline bool peer_backlogged(struct sk_msg_md *msg, __u64 bytes, __u64 sends)
{
	if (!km_feat_accel)
		return false;
	struct config_value *c = config();
	if (!c || !c->queue_limit)
		return false;
	struct sock *sk = NULL;
	if (bpf_core_read(&sk, sizeof(sk), &((struct sk_msg *)(void *)msg)->sk_redir) || !sk)
		return false;
	__u8 locks = 0;
	int rcvbuf = 0;
	__u32 queued = 0, limit = c->queue_limit;
	if (!psock_queued(sk, &queued))
		return false;
	if (!bpf_core_read(&locks, sizeof(locks), &sk->sk_userlocks) &&
	    (locks & SOCK_RCVBUF_LOCK) &&
	    !bpf_core_read(&rcvbuf, sizeof(rcvbuf), &sk->sk_rcvbuf) && rcvbuf > 0 &&
	    (__u32)rcvbuf < limit)
		limit = rcvbuf;
	/* queued / (bytes / sends) messages, each with its overhead. */
	__u64 cost = queued + (bytes ? (__u64)queued * sends / bytes : 0) * msg_overhead();
	return cost >= limit;
}

/* sk_msg's acceleration step, for a socket without a pending TLV. */
static __always_inline int accel_sendmsg(struct sk_msg_md *msg, struct sock_state *st)
{
	/*
	 * Each direction starts on one path, chosen at its first send, and
	 * only ever leaves the peer's queue for TCP, never the other way: the
	 * receiver reads its queue before TCP's, so bytes stay in order.
	 */
	struct sock_key self = {}, peer = {};
	if (!(st->flags & KMESH_SOCK_DECIDED)) {
		st->flags |= KMESH_SOCK_DECIDED;
		int end = sock_end(st);
		FILL_KEY(&self, msg, SOCK_NETNS(msg, st));
		struct conn_value *c = accelerate_on() ? conn_of(&self, end) : NULL;
		if (c) {
			/* Announced before the redirect; the other end, if it is
			 * leaving, goes first (see KMESH_CONN_*). No entry: the
			 * connecting end never entered km_sock. */
			__u32 old = conn_fetch_or(c, KMESH_CONN_REDIRECT(end), true);
			mirror_key(&self, &peer);
			if (!(old & KMESH_CONN_LEAVING(!end)) && (end || (old & KMESH_CONN_ACCEPTED_IN)) &&
			    bpf_msg_redirect_hash(msg, &km_sock, &peer, BPF_F_INGRESS) == SK_PASS) {
				st->flags |= KMESH_SOCK_ACCEL;
				st->redirected += msg->size;
				stat_inc(KMESH_STAT_ACCEL_ON);
				return SK_PASS;
			}
			/* Plain for good: the other end may leave after all. */
			conn_and(c, ~KMESH_CONN_REDIRECT(end), true);
		}
		stat_inc(KMESH_STAT_ACCEL_OFF);
		return SK_PASS;
	}
	if (!(st->flags & KMESH_SOCK_ACCEL))
		return SK_PASS;
	FILL_KEY(&self, msg, SOCK_NETNS(msg, st));
	mirror_key(&self, &peer);
	/* Peer gone (closed): plain TCP, which fails as TCP would. */
	if (bpf_msg_redirect_hash(msg, &km_sock, &peer, BPF_F_INGRESS) != SK_PASS)
		return SK_PASS;
	/* Sends on one socket are serialized by its lock: no atomic needed. */
	st->redirected += msg->size;
	/*
	 * A peer that stopped reading: this message still joins its queue
	 * (a redirect cannot be taken back), the next ones go through TCP,
	 * whose flow control then blocks the sender as it would without us.
	 */
	__u32 bytes = st->unchecked_bytes + msg->size, sends = st->unchecked_sends + 1;
	if (bytes + (__u64)sends * msg_overhead() < KMESH_QUEUE_CHECK_BYTES) {
		st->unchecked_bytes = bytes;
		st->unchecked_sends = sends;
	} else {
		st->unchecked_bytes = 0;
		st->unchecked_sends = 0;
		if (peer_backlogged(msg, bytes, sends)) {
			st->flags &= ~KMESH_SOCK_ACCEL;
			stat_inc(KMESH_STAT_ACCEL_PUSHBACK);
		}
	}
	return SK_PASS;
}

#endif
