/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Per-service limits at connect time, for services whose km_vip value sets
 * them:
 * - circuit breaker: at most max_connections concurrent connections from
 *   this node. sockops counts a socket in when its SYN goes out and out
 *   when it closes (a failed connect too); connect4/6 refuse while the
 *   count is at the limit. The check and the count are apart, so
 *   simultaneous connects on several CPUs can pass it by at most one per
 *   CPU; in exchange a connect that fails before its SYN (no route, no
 *   port) never leaves a count behind. Count and socket storage are
 *   pinned and reused by the next daemon, and the programs stay attached
 *   between daemons, so counts stay right across a restart.
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

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct limit_sock);
} km_limit_sock SEC(".maps");

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
 * connect. A connect that passes is marked for sockops to count.
 */
static __always_inline bool limits_connect(struct bpf_sock_addr *ctx,
					   const struct service_value *svc, __u64 netns)
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
		struct limit_sock *ls =
			bpf_sk_storage_get(&km_limit_sock, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (ls) {
			ls->id = id;
			ls->state = KMESH_LIMIT_PENDING;
		}
	}
	return true;
}

/*
 * sockops: a marked socket is counted when its SYN goes out (and its
 * state changes watched), and uncounted when it closes, established or
 * not.
 */
static __always_inline void limits_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB &&
	    !(op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE))
		return;
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct limit_sock *ls = bpf_sk_storage_get(&km_limit_sock, sk, 0, 0);
	if (!ls)
		return;
	struct limit_id id = ls->id;
	struct svc_conns *c = bpf_map_lookup_elem(&km_svc_conns, &id);
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		if (ls->state != KMESH_LIMIT_PENDING || !c)
			return;
		ls->state = KMESH_LIMIT_COUNTED;
		__sync_fetch_and_add(&c->active, 1);
		bpf_sock_ops_cb_flags_set(skops,
					  skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		return;
	}
	if (ls->state != KMESH_LIMIT_COUNTED)
		return;
	ls->state = 0;
	if (c)
		__sync_fetch_and_add(&c->active, -1);
}

#endif
