#!/usr/bin/env bash
# Capacity benchmark (root): 100k concurrent accelerated connections
# (KMESH_CAP_CONNS=N to change), checked with an echo each, measured while
# all are held. Builds release (cargo's bench profile) and runs
# bench/capacity/main.rs. Results: bench/results/capacity-<date>.md.
#
# Everything it creates (netns, child cgroup, bpffs mount) is named
# kmt<pid>x… and removed by Drop guards, also when interrupted; if the
# benchmark is killed outright, the trap below removes what a dead pid left.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "run as root: the benchmark creates network namespaces and cgroups and loads BPF" >&2
    exit 1
fi
source scripts/deps.sh

# Leftovers of harness processes that no longer exist, and only those.
sweep_dead() {
    local name pid cg tmp="${TMPDIR:-/tmp}"
    cg=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
    for path in /run/netns/kmt* "$cg"/kmt* "$tmp"/kmt*; do
        [ -e "$path" ] || continue
        name=$(basename "$path")
        pid=${name#kmt}
        pid=${pid%%x*}
        case "$pid" in '' | *[!0-9]*) continue ;; esac
        [ -d "/proc/$pid" ] && continue
        case "$path" in
            /run/netns/*) ip netns del "$name" 2>/dev/null || true ;;
            "$cg"/*) echo 1 > "$path/cgroup.kill" 2>/dev/null || true
                     # Killed processes leave the cgroup asynchronously.
                     for _ in 1 2 3 4 5 6 7 8 9 10; do
                         rmdir "$path" 2>/dev/null && break
                         sleep 0.1
                     done ;;
            *) umount "$path/bpffs" 2>/dev/null || true
               rm -rf "$path" ;;
        esac
    done
}
trap sweep_dead EXIT

cargo bench --bench capacity
