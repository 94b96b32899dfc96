/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * L4 authorization at the destination (sk_lookup, before any listener can
 * take the connection) and at an enrolled client's connect(). The daemon
 * compiles the policies (src/authz/compile.rs); here a decision is at most
 * seven lookups: the destination's policy set, then the classes of the
 * port, of the source's identity (two) and of the source address in that
 * set, then the outcome of the set's DENY part and of its ALLOW part for
 * those classes; the destination's entry says which the set needs. A
 * destination without policies costs one miss. Needs only what sk_lookup and ring buffers had by Linux 5.9.
 */
#ifndef __KMESH_LIB_AUTHZ_H__
#define __KMESH_LIB_AUTHZ_H__

#include "common.h"
#include "redirect.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr_key);
	__type(value, struct authz_dst);
	__uint(max_entries, 1024);
} km_authz_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct authz_port_key);
	__type(value, struct authz_class);
	__uint(max_entries, 1024);
} km_authz_port SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct authz_id_key);
	__type(value, struct authz_class);
	__uint(max_entries, 1024);
} km_authz_id SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct authz_src_key);
	__type(value, struct authz_class);
	__uint(max_entries, 1024);
} km_authz_src SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct authz_verdict_key);
	__type(value, struct authz_verdict);
	__uint(max_entries, 1024);
} km_authz_verdict SEC(".maps");

/* Per policy index: allow, deny, dry-run deny (enum kmesh_authz_count). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 3 * 4096);
} km_authz_count SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} km_authz_events SEC(".maps");

static __always_inline void authz_count(__u32 policy, __u32 kind)
{
	if (!policy)
		return;
	__u32 idx = policy * 3 + kind;
	__u64 *v = bpf_map_lookup_elem(&km_authz_count, &idx);
	if (v)
		*v += 1;
}

static __always_inline void authz_event(const struct authz_verdict *v, const struct kmesh_addr *src,
					const struct kmesh_addr *dst, __u32 port, __u32 at_connect)
{
	struct authz_event *e = bpf_ringbuf_reserve(&km_authz_events, sizeof(*e), 0);
	if (!e) {
		stat_inc(KMESH_STAT_AUTHZ_EVENT_LOST);
		return;
	}
	e->policy = v->policy;
	e->at_connect = at_connect;
	e->src = *src;
	e->dst = *dst;
	e->dst_port = port;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

/*
 * The verdict for src -> dst:port (port in host order) into *out; false
 * if dst has no policies. The two parts' outcomes combine as the evaluator
 * decides: a matching DENY denies; otherwise, where ALLOW policies exist,
 * one must match. A missing outcome (a table being replaced that a
 * connection raced) denies: authorization fails closed.
 */
