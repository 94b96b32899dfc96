# Locality load balancing (sourced by scripts/verify.sh). This node is in
# us-east/zone-a/rack-1; web-1 shares its rack, web-2 only its region,
# web-3 is in another region. FAILOVER sends every connection to the best
# non-empty level; STRICT only to a full match, else connect() fails (EPERM).
locality_config() { # MODE HEALTH_OF_WEB1 HEALTH_OF_WEB2
  cat >"$RUN/config.json" <<JSON
{
  "enroll": { "netns": ["/run/netns/$CLIENT"] },
  "services": [{
    "name": "web", "namespace": "demo", "hostname": "web.demo.svc.cluster.local",
    "addresses": ["10.96.0.10"], "ports": [{ "service_port": 80, "target_port": 8080 }],
    "load_balancing": { "mode": "$1", "routing_preference": ["REGION", "ZONE", "SUBZONE"] }
  }],
  "workloads": [
    { "uid": "Kubernetes//Pod/demo/web-1", "name": "web-1", "namespace": "demo", "status": "$2",
      "addresses": ["10.244.0.11"], "services": { "demo/web.demo.svc.cluster.local": {} },
      "locality": { "region": "us-east", "zone": "zone-a", "subzone": "rack-1" } },
    { "uid": "Kubernetes//Pod/demo/web-2", "name": "web-2", "namespace": "demo", "status": "$3",
      "addresses": ["10.244.0.12"], "services": { "demo/web.demo.svc.cluster.local": {} },
      "locality": { "region": "us-east", "zone": "zone-b", "subzone": "rack-7" } },
    { "uid": "Kubernetes//Pod/demo/web-3", "name": "web-3", "namespace": "demo",
      "addresses": ["10.244.0.13"], "services": { "demo/web.demo.svc.cluster.local": {} },
      "locality": { "region": "eu-west", "zone": "zone-c", "subzone": "rack-2" } }
  ]
}
JSON
}

serve_pods
locality_config FAILOVER HEALTHY HEALTHY
step "the daemon on a node in us-east/zone-a/rack-1; web: FAILOVER over REGION, ZONE, SUBZONE"
show grep -o '"load_balancing": {[^}]*}' "$RUN/config.json"
start_daemon --locality us-east/zone-a/rack-1 --node-name node-a

step "20 connects to 10.96.0.10:80: all on web-1 (same region, zone and rack)"
out=$(landed 20 10.96.0.10:80); echo "$out"
expect "$out" "web-1=20 "

step "web-1 UNHEALTHY (reload): all on web-2 (same region, another zone: the next level)"
locality_config FAILOVER UNHEALTHY HEALTHY; reload
out=$(landed 20 10.96.0.10:80); echo "$out"
expect "$out" "web-2=20 "

step "web-2 UNHEALTHY too: all on web-3 (another region: the last level)"
locality_config FAILOVER UNHEALTHY UNHEALTHY; reload
out=$(landed 20 10.96.0.10:80); echo "$out"
expect "$out" "web-3=20 "

step "STRICT with web-1 UNHEALTHY: no full match left, connect() fails at once with EPERM"
locality_config STRICT UNHEALTHY HEALTHY; reload
out=$(show "$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" --cgroup "$CG" connect 10.96.0.10:80 --timeout-ms 1000 || true)
echo "$out"
echo "$out" | grep -q '"errno":1,' || fail "expected errno 1 (EPERM)"

step "STRICT with web-1 HEALTHY again: all on web-1"
locality_config STRICT HEALTHY HEALTHY; reload
out=$(landed 20 10.96.0.10:80); echo "$out"
expect "$out" "web-1=20 "

step "the dump: the endpoint lists by priority (0 = best), as the data path holds them"
dump_services lb_policy endpoints
