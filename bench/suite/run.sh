#!/usr/bin/env bash
# One command for the data-path benchmark suite (root): installs the tools
# it needs, then runs it. Extra arguments go to the bench binary (criterion
# filters). KMESH_BENCH_QUICK=1 for a short run (under 6 min with the peers, once
# built); full ~25 min. KMESH_BENCH_MESH_VARIANT="label:--flag ..." adds a
# mesh row with extra daemon flags (docs/benchmarks.md).
# Results: bench/results/suite-<date>.md and .png.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
    echo "run as root: the suite creates network namespaces and cgroups and loads BPF" >&2
    exit 1
fi
source scripts/deps.sh
bash bench/suite/deps.sh
exec cargo bench --bench suite -- "$@"
