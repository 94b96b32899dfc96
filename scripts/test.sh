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
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-features 2>&1
