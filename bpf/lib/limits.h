/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Per-service limits at connect time, for services whose km_vip value sets
 * them:
 * - circuit breaker: at most max_connections concurrent connections from
 *   this node. connect4/6 refuse while the count is at the limit, and
 *   leave a note (km_conn_note, lib/sock.h) naming the service; sockops
 *   counts the socket in when its SYN goes out and out when it closes (a
 *   failed connect too), and drops the note then. The check and the count
 *   are apart, so simultaneous connects on several CPUs can pass it by at
 *   most one per CPU; in exchange a connect that fails before its SYN (no
 *   route, no port) never leaves a count behind (its note, never counted,
 *   is swept by the daemon). Counts and notes are pinned and reused by
 *   the next daemon, and the programs stay attached between daemons, so
 *   counts stay right across a restart.
 * - rate limit: a token bucket per (service, client netns), as Envoy's
 *   local_ratelimit for TCP: max_tokens, refilled by tokens_per_fill
 *   every fill_interval; a connect takes one token or is refused. The
 *   bucket is updated under its spin lock (hash maps allow one since
 *   5.1; LRU hash maps do not, hence a plain hash the daemon sweeps).
 * A refused connect gets EPERM (the program returns 0) at once.
 */
#ifndef __KMESH_LIB_LIMITS_H__
#define __KMESH_LIB_LIMITS_H__

#include "common.h"
#include "sock.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct limit_id);
	__type(value, struct svc_conns);
	__uint(max_entries, 1024); /* services with a breaker */
} km_svc_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct bucket_key);
	__type(value, struct bucket);
	/* (rate-limited service, client pod) pairs; full: new pairs go
	 * unlimited (and the writer sweeps pairs gone). */
	__uint(max_entries, 4096);
} km_bucket SEC(".maps");

/* Takes a token from the bucket of (svc, netns); false: none left. */
static __always_inline bool bucket_take(const struct service_value *svc, __u64 netns)
{
	struct bucket_key k = {
		.id = { svc->limit_id[0], svc->limit_id[1] },
		.netns = netns,
	};
	__u32 max = svc->rl_max_tokens;
	__u64 now = bpf_ktime_get_ns();
	struct bucket *b = bpf_map_lookup_elem(&km_bucket, &k);
	if (!b) {
		struct bucket fresh = { .tokens = max, .last_fill_ns = now };
		bpf_map_update_elem(&km_bucket, &k, &fresh, BPF_NOEXIST);
		b = bpf_map_lookup_elem(&km_bucket, &k);
		/* Map full: the limit is lost, not the connection. */
		if (!b)
			return true;
	}
	__u64 interval = (__u64)svc->rl_fill_interval_ms * 1000000;
	__u64 per_fill = svc->rl_tokens_per_fill;
	bool ok;
	bpf_spin_lock(&b->lock);
	if (interval && now > b->last_fill_ns) {
		__u64 n = (now - b->last_fill_ns) / interval;
		if (n) {
			__u64 t = b->tokens + n * per_fill;
			b->tokens = t > max ? max : t;
			b->last_fill_ns += n * interval;
		}
	}
	/* The limit was lowered on reload. */
	if (b->tokens > max)
		b->tokens = max;
	ok = b->tokens > 0;
	if (ok)
		b->tokens -= 1;
	else
		b->rejected += 1;
	bpf_spin_unlock(&b->lock);
	return ok;
}

/*
 * connect4/6, once the destination matched service svc: false refuses the
 * connect. A connect that passes a breaker gets its service in `n`, for
 * sockops to count (see note_commit).
 */
static __always_inline bool limits_connect(const struct service_value *svc, __u64 netns,
					   struct conn_note *n)
{
	if (!svc->max_connections && !svc->rl_max_tokens)
		return true;
	struct limit_id id = { .id = { svc->limit_id[0], svc->limit_id[1] } };
	if (svc->max_connections) {
		struct svc_conns *c = bpf_map_lookup_elem(&km_svc_conns, &id);
		if (c && c->active >= (__s64)svc->max_connections) {
			__sync_fetch_and_add(&c->rejected, 1);
			stat_inc(KMESH_STAT_BREAKER_REJECT);
			return false;
		}
	}
	if (svc->rl_max_tokens && !bucket_take(svc, netns)) {
		stat_inc(KMESH_STAT_RATE_LIMITED);
		return false;
	}
	if (svc->max_connections) {
		n->limit = id;
		n->flags |= KMESH_NOTE_LIMIT_PENDING;
	}
	return true;
}

/*
 * sockops, a socket's SYN going out: counts it in if its note says so.
 * True: the note is needed until the socket closes.
 */
static __always_inline bool limits_connecting(struct conn_note *n)
{
	if (!(n->flags & KMESH_NOTE_LIMIT_PENDING))
		return false;
	n->flags &= ~KMESH_NOTE_LIMIT_PENDING;
	struct limit_id id = n->limit;
	struct svc_conns *c = bpf_map_lookup_elem(&km_svc_conns, &id);
	if (!c)
		return false;
	__sync_fetch_and_add(&c->active, 1);
	n->flags |= KMESH_NOTE_LIMIT_COUNTED;
	return true;
}

/* sockops, a marked socket closing (established or not): counts it out. */
static __always_inline void limits_closed(struct conn_note *n)
{
	if (!(n->flags & KMESH_NOTE_LIMIT_COUNTED))
		return;
	n->flags &= ~KMESH_NOTE_LIMIT_COUNTED;
	struct limit_id id = n->limit;
	struct svc_conns *c = bpf_map_lookup_elem(&km_svc_conns, &id);
	if (c)
		__sync_fetch_and_add(&c->active, -1);
}

#endif
