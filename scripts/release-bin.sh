# Sourced by scripts/package.sh and scripts/image.sh (from the repository
# root, with `build` set to 1 or 0 and `me` naming the caller): the release
# `kmesh` both ship, built unless build=0 (a no-op when current), and
# checked to be this Cargo.toml's version. Sets bin and cargo_version.
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
bin=$target_dir/release/kmesh
cargo_version=$(awk -F'"' '/^\[/ { p = ($0 == "[package]") } p && /^version *=/ { print $2; exit }' Cargo.toml)
[ -n "$cargo_version" ] || {
  echo "$me: no [package] version in Cargo.toml" >&2
  exit 1
}
if [ "$build" = 1 ]; then
  cargo build --release --locked --bin kmesh
fi
[ -x "$bin" ] || {
  echo "$me: $bin missing (run without --no-build)" >&2
  exit 1
}
built=$("$bin" version)
[ "$built" = "kmesh $cargo_version" ] || {
  echo "$me: $bin says \"$built\", Cargo.toml has $cargo_version: rebuild (drop --no-build)" >&2
  exit 1
}
