#!/usr/bin/env bash
# The kernel matrix: boots Debian's kernels (5.10 from bullseye, 6.1 from
# bookworm, 6.12 from bookworm-backports) in QEMU guests with virtme-ng and
# runs the data-path system tests inside each, with the host's built test
# binaries and the host's filesystem shared read-only. Prints one line per
# kernel and a closing "N passed, N failed".
#
#   scripts/kernels.sh [--fetch-only] [KERNEL...]    KERNEL: 5.10 6.1 6.12
#
# Environment:
#   KMESH_KERNEL_CACHE  where the kernel packages are fetched and unpacked
#                       (default /var/lib/kmesh-kernels; a second run does
#                       not download again). Not under /var/cache: virtme-ng
#                       hides that behind a tmpfs in the guest, and the guest
#                       needs the kernel's modules from there.
#   KMESH_KERNEL_TESTS  the test binaries (cargo test target names) to run in
#                       each guest, each optionally with test-name filters
#                       ("authz:a,b"); default: redirect waypoint accel
#                       kernel, two authz tests, two telemetry tests and
#                       three traffic tests
#   KMESH_KERNEL_JOBS   guests run at once (default 1)
#   KMESH_GUEST_TIMEOUT a whole guest's seconds (default 1500);
#   KMESH_GUEST_TEST_TIMEOUT one test binary's (600); KMESH_GUEST_FROZEN
#                       seconds without the guest's heartbeat that make it
#                       frozen (240): what had not ended runs again, once
#   KMESH_DEBIAN_MIRROR the Debian mirror (default: the host's own, from
#                       /etc/apt/sources.list*)
#
# apt runs with its own sources list, state and cache under the cache dir: the
# host's apt lists and sources, and /boot, are never touched.
set -euo pipefail

