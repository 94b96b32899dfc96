// SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0)
/*
 * The data path, one object so every program shares the maps:
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
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "kmesh.h"
#include "maps.h"

/* Returns the endpoint priority level to draw from, or -1. */
static __always_inline int pick_prio(const struct service_value *svc)
{
	if (svc->lb_policy == KMESH_LB_FAILOVER) {
#pragma unroll
		for (int p = 0; p < KMESH_MAX_PRIO; p++)
			if (svc->prio_endpoint_count[p] > 0)
				return p;
		return -1;
	}
	/* RANDOM keeps every endpoint at priority 0; STRICT uses only full matches. */
	return svc->prio_endpoint_count[0] > 0 ? 0 : -1;
}

enum verdict {
	V_PASS,     /* leave the connection alone */
	V_REWRITE,  /* destination rewritten in *addr / *port */
	V_REJECT,   /* refuse the connect (EPERM) */
	V_WAYPOINT, /* rewritten to a waypoint; *orig holds the destination */
};

/* Target port for *port on svc: 0 = same port, -1 = port not served. */
static __always_inline int match_port(const struct service_value *svc, __u32 port, __u32 *target)
{
	bool found = false;
#pragma unroll
	for (int i = 0; i < KMESH_MAX_PORTS; i++) {
		if (!found && svc->service_port[i] != 0 && svc->service_port[i] == port) {
			*target = svc->target_port[i];
			found = true;
		}
	}
	return found ? 0 : -1;
}

/*
 * Picks an endpoint of svc for a connection to *port (already matched,
 * service target port `target`, which the endpoint's own may override). Fills addr and port with the backend, or returns
 * V_PASS/V_REJECT. *ev_out gets the endpoint (for its waypoint).
 */
static __always_inline enum verdict pick_backend(const struct service_value *svc, __u32 target,
						 struct kmesh_addr *addr, __u32 *port,
						 bool want_v4, struct endpoint_value **ev_out)
{
	int prio = pick_prio(svc);
	if (prio < 0 || prio >= KMESH_MAX_PRIO) {
		if (svc->lb_policy == KMESH_LB_STRICT) {
			stat_inc(KMESH_STAT_STRICT_REJECT);
			return V_REJECT;
		}
		stat_inc(KMESH_STAT_NO_ENDPOINT);
		return V_PASS;
	}
	__u32 svc_port = *port;
	__u32 count = svc->prio_endpoint_count[prio];
	if (count == 0) {
		stat_inc(KMESH_STAT_NO_ENDPOINT);
		return V_PASS;
	}
	struct endpoint_key ek = {
		.service_id = svc->service_id,
		.prio = prio,
		.index = bpf_get_prandom_u32() % count + 1,
	};
	struct endpoint_value *ev = bpf_map_lookup_elem(&km_endpoint, &ek);
	if (!ev) {
		stat_inc(KMESH_STAT_NO_ENDPOINT);
		return V_PASS;
	}
	if (want_v4) {
		if (!ev->addr.has_ip4) {
			stat_inc(KMESH_STAT_FAMILY_MISMATCH);
			return V_PASS;
		}
		addr->ip6[0] = 0;
		addr->ip6[1] = 0;
		addr->ip6[2] = bpf_htonl(0x0000ffff);
		addr->ip6[3] = ev->addr.ip4;
	} else {
		if (!ev->addr.has_ip6) {
			stat_inc(KMESH_STAT_FAMILY_MISMATCH);
			return V_PASS;
		}
		*addr = ev->addr.ip6;
	}
	if (ev->flags & KMESH_EP_PORTS) {
		struct port_key pk = {
			.service_id = svc->service_id,
			.workload_id = ev->workload_id,
			.service_port = svc_port,
		};
		__u32 *own = bpf_map_lookup_elem(&km_port, &pk);
		if (own)
			target = *own;
	}
	if (target != 0)
		*port = target;
	*ev_out = ev;
	return V_REWRITE;
}

