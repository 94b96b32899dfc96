#!/usr/bin/env bash
# Builds the bare-host packages from this checkout: a .deb (dpkg-deb, for
# Debian/Ubuntu) and an RPM (rpmbuild, for openEuler/RHEL-like hosts), both
# wrapping one release build of `kmesh` with the systemd unit, /etc/kmesh and
# the licences. Output: target/package/ (or $KMESH_PACKAGE_OUT).
#
#   scripts/package.sh              cargo build --release (a no-op when current), then package
#   scripts/package.sh --no-build   package target/release/kmesh as it is
#
# Layout and first steps after install: docs/install-bare-host.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

build=1
for arg in "$@"; do
  case "$arg" in
  --no-build) build=0 ;;
  -h | --help)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "package.sh: unknown argument $arg (see --help)" >&2
    exit 2
    ;;
  esac
done

# Tools (rpm for rpmbuild, binutils) and Rust; installs only what is missing.
source scripts/deps.sh
for tool in dpkg-deb rpmbuild readelf objdump strip cargo; do
  command -v "$tool" >/dev/null || {
    echo "package.sh: $tool is missing (scripts/deps.sh installs it as root)" >&2
    exit 1
  }
done

started=$SECONDS
out=${KMESH_PACKAGE_OUT:-$root/target/package}
maintainer=${KMESH_PACKAGE_MAINTAINER:-kmesh-rs developers <kmesh-rs@localhost>}

# Version: [package] version of Cargo.toml.
me=package.sh
source scripts/release-bin.sh
# "-pre" parts become "~pre", which both dpkg and rpm sort before the release.
version=${cargo_version//-/\~}
release=1
# The shipped configs must be ones the shipped binary accepts.
"$bin" ctl check-config packaging/etc/config.json >/dev/null
"$bin" ctl check-config packaging/examples/config.json >/dev/null

# Shared libraries the binary links against, by each distribution's package
# name. An unknown one stops the build: a new link dependency must be named.
glibc_min=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -n1)
deb_deps=() rpm_deps=()
add_dep() { # deb-name rpm-name
  local d
  for d in "${deb_deps[@]}"; do [ "$d" = "$1" ] && return; done
  deb_deps+=("$1")
  rpm_deps+=("$2")
}
for lib in $(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
  case "$lib" in
  libelf.so.*) add_dep libelf1 elfutils-libelf ;;
  libz.so.*) add_dep zlib1g zlib ;;
  libgcc_s.so.*) add_dep libgcc-s1 libgcc ;;
  libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux-*)
    add_dep "libc6 (>= $glibc_min)" "glibc >= $glibc_min"
    ;;
  *)
    echo "package.sh: $bin links $lib, which has no package name here: add it" >&2
    exit 1
    ;;
  esac
done

# Licences of the crates compiled in (normal dependencies for this host);
# the RPM's License tag is the AND of all of them, as distributions expect.
tree() { cargo tree --locked "$@" -e normal,no-proc-macro --prefix none -f '{p}|{l}'; }
crates=$({ tree --offline 2>/dev/null || tree; } |
  sed 's/ (\*)$//; s/ (proc-macro)//; s/^\([^ ]*\) v\([^ ]*\)[^|]*|/\1 \2|/' | sort -u)
spdx() { # one licence field -> SPDX, alternatives sorted, parenthesised if compound
  sed 's# */ *# OR #g' | awk '{
    if ($0 ~ /[()]/ || $0 ~ / AND /) { print "(" $0 ")"; next }
    n = split($0, a, / OR /)
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
    s = a[1]; for (i = 2; i <= n; i++) s = s " OR " a[i]
    print (n > 1 ? "(" s ")" : s) }'
}
crate_licenses=$(printf '%s\n' "$crates" | grep -v '^kmesh ' | cut -d'|' -f2 | spdx | sort -u |
  grep -vx 'Apache-2.0' | paste -sd'|' | sed 's/|/ AND /g')
rpm_license="Apache-2.0 AND (BSD-2-Clause OR GPL-2.0-only)${crate_licenses:+ AND $crate_licenses}"

work=$out/work
rm -rf "$work"
mkdir -p "$out" "$work"

third_party() {
  echo "Rust crates compiled into /usr/bin/kmesh (normal dependencies of kmesh"
  echo "$cargo_version, cargo tree): name version: licence. Their licence texts are"
  echo "in each crate's source on crates.io."
  echo
  printf '%s\n' "$crates" | grep -v '^kmesh ' | sed 's/|/: /'
}