# Inside a guest: `kernels.sh --guest OUT BIN...` runs each test binary and
# leaves its output and exit code in OUT (a directory shared read-write with
# the host; the guest's console is not reliable output).
if [ "${1:-}" = "--guest" ]; then
  out=$2
  shift 2
  exec >"$out/guest.log" 2>&1
  # The host takes a heartbeat that stops for minutes as a frozen guest.
  while date +%s >"$out/heartbeat"; do sleep 10; done &
  uname -r
  # The test harness mounts its own bpffs and finds cgroup2 in /proc/mounts;
  # veth is a module in Debian's kernels (virtme-ng exposes the package's
  # modules dir as /lib/modules/<release>).
  step() { echo "$(date +%T) $*"; }
  step modprobe veth
  modprobe veth || echo "modprobe veth failed"
  ulimit -l unlimited
  # Binaries are read over 9p without a page cache: every daemon start
  # would read the whole binary again, and 6.12's 9p reads at ~3 MB/s. The
  # host left stripped, zstd-compressed copies in OUT/bin; they go to RAM
  # and over the originals' paths (the test binaries start the daemon by
  # its build path).
  step copying the binaries into RAM
  mkdir -p /run/kmesh-bin
  for f in "$out"/bin/*.zst; do
    name=$(basename "$f" .zst)
    zstd -d -q "$f" -o "/run/kmesh-bin/$name"
    chmod +x "/run/kmesh-bin/$name"
    mount --bind "/run/kmesh-bin/$name" "$(cat "$out/bin/$name.orig")"
  done
  # A stuck test must leave evidence and must not stall the binaries after
  # it: blocked tasks are reported on the console (vng.log on the host), and
  # each binary runs in a session of its own that is killed whole when its
  # time is up (a daemon or pod it left behind would hold the log pipe open).
  sysctl -q -w kernel.hung_task_timeout_secs=60 kernel.hung_task_warnings=-1 2>/dev/null || true
  limit=${KMESH_GUEST_TEST_TIMEOUT:-600}
  for bin in "$@"; do
    name=$(basename "$bin")
    name=${name%-*}
    # Test-name filters for this binary (KMESH_KERNEL_TESTS "name:a,b").
    filters=$(cat "$out/filters/$name" 2>/dev/null || true)
    step "$name"
    # NAME.times: when each test ended, in seconds since the binary
    # started (the matrix's time budget is spent per test).
    start=$(date +%s)
    rm -f "$out/$name.sid"
    # Shortly before the limit: every task's state and kernel stack, and
    # the kernel's own list of blocked tasks, into NAME.hang.
    (
      sleep $((limit - 15))
      {
        echo "$(date +%T) $name still running after $((limit - 15)) s"
        # User tasks only (kernel threads are children of kthreadd, pid 2).
        ps -eo pid,ppid,sid,stat,wchan:32,etime,args | awk '$1 != 2 && $2 != 2' | cut -c1-200
        for t in /proc/[0-9]*/task/[0-9]*; do
          st=$(awk '{print $3}' "$t/stat" 2>/dev/null) || continue
          case "$st" in D | R) echo "--- $t $st $(tr '\0' ' ' <"${t%/task/*}/cmdline" 2>/dev/null | cut -c1-120)"; cat "$t/stack" 2>/dev/null ;; esac
        done
        echo w >/proc/sysrq-trigger 2>/dev/null
        dmesg | tail -n 200
      } >"$out/$name.hang" 2>&1
    ) &
    watchdog=$!
    # shellcheck disable=SC2086,SC2016
    {
      setsid -w bash -c 'echo $$ >"$1"; shift; exec timeout -k 10 "$@"' _ "$out/$name.sid" \
        "$limit" "$bin" --test-threads=2 --show-output $filters 2>&1 || echo $? >"$out/$name.rc"
      pkill -KILL -s "$(cat "$out/$name.sid")" 2>/dev/null || true
    } | tee "$out/$name.log" | while IFS= read -r l; do
      case "$l" in "test "*" ... "*) printf '%d %s\n' $(($(date +%s) - start)) "$l" ;; esac
    done >"$out/$name.times"
    kill "$watchdog" 2>/dev/null || true
    [ -f "$out/$name.rc" ] || echo 0 >"$out/$name.rc"
  done
  echo done >"$out/finished"
  exit 0
fi
cd "$(dirname "$0")/.."
repo=$(pwd)
cache=${KMESH_KERNEL_CACHE:-/var/lib/kmesh-kernels}
# authz runs two of its tests per kernel: together they load and exercise
# every authorization path the kernel has to run (sk_lookup refusals over
# IPv4, IPv6 and v4-mapped, connect-time EPERM, the live cut); the whole
# file takes over 10 minutes in an emulated guest.
tests=${KMESH_KERNEL_TESTS:-redirect waypoint accel kernel authz:source_cidr_destination_port,live_connections_are_cut telemetry:counted_exactly_on_both_reporters,a_reset_and_a_refused traffic:canary_split,breaker_caps,rate_limit}
fetch_only=0
kernels=()
for a in "$@"; do
  case "$a" in
    --fetch-only) fetch_only=1 ;;
    5.10 | 6.1 | 6.12) kernels+=("$a") ;;
    *) echo "kernels.sh: unknown argument '$a' (expected --fetch-only, 5.10, 6.1 or 6.12)" >&2; exit 2 ;;
  esac
done
[ "${#kernels[@]}" -gt 0 ] || kernels=(5.10 6.1 6.12)

suite_of() {
  case "$1" in
    5.10) echo bullseye ;;
    6.1) echo bookworm ;;
    6.12) echo bookworm-backports ;;
  esac
}

mirror() {
  if [ -n "${KMESH_DEBIAN_MIRROR:-}" ]; then echo "$KMESH_DEBIAN_MIRROR"; return; fi
  local m
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ' || true)
  echo "${m:-http://deb.debian.org/debian}"
}

# apt with everything of its own under $cache/apt.
apt_own() {
  local tool=$1
  shift
  "$tool" -o Dir::State="$cache/apt/state" -o Dir::Cache="$cache/apt/cache" \
    -o Dir::Etc::SourceList="$cache/apt/sources.list" -o Dir::Etc::SourceParts="$cache/apt/empty" \
    -o Dir::Etc::Preferences="$cache/apt/preferences" -o Dir::Etc::PreferencesParts="$cache/apt/empty" \
    -o APT::Sandbox::User=root -o Debug::NoLocking=1 -q "$@"
}

# Unpacks the newest linux-image of the kernel's suite into $cache/<kernel>;
# prints the vmlinuz path. Does nothing when it is already there.
fetch() {
  local k=$1 dir="$cache/$1"
  if [ -f "$dir/.done" ]; then
    ls "$dir"/boot/vmlinuz-* | head -n1
    return
  fi
  mkdir -p "$cache/apt/state/lists/partial" "$cache/apt/cache/archives/partial" "$cache/apt/empty"
  if [ ! -f "$cache/apt/.updated" ]; then
    local m
    m=$(mirror)
    {
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $m bullseye main"
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $m bookworm main"
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $m bookworm-backports main"
    } >"$cache/apt/sources.list"
    : >"$cache/apt/preferences"
    echo "kernels: apt-get update (own lists under $cache/apt) from $m" >&2
    apt_own apt-get update -qq >&2
    touch "$cache/apt/.updated"
  fi
  local suite pkg
  suite=$(suite_of "$k")
  # The suite's linux-image-amd64 names the real package (linux-image-<abi>-amd64).
  pkg=$(apt_own apt-cache show "linux-image-amd64/$suite" 2>/dev/null |
    sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*-amd64\).*/\1/p' | head -n1)
  pkg=${pkg%-unsigned}
  [ -n "$pkg" ] || { echo "kernels: no linux-image-amd64 in $suite" >&2; return 1; }
  echo "kernels: $k: downloading $pkg from $suite" >&2
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && apt_own apt-get download -qq "$pkg/$suite" >&2)
  rm -rf "$dir"
  mkdir -p "$dir"
  dpkg-deb -x "$tmp"/*.deb "$dir"
  rm -rf "$tmp"
  # Debian's kernels are readable by root only; virtme-ng reads them as is.
  touch "$dir/.done"
  ls "$dir"/boot/vmlinuz-* | head -n1
}

for k in "${kernels[@]}"; do
  fetch "$k" >/dev/null
done
[ "$fetch_only" -eq 0 ] || exit 0

# The test binaries, built once on the host and run from the shared
# filesystem in every guest.
args=()
for t in $tests; do args+=(--test "${t%%:*}"); done
bins=$(cargo test --no-run --message-format=json "${args[@]}" 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*\/deps\/[^"]*\)".*/\1/p')
[ -n "$bins" ] || { echo "kernels: building the test binaries failed (cargo test --no-run ${args[*]})" >&2; exit 1; }