/*
 * Sends the connection to waypoint wp, remembering addr:port as the
 * original destination. A waypoint given as a service VIP (a hostname
 * waypoint resolved by the daemon) is resolved here to one of its pods,
 * without a further waypoint step.
 */
static __always_inline enum verdict to_waypoint(const struct waypoint *wp, struct kmesh_addr *addr,
						__u32 *port, bool want_v4, struct sock_state *orig)
{
	if (addr_is_v4(&wp->addr) != want_v4) {
		stat_inc(KMESH_STAT_FAMILY_MISMATCH);
		return V_PASS;
	}
	orig->orig_addr = *addr;
	orig->orig_port = *port;
	struct kmesh_addr wp_addr = wp->addr;
	__u32 wp_port = wp->port;
	struct addr_key key = { .addr = wp_addr };
	struct service_value *svc = bpf_map_lookup_elem(&km_vip, &key);
	if (svc) {
		__u32 target = 0;
		struct endpoint_value *ev = NULL;
		if (match_port(svc, wp_port, &target) < 0) {
			stat_inc(KMESH_STAT_PORT_MISS);
			return V_PASS;
		}
		enum verdict v = pick_backend(svc, target, &wp_addr, &wp_port, want_v4, &ev);
		if (v != V_REWRITE)
			return v;
	}
	*addr = wp_addr;
	*port = wp_port;
	stat_inc(KMESH_STAT_WAYPOINT_REDIRECT);
	return V_WAYPOINT;
}

/*
 * Core lookup shared by both families. addr/port are in/out, in the
 * socket's representation (network order). want_v4: the socket can only
 * reach an IPv4 backend (connect4 or a v4-mapped connect6). The caller has
 * checked enrollment; no_waypoint: the caller is a waypoint itself.
 */
static __always_inline enum verdict redirect(struct kmesh_addr *addr, __u32 *port, bool want_v4,
					     bool no_waypoint, struct sock_state *orig)
{
	struct addr_key key = { .addr = *addr };
	struct service_value *svc = bpf_map_lookup_elem(&km_vip, &key);
	if (!svc) {
		/* Direct pod access: the address is already the backend. */
		struct workload_value *wl = bpf_map_lookup_elem(&km_workload, &key);
		if (!wl)
			return V_PASS;
		stat_inc(KMESH_STAT_WORKLOAD_DIRECT);
		if (wl->waypoint.port != 0 && !no_waypoint)
			return to_waypoint(&wl->waypoint, addr, port, want_v4, orig);
		return V_PASS;
	}

	__u32 target = 0;
	if (match_port(svc, *port, &target) < 0) {
		stat_inc(KMESH_STAT_PORT_MISS);
		return V_PASS;
	}
	if (svc->waypoint.port != 0 && !no_waypoint)
		return to_waypoint(&svc->waypoint, addr, port, want_v4, orig);

	struct endpoint_value *ev = NULL;
	enum verdict v = pick_backend(svc, target, addr, port, want_v4, &ev);
	if (v != V_REWRITE || !ev)
		return v;
	if (ev->waypoint.port != 0 && !no_waypoint)
		return to_waypoint(&ev->waypoint, addr, port, want_v4, orig);
	stat_inc(KMESH_STAT_SERVICE_REDIRECT);
	return V_REWRITE;
}

/* Keeps the original destination on the socket for the sk_msg program. */
static __always_inline bool remember_orig(struct bpf_sock_addr *ctx, const struct sock_state *orig)
{
	struct sock_state *st =
		bpf_sk_storage_get(&km_sock_state, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		stat_inc(KMESH_STAT_TLV_FAILED);
		return false;
	}
	st->orig_addr = orig->orig_addr;
	st->orig_port = orig->orig_port;
	st->flags = KMESH_SOCK_TLV_PENDING;
	return true;
}

