// SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0)
/*
 * connect-time service redirect: cgroup/connect4 and cgroup/connect6.
 *
 * An enrolled socket connecting to a service VIP:port is rewritten to one of
 * the service's backends (and its target port) before the kernel builds the
 * connection, so no packet ever carries the VIP and no proxy hop is needed.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "kmesh.h"

/* Sizes are placeholders: the loader sets max_entries from config. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr_key);
	__type(value, struct service_value);
	__uint(max_entries, 1024);
} km_vip SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr_key);
	__type(value, struct workload_value);
	__uint(max_entries, 1024);
} km_workload SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_value);
	__uint(max_entries, 1024);
} km_endpoint SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct manage_value);
	__uint(max_entries, 1024);
} km_manage SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, KMESH_STAT_MAX);
} km_stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&km_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline bool enrolled(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	return bpf_map_lookup_elem(&km_manage, &cookie) != NULL;
}

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
	V_PASS,    /* leave the connection alone */
	V_REWRITE, /* destination rewritten in *addr / *port */
	V_REJECT,  /* refuse the connect (EPERM) */
};

/*
 * Core lookup shared by both families. addr/port are in/out, in the
 * socket's representation (network order). want_v4: the socket can only
 * reach an IPv4 backend (connect4 or a v4-mapped connect6). The caller has
 * checked enrollment.
 */
static __always_inline enum verdict redirect(struct kmesh_addr *addr, __u32 *port, bool want_v4)
{
	struct addr_key key = { .addr = *addr };
	struct service_value *svc = bpf_map_lookup_elem(&km_vip, &key);
	if (!svc) {
		/* Direct pod access: the address is already the backend. */
		if (bpf_map_lookup_elem(&km_workload, &key))
			stat_inc(KMESH_STAT_WORKLOAD_DIRECT);
		return V_PASS;
	}

	__u32 target = 0;
	bool port_found = false;
#pragma unroll
	for (int i = 0; i < KMESH_MAX_PORTS; i++) {
		if (!port_found && svc->service_port[i] != 0 && svc->service_port[i] == *port) {
			target = svc->target_port[i];
			port_found = true;
		}
	}
	if (!port_found) {
		stat_inc(KMESH_STAT_PORT_MISS);
		return V_PASS;
	}

	int prio = pick_prio(svc);
	if (prio < 0 || prio >= KMESH_MAX_PRIO) {
		if (svc->lb_policy == KMESH_LB_STRICT) {
			stat_inc(KMESH_STAT_STRICT_REJECT);
			return V_REJECT;
		}
		stat_inc(KMESH_STAT_NO_ENDPOINT);
		return V_PASS;
	}
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
	if (target != 0)
		*port = target;
	stat_inc(KMESH_STAT_SERVICE_REDIRECT);
	return V_REWRITE;
}

SEC("cgroup/connect4")
int kmesh_connect4(struct bpf_sock_addr *ctx)
{
	/*
	 * Enrollment first: attached at the cgroup2 root, most sockets on a node
	 * are not enrolled, and they then pay one lookup.
	 */
	if (ctx->type != SOCK_STREAM || !enrolled(ctx))
		return 1;
	stat_inc(KMESH_STAT_ENROLLED_CONNECT);

	struct kmesh_addr addr = {
		.ip6 = { 0, 0, bpf_htonl(0x0000ffff), ctx->user_ip4 },
	};
	__u32 port = ctx->user_port;
	enum verdict v = redirect(&addr, &port, true);
	if (v == V_REJECT)
		return 0;
	if (v == V_REWRITE) {
		ctx->user_ip4 = addr.ip6[3];
		ctx->user_port = port;
	}
	return 1;
}

SEC("cgroup/connect6")
int kmesh_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || !enrolled(ctx))
		return 1;
	stat_inc(KMESH_STAT_ENROLLED_CONNECT);

	struct kmesh_addr addr;
	addr.ip6[0] = ctx->user_ip6[0];
	addr.ip6[1] = ctx->user_ip6[1];
	addr.ip6[2] = ctx->user_ip6[2];
	addr.ip6[3] = ctx->user_ip6[3];
	bool mapped = addr.ip6[0] == 0 && addr.ip6[1] == 0 && addr.ip6[2] == bpf_htonl(0x0000ffff);
	__u32 port = ctx->user_port;
	enum verdict v = redirect(&addr, &port, mapped);
	if (v == V_REJECT)
		return 0;
	if (v == V_REWRITE) {
		ctx->user_ip6[0] = addr.ip6[0];
		ctx->user_ip6[1] = addr.ip6[1];
		ctx->user_ip6[2] = addr.ip6[2];
		ctx->user_ip6[3] = addr.ip6[3];
		ctx->user_port = port;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
