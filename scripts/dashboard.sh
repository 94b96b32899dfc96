#!/usr/bin/env bash
# Renders the Grafana dashboard (deploy/grafana/kmesh.json) from a real run:
# the daemon on the demo topology (scripts/lib/pods.sh) with both pods
# enrolled, a real Prometheus scraping it every 2 s, and traffic for
# DURATION seconds (default 180): echo transfers through a service VIP,
# connects to a service whose backend refuses, connects an AuthorizationPolicy
# denies. The panels' PromQL then runs against that Prometheus and
# scripts/dashboard.py draws them (no Grafana server is installable here).
# Output: docs/dashboard.png (or $1). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/dashboard.png}
DURATION=${DURATION:-180}
source scripts/deps.sh
command -v prometheus >/dev/null || { apt-get update -qq; apt-get install -y -qq prometheus; }
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install -q --root-user-action=ignore matplotlib
cargo build --release --bins -q
BIN=target/release
KMESH_PODS_TAG=dash
source scripts/lib/pods.sh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MPORT=$(free_port)
PPORT=$(free_port)

for i in 1 2 3; do
  "$BIN/kmesh-probe" --netns "/run/netns/$PODS" serve --listen "10.244.0.1$i:8080" --name "web-$i" >/dev/null &
  pids+=($!)
done
"$BIN/kmesh-probe" --netns "/run/netns/$PODS" serve --listen "10.244.0.12:8443" --name admin >/dev/null &
pids+=($!)

cat >"$RUN/config.json" <<JSON
{
  "enroll": { "netns": ["/run/netns/$CLIENT", "/run/netns/$PODS"] },
  "services": [
    { "name": "web", "namespace": "demo", "hostname": "web.demo.svc.cluster.local",
      "addresses": ["10.96.0.10"], "ports": [{ "service_port": 80, "target_port": 8080 }] },
    { "name": "db", "namespace": "demo", "hostname": "db.demo.svc.cluster.local",
      "addresses": ["10.96.0.20"], "ports": [{ "service_port": 5432, "target_port": 5432 }] },
    { "name": "admin", "namespace": "demo", "hostname": "admin.demo.svc.cluster.local",
      "addresses": ["10.96.0.30"], "ports": [{ "service_port": 443, "target_port": 8443 }] }
  ],
  "workloads": [
    { "uid": "Kubernetes//Pod/demo/sleep", "name": "sleep", "namespace": "demo",
      "service_account": "sleep", "addresses": ["10.244.0.2"] },
    { "uid": "Kubernetes//Pod/demo/web-1", "name": "web-1", "namespace": "demo",
      "addresses": ["10.244.0.11"],
      "services": { "demo/web.demo.svc.cluster.local": {}, "demo/db.demo.svc.cluster.local": {} } },
    { "uid": "Kubernetes//Pod/demo/web-2", "name": "web-2", "namespace": "demo",
      "addresses": ["10.244.0.12"],
      "services": { "demo/web.demo.svc.cluster.local": {}, "demo/admin.demo.svc.cluster.local": {} } },
    { "uid": "Kubernetes//Pod/demo/web-3", "name": "web-3", "namespace": "demo",
      "addresses": ["10.244.0.13"], "services": { "demo/web.demo.svc.cluster.local": {} } }
  ],
  "policies": [{
    "name": "no-admin-port", "namespace": "demo", "scope": "NAMESPACE", "action": "DENY",
    "rules": [{ "clauses": [{ "matches": [{ "destination_ports": [8443] }] }] }]
  }]
}
JSON
"$BIN/kmesh" daemon --config "$RUN/config.json" --cgroup "$CG" --bpffs "$BPFFS/kmesh" \
  --admin-socket "$RUN/admin.sock" --metrics-addr "127.0.0.1:$MPORT" --admin-addr off \
  --readiness-addr off --bpf-stats 2>"$RUN/daemon.log" &
DAEMON=$!
pids+=($DAEMON)
wait_socket "$RUN/admin.sock" "$RUN/daemon.log"

cat >"$RUN/prometheus.yml" <<YML
global: { scrape_interval: 2s, evaluation_interval: 2s }
scrape_configs:
  - job_name: kmesh
    metrics_path: /stats/prometheus
    static_configs: [{ targets: ["127.0.0.1:$MPORT"] }]
YML
prometheus --config.file="$RUN/prometheus.yml" --storage.tsdb.path="$RUN/tsdb" \
  --web.listen-address="127.0.0.1:$PPORT" >"$RUN/prometheus.log" 2>&1 &
pids+=($!)

in_client() { "$BIN/kmesh-probe" --netns "/run/netns/$CLIENT" --cgroup "$CG" "$@"; }
START=$(date +%s)
echo "== traffic for ${DURATION}s (Prometheus on 127.0.0.1:$PPORT scraping 127.0.0.1:$MPORT)"
while [ $(($(date +%s) - START)) -lt "$DURATION" ]; do
  # The load ramps up over the run so the panels show a change.
  n=$((5 + ($(date +%s) - START) / 10))
  in_client transfer 10.96.0.10:80 --sizes 1000,20000 --conns "$n" >/dev/null
  in_client connect 10.96.0.20:5432 --count 2 --timeout-ms 300 >/dev/null 2>&1 || true
  in_client connect 10.96.0.30:443 --timeout-ms 300 >/dev/null 2>&1 || true
  # A reload now and then, so the apply panels have something to show.
  [ $(( ($(date +%s) - START) % 30 )) -lt 2 ] && kill -HUP "$DAEMON"
  sleep 1
done
sleep 5
python3 scripts/dashboard.py "http://127.0.0.1:$PPORT" deploy/grafana/kmesh.json "$OUT" "$START" "$(date +%s)" 4
