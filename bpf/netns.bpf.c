// SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0)
/*
 * Reads a network namespace's cookie where getsockopt(SO_NETNS_COOKIE) is
 * missing (before Linux 5.14): the daemon attaches this program to a
 * cgroup of its own holding only a child process it made, which enters the
 * netns and connects a UDP socket; the program stores the socket's netns
 * cookie (bpf_get_netns_cookie in cgroup sock_addr programs: Linux 5.7)
 * and refuses the connect, so nothing leaves the socket.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} km_netns_probe SEC(".maps");

SEC("cgroup/connect4")
int kmesh_netns_probe(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	bpf_map_update_elem(&km_netns_probe, &zero, &cookie, BPF_ANY);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
