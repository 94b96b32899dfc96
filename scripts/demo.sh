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

source scripts/lib/pods.sh

for i in 1 2 3; do
  "$BIN/kmesh-probe" --netns "/run/netns/$PODS" serve --listen "10.244.0.1$i:8080" --name "web-$i" >/dev/null &
  pids+=($!)
done

sed "s|@CLIENT_NETNS@|/run/netns/$CLIENT|" deploy/demo.json > "$RUN/config.json"
"$BIN/kmesh" daemon --config "$RUN/config.json" --cgroup "$CG" --bpffs "$BPFFS/kmesh" \
  --admin-socket "$RUN/admin.sock" 2>"$RUN/daemon.log" &
pids+=($!)
wait_socket "$RUN/admin.sock" "$RUN/daemon.log"

echo "== service web: VIP 10.96.0.10:80 -> pods web-1..3 on :8080 (config: deploy/demo.json)"
echo "== 6 connects from the client pod (netns $CLIENT, cgroup $CG) to 10.96.0.10:80:"
"$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" --cgroup "$CG" connect 10.96.0.10:80 --count 6
echo "== the same VIP from a process outside the enrolled cgroup (not redirected):"
"$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" connect 10.96.0.10:80 --timeout-ms 500 || true
echo "== kmesh ctl dump (live maps):"
"$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock"