SEC("cgroup/connect4")
int kmesh_connect4(struct bpf_sock_addr *ctx)
{
	/*
	 * Enrollment first: attached at the cgroup2 root, most sockets on a node
	 * are not enrolled, and they then pay one lookup.
	 */
	if (ctx->type != SOCK_STREAM)
		return 1;
	struct manage_value *m = netns_enrollment(ctx);
	if (!m)
		return 1;
	stat_inc(KMESH_STAT_ENROLLED_CONNECT);

	struct kmesh_addr addr = {
		.ip6 = { 0, 0, bpf_htonl(0x0000ffff), ctx->user_ip4 },
	};
	__u32 port = ctx->user_port;
	struct sock_state orig = {};
	enum verdict v = redirect(&addr, &port, true, m->flags & KMESH_NETNS_WAYPOINT, &orig);
	if (v == V_REJECT)
		return 0;
	/* No way to carry the original destination: fail closed. */
	if (v == V_WAYPOINT && !remember_orig(ctx, &orig))
		return 0;
	if (v == V_REWRITE || v == V_WAYPOINT) {
		ctx->user_ip4 = addr.ip6[3];
		ctx->user_port = port;
	}
	return 1;
}

SEC("cgroup/connect6")
int kmesh_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	struct manage_value *m = netns_enrollment(ctx);
	if (!m)
		return 1;
	stat_inc(KMESH_STAT_ENROLLED_CONNECT);

	struct kmesh_addr addr;
	addr.ip6[0] = ctx->user_ip6[0];
	addr.ip6[1] = ctx->user_ip6[1];
	addr.ip6[2] = ctx->user_ip6[2];
	addr.ip6[3] = ctx->user_ip6[3];
	__u32 port = ctx->user_port;
	struct sock_state orig = {};
	enum verdict v =
		redirect(&addr, &port, addr_is_v4(&addr), m->flags & KMESH_NETNS_WAYPOINT, &orig);
	if (v == V_REJECT)
		return 0;
	if (v == V_WAYPOINT && !remember_orig(ctx, &orig))
		return 0;
	if (v == V_REWRITE || v == V_WAYPOINT) {
		ctx->user_ip6[0] = addr.ip6[0];
		ctx->user_ip6[1] = addr.ip6[1];
		ctx->user_ip6[2] = addr.ip6[2];
		ctx->user_ip6[3] = addr.ip6[3];
		ctx->user_port = port;
	}
	return 1;
}

/*
 * The connection as seen from this end; see struct sock_key. Context
 * fields are read one by one through volatile: clang otherwise merges
 * them into 8-byte loads or computed context pointers, which the verifier
 * refuses.
 */
