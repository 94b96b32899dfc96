#!/usr/bin/env bash
# Debian packages the benchmark suite uses on top of scripts/deps.sh: the
# comparison tools (iperf3, sockperf, wrk, qperf), the peers the suite sets up
# in its own netns (nftables and ipvsadm for kube-proxy's two data paths,
# haproxy as a user-space L4 proxy) and gnuplot for the PNG. Kept out of
# scripts/deps.sh so CI does not install them.
set -euo pipefail
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v sockperf >/dev/null || need+=(sockperf)
command -v wrk >/dev/null || need+=(wrk)
command -v qperf >/dev/null || need+=(qperf)
command -v gnuplot >/dev/null || need+=(gnuplot-nox)
command -v nft >/dev/null || need+=(nftables)
command -v ipvsadm >/dev/null || need+=(ipvsadm)
command -v haproxy >/dev/null || need+=(haproxy)
command -v taskset >/dev/null || need+=(util-linux)
command -v ss >/dev/null || need+=(iproute2)
if ((${#need[@]})); then
    apt-get update -qq
    # iperf3's package asks whether to start a system-wide server: no.
    echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
