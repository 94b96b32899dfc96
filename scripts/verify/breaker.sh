# Circuit breaker (sourced by scripts/verify.sh): web allows 5 concurrent
# connections from this node. The kernel counts them from connect to close;
# the 6th connect() fails at once with EPERM; the counts survive a daemon
# crash, connections closing while no daemon runs included.
cat >"$RUN/config.json" <<JSON
{
  "enroll": { "netns": ["/run/netns/$CLIENT"] },
  "services": [{
    "name": "web", "namespace": "demo", "hostname": "web.demo.svc.cluster.local",
    "addresses": ["10.96.0.10"], "ports": [{ "service_port": 80, "target_port": 8080 }],
    "max_connections": 5
  }],
  "workloads": [
    { "uid": "Kubernetes//Pod/demo/web-1", "name": "web-1", "namespace": "demo",
      "addresses": ["10.244.0.11"], "services": { "demo/web.demo.svc.cluster.local": {} } }
  ]
}
JSON

# hold N: opens connection N and keeps it open (until release N). The
# probe holds it until its input ends; a sleep holds the input open (not
# this shell: every process started later would inherit the pipe).
declare -A holder
hold() {
  mkfifo "$RUN/hold$1"
  "$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" --cgroup "$CG" connect 10.96.0.10:80 --hold \
    <"$RUN/hold$1" >"$RUN/held$1" &
  pids+=($!)
  sleep 3600 >"$RUN/hold$1" &
  holder[$1]=$!
  pids+=($!)
  for _ in $(seq 50); do [ -s "$RUN/held$1" ] && break; sleep 0.1; done
  echo "connection $1: $(cat "$RUN/held$1")"
}
# release N: closes connection N (the probe sees end of input and exits).
release() {
  kill "${holder[$1]}"
  echo "connection $1 closed"
}
# wait_active N: until the kernel's count is N (closes take a round trip).
wait_active() {
  for _ in $(seq 50); do
    "$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock" |
      python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["traffic"][0]["active_connections"] != int(sys.argv[1]))' "$1" &&
      return 0
    sleep 0.1
  done
  dump_traffic active_connections
  fail "active_connections did not reach $1"
}

serve_pods
step "web: max_connections 5"
show grep -o '"max_connections": [0-9]*' "$RUN/config.json"
start_daemon

step "5 connections held open"
for i in 1 2 3 4 5; do hold $i; done
wait_active 5
dump_traffic max_connections active_connections breaker_rejected

step "a 6th connect() fails at once with EPERM (errno 1)"
out=$(show "$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" --cgroup "$CG" connect 10.96.0.10:80 --timeout-ms 1000 || true)
echo "$out"
echo "$out" | grep -q '"errno":1,' || fail "expected errno 1 (EPERM)"
dump_traffic active_connections breaker_rejected
out=$(dump_stats breaker_reject); echo "$out"
expect "$out" "breaker_reject=1"

step "one closes: the next connect goes through"
release 5
wait_active 4
out=$(landed 1 10.96.0.10:80); echo "$out"
expect "$out" "web-1=1 "

step "the daemon crashes (SIGKILL) with 4 open; 2 close while it is down"
show kill -9 "$DAEMON"
wait "$DAEMON" 2>/dev/null || true
release 4
release 3
sleep 0.5

step "a new daemon finds the count the kernel kept: 2"
rm -f "$RUN/admin.sock"
start_daemon
wait_active 2
dump_traffic max_connections active_connections

step "so 3 more fit, and the 6th is refused again"
for i in 6 7 8; do hold $i; done
wait_active 5
out=$("$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" --cgroup "$CG" connect 10.96.0.10:80 --timeout-ms 1000 || true)
echo "$out"
echo "$out" | grep -q '"errno":1,' || fail "expected errno 1 (EPERM)"
for i in 1 2 6 7 8; do release $i; done
wait_active 0
dump_traffic active_connections breaker_rejected
