# Connect rate limit (sourced by scripts/verify.sh): web takes from each
# client pod a burst of 10 connects, then 5 more every 5 s (a token
# bucket per pod, as Envoy's local_ratelimit). Connects beyond fail at once
# with EPERM and are counted.
cat >"$RUN/config.json" <<JSON
{
  "enroll": { "netns": ["/run/netns/$CLIENT"] },
  "services": [{
    "name": "web", "namespace": "demo", "hostname": "web.demo.svc.cluster.local",
    "addresses": ["10.96.0.10"], "ports": [{ "service_port": 80, "target_port": 8080 }],
    "rate_limit": { "max_tokens": 10, "tokens_per_fill": 5, "fill_interval_ms": 5000 }
  }],
  "workloads": [
    { "uid": "Kubernetes//Pod/demo/web-1", "name": "web-1", "namespace": "demo",
      "addresses": ["10.244.0.11"], "services": { "demo/web.demo.svc.cluster.local": {} } }
  ]
}
JSON
# burst N: N connects at once; prints how many landed and how many got EPERM.
burst() {
  echo "\$ kmesh-probe --netns /run/netns/$CLIENT --cgroup $CG connect 10.96.0.10:80 --count $1  # outcomes counted" >&2
  "$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" --cgroup "$CG" connect 10.96.0.10:80 --count "$1" --timeout-ms 1000 |
    python3 -c '
import json, sys
c = [json.loads(l) for l in sys.stdin]
ok = sum(1 for x in c if x["ok"])
eperm = sum(1 for x in c if x.get("errno") == 1)
print("connected=%d eperm=%d" % (ok, eperm))' || true
}
traffic() {
  echo "\$ kmesh ctl dump --admin-socket $RUN/admin.sock  # traffic: rate_limit, pods"
  "$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock" | python3 -c '
import json, sys
for t in json.load(sys.stdin)["traffic"]:
    print(t["service"], "rate_limit=" + json.dumps(t["rate_limit"]))
    for p in t.get("pods", []):
        print("  pod", p["source"], "tokens=%d rejected=%d" % (p["tokens"], p["rejected"]))'
}

serve_pods
step "web: rate_limit 10 tokens, 5 more every 5000 ms, per client pod"
show grep -o '"rate_limit": {[^}]*}' "$RUN/config.json"
start_daemon

step "a burst of 30 connects: the 10 tokens go through, 20 fail at once with EPERM"
out=$(burst 30); echo "$out"
expect "$out" "connected=10 eperm=20"
traffic

step "one fill interval after the bucket was made: 5 tokens (the dump computes them as the program will)"
for _ in $(seq 400); do
  [ "$("$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["traffic"][0]["pods"][0]["tokens"])')" = 5 ] && break
  sleep 0.05
done
traffic
out=$(burst 30); echo "$out"
expect "$out" "connected=5 eperm=25"

step "after 10 s idle (2 fills): full again (10), not beyond"
sleep 10
out=$(burst 30); echo "$out"
expect "$out" "connected=10 eperm=20"
out=$(dump_stats rate_limited); echo "$out"
expect "$out" "rate_limited=65"
traffic
