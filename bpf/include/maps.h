/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * The data path's maps, shared by every program in kmesh.bpf.c. Sizes
 * here are placeholders: the loader sets max_entries from its flags.
 */
#ifndef __KMESH_MAPS_H__
#define __KMESH_MAPS_H__

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

/* Sockets whose sends the sk_msg program sees (acceleration, TLV). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(max_entries, 1024);
} km_sock SEC(".maps");

/*
 * One entry per connection with an end in km_sock, keyed by the connecting
 * end's sock_key; created by that end's sockops, removed when it closes
 * (and by the daemon's sweep once neither end is in km_sock). An element
 * freed while a program still points to it can be reused for another
 * connection; a bit set or read there then makes an end stay in km_sock
 * or on TCP, which is safe, as its own connection's other end has closed.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sock_key);
	__type(value, struct conn_value);
	__uint(max_entries, 1024);
} km_conn SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} km_sock_state SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&km_stats, &idx);
	if (v)
		*v += 1;
}

/* The enrollment of the caller's netns, or NULL if not enrolled. */
static __always_inline struct manage_value *netns_enrollment(void *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	return bpf_map_lookup_elem(&km_manage, &cookie);
}

static __always_inline struct config_value *config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&km_config, &zero);
}

static __always_inline bool accelerate_on(void)
{
	struct config_value *c = config();
	return c && c->accelerate;
}

static __always_inline bool addr_is_v4(const struct kmesh_addr *a)
{
	return a->ip6[0] == 0 && a->ip6[1] == 0 && a->ip6[2] == bpf_htonl(0x0000ffff);
}

/* 127.0.0.0/8 (IPv4-mapped) or ::1. */
static __always_inline bool addr_is_loopback(const struct kmesh_addr *a)
{
	if (addr_is_v4(a))
		return (bpf_ntohl(a->ip6[3]) >> 24) == 127;
	return a->ip6[0] == 0 && a->ip6[1] == 0 && a->ip6[2] == 0 && a->ip6[3] == bpf_htonl(1);
}

#endif