# stage DIR UNITDIR: the files both packages hold.
stage() {
  local d=$1 unitdir=$2
  install -d -m 755 "$d/usr/bin" "$d/usr/libexec/kmesh" "$d$unitdir" "$d/etc/kmesh" \
    "$d/usr/share/doc/kmesh/examples"
  # Stripped as distributions ship binaries (panic messages keep file:line).
  strip --strip-unneeded -o "$d/usr/bin/kmesh" "$bin"
  chmod 755 "$d/usr/bin/kmesh"
  install -m 755 packaging/stop-post "$d/usr/libexec/kmesh/stop-post"
  install -m 644 deploy/kmesh.service "$d$unitdir/kmesh.service"
  install -m 644 packaging/etc/config.json packaging/etc/kmesh.env packaging/etc/README "$d/etc/kmesh/"
  install -m 644 README.md docs/install-bare-host.md "$d/usr/share/doc/kmesh/"
  install -m 644 packaging/examples/config.json "$d/usr/share/doc/kmesh/examples/"
}

# --- .deb
deb_arch=$(dpkg --print-architecture)
deb=$out/kmesh_${version}-${release}_${deb_arch}.deb
d=$work/deb
# Debian 12 still ships units under /lib (merged /usr makes it /usr/lib too).
stage "$d" /lib/systemd/system
third_party >"$d/usr/share/doc/kmesh/THIRD-PARTY"
sed "s/@VERSION@/$cargo_version/" packaging/deb/copyright >"$d/usr/share/doc/kmesh/copyright"
sed -n '/^Copyright/,$p' packaging/licenses/BSD-2-Clause | sed 's/^$/./; s/^/ /' >>"$d/usr/share/doc/kmesh/copyright"
install -d -m 755 "$d/DEBIAN"
install -m 755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$d/DEBIAN/"
(cd "$d" && find etc -type f | sed 's#^#/#' | sort) >"$d/DEBIAN/conffiles"
(cd "$d" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$d/DEBIAN/md5sums"
installed_kb=$(du -sk --exclude=DEBIAN "$d" | cut -f1)
depends=$(printf '%s\n' "${deb_deps[@]}" | paste -sd, | sed 's/,/, /g')
cat >"$d/DEBIAN/control" <<EOF
Package: kmesh
Version: ${version}-${release}
Architecture: $deb_arch
Maintainer: $maintainer
Installed-Size: $installed_kb
Depends: $depends
Recommends: systemd
Section: net
Priority: optional
Description: service-mesh data plane in Rust and eBPF (connect-time redirect)
 kmesh-rs: BPF programs on a cgroup rewrite a connection to a service VIP to
 one of the service's backends at connect() time, before any packet exists.
 Driven by /etc/kmesh/config.json (Istio workload API shapes) and optionally
 an Istio control plane. The systemd unit is installed but not enabled: edit
 the config, then run systemctl enable --now kmesh.
EOF
dpkg-deb --root-owner-group -Zxz --build "$d" "$deb" >/dev/null

# --- RPM
rpm_arch=$(uname -m)
r=$work/rpm
stage "$r" /usr/lib/systemd/system
lic=$r/usr/share/licenses/kmesh
install -d -m 755 "$lic"
install -m 644 LICENSE "$lic/LICENSE"
install -m 644 packaging/licenses/BSD-2-Clause "$lic/LICENSE.BSD-2-Clause"
install -m 644 /usr/share/common-licenses/GPL-2 "$lic/LICENSE.GPL-2.0"
third_party >"$lic/THIRD-PARTY"
rpmbuild -bb --quiet --target "$rpm_arch" \
  --define "_topdir $work/rpmbuild" \
  --define "_rpmdir $out" \
  --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
  --define "kmesh_version $version" \
  --define "kmesh_stage $r" \
  --define "kmesh_license $rpm_license" \
  --define "kmesh_requires $(printf '%s\n' "${rpm_deps[@]}" | paste -sd, | sed 's/,/, /g')" \
  packaging/rpm/kmesh.spec >/dev/null
rpm=$out/kmesh-${version}-${release}.${rpm_arch}.rpm

rm -rf "$work"
for f in "$deb" "$rpm"; do
  [ -f "$f" ] || {
    echo "package.sh: $f was not built" >&2
    exit 1
  }
  echo "$f ($(du -k "$f" | cut -f1) KiB)"
done
echo "packaged in $((SECONDS - started)) s (binary $(du -k "$bin" | cut -f1) KiB unstripped)"
