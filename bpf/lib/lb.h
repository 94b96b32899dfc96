/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Weighted endpoint choice. Endpoint lists stay one entry per endpoint;
 * a priority whose endpoints' weights differ also has a table of
 * KMESH_LB_SLOTS endpoint indices, each endpoint in proportion to its
 * weight (src/writer/weights.rs fills it). A uniform draw over the slots
 * is then a weighted draw over the endpoints, for one more lookup, and
 * only on services whose value marks the priority weighted.
 */
#ifndef __KMESH_LIB_LB_H__
#define __KMESH_LIB_LB_H__

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb_key);
	__type(value, struct lb_table);
	__uint(max_entries, 1024);
} km_lb SEC(".maps");

/*
 * The index to use for priority prio with count endpoints, where uniform
 * is the uniform draw. A slot naming no endpoint of the current list (the
 * table lags a list change by a few updates) keeps the uniform draw: a
 * connection never goes to an index that does not exist.
 */
static __always_inline __u32 lb_weighted_index(const struct service_value *svc, __u32 prio,
					       __u32 count, __u32 uniform)
{
	if (prio >= 32 || !(svc->weighted_prios & (1u << prio)))
		return uniform;
	struct lb_key k = { .service_id = svc->service_id, .prio = prio };
	struct lb_table *t = bpf_map_lookup_elem(&km_lb, &k);
	if (!t)
		return uniform;
	__u32 idx = t->slot[bpf_get_prandom_u32() & (KMESH_LB_SLOTS - 1)];
	if (idx == 0 || idx > count)
		return uniform;
	return idx;
}

#endif
