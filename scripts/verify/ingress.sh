# Ingress (sourced by scripts/verify.sh): a gateway pod that clients outside
# the mesh reach, enrolled, forwarding to a service VIP. The gateway is
# HAProxy in TCP mode in the client pod (netns and cgroup enrolled); the
# outside client runs in the pods' netns, which is not enrolled. HAProxy
# connects to the VIP like any pod, so the data path picks a backend for it.
command -v haproxy >/dev/null || { apt-get update -qq; apt-get install -y -qq haproxy; }
serve_pods
cat >"$RUN/config.json" <<JSON
{
  "enroll": { "netns": ["/run/netns/$CLIENT"] },
  "services": [{
    "name": "web", "namespace": "demo", "hostname": "web.demo.svc.cluster.local",
    "addresses": ["10.96.0.10"], "ports": [{ "service_port": 80, "target_port": 8080 }]
  }],
  "workloads": [
    { "uid": "Kubernetes//Pod/demo/web-1", "name": "web-1", "namespace": "demo",
      "addresses": ["10.244.0.11"], "services": { "demo/web.demo.svc.cluster.local": {} } },
    { "uid": "Kubernetes//Pod/demo/web-2", "name": "web-2", "namespace": "demo",
      "addresses": ["10.244.0.12"], "services": { "demo/web.demo.svc.cluster.local": {} } },
    { "uid": "Kubernetes//Pod/demo/web-3", "name": "web-3", "namespace": "demo",
      "addresses": ["10.244.0.13"], "services": { "demo/web.demo.svc.cluster.local": {} } },
    { "uid": "Kubernetes//Pod/istio-ingress/gateway", "name": "gateway", "namespace": "istio-ingress",
      "addresses": ["10.244.0.2"] }
  ]
}
JSON
cat >"$RUN/haproxy.cfg" <<CFG
global
  maxconn 256
defaults
  mode tcp
  timeout connect 2s
  timeout client 10s
  timeout server 10s
frontend ingress
  bind 10.244.0.2:8000
  default_backend web
backend web
  # The service's VIP: nothing owns it; connect() in the enrolled pod is
  # redirected to one of its endpoints.
  server web 10.96.0.10:80
CFG
step "the gateway: HAProxy listening on 10.244.0.2:8000, forwarding to web's VIP 10.96.0.10:80"
show cat "$RUN/haproxy.cfg"
start_daemon
# HAProxy starts inside the enrolled cgroup (joined first: `ip netns exec`
# mounts the netns's own /sys, which hides the cgroup tree) and the
# gateway pod's netns.
sh -c "echo \$\$ > '$CG/cgroup.procs'; exec ip netns exec '$CLIENT' haproxy -db -f '$RUN/haproxy.cfg'" \
  >"$RUN/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
  ip netns exec "$CLIENT" ss -Htln 'sport = :8000' | grep -q . && break
  sleep 0.1
done

step "30 connects from a client outside the mesh (netns $PODS, not enrolled) to the gateway"
echo "\$ kmesh-probe --netns /run/netns/$PODS connect 10.244.0.2:8000 --count 30  # pods counted"
out=$("$BIN/kmesh-probe" --netns "/run/netns/$PODS" connect 10.244.0.2:8000 --count 30 --timeout-ms 2000 | per_pod)
echo "$out"
for p in web-1 web-2 web-3; do
  echo "$out" | grep -q "$p=" || fail "$p got none of 30 connections through the gateway"
done
total=$(echo "$out" | grep -o '=[0-9]*' | tr -d = | awk '{n += $1} END {print n}')
expect "$total" 30

step "the data path counted the gateway's 30 connects to the VIP as redirects"
out=$(dump_stats enrolled_connect service_redirect); echo "$out"
expect "$out" "enrolled_connect=30 service_redirect=30"

step "the outside client alone cannot reach the VIP: nothing owns 10.96.0.10 (not enrolled)"
show "$BIN/kmesh-probe" --netns "/run/netns/$PODS" connect 10.96.0.10:80 --timeout-ms 500 || true
