/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Every struct shared between the BPF programs and the Rust daemon lives
 * here; Rust uses the types libbpf-cargo generates from this header's BTF.
 *
 * Byte order: addresses and ports are stored in network byte order exactly as
 * bpf_sock_addr presents them, so the hot path compares without swapping.
 * IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d) wherever a 16-byte
 * address is used, so one entry serves connect4 and a dual-stack socket's
 * connect6 to ::ffff:VIP alike.
 *
 * Layout (why it is denormalized): on this class of machine each hash
 * lookup on the connect path costs 50-80 ns, mostly cache misses, against a
 * ~65 ns floor for an empty program. The logical chain frontend -> service
 * -> endpoint -> backend is therefore stored as two lookups: km_vip holds
 * the service itself, and each km_endpoint entry carries its backend's
 * addresses. All maps are hash maps: an update replaces the whole element
 * atomically, so a program never sees a half-written value (array map
 * updates are copied in place and can be read torn).
 */
#ifndef __KMESH_H__
#define __KMESH_H__

#define KMESH_MAX_PRIO 7
#define KMESH_MAX_PORTS 10

enum kmesh_lb_policy {
	KMESH_LB_RANDOM = 0,
	KMESH_LB_STRICT = 1,
	KMESH_LB_FAILOVER = 2,
};

/* Indices into the per-CPU stats array. */
enum kmesh_stat {
	KMESH_STAT_ENROLLED_CONNECT = 0, /* connects seen from enrolled netns */
	KMESH_STAT_SERVICE_REDIRECT = 1, /* VIP rewritten to a backend */
	KMESH_STAT_WORKLOAD_DIRECT = 2,  /* destination is a known workload */
	KMESH_STAT_NO_ENDPOINT = 3,      /* service hit, nothing to pick */
	KMESH_STAT_STRICT_REJECT = 4,    /* STRICT service, no local endpoint */
	KMESH_STAT_FAMILY_MISMATCH = 5,  /* picked backend lacks the family */
	KMESH_STAT_PORT_MISS = 6,        /* service hit on an unlisted port */
	KMESH_STAT_MAX = 8,
};

struct kmesh_addr {
	__u32 ip6[4]; /* network order words; IPv4 is ::ffff:a.b.c.d */
};

/* Key of km_vip and km_workload. */
struct addr_key {
	struct kmesh_addr addr;
};

/* km_vip value: the service a VIP belongs to, complete. */
struct service_value {
	__u32 service_id;
	__u32 lb_policy; /* enum kmesh_lb_policy */
	/* endpoints at each locality priority; indices 1..count are dense */
	__u32 prio_endpoint_count[KMESH_MAX_PRIO];
	__u32 service_port[KMESH_MAX_PORTS]; /* network order in low 16 bits, 0 = unused */
	__u32 target_port[KMESH_MAX_PORTS];  /* 0 = same as service port */
	struct kmesh_addr waypoint_addr;
	__u32 waypoint_port; /* network order; 0 = no waypoint */
};

/* km_workload value: a pod address, for direct access. */
struct workload_value {
	__u32 workload_id;
};

/* A backend's addresses, one per family. */
struct backend_addr {
	__u32 has_ip4;
	__u32 ip4; /* network order */
	__u32 has_ip6;
	struct kmesh_addr ip6;
};

struct endpoint_key {
	__u32 service_id;
	__u32 prio;
	__u32 index; /* 1-based */
};

struct endpoint_value {
	__u32 workload_id;
	struct backend_addr addr;
};

struct manage_value {
	__u32 enrolled;
};

#endif
