#!/usr/bin/env bash
# Verification guides (docs/verification.md). Each GUIDE sets up the demo
# pods (scripts/lib/pods.sh: client 10.244.0.2, pods 10.244.0.11-13), runs
# the daemon with that feature's config, drives real connections, prints
# every command with its output, and exits non-zero when an outcome is not
# the documented one.
#
#   bash scripts/verify.sh locality | ingress | egress | breaker | ratelimit   (as root)
#
# KMESH_BIN=DIR uses kmesh and kmesh-probe from DIR instead of building the
# release binaries (the tests pass target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
GUIDE=${1:?usage: verify.sh locality|ingress|egress|breaker|ratelimit}
case "$GUIDE" in locality | ingress | egress | breaker | ratelimit) ;; *)
  echo "unknown guide '$GUIDE': locality, ingress, egress, breaker or ratelimit" >&2
  exit 2
  ;;
esac
if [ -z "${KMESH_BIN:-}" ]; then
  source scripts/deps.sh
  cargo build --release --bins -q
fi
BIN=${KMESH_BIN:-target/release}
KMESH_PODS_TAG=verify
source scripts/lib/pods.sh

# Commands are shown as an operator would type them: the netns and cgroup
# paths are this run's.
show() {
  echo "\$ $*" | sed -e "s|$BIN/||g"
  "$@"
}
step() { printf '\n== %s\n' "$*"; }
fail() {
  echo "VERIFY FAILED: $*" >&2
  exit 1
}
# per_pod: kmesh-probe's connect lines on stdin -> "web-1=N web-2=M ".
per_pod() {
  grep -o '"name":"[^"]*"' | cut -d'"' -f4 | sort | uniq -c | awk '{printf "%s=%s ", $2, $1} END {print ""}'
}
# connects N VIP:PORT from the client pod; prints how many landed on each pod.
landed() {
  echo "\$ kmesh-probe --netns /run/netns/$CLIENT --cgroup $CG connect $2 --count $1  # pods counted" >&2
  "$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" --cgroup "$CG" connect "$2" --count "$1" --timeout-ms 1000 | per_pod
}
# dump_section SECTION NAME KEY...: each entry of a `kmesh ctl dump` section,
# by its NAME field, with the given keys.
dump_section() {
  local section=$1 name=$2
  shift 2
  "$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock" | python3 -c '
import json, sys
for s in json.load(sys.stdin)[sys.argv[1]]:
    print(s[sys.argv[2]], " ".join(f"{k}={json.dumps(s.get(k))}" for k in sys.argv[3:]))' "$section" "$name" "$@"
}
# dump_services KEY...: each service's name and the given keys from `kmesh ctl dump`.
dump_services() {
  echo "\$ kmesh ctl dump --admin-socket $RUN/admin.sock  # services: name, $*"
  dump_section services name "$@"
}
# dump_traffic KEY...: each service's traffic section from `kmesh ctl dump`.
dump_traffic() {
  echo "\$ kmesh ctl dump --admin-socket $RUN/admin.sock  # traffic: $*"
  dump_section traffic service "$@"
}
# dump_stats KEY...: the given data-path counters from `kmesh ctl dump`.
dump_stats() {
  echo "\$ kmesh ctl dump --admin-socket $RUN/admin.sock  # stats: $*" >&2
  "$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock" | python3 -c '
import json, sys
s = json.load(sys.stdin)["stats"]
print(" ".join(f"{k}={s[k]}" for k in sys.argv[1:]))' "$@"
}
expect() { [ "$1" = "$2" ] || fail "expected '$2', got '$1'"; }

serve_pods() {
  for i in 1 2 3; do
    "$BIN/kmesh-probe" --netns "/run/netns/$PODS" serve --listen "10.244.0.1$i:${1:-8080}" --name "web-$i" >/dev/null &
    pids+=($!)
  done
}
DAEMON=
start_daemon() {
  "$BIN/kmesh" daemon --config "$RUN/config.json" --cgroup "$CG" --bpffs "$BPFFS/kmesh" \
    --admin-socket "$RUN/admin.sock" --metrics-addr off --admin-addr off --readiness-addr off \
    "$@" 2>"$RUN/daemon.log" &
  DAEMON=$!
  pids+=("$DAEMON")
  wait_socket "$RUN/admin.sock" "$RUN/daemon.log"
}
# reload: the new config in $RUN/config.json is applied on SIGHUP; returns
# once the daemon logged the apply.
reload() {
  local n
  n=$(grep -c ': applied ' "$RUN/daemon.log" || true)
  kill -HUP "$DAEMON"
  for _ in $(seq 50); do
    [ "$(grep -c ': applied ' "$RUN/daemon.log" || true)" -gt "$n" ] && return 0
    sleep 0.1
  done
  cat "$RUN/daemon.log"
  fail "the daemon did not apply the reload"
}

source "scripts/verify/$GUIDE.sh"
echo
echo "VERIFIED: $GUIDE"
