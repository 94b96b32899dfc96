/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0) */
/*
 * Minimal kernel type subset. Hand-written so the build needs no BTF on the
 * build host; kernel structs carry preserve_access_index so CO-RE relocates
 * them against the running kernel's BTF at load time. Context structs
 * (bpf_sock_addr, bpf_sock_ops, sk_msg_md) are uapi and rewritten by the
 * verifier, so their layout here must match include/uapi/linux/bpf.h.
 */
#ifndef __KMESH_VMLINUX_H__
#define __KMESH_VMLINUX_H__

typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef short __s16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
#define true 1
#define false 0

enum bpf_map_type {
	BPF_MAP_TYPE_UNSPEC = 0,
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PROG_ARRAY = 3,
	BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_LPM_TRIE = 11,
	BPF_MAP_TYPE_SOCKMAP = 15,
	BPF_MAP_TYPE_SOCKHASH = 18,
	BPF_MAP_TYPE_SK_STORAGE = 24,
	BPF_MAP_TYPE_RINGBUF = 27,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

enum {
	BPF_F_NO_PREALLOC = 1,
};

/* bpf_msg_redirect_hash flags */
#define BPF_F_INGRESS 1
/* bpf_sk_storage_get flags */
#define BPF_SK_STORAGE_GET_F_CREATE 1

enum sk_action {
	SK_DROP = 0,
	SK_PASS = 1,
};

enum {
	BPF_SOCK_OPS_VOID = 0,
	BPF_SOCK_OPS_TIMEOUT_INIT = 1,
	BPF_SOCK_OPS_RWND_INIT = 2,
	BPF_SOCK_OPS_TCP_CONNECT_CB = 3,
	BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB = 4,
	BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB = 5,
	BPF_SOCK_OPS_NEEDS_ECN = 6,
	BPF_SOCK_OPS_BASE_RTT = 7,
	BPF_SOCK_OPS_RTO_CB = 8,
	BPF_SOCK_OPS_RETRANS_CB = 9,
	BPF_SOCK_OPS_STATE_CB = 10,
	BPF_SOCK_OPS_TCP_LISTEN_CB = 11,
	BPF_SOCK_OPS_RTT_CB = 12,
};

enum {
	BPF_SOCK_OPS_RTO_CB_FLAG = 1,
	BPF_SOCK_OPS_RETRANS_CB_FLAG = 2,
	BPF_SOCK_OPS_STATE_CB_FLAG = 4,
	BPF_SOCK_OPS_RTT_CB_FLAG = 8,
};

enum {
	BPF_TCP_ESTABLISHED = 1,
	BPF_TCP_SYN_SENT = 2,
	BPF_TCP_SYN_RECV = 3,
	BPF_TCP_FIN_WAIT1 = 4,
	BPF_TCP_FIN_WAIT2 = 5,
	BPF_TCP_CLOSE = 7,
	BPF_TCP_CLOSE_WAIT = 8,
	BPF_TCP_LAST_ACK = 9,
	BPF_TCP_LISTEN = 10,
	BPF_TCP_CLOSING = 11,
};

#define EEXIST 17
#define ETIMEDOUT 110
#define EBUSY 16
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6

struct bpf_sock;

struct bpf_sock_addr {
	__u32 user_family;
	__u32 user_ip4;
	__u32 user_ip6[4];
	__u32 user_port;
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 msg_src_ip4;
	__u32 msg_src_ip6[4];
	union {
		struct bpf_sock *sk;
		__u64 :64;
	} __attribute__((aligned(8)));
};

#define __kmesh_md_ptr(type, name) \
	union {                     \
		type name;          \
		__u64 : 64;         \
	} __attribute__((aligned(8)))

/* As of Linux 5.9 (later kernels only add fields at the end). */
struct bpf_sk_lookup {
	__kmesh_md_ptr(struct bpf_sock *, sk);
	__u32 family;
	__u32 protocol;
	__u32 remote_ip4;
	__u32 remote_ip6[4];
	__u32 remote_port;
	__u32 local_ip4;
	__u32 local_ip6[4];
	__u32 local_port; /* host order */
};

struct bpf_sock_ops {
	__u32 op;
	union {
		__u32 args[4];
		__u32 reply;
		__u32 replylong[4];
	};
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port; /* network order, in the high 16 bits on little endian */
	__u32 local_port;  /* host order */
	__u32 is_fullsock;
	__u32 snd_cwnd;
	__u32 srtt_us;
	__u32 bpf_sock_ops_cb_flags;
	__u32 state;
	__u32 rtt_min;
	__u32 snd_ssthresh;
	__u32 rcv_nxt;
	__u32 snd_nxt;
	__u32 snd_una;
	__u32 mss_cache;
	__u32 ecn_flags;
	__u32 rate_delivered;
	__u32 rate_interval_us;
	__u32 packets_out;
	__u32 retrans_out;
	__u32 total_retrans;
	__u32 segs_in;
	__u32 data_segs_in;
	__u32 segs_out;
	__u32 data_segs_out;
	__u32 lost_out;
	__u32 sacked_out;
	__u32 sk_txhash;
	__u64 bytes_received;
	__u64 bytes_acked;
	__kmesh_md_ptr(struct bpf_sock *, sk);
};

struct sk_msg_md {
	__kmesh_md_ptr(void *, data);
	__kmesh_md_ptr(void *, data_end);
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port; /* as in bpf_sock_ops */
	__u32 local_port;
	__u32 size;
	__kmesh_md_ptr(struct bpf_sock *, sk);
};

/*
 * Kernel structs, read through BTF pointers or bpf_probe_read_kernel with
 * CO-RE: only the fields used, relocated at load time.
 */
struct sk_msg {
	struct sock *sk_redir; /* set by bpf_msg_redirect_hash */
} __attribute__((preserve_access_index));
typedef struct {
	__s64 counter;
} atomic64_t;
/* The netns cookie: made at the netns's creation since Linux 5.12 ... */
struct net {
	__u64 net_cookie;
} __attribute__((preserve_access_index));
/* ... and on first use before (an atomic64_t). */
struct net___old {
	atomic64_t net_cookie;
} __attribute__((preserve_access_index));
struct in6_addr {
	union {
		__u32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));
/* sk_flags lives here (skc_flags) since Linux 6.x; in struct sock before. */
struct sock_common {
	unsigned long skc_flags;
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	unsigned short skc_family;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	struct {
		struct net *net;
	} skc_net;
	atomic64_t skc_cookie;
} __attribute__((preserve_access_index));
struct sock___old {
	unsigned long sk_flags;
} __attribute__((preserve_access_index));
struct sock {
	struct sock_common __sk_common;
	__u8 sk_userlocks;
	__u8 sk_shutdown;
	int sk_rcvbuf;
	int sk_err;
	void *sk_user_data;
} __attribute__((preserve_access_index));
struct inet_sock {
	__be16 inet_sport; /* kept at TCP_CLOSE, where inet_num is cleared */
} __attribute__((preserve_access_index));
struct inet_connection_sock {
	struct inet_sock icsk_inet;
} __attribute__((preserve_access_index));
struct tcp_sock {
	struct inet_connection_sock inet_conn;
	__u64 bytes_received;
	__u64 bytes_acked;
	__u64 tcp_mstamp;
} __attribute__((preserve_access_index));
/* The kernel's context behind struct bpf_sock_ops. */
struct bpf_sock_ops_kern {
	struct sock *sk;
} __attribute__((preserve_access_index));
struct sk_psock {
	__u32 msg_tot_len; /* bytes in ingress_msg (not in 6.1) */
} __attribute__((preserve_access_index));
#define SOCK_RCVBUF_LOCK 2
#define RCV_SHUTDOWN 1
/* enum sock_flags: SOCK_DONE, set by tcp_fin when the peer's FIN comes in. */
#define SOCK_DONE 1
/* Low bits of sk_user_data (include/net/sock.h); PSOCK marks a psock. */
#define SK_USER_DATA_PSOCK 4UL
#define SK_USER_DATA_PTRMASK (~7UL)
/* uapi: only inside a map value (bpf/lib/limits.h's token buckets). */
struct bpf_spin_lock {
	__u32 val;
};
#endif
