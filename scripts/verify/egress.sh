# Egress to services outside the mesh (sourced by scripts/verify.sh), as
# Istio's ServiceEntry resolutions: DNS (the daemon resolves the host and
# its answers are the endpoints), STATIC (endpoints are workload entries
# with addresses), NONE (no VIP entry: connections keep their destination).
# "Outside" is the pods' netns; the DNS server is a real dnsmasq on a
# 127.77.x.y address of this host.
DNS_DIR=$RUN/dns
mkdir -p "$DNS_DIR" && chmod 755 "$DNS_DIR"
for i in $(seq 2 250); do
  DNS_ADDR=127.77.$((($$ + i) % 250 + 1)).53
  ss -Hlnu "src $DNS_ADDR:53" | grep -q . || break
done
printf '10.244.0.12 api.example.test\n10.244.0.13 api.example.test\n' >"$DNS_DIR/hosts"
chmod 644 "$DNS_DIR/hosts"
dnsmasq --no-daemon --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
  --listen-address="$DNS_ADDR" --port=53 --local=/example.test/ --local-ttl=1 \
  --addn-hosts="$DNS_DIR/hosts" >"$DNS_DIR/log" 2>&1 &
DNSMASQ=$!
pids+=("$DNSMASQ")

serve_pods
cat >"$RUN/config.json" <<JSON
{
  "enroll": { "netns": ["/run/netns/$CLIENT"] },
  "services": [
    { "name": "api", "namespace": "demo", "hostname": "api.example.test", "resolution": "DNS",
      "addresses": ["240.240.0.10"], "ports": [{ "service_port": 443, "target_port": 8080 }] },
    { "name": "db", "namespace": "demo", "hostname": "db.example.test", "resolution": "STATIC",
      "addresses": ["240.240.0.20"], "ports": [{ "service_port": 5432, "target_port": 8080 }] },
    { "name": "legacy", "namespace": "demo", "hostname": "legacy.example.test", "resolution": "NONE",
      "addresses": ["10.244.0.13"], "ports": [{ "service_port": 8080, "target_port": 8080 }] }
  ],
  "workloads": [
    { "uid": "ServiceEntry/demo/db-vm", "name": "db-vm", "namespace": "demo",
      "addresses": ["10.244.0.11"], "services": { "demo/db.example.test": {} } }
  ]
}
JSON
step "three ServiceEntries: api (DNS), db (STATIC, one workload entry), legacy (NONE)"
show python3 -c 'import json,sys; [print(s["name"], s["resolution"], s["addresses"], s["ports"]) for s in json.load(open(sys.argv[1]))["services"]]' "$RUN/config.json"
step "the DNS server's answer for api.example.test"
show cat "$DNS_DIR/hosts"
start_daemon --dns-server "$DNS_ADDR" --dns-min-refresh 1 --dns-max-refresh 2
for _ in $(seq 50); do
  "$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock" | grep -q 10.244.0.13 && break
  sleep 0.1
done

step "DNS: 30 connects to api's VIP 240.240.0.10:443 land on the two answers"
out=$(landed 30 240.240.0.10:443); echo "$out"
case "$out" in "web-2="*" web-3="*" ") ;; *) fail "expected web-2 and web-3 only" ;; esac

step "the answer changes to 10.244.0.12 only: within the refresh (TTL 1 s) every connect goes there"
printf '10.244.0.12 api.example.test\n' >"$DNS_DIR/hosts"
kill -HUP "$DNSMASQ"
for _ in $(seq 50); do
  out=$(landed 10 240.240.0.10:443 2>/dev/null || true)
  [ "$out" = "web-2=10 " ] && break
  sleep 0.1
done
out=$(landed 20 240.240.0.10:443); echo "$out"
expect "$out" "web-2=20 "
echo "\$ kmesh ctl dump --admin-socket $RUN/admin.sock  # dns"
"$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["dns"])'

step "STATIC: db's VIP 240.240.0.20:5432 lands on its workload entry (10.244.0.11:8080)"
out=$(landed 10 240.240.0.20:5432); echo "$out"
expect "$out" "web-1=10 "

step "NONE: legacy gets no VIP entry; connects to 10.244.0.13:8080 keep their destination"
out=$(landed 10 10.244.0.13:8080); echo "$out"
expect "$out" "web-3=10 "
echo "\$ kmesh ctl dump --admin-socket $RUN/admin.sock  # passthrough"
"$BIN/kmesh" ctl dump --admin-socket "$RUN/admin.sock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["passthrough"])'
