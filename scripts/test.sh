#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and system tests that
# load the BPF programs into the running kernel and drive real connections
# through network namespaces and a child cgroup. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "the test suite loads BPF programs and creates namespaces: run it as root" >&2
  exit 1
fi
source scripts/deps.sh
# The kernel matrix's kernels download while the host builds and tests.
fetch_pid=
if [ "${KMESH_KERNELS:-all}" != 0 ]; then
  bash scripts/kernels.sh --fetch-only >/tmp/kmesh-kernel-fetch.log 2>&1 &
  fetch_pid=$!
fi
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-features 2>&1
# The kernel matrix: the data-path tests again on Debian's 5.10, 6.1 and
# 6.12 kernels in emulated guests (docs/kernels.md). KMESH_KERNELS=0 skips
# it; KMESH_KERNELS="5.10" runs only those.
if [ "${KMESH_KERNELS:-all}" != 0 ]; then
  # A failed download is tried again (and reported) by the run itself.
  wait "$fetch_pid" || cat /tmp/kmesh-kernel-fetch.log >&2
  if [ "${KMESH_KERNELS:-all}" = all ]; then
    bash scripts/kernels.sh
  else
    # shellcheck disable=SC2086
    bash scripts/kernels.sh $KMESH_KERNELS
  fi
fi
