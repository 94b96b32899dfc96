#!/usr/bin/env bash
# Installs what building and testing kmesh-rs needs on Debian 12, if missing.
# Rust itself must already be there (rustup; Debian 12's cargo is too old).
set -euo pipefail
need=()
# dnsmasq-base: the DNS server of the resolver tests (only the binary; the
# dnsmasq package would also start a system service).
for pkg in clang llvm libelf-dev zlib1g-dev pkg-config make gcc iproute2 procps dnsmasq-base; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust >= 1.80 with rustup (https://rustup.rs), then re-run" >&2
  exit 1
fi
