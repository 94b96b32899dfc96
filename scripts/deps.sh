#!/usr/bin/env bash
# Installs what building and testing kmesh-rs needs on Debian 12, if missing.
set -euo pipefail
need=()
# dnsmasq-base: the DNS server of the resolver tests (only the binary; the
# dnsmasq package would also start a system service).
# rpm (rpmbuild), binutils (also objcopy for the matrix): scripts/package.sh;
# systemd: systemd-analyze for the package test (only installed, never
# started there). qemu-system-x86, kmod (depmod), file, busybox-static: the
# kernel matrix's guests (scripts/kernels.sh, booted by virtme-ng); zstd:
# the matrix's binaries travel compressed into the guests. podman,
# runc: the image test (crun refuses hybrid cgroup hosts); python3-venv: the
# manifests' schema validator (kubernetes-validate in a venv).
# prometheus: tests/observability.rs scrapes the daemon with a real server.
# haproxy: the ingress gateway of scripts/verify.sh (tests/guides.rs).
# containernetworking-plugins: bridge + host-local under podman's CNI
# backend in tests/cni.rs.
for pkg in clang llvm libelf-dev zlib1g-dev pkg-config make gcc iproute2 procps dnsmasq-base \
  rpm binutils systemd qemu-system-x86 kmod file busybox-static zstd python3 python3-venv \
  podman runc prometheus haproxy containernetworking-plugins; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Rust: rustup's stable toolchain when there is no cargo, or one older than
# the dependencies need (Debian 12's packaged cargo is 1.63).
min_rust=1.88
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
rust_ok() {
  command -v cargo >/dev/null 2>&1 || return 1
  local v
  v=$(cargo --version | awk '{print $2}')
  [ "$(printf '%s\n%s\n' "$min_rust" "$v" | sort -V | head -n1)" = "$min_rust" ]
}
if ! rust_ok; then
  if command -v rustup >/dev/null 2>&1; then
    echo "updating Rust (need >= $min_rust)"
    rustup toolchain install stable --profile minimal --component rustfmt,clippy
    rustup default stable
  else
    echo "installing Rust (rustup, stable) into $HOME/.cargo"
    for pkg in curl ca-certificates; do
      dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null; }
    done
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
      sh -s -- -y --profile minimal --component rustfmt,clippy --default-toolchain stable
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
if ! rust_ok; then
  echo "Rust >= $min_rust is needed; cargo is $(cargo --version 2>/dev/null || echo missing)" >&2
  exit 1
fi
# virtme-ng (PyPI) boots the matrix's kernels with the host's filesystem.
if ! command -v vng >/dev/null 2>&1; then
  echo "installing virtme-ng (pip)"
  python3 -m pip --version >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  }
  python3 -m pip install -q virtme-ng 2>/dev/null || python3 -m pip install -q --break-system-packages virtme-ng
  hash -r
fi
