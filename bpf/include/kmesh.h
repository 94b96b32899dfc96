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
	KMESH_STAT_WAYPOINT_REDIRECT = 7, /* sent to a waypoint instead */
	KMESH_STAT_TLV_SENT = 8,         /* original destination prepended */
	KMESH_STAT_TLV_FAILED = 9,       /* could not prepend: message dropped */
	KMESH_STAT_ACCEL_ADDED = 10,     /* socket entered the acceleration map */
	KMESH_STAT_ACCEL_FULL = 11,      /* acceleration map full: stays plain */
	KMESH_STAT_ACCEL_ON = 12,        /* direction decided: redirected to peer */
	KMESH_STAT_ACCEL_OFF = 13,       /* direction decided: plain TCP */
	KMESH_STAT_ACCEL_PUSHBACK = 14,  /* peer's queue full: direction now TCP */
	KMESH_STAT_ACCEL_LEFT = 15,      /* socket left the map: on TCP for good */
	KMESH_STAT_ACCEL_SKIPPED = 16,   /* accepted from a client not in the map */
	KMESH_STAT_AUTHZ_ALLOW = 17,     /* policied destination: connection allowed */
	KMESH_STAT_AUTHZ_DENY = 18,      /* denied at the destination (refused) */
	KMESH_STAT_AUTHZ_DENY_CONNECT = 19, /* denied at the client's connect() */
	KMESH_STAT_AUTHZ_DRY_RUN_DENY = 20, /* a dry-run policy would have denied */
	KMESH_STAT_AUTHZ_EVENT_LOST = 21, /* denial not logged: ring buffer full */
	KMESH_STAT_AUTHZ_CUT = 22, /* (daemon) live connections a policy change closed */
	KMESH_STAT_TELE_LOST = 23, /* connection event lost: ring buffer full */
	KMESH_STAT_BREAKER_REJECT = 24, /* service at max_connections: refused */
	KMESH_STAT_RATE_LIMITED = 25,   /* client pod's token bucket empty: refused */
	KMESH_STAT_NOTE_FULL = 26,      /* km_conn_note full: the breaker does not count it */
	KMESH_STAT_MAX = 27,
};

/* km_manage flags */
enum kmesh_netns_flag {
	/* A waypoint's own netns: its connections never go to a waypoint. */
	KMESH_NETNS_WAYPOINT = 1,
};

/* sock_state flags */
enum kmesh_sock_flag {
	KMESH_SOCK_TLV_PENDING = 1, /* original destination not sent yet */
	KMESH_SOCK_DECIDED = 2,     /* first send happened: direction fixed */
	KMESH_SOCK_ACCEL = 4,       /* sends go straight to the peer socket */
	KMESH_SOCK_PASSIVE = 8,     /* this end accepted the connection */
};

/*
 * km_conn value bits, two per end (end 0 connected, end 1 accepted). An
 * end sets REDIRECT before its first redirect to the other, LEAVING before
 * it takes itself out of km_sock; both with one atomic fetch-or on the
 * same word, so at most one of the two sees the other's bit clear, and a
 * socket never leaves while the other end may still redirect into it.
 */
#define KMESH_CONN_REDIRECT(end) (1u << (2 * (end)))
#define KMESH_CONN_LEAVING(end) (2u << (2 * (end)))
/*
 * The accepting end entered km_sock. Until then a socket under its key may
 * be an old one kept for its unread bytes (see sock_closed), so the
 * connecting end does not redirect. (The other way needs no bit: the
 * connecting end entered before it created the entry.)
 */
#define KMESH_CONN_ACCEPTED_IN (1u << 4)

struct conn_value {
	__u32 bits;
};

struct kmesh_addr {
	__u32 ip6[4]; /* network order words; IPv4 is ::ffff:a.b.c.d */
};

