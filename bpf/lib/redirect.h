/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Connect-time redirect: the service, workload, endpoint and enrollment maps
 * and the lookup chain connect4/connect6 run (DESIGN.md, Data path). Needs
 * only what cgroup sock_addr programs had by Linux 5.7.
 */
#ifndef __KMESH_LIB_REDIRECT_H__
#define __KMESH_LIB_REDIRECT_H__

#include "common.h"
#include "lb.h"

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

/* Value: target port, network order in low 16 bits. Looked up only for
 * endpoints flagged KMESH_EP_PORTS. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct port_key);
	__type(value, __u32);
	__uint(max_entries, 1024);
} km_port SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct manage_value);
	__uint(max_entries, 1024);
} km_manage SEC(".maps");

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
	ek.index = lb_weighted_index(svc, prio, count, ek.index);
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
		addr_set_v4(addr, ev->addr.ip4);
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
 * *hit: the service matched (VIP and port), if any.
 */
static __always_inline enum verdict redirect(struct kmesh_addr *addr, __u32 *port, bool want_v4,
					     bool no_waypoint, struct sock_state *orig,
					     const struct service_value **hit)
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
	/* The service the client asked for: its limits apply (limits.h). */
	*hit = svc;
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

#endif
