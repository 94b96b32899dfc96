/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * What every program shares: the kernel features the loader found, the
 * settings and stats maps, and address helpers.
 */
#ifndef __KMESH_LIB_COMMON_H__
#define __KMESH_LIB_COMMON_H__

/*
 * Set by the loader from its probes (src/bpf/features.rs) before the load.
 * Read-only constants to the verifier: code behind a zero flag is never
 * visited, so a kernel that lacks an instruction or a helper still loads
 * the rest (atomic fetch-or needs 5.12; bpf_get_netns_cookie in sockops
 * and sk_msg needs 5.15).
 */
/* Acceleration can run: atomics, psock queue length, helpers. */
const volatile __u32 km_feat_accel = 0;
/* bpf_get_netns_cookie in sockops and sk_msg. */
const volatile __u32 km_feat_netns_helper = 0;
/* bpf_probe_read_kernel in sockops and sk_msg. */
const volatile __u32 km_feat_probe_read = 0;
/* The sockops and sk_msg programs are loaded: a waypoint gets its TLV. */
const volatile __u32 km_feat_tlv = 0;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, KMESH_STAT_MAX);
} km_stats SEC(".maps");

/* One element; a single u32 flag, so an in-place update cannot be torn. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct config_value);
	__uint(max_entries, 1);
} km_config SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&km_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline struct config_value *config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&km_config, &zero);
}

/* Acceleration configured and possible on this kernel. */
static __always_inline bool accelerate_on(void)
{
	if (!km_feat_accel)
		return false;
	struct config_value *c = config();
	return c && c->accelerate;
}

static __always_inline bool addr_is_v4(const struct kmesh_addr *a)
{
	return a->ip6[0] == 0 && a->ip6[1] == 0 && a->ip6[2] == bpf_htonl(0x0000ffff);
}

/* a = ip (network order), IPv4-mapped. */
static __always_inline void addr_set_v4(struct kmesh_addr *a, __be32 ip)
{
	a->ip6[0] = 0;
	a->ip6[1] = 0;
	a->ip6[2] = bpf_htonl(0x0000ffff);
	a->ip6[3] = ip;
}

/* 127.0.0.0/8 (IPv4-mapped) or ::1. */
static __always_inline bool addr_is_loopback(const struct kmesh_addr *a)
{
	if (addr_is_v4(a))
		return (bpf_ntohl(a->ip6[3]) >> 24) == 127;
	return a->ip6[0] == 0 && a->ip6[1] == 0 && a->ip6[2] == 0 && a->ip6[3] == bpf_htonl(1);
}

#endif