static __always_inline bool authz_decide(const struct kmesh_addr *src, const struct kmesh_addr *dst,
					 __u32 port, struct authz_verdict *out)
{
	struct addr_key key = { .addr = *dst };
	struct authz_dst *d = bpf_map_lookup_elem(&km_authz_dst, &key);
	if (!d)
		return false;
	__u32 set = d->set, need = d->flags;
	struct authz_verdict_key dk = { .set = set, .part = KMESH_AUTHZ_PART_DENY,
					.dst_class = d->deny_class };
	struct authz_verdict_key ak = { .set = set, .part = KMESH_AUTHZ_PART_ALLOW,
					.dst_class = d->allow_class };
	struct authz_class *c;
	if (need & KMESH_AUTHZ_PORTS) {
		struct authz_port_key pk = { .set = set, .port = port };
		c = bpf_map_lookup_elem(&km_authz_port, &pk);
		if (c) {
			dk.port_class = c->deny;
			ak.port_class = c->allow;
		}
	}
	if (need & KMESH_AUTHZ_IDENTITIES) {
		key.addr = *src;
		struct workload_value *wl = bpf_map_lookup_elem(&km_workload, &key);
		if (wl && wl->identity) {
			struct authz_id_key ik = { .set = set, .identity = wl->identity };
			c = bpf_map_lookup_elem(&km_authz_id, &ik);
			if (c) {
				dk.id_class = c->deny;
				ak.id_class = c->allow;
			}
		}
	}
	if (need & KMESH_AUTHZ_SOURCES) {
		struct authz_src_key sk = {
			.prefixlen = 32 + 128,
			.set = bpf_htonl(set),
			.addr = *src,
		};
		c = bpf_map_lookup_elem(&km_authz_src, &sk);
		if (c) {
			dk.src_class = c->deny;
			ak.src_class = c->allow;
		}
	}
	out->flags = KMESH_AUTHZ_DENY;
	out->policy = 0;
	out->dry_policy = 0;
	/* A part without policies: nothing matches, nothing is required. */
	struct authz_verdict none = {};
	struct authz_verdict *dv = &none, *av = &none;
	if (need & KMESH_AUTHZ_HAS_DENY) {
		dv = bpf_map_lookup_elem(&km_authz_verdict, &dk);
		if (!dv)
			return true;
	}
	if (dv->flags & KMESH_AUTHZ_DENY) {
		out->policy = dv->policy;
		return true;
	}
	if (need & KMESH_AUTHZ_HAS_ALLOW) {
		av = bpf_map_lookup_elem(&km_authz_verdict, &ak);
		if (!av)
			return true;
	}
	if (av->flags & KMESH_AUTHZ_DENY)
		return true;
	out->flags = 0;
	out->policy = av->policy;
	if (dv->flags & KMESH_AUTHZ_DRY_DENY) {
		out->flags = KMESH_AUTHZ_DRY_DENY;
		out->dry_policy = dv->dry_policy;
	} else if (av->flags & KMESH_AUTHZ_DRY_DENY) {
		out->flags = KMESH_AUTHZ_DRY_DENY;
		out->dry_policy = av->dry_policy;
	}
	return true;
}

/* At the destination: counts and logs; false refuses the connection. */
static __always_inline bool authz_destination(const struct kmesh_addr *src,
					      const struct kmesh_addr *dst, __u32 port)
{
	struct authz_verdict v;
	if (!authz_decide(src, dst, port, &v))
		return true;
	if (v.flags & KMESH_AUTHZ_DRY_DENY) {
		stat_inc(KMESH_STAT_AUTHZ_DRY_RUN_DENY);
		authz_count(v.dry_policy, KMESH_AUTHZ_COUNT_DRY_DENY);
	}
	if (v.flags & KMESH_AUTHZ_DENY) {
		stat_inc(KMESH_STAT_AUTHZ_DENY);
		authz_count(v.policy, KMESH_AUTHZ_COUNT_DENY);
		authz_event(&v, src, dst, port, 0);
		return false;
	}
	stat_inc(KMESH_STAT_AUTHZ_ALLOW);
	authz_count(v.policy, KMESH_AUTHZ_COUNT_ALLOW);
	return true;
}

/*
 * At an enrolled client's connect() to addr:port (network order port, as
 * bpf_sock_addr holds it), from its netns's own address of the family.
 * Only an enforced denial acts here (the destination counts the rest);
 * false refuses the connect (EPERM) before any packet is sent.
 */
static __always_inline bool authz_connect(const struct manage_value *m, const struct kmesh_addr *addr,
					  __u32 port, bool v4)
{
	struct kmesh_addr src;
	if (v4) {
		if (!m->src4)
			return true;
		addr_set_v4(&src, m->src4);
	} else {
		src = m->src6;
		if (!(src.ip6[0] | src.ip6[1] | src.ip6[2] | src.ip6[3]))
			return true;
	}
	__u32 host_port = bpf_ntohs((__u16)port);
	struct authz_verdict v;
	if (!authz_decide(&src, addr, host_port, &v) || !(v.flags & KMESH_AUTHZ_DENY))
		return true;
	stat_inc(KMESH_STAT_AUTHZ_DENY_CONNECT);
	authz_count(v.policy, KMESH_AUTHZ_COUNT_DENY);
	authz_event(&v, &src, addr, host_port, 1);
	return false;
}

#endif