/* A waypoint to send connections to instead of their destination. */
struct waypoint {
	struct kmesh_addr addr; /* IPv4 as ::ffff:a.b.c.d */
	__u32 port;             /* network order in low 16 bits; 0 = none */
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
	struct waypoint waypoint;
	/* Bit p: priority p picks through its km_lb table (unequal weights);
	 * clear, the pick is uniform and costs no further lookup. */
	__u32 weighted_prios;
	/* Limits (bpf/lib/limits.h), all 0 = none. The id is a hash of the
	 * service's name, not service_id: the counts outlive the daemon, and
	 * the next one numbers services anew. */
	__u32 limit_id[2];
	__u32 max_connections;     /* concurrent connections from this node */
	__u32 rl_max_tokens;       /* token bucket per client netns */
	__u32 rl_tokens_per_fill;
	__u32 rl_fill_interval_ms;
};

/*
 * km_lb value: a weighted priority's pick table. Each slot holds an
 * endpoint index (1-based), each endpoint in proportion to its weight; a
 * uniformly drawn slot is then a weighted draw. 0 or an index beyond the
 * priority's count (mid-update) falls back to the uniform pick.
 */
#define KMESH_LB_SLOTS 1024

struct lb_key {
	__u32 service_id;
	__u32 prio;
};

struct lb_table {
	__u16 slot[KMESH_LB_SLOTS];
};

/* km_svc_conns key (limit_id) and value: connections counted by sockops
 * from connect to close, and connects the breaker refused. */
struct limit_id {
	__u32 id[2];
};

struct svc_conns {
	__s64 active;
	__u64 rejected;
};

/* km_bucket: one token bucket per (service, client netns). */
struct bucket_key {
	__u32 id[2];
	__u64 netns;
};

struct bucket {
	struct bpf_spin_lock lock;
	__u32 tokens;
	__u64 last_fill_ns; /* bpf_ktime_get_ns of the last whole interval */
	__u64 rejected;
};

/*
 * km_conn_note (bpf/lib/sock.h): what connect4/6 leave for sockops about
 * a client socket the circuit breaker counts, by socket cookie: a
 * preallocated hash entry instead of socket storage, whose creation at
 * every connect (an allocation charged to the memory cgroup, freed after
 * RCU) was the largest part of the breaker's cost per connection.
 * Telemetry keeps nothing there (its connect event, lib/telemetry.h).
 */
enum kmesh_note_flag {
	KMESH_NOTE_UNUSED = 1,        /* was: telemetry watched the socket too */
	KMESH_NOTE_LIMIT_PENDING = 2, /* passed the breaker; counted when its SYN goes out */
	KMESH_NOTE_LIMIT_COUNTED = 4, /* in its service's active count until close */
};

struct conn_note {
	/* Unused since telemetry's connect event; kept so that notes pinned
	 * by an older daemon keep their layout. */
	struct kmesh_addr orig;
	__u32 orig_port;
	__u32 flags;            /* enum kmesh_note_flag */
	__u64 start_ns;         /* connect (bpf_ktime_get_ns); the daemon's sweep ages by it */
	struct limit_id limit;  /* the service the socket counts against */
};

