#!/usr/bin/env bash
# Demo: builds kmesh, creates two network namespaces (a client "pod" and a
# namespace holding three backend "pods"), starts the daemon with the
# built-in config deploy/demo.json attached to a child cgroup, and shows
# connections to the service VIP landing on the pods. Everything it creates
# is removed on exit. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release --bins -q
BIN=target/release

CG_ROOT=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
CG="$CG_ROOT/kmesh-demo-$$"
BPFFS=$(mktemp -d /tmp/kmesh-demo-bpffs.XXXX)
RUN=$(mktemp -d /tmp/kmesh-demo-run.XXXX)
CLIENT=kmesh-demo-client-$$
PODS=kmesh-demo-pods-$$
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

# Topology: client 10.244.0.2 <-veth-> pods 10.244.0.11-13 (and fd00:244::/64).
ip netns add "$CLIENT"
ip netns add "$PODS"
ip link add eth0 netns "$CLIENT" type veth peer name eth0 netns "$PODS"
ip -n "$CLIENT" addr add 10.244.0.2/24 dev eth0
for i in 11 12 13; do ip -n "$PODS" addr add 10.244.0.$i/24 dev eth0; done
for ns in "$CLIENT" "$PODS"; do ip -n "$ns" link set lo up; ip -n "$ns" link set eth0 up; done
ip -n "$CLIENT" route add default dev eth0
mkdir "$CG"
mount -t bpf bpf "$BPFFS"

for i in 1 2 3; do
  "$BIN/kmesh-probe" --netns "/run/netns/$PODS" serve --listen "10.244.0.1$i:8080" --name "web-$i" >/dev/null &
  pids+=($!)
done

sed "s|@CLIENT_NETNS@|/run/netns/$CLIENT|" deploy/demo.json > "$RUN/config.json"
"$BIN/kmesh" daemon --config "$RUN/config.json" --cgroup "$CG" --bpffs "$BPFFS/kmesh" \
  --admin-socket "$RUN/admin.sock" 2>"$RUN/daemon.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$RUN/admin.sock" ] && break; sleep 0.1; done
[ -S "$RUN/admin.sock" ] || { cat "$RUN/daemon.log"; exit 1; }

echo "== service web: VIP 10.96.0.10:80 -> pods web-1..3 on :8080 (config: deploy/demo.json)"
echo "== 6 connects from the client pod (netns $CLIENT, cgroup $CG) to 10.96.0.10:80:"
"$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" --cgroup "$CG" connect 10.96.0.10:80 --count 6
echo "== the same VIP from a process outside the enrolled cgroup (not redirected):"
"$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" connect 10.96.0.10:80 --timeout-ms 500 || true
echo "== kmesh ctl dump (live maps):"
"$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock"
