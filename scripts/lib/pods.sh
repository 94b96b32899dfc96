# Sourced by scripts/demo.sh and scripts/dashboard.sh: a client "pod" netns
# (10.244.0.2) and a netns holding three backend "pods" (10.244.0.11-13) on one
# veth, a child cgroup and a private bpffs for the daemon, and a cleanup trap
# that removes all of it and stops the processes started into $pids.
# Needs: set -euo pipefail, cwd at the repo root. Sets CG BPFFS RUN CLIENT PODS.
CG_ROOT=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
CG="$CG_ROOT/kmesh-${KMESH_PODS_TAG:-demo}-$$"
BPFFS=$(mktemp -d "/tmp/kmesh-${KMESH_PODS_TAG:-demo}-bpffs.XXXX")
RUN=$(mktemp -d "/tmp/kmesh-${KMESH_PODS_TAG:-demo}-run.XXXX")
CLIENT=kmesh-${KMESH_PODS_TAG:-demo}-client-$$
PODS=kmesh-${KMESH_PODS_TAG:-demo}-pods-$$
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del "$CLIENT" 2>/dev/null || true
  ip netns del "$PODS" 2>/dev/null || true
  rmdir "$CG" 2>/dev/null || true
  umount "$BPFFS" 2>/dev/null || true
  rm -rf "$BPFFS" "$RUN"
}
trap cleanup EXIT

# Topology: client 10.244.0.2 <-veth-> pods 10.244.0.11-13.
ip netns add "$CLIENT"
ip netns add "$PODS"
ip link add eth0 netns "$CLIENT" type veth peer name eth0 netns "$PODS"
ip -n "$CLIENT" addr add 10.244.0.2/24 dev eth0
for i in 11 12 13; do ip -n "$PODS" addr add 10.244.0.$i/24 dev eth0; done
for ns in "$CLIENT" "$PODS"; do ip -n "$ns" link set lo up; ip -n "$ns" link set eth0 up; done
ip -n "$CLIENT" route add default dev eth0
mkdir "$CG"
mount -t bpf bpf "$BPFFS"

# wait_socket SOCKET LOG: until the daemon's admin socket exists, or fail
# showing the daemon's log.
wait_socket() {
  for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done
  cat "$2"
  return 1
}