#define CTX_U32(x) (*(volatile __u32 *)&(x))
#define FILL_KEY(key, c)                                                          \
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
		(key)->netns = addr_is_loopback(&(key)->local) ? bpf_get_netns_cookie(c) : 0; \
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
 * A connecting end enters km_sock together with its connection's km_conn
 * entry. An accepting end enters only if its client did: otherwise nothing
 * can be redirected either way, and the map would only slow its sends and
 * reads (sk_msg and the psock's recvmsg run for every call).
 */
static __always_inline int sockops_established(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;
	if (!netns_enrollment(skops))
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
	if (!tlv && !accelerate_on())
		return 1;
	struct sock_key key = {};
	FILL_KEY(&key, skops);
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
	}
	if (conn)
		__sync_fetch_and_or(&conn->bits, KMESH_CONN_ACCEPTED_IN);
	if (!passive) {
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
	if (!bpf_core_field_exists(struct sk_psock, msg_tot_len) ||
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
static __always_inline bool ended_in_order_unread(struct bpf_sock_ops *skops)
{
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
static __always_inline void sock_closed(struct bpf_sock_ops *skops)
{
	struct sock_key key = {};
	FILL_KEY(&key, skops);
	/* km_conn holds connecting ends' keys: no-op for an accepting end. */
	bpf_map_delete_elem(&km_conn, &key);
	if (!ended_in_order_unread(skops))
		bpf_map_delete_elem(&km_sock, &key);
}

/*
 * Runs for an ACK of data this socket sent through TCP. If its own
 * direction is on TCP for good (plain from its first send, the waypoint TLV
 * sent, or pushed back), the map only costs it, so it leaves, provided the
 * other end never redirected into it (then its queue is empty) and, by the
 * LEAVING bit, never will. One try: the other end's REDIRECT bit stays.
 */
static __always_inline int leave_if_on_tcp(struct bpf_sock_ops *skops)
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
	FILL_KEY(&key, skops);
	struct conn_value *c = conn_of(&key, end);
	if (!c)
		return 1;
	__u32 old = __sync_fetch_and_or(&c->bits, KMESH_CONN_LEAVING(end));
	if (old & KMESH_CONN_REDIRECT(!end))
		return 1;
	if (bpf_map_delete_elem(&km_sock, &key) == 0)
		stat_inc(KMESH_STAT_ACCEL_LEFT);
	return 1;
}

SEC("sockops")
int kmesh_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		return sockops_established(skops);
	case BPF_SOCK_OPS_RTT_CB:
		return leave_if_on_tcp(skops);
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			sock_closed(skops);
		return 1;
	}
	return 1;
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

SEC("sk_msg")
int kmesh_sendmsg(struct sk_msg_md *msg)
{
	struct sock_state *st = bpf_sk_storage_get(&km_sock_state, msg->sk, 0, 0);
	if (st && (st->flags & KMESH_SOCK_TLV_PENDING)) {
		/* Waypoint connections are never accelerated: the waypoint must
		 * see the TLV, and each direction keeps one path. */
		st->flags = KMESH_SOCK_DECIDED;
		if (push_tlv(msg, st)) {
			stat_inc(KMESH_STAT_TLV_FAILED);
			return SK_DROP;
		}
		stat_inc(KMESH_STAT_TLV_SENT);
		return SK_PASS;
	}
	if (!st) {
		st = bpf_sk_storage_get(&km_sock_state, msg->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!st)
			return SK_PASS;
	}
	/*
	 * Each direction starts on one path, chosen at its first send, and
	 * only ever leaves the peer's queue for TCP, never the other way: the
	 * receiver reads its queue before TCP's, so bytes stay in order.
	 */
	struct sock_key self = {}, peer = {};
	if (!(st->flags & KMESH_SOCK_DECIDED)) {
		st->flags |= KMESH_SOCK_DECIDED;
		int end = sock_end(st);
		FILL_KEY(&self, msg);
		struct conn_value *c = accelerate_on() ? conn_of(&self, end) : NULL;
		if (c) {
			/* Announced before the redirect; the other end, if it is
			 * leaving, goes first (see KMESH_CONN_*). No entry: the
			 * connecting end never entered km_sock. */
			__u32 old = __sync_fetch_and_or(&c->bits, KMESH_CONN_REDIRECT(end));
			mirror_key(&self, &peer);
			if (!(old & KMESH_CONN_LEAVING(!end)) && (end || (old & KMESH_CONN_ACCEPTED_IN)) &&
			    bpf_msg_redirect_hash(msg, &km_sock, &peer, BPF_F_INGRESS) == SK_PASS) {
				st->flags |= KMESH_SOCK_ACCEL;
				stat_inc(KMESH_STAT_ACCEL_ON);
				return SK_PASS;
			}
			/* Plain for good: the other end may leave after all. */
			__sync_fetch_and_and(&c->bits, ~KMESH_CONN_REDIRECT(end));
		}
		stat_inc(KMESH_STAT_ACCEL_OFF);
		return SK_PASS;
	}
	if (!(st->flags & KMESH_SOCK_ACCEL))
		return SK_PASS;
	FILL_KEY(&self, msg);
	mirror_key(&self, &peer);
	/* Peer gone (closed): plain TCP, which fails as TCP would. */
	if (bpf_msg_redirect_hash(msg, &km_sock, &peer, BPF_F_INGRESS) != SK_PASS)
		return SK_PASS;
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

char LICENSE[] SEC("license") = "Dual BSD/GPL";
