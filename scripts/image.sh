#!/usr/bin/env bash
# Builds the daemon's OCI image with podman (Debian's; its build is buildah) FROM scratch, with
# no registry pull: the stripped release `kmesh`, exactly the shared
# libraries ldd finds for it, /etc/nsswitch.conf and the licences. The image
# goes into the local container storage (root's, /var/lib/containers).
#
#   scripts/image.sh                 cargo build --release (a no-op when current), then build
#   scripts/image.sh --no-build      use target/release/kmesh as it is
#   scripts/image.sh --tag NAME      image name (default localhost/kmesh:<version>)
#   scripts/image.sh --save FILE     also write it as an OCI archive (podman load -i FILE)
#
# Running it, and on Kubernetes: docs/kubernetes.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

build=1 tag="" save=""
while [ $# -gt 0 ]; do
  case "$1" in
  --no-build) build=0 ;;
  --tag)
    tag=${2:?--tag needs a name}
    shift
    ;;
  --save)
    save=${2:?--save needs a file}
    shift
    ;;
  -h | --help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "image.sh: unknown argument $1 (see --help)" >&2
    exit 2
    ;;
  esac
  shift
done

started=$SECONDS
if ! command -v podman >/dev/null; then
  [ "$(id -u)" -eq 0 ] || {
    echo "image.sh: needs podman (apt-get install podman, as root)" >&2
    exit 1
  }
  echo "installing podman"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman >/dev/null
fi

if [ "$build" = 1 ]; then
  source scripts/deps.sh
fi
me=image.sh
source scripts/release-bin.sh
tag=${tag:-localhost/kmesh:$cargo_version}

ctx=$(mktemp -d "${TMPDIR:-/tmp}/kmesh-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
fs=$ctx/rootfs
install -d -m 755 "$fs/usr/bin" "$fs/etc" "$fs/usr/share/doc/kmesh" "$fs/tmp"
chmod 1777 "$fs/tmp"
strip --strip-unneeded -o "$fs/usr/bin/kmesh" "$bin"
chmod 755 "$fs/usr/bin/kmesh"

# Every library at the path the loader looks for it (the real file, not the
# host's symlink), plus the loader itself at the binary's PT_INTERP path.
# ldd is the loader's own answer, so nothing is guessed.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[ -n "$libs" ] || {
  echo "image.sh: ldd found no libraries for $bin (static binary? then drop this step)" >&2
  exit 1
}
for lib in $libs; do
  case "$(basename "$lib")" in
  libelf.so.* | libz.so.* | libgcc_s.so.* | libc.so.* | libm.so.* | ld-linux-*) ;;
  *)
    # A new link dependency must be looked at (licence, size), as in package.sh.
    echo "image.sh: $bin links $lib, which is not in the known list: add it" >&2
    exit 1
    ;;
  esac
  install -d -m 755 "$fs$(dirname "$lib")"
  cp -L "$lib" "$fs$lib"
done
interp=$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ -e "$fs$interp" ] || {
  install -d -m 755 "$fs$(dirname "$interp")"
  cp -L "$interp" "$fs$interp"
}

# glibc's getaddrinfo (the istiod hostname): files first, then DNS; both
# are built into glibc >= 2.34, so no libnss_* module is loaded.
echo "hosts: files dns" >"$fs/etc/nsswitch.conf"
install -m 644 LICENSE "$fs/usr/share/doc/kmesh/LICENSE"
install -m 644 packaging/licenses/BSD-2-Clause "$fs/usr/share/doc/kmesh/LICENSE.BSD-2-Clause"
cp deploy/Containerfile "$ctx/Containerfile"

# The same inputs give the same image (layer times fixed at the epoch).
previous=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
podman build --quiet --timestamp 0 --network none \
  --label "org.opencontainers.image.version=$cargo_version" \
  -f "$ctx/Containerfile" -t "$tag" "$ctx" >/dev/null
# A rebuild moves the tag: the image it leaves without any tag is ours to drop.
if [ -n "$previous" ] && [ "$(podman image inspect --format '{{.Id}}' "$tag")" != "$previous" ] &&
  [ -z "$(podman image inspect --format '{{join .RepoTags ""}}' "$previous" 2>/dev/null)" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
if [ -n "$save" ]; then
  rm -f "$save"
  podman save --quiet --format oci-archive -o "$save" "$tag"
fi
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "$tag ($((size / 1024)) KiB)"
[ -z "$save" ] || echo "$save ($(du -k "$save" | cut -f1) KiB, OCI archive)"
echo "image built in $((SECONDS - started)) s (binary $(du -k "$fs/usr/bin/kmesh" | cut -f1) KiB stripped)"