# Stripped and compressed once for every guest (OUT/bin links here): the
# binaries with debug info are ~1.5 GB, and a guest reads them at a few MB/s.
binz=$(mktemp -d /tmp/kmesh-kernel-bins-XXXXXX)
trap 'rm -rf "$binz"' EXIT
for f in $bins "$repo/target/debug/kmesh" "$repo/target/debug/kmesh-probe" "$repo/target/debug/kmesh-load"; do
  name=$(basename "$f")
  objcopy --strip-all "$f" "$binz/$name"
  zstd -q -1 --rm "$binz/$name" -o "$binz/$name.zst"
  echo "$f" >"$binz/$name.orig"
done

# What a guest's kernel said that explains a hang: its warnings with their
# stacks, and the console's last lines.
console_report() {
  grep -a -E -A 25 'INFO: task|soft lockup|hard LOCKUP|rcu: INFO|BUG:|WARNING:|Kernel panic|Oops' "$1" | head -n 150 || true
  echo "-- the last lines of its console:"
  tail -n 25 "$1" || true
}

# One kernel's guest run; leaves its summary lines in RES/K.summary and
# "pass fail skip" in RES/K.counts.
run_kernel() {
  local k=$1 res=$2
  local kimg out start secs line kpass=0 kfail=0 kskip=0 vrc=0
  kimg=$(fetch "$k")
  out=$(mktemp -d /tmp/kmesh-kernel-XXXXXX)
  start=$(date +%s)
  mkdir -p "$out/filters"
  ln -s "$binz" "$out/bin"
  for t in $tests; do
    case "$t" in *:*) echo "${t#*:}" | tr ',' ' ' >"$out/filters/${t%%:*}" ;; esac
  done
  # --disable-kvm: this machine's /dev/kvm cannot run guests; --force-9p:
  # virtiofsd is not needed. The guest shares the host's filesystem
  # read-only (with tmpfs overlays on /tmp, /var, /etc), OUT read-write.
  # A guest that never got to run the script (vng once exited 255 within
  # seconds, with nothing logged) is started once more. So is one that
  # froze (its heartbeat stopped: once on 5.10 in CI, within a minute of a
  # test binary's start, not even libtest's 60 s notice came out): the
  # binaries it had not ended run in a new guest, and the summary says so.
  local attempt rest b n froze=""
  for attempt in 1 2; do
    vrc=0
    rest=""
    for b in $bins; do
      n=$(basename "$b")
      [ -f "$out/${n%-*}.rc" ] || rest+=" $b"
    done
    rm -f "$out/heartbeat"
    timeout "${KMESH_GUEST_TIMEOUT:-1500}" vng --run "$kimg" --disable-kvm --force-9p \
      --memory 3G --cpus 2 --rwdir "$out" --verbose \
      --exec "KMESH_TEST_TIME_SCALE=${KMESH_TEST_TIME_SCALE:-10} KMESH_GUEST_TEST_TIMEOUT=${KMESH_GUEST_TEST_TIMEOUT:-600} bash $repo/scripts/kernels.sh --guest $out$rest" \
      >>"$out/vng.log" 2>&1 </dev/null &
    local vpid=$! stale=${KMESH_GUEST_FROZEN:-240} frozen=0
    while kill -0 "$vpid" 2>/dev/null; do
      sleep 5
      if [ -f "$out/heartbeat" ] && [ ! -f "$out/finished" ] &&
        [ $(($(date +%s) - $(stat -c %Y "$out/heartbeat"))) -gt "$stale" ]; then
        frozen=1
        kill -TERM "$vpid" 2>/dev/null || true
        break
      fi
    done
    wait "$vpid" || vrc=$?
    if [ "$frozen" = 1 ]; then
      local stuck
      stuck=$(tail -n1 "$out/guest.log" | cut -d' ' -f2-)
      froze+="${froze:+, then in }$stuck"
      echo "---- $k: the guest froze in $stuck (no heartbeat for ${stale} s); its kernel's warnings:"
      console_report "$out/vng.log"
      mv "$out/vng.log" "$out/vng.froze$attempt.log"
      [ ! -f "$out/$stuck.log" ] || mv "$out/$stuck.log" "$out/$stuck.froze$attempt.log"
      if [ "$attempt" = 1 ]; then
        echo "kernels: $k: the guest froze in $stuck; what had not ended runs in a new guest" >&2
        continue
      fi
      break
    fi
    [ "$vrc" -ne 0 ] && [ ! -f "$out/guest.log" ] && [ "$attempt" = 1 ] || break
    echo "kernels: $k: the guest did not start (vng exit $vrc); starting it again" >&2
  done
  secs=$(($(date +%s) - start))
  line="$k ($(head -n1 "$out/guest.log" 2>/dev/null || echo unknown)), ${secs}s:"
  : >"$res/$k.summary"
  for bin in $bins; do
    local name res_line p f s t skipped rc
    name=$(basename "$bin")
    name=${name%-*}
    res_line=$(grep -E '^test result:' "$out/$name.log" 2>/dev/null | tail -n1 || true)
    p=$(echo "$res_line" | sed -n 's/.* \([0-9]*\) passed.*/\1/p')
    f=$(echo "$res_line" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
    s=$(echo "$res_line" | sed -n 's/.* \([0-9]*\) ignored.*/\1/p')
    skipped=$( (grep '^SKIP' "$out/$name.log" 2>/dev/null || true) | sort -u | wc -l)
    rc=$(cat "$out/$name.rc" 2>/dev/null || echo none)
    if [ -z "$res_line" ] || [ "$rc" != 0 ]; then
      # No result line (crash, timeout) counts as one failure at least.
      [ -n "$f" ] && [ "$f" -gt 0 ] || f=1
      p=${p:-0}
      echo "---- $k: $name (exit $rc) ----"
      grep -E '^(test .* FAILED|---- |thread .* panicked)|Error|error' "$out/$name.log" 2>/dev/null | head -n 40 || true
      if [ "$rc" != 0 ] && [ "$rc" != 101 ]; then
        # Killed or never ended: where it was, and what the kernel said.
        echo "-- the last lines of its output:"
        tail -n 15 "$out/$name.log" 2>/dev/null || true
        [ ! -f "$out/$name.hang" ] || { echo "-- its tasks before the time limit:"; head -c 12000 "$out/$name.hang"; }
      fi
    fi
    # cargo counts a test that returned early as passed.
    p=$((p - skipped))
    kpass=$((kpass + p))
    kfail=$((kfail + f))
    kskip=$((kskip + skipped))
    t=$(echo "$res_line" | sed -n 's/.*finished in \([0-9]*\).*/\1/p')
    line+=" $name ${p}/$((p + f + skipped))${t:+ in ${t}s}"
    [ "$skipped" -eq 0 ] || line+=" ($skipped skipped)"
    : "$s"
  done
  if [ ! -f "$out/finished" ]; then
    if [ -f "$out/vng.log" ]; then
      echo "---- $k: the guest did not finish; its kernel's warnings:"
      console_report "$out/vng.log"
    fi
    line+=" [guest did not finish: vng exit $vrc]"
    kfail=$((kfail + 1))
  fi
  echo "$([ "$kfail" -eq 0 ] && echo PASS || echo FAIL) $line${froze:+ [the guest froze in $froze; a new guest ran what had not ended]}" >>"$res/$k.summary"
  # Each reason for skipping once, with how many tests it skipped.
  while read -r n why; do
    if [ -n "$why" ]; then echo "       $n skipped: $why" >>"$res/$k.summary"; fi
  done < <( (grep -h '^SKIP' "$out"/*.log 2>/dev/null || true) | sort -u | sed 's/^SKIP [^:]*: //' | sort | uniq -c)
  echo "$kpass $kfail $kskip" >"$res/$k.counts"
  echo "kernels: $k done in ${secs}s (logs in $out)" >&2
}

# Guests one after another by default: two emulated guests side by side
# on two cores took 41 min where one at a time takes ~20 (KMESH_KERNEL_JOBS
# runs more at once on a bigger machine).
res=$(mktemp -d /tmp/kmesh-kernels-XXXXXX)
jobs_max=${KMESH_KERNEL_JOBS:-1}
for k in "${kernels[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
  run_kernel "$k" "$res" &
done
wait
total_pass=0
total_fail=0
total_skip=0
summary=()
for k in "${kernels[@]}"; do
  while IFS= read -r l; do summary+=("$l"); done <"$res/$k.summary"
  read -r kp kf ks <"$res/$k.counts" || { kp=0; kf=1; ks=0; }
  total_pass=$((total_pass + kp))
  total_fail=$((total_fail + kf))
  total_skip=$((total_skip + ks))
done
echo "kernel matrix:"
printf '  %s\n' "${summary[@]}"
echo "kernels: $total_pass passed, $total_fail failed, $total_skip skipped"
[ "$total_fail" -eq 0 ]