/* km_workload value: a pod address, for direct access. */
struct workload_value {
	__u32 workload_id;
	struct waypoint waypoint; /* the workload's own waypoint */
	/* Its identity (trust domain, namespace, service account) as a number
	 * the authorization tables know; 0: none. */
	__u32 identity;
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

/* endpoint_value flags */
enum kmesh_endpoint_flag {
	/* km_port has target ports of this workload that differ from its
	 * services' own (Istio's per-workload PortList). */
	KMESH_EP_PORTS = 1,
};

struct endpoint_value {
	__u32 workload_id;
	__u32 flags; /* enum kmesh_endpoint_flag */
	struct backend_addr addr;
	struct waypoint waypoint; /* the backend workload's waypoint */
};

/* km_port key: a workload's own target port for one service port. */
struct port_key {
	__u32 service_id;
	__u32 workload_id;
	__u32 service_port; /* network order in low 16 bits */
};

struct manage_value {
	__u32 enrolled;
	__u32 flags; /* enum kmesh_netns_flag */
	/*
	 * The netns's one global address per family, the source of its
	 * unbound sockets (authorization at connect); 0 / all zero: none or
	 * several (then the destination decides alone).
	 */
	__u32 src4; /* network order */
	struct kmesh_addr src6;
};

/*
 * L4 authorization (bpf/lib/authz.h, compiled by src/authz/compile.rs).
 * The policies that apply to a destination are one "policy set"; a set
 * reduces each input to a small class number (the inputs its policies
 * cannot tell apart share one), and a dense table gives the verdict of
 * every class combination. Class 0 is every input no entry names.
 */
struct authz_dst {
	__u32 set;  /* policy set id, never reused: a flip is one update */
	__u32 deny_class;  /* the destination address's class in each part */
	__u32 allow_class;
	__u32 flags; /* enum kmesh_authz_dst_flag: the lookups the set needs */
};

/*
 * What a set's tables hold besides class 0: a lookup whose answer is
 * always class 0 (or a part without policies) is skipped.
 */
enum kmesh_authz_dst_flag {
	KMESH_AUTHZ_PORTS = 1,      /* km_authz_port has entries for the set */
	KMESH_AUTHZ_IDENTITIES = 2, /* km_authz_id has */
	KMESH_AUTHZ_SOURCES = 4,    /* km_authz_src has */
	KMESH_AUTHZ_HAS_DENY = 8,   /* the set has DENY policies */
	KMESH_AUTHZ_HAS_ALLOW = 16, /* the set has ALLOW policies */
};

/* A value's class in the set's DENY part and in its ALLOW part. */
struct authz_class {
	__u32 deny;
	__u32 allow;
};

enum kmesh_authz_part {
	KMESH_AUTHZ_PART_DENY = 0,
	KMESH_AUTHZ_PART_ALLOW = 1,
};

struct authz_port_key {
	__u32 set;
	__u32 port; /* host order */
};

struct authz_id_key {
	__u32 set;
	__u32 identity; /* km_authz_ident's value */
};

struct authz_src_key {
	__u32 prefixlen; /* 32 (the set) + bits of addr */
	__u32 set;       /* big-endian: the trie compares bytes */
	struct kmesh_addr addr;
};

struct authz_verdict_key {
	__u32 set;
	__u32 part; /* enum kmesh_authz_part */
	__u32 id_class;
	__u32 src_class;
	__u32 dst_class;
	__u32 port_class;
};

/*
 * A part's outcome (km_authz_verdict value). DENY part: flags say whether
 * an enforced DENY matches (KMESH_AUTHZ_DENY) or only a dry-run one does
 * (KMESH_AUTHZ_DRY_DENY); policy and dry_policy are their indices. ALLOW
 * part: flags as below, policy = the first
 * enforced ALLOW that matches, dry_policy = the first dry-run ALLOW when
 * only the dry-run ones leave the connection not allowed.
 * authz_decide() combines the two into the same struct with
 * KMESH_AUTHZ_DENY / KMESH_AUTHZ_DRY_DENY.
 */
enum kmesh_authz_flag {
	KMESH_AUTHZ_DENY = 1,     /* combined: refuse. DENY part: one matches.
				     ALLOW part: not allowed */
	KMESH_AUTHZ_DRY_DENY = 2, /* combined: a dry-run policy would refuse.
				     DENY part: only a dry-run one matches.
				     ALLOW part: not allowed counting dry-run ones */
};

struct authz_verdict {
	__u32 flags;      /* enum kmesh_authz_flag */
	__u32 policy;
	__u32 dry_policy;
};

/* km_authz_count index: policy index * 3 + this. */
enum kmesh_authz_count {
	KMESH_AUTHZ_COUNT_ALLOW = 0,
	KMESH_AUTHZ_COUNT_DENY = 1,
	KMESH_AUTHZ_COUNT_DRY_DENY = 2,
};

/* One denial, for the daemon's log (km_authz_events ring buffer). */
struct authz_event {
	__u32 policy;  /* 0: no ALLOW policy matched */
	__u32 at_connect; /* 1: refused at the client's connect() */
	struct kmesh_addr src;
	struct kmesh_addr dst;
	__u32 dst_port; /* host order */
	__u32 pad;
};

/*
 * km_sock (sockhash) and km_conn key: a TCP connection seen from one end.
 * Ports in host order, IPv4 as ::ffff:a.b.c.d, so both ends' keys are each
 * other's mirror image. Pod addresses are unique on a node, loopback ones
 * are not (every pod has 127.0.0.1), so a loopback connection, which never
 * leaves its netns, also carries the netns cookie; 0 otherwise.
 */
struct sock_key {
	struct kmesh_addr local;
	struct kmesh_addr remote;
	__u32 local_port;
	__u32 remote_port;
	__u64 netns;
};

/* Per-socket state (sk_storage), freed with the socket. */
struct sock_state {
	struct kmesh_addr orig_addr; /* destination before a waypoint redirect */
	__u32 orig_port;             /* network order in low 16 bits */
	__u32 flags;                 /* enum kmesh_sock_flag */
	/* Sent to the peer since its queue was last looked at: */
	__u32 unchecked_bytes;
	__u32 unchecked_sends;
	__u32 pad;
	/* The socket's netns cookie, from connect4: where sockops and sk_msg
	 * cannot ask for it (bpf_get_netns_cookie there needs Linux 5.15). */
	__u64 netns;
	/* Bytes sent straight into the peer's queue (acceleration), which
	 * TCP's counters never see; telemetry adds them at close. */
	__u64 redirected;
};

enum kmesh_tele_kind {
	KMESH_TELE_OPEN = 0,
	KMESH_TELE_CLOSE = 1,
	KMESH_TELE_CONNECT = 2,
};

/* Why a connection ended, as the socket's last state change shows it. */
enum kmesh_tele_reason {
	KMESH_TELE_NORMAL = 0,         /* FIN handshake */
	KMESH_TELE_RESET = 1,          /* reset (sent or received) while open */
	KMESH_TELE_CONNECT_FAILED = 2, /* never established: refused, unreachable */
	KMESH_TELE_TIMEOUT = 3,        /* the kernel gave up (ETIMEDOUT) */
};

/*
 * A client's connect let through by connect4/6: where it meant to go
 * (the service VIP, before the rewrite) and when. The socket's open and
 * close name it by the same cookie. Ports in host order; `kind` comes
 * first in both events.
 */
struct tele_connect_event {
	__u8 kind; /* KMESH_TELE_CONNECT */
	__u8 pad;
	__u16 orig_port;
	__u32 pad2;
	struct kmesh_addr orig;
	__u64 cookie;
	__u64 ts_ns;
};

/* Which end of its connection a socket is. */
enum kmesh_tele_end {
	KMESH_TELE_ACTIVE = 0,  /* the client (reporter=source) */
	KMESH_TELE_PASSIVE = 1, /* the accepting end (reporter=destination) */
	/* A close after the open: the reader knows from the open. The kernel
	 * keeps nothing per socket to tell it then. */
	KMESH_TELE_END_UNKNOWN = 2,
};

/* A socket's open or close in km_tele_events. Ports in host order. */
struct tele_event {
	__u8 kind;       /* enum kmesh_tele_kind */
	__u8 reason;     /* enum kmesh_tele_reason, for CLOSE */
	__u8 end;        /* enum kmesh_tele_end */
	__u8 in_sockmap; /* 1: had acceleration state: a local peer may have
			  * redirected bytes into it */
	__u16 local_port;
	__u16 remote_port;
	struct kmesh_addr local;
	struct kmesh_addr remote;
	__u64 cookie;   /* the socket's (a client's connect event has it too) */
	__u64 ts_ns;    /* when, on CLOCK_MONOTONIC (ns; the socket's tcp_mstamp) */
	__u64 sent;     /* bytes_acked less our FIN (a client's SYN is in it:
			 * the reader takes it out), plus `redirected` */
	__u64 received; /* bytes_received */
	/* A close: of `sent`, the bytes that went straight into the peer's
	 * queue (acceleration), which the peer's own counters miss. */
	__u64 redirected;
};

/* Settings the daemon writes into km_config[0]. */
struct config_value {
	__u32 accelerate;  /* same-host sockmap acceleration on */
	__u32 queue_limit; /* memory (payload + per-message overhead) a peer
			    * may hold unread before its sender falls back
			    * to TCP; 0 = no limit */
};

/*
 * How often an accelerated sender looks at its peer's queue: after this
 * much memory sent, payload plus a struct sk_msg per send.
 */
#define KMESH_QUEUE_CHECK_BYTES 65536

#endif
