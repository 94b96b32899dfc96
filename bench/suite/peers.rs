//! Real peers the suite measures next to the mesh, each set up inside the
//! client pod's netns only (never the host's) while its mode is measured,
//! and removed when the suite leaves that mode or drops (the namespace's
//! deletion would remove the rules too; the guard does not rely on it):
//!
//! - kube-proxy's nftables mode: a `kube-proxy` table shaped as kube-proxy
//!   writes it (service-ips verdict map, a chain per service port with
//!   numgen random load-balancing over endpoint chains, DNAT in the
//!   endpoint chains, hooked on output for locally originated traffic,
//!   mark-and-masquerade for sources outside the cluster CIDR, the
//!   no-endpoint check on new connections in filter output).
//! - kube-proxy's IPVS mode: the VIP on a `kube-ipvs0` dummy, a virtual
//!   service per port with the rr scheduler and the pod as a masqueraded
//!   (NAT) real server, kube-proxy's IPVS sysctls, and the masquerade
//!   kube-proxy adds for sources outside the cluster CIDR (a local client's
//!   source is the VIP itself, as on a node).
//! - HAProxy in TCP mode listening on the VIP, the stand-in for a sidecar
//!   (or ztunnel's L4 hop) in the client's netns.
//!
//! Nothing here starts a kmesh daemon; the client connects to the VIP and
//! only the peer's state can take it to the server pod (the VIP has no
//! owner on the bridge, so without the peer the connect fails).

use std::{
    io::Write,
    net::IpAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::harness::Pod;

/// kube-proxy's masquerade bit (its default --masquerade-bit 14).
const MASQ_MARK: &str = "0x4000";
/// The pods' addresses (the harness gives 10.244.0.<n>/24).
const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// One service port the peers forward: (VIP port, pod port).
pub type PortMap = (u16, u16);

fn run_in(ns: &str, argv: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(argv);
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("{}: {e}", argv[0]))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .map_err(|e| format!("{}: stdin: {e}", argv[0]))?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{} in {ns}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// kube-proxy's nftables-mode rules for one service with one endpoint per
/// port, as `nft -f` input. Priorities are numbers (dstnat - 10, dstnat,
/// srcnat): bookworm's nft 1.0.6 refuses the names on the output hook.
pub fn nft_ruleset(vip: IpAddr, backend: IpAddr, ports: &[PortMap]) -> String {
    let mut elements = Vec::new();
    let mut chains = String::new();
    for &(svc, target) in ports {
        let sc = format!("service-bench/web/tcp/p{svc}");
        let ec = format!("endpoint-bench/web/tcp/p{svc}__{backend}/{target}");
        elements.push(format!("{vip} . tcp . {svc} : goto {sc}"));
        chains += &format!(
            "  chain {sc} {{\n    ip daddr {vip} tcp dport {svc} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n    numgen random mod 1 vmap {{ 0 : goto {ec} }}\n  }}\n  chain {ec} {{\n    ip saddr {backend} jump mark-for-masquerade\n    meta l4proto tcp dnat to {backend}:{target}\n  }}\n"
        );
    }
    format!(
        "table ip kube-proxy {{
  comment \"kmesh-rs bench: kube-proxy nftables mode\"
  chain mark-for-masquerade {{
    meta mark set meta mark | {MASQ_MARK}
  }}
  chain masquerading {{
    meta mark & {MASQ_MARK} == 0 return
    meta mark set meta mark ^ {MASQ_MARK}
    masquerade fully-random
  }}
  map no-endpoint-services {{
    type ipv4_addr . inet_proto . inet_service : verdict
  }}
  chain service-endpoints-check {{
    ip daddr . meta l4proto . th dport vmap @no-endpoint-services
  }}
  chain filter-output {{
    type filter hook output priority -110; policy accept;
    ct state new jump service-endpoints-check
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority -100; policy accept;
    jump services
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority 100; policy accept;
    jump masquerading
  }}
{chains}  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = {{ {} }}
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
}}
",
        elements.join(", ")
    )
}

/// Whether this kernel has IPVS (loading the module if it is one); the
/// reason it cannot run otherwise.
pub fn ipvs_probe(ns: &str) -> Result<(), String> {
    let _ = Command::new("modprobe")
        .args(["-q", "ip_vs"])
        .stderr(Stdio::null())
        .status();
    run_in(ns, &["test", "-e", "/proc/net/ip_vs"], None).map_err(|_| {
        "n/a (kernel without IPVS: no /proc/net/ip_vs after modprobe ip_vs)".to_string()
    })
}

pub enum Peer {
    Nftables {
        ns: String,
    },
    Ipvs {
        ns: String,
    },
    Haproxy {
        ns: String,
        vip: IpAddr,
        child: Child,
    },
}

impl Peer {
    pub fn nftables(
        pod: &Pod,
        vip: IpAddr,
        backend: IpAddr,
        ports: &[PortMap],
    ) -> Result<Peer, String> {
        let ns = pod.netns.clone();
        // The guard first, so a half-applied ruleset is removed too.
        let p = Peer::Nftables { ns: ns.clone() };
        run_in(
            &ns,
            &["nft", "-f", "-"],
            Some(&nft_ruleset(vip, backend, ports)),
        )?;
        Ok(p)
    }

    pub fn ipvs(
        pod: &Pod,
        vip: IpAddr,
        backend: IpAddr,
        ports: &[PortMap],
    ) -> Result<Peer, String> {
        let ns = pod.netns.clone();
        ipvs_probe(&ns)?;
        let p = Peer::Ipvs { ns: ns.clone() };
        // kube-proxy's settings for IPVS mode (conntrack so masquerade
        // sees IPVS's connections; no ARP answers for the dummy's VIPs).
        run_in(
            &ns,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.vs.conntrack=1",
                "net.ipv4.vs.expire_nodest_conn=1",
                "net.ipv4.vs.expire_quiescent_template=1",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
            ],
            None,
        )?;
        run_in(
            &ns,
            &["ip", "link", "add", "kube-ipvs0", "type", "dummy"],
            None,
        )?;
        run_in(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{vip}/32"),
                "dev",
                "kube-ipvs0",
            ],
            None,
        )?;
        for &(svc, target) in ports {
            let v = format!("{vip}:{svc}");
            run_in(&ns, &["ipvsadm", "-A", "-t", &v, "-s", "rr"], None)?;
            let r = format!("{backend}:{target}");
            run_in(
                &ns,
                &["ipvsadm", "-a", "-t", &v, "-r", &r, "-m", "-w", "1"],
                None,
            )?;
        }
        // kube-proxy marks traffic to a cluster IP from outside the cluster
        // CIDR and masquerades it in postrouting (it uses iptables and an
        // ipset; the same two steps in nftables here).
        let masq = format!(
            "table ip kube-proxy-ipvs {{
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    ip daddr {vip} ip saddr != {CLUSTER_CIDR} meta mark set meta mark | {MASQ_MARK}
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority 100; policy accept;
    meta mark & {MASQ_MARK} == {MASQ_MARK} masquerade
  }}
}}
"
        );
        run_in(&ns, &["nft", "-f", "-"], Some(&masq))?;
        Ok(p)
    }

    /// `cmd` runs haproxy in the client pod (taskset and cgroup as the
    /// other tools); its config is written to `cfg`.
    pub fn haproxy(
        pod: &Pod,
        vip: IpAddr,
        backend: IpAddr,
        ports: &[PortMap],
        cfg: &std::path::Path,
        mut cmd: Command,
    ) -> Result<Peer, String> {
        let ns = pod.netns.clone();
        run_in(
            &ns,
            &["ip", "addr", "add", &format!("{vip}/32"), "dev", "lo"],
            None,
        )?;
        let mut text = String::from(
            // maxconn sets haproxy's file limit (2 per connection): within
            // the 20000 hard limit some hosts give root.
            "global\n  maxconn 4000\n  nbthread 1\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
        );
        for &(svc, target) in ports {
            text += &format!(
                "\nlisten p{svc}\n  bind {vip}:{svc}\n  server web-1 {backend}:{target}\n"
            );
        }
        if let Err(e) = std::fs::write(cfg, text) {
            let _ = run_in(
                &ns,
                &["ip", "addr", "del", &format!("{vip}/32"), "dev", "lo"],
                None,
            );
            return Err(format!("{}: {e}", cfg.display()));
        }
        // -db: foreground, one process, so the pid is haproxy's own.
        let log = cfg.with_extension("log");
        let err = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .args(["haproxy", "-db", "-f"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = run_in(
                    &ns,
                    &["ip", "addr", "del", &format!("{vip}/32"), "dev", "lo"],
                    None,
                );
                return Err(format!("haproxy: {e}"));
            }
        };
        let mut p = Peer::Haproxy { ns, vip, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        for &(svc, _) in ports {
            while !crate::world::listening(pod, svc) {
                if let Peer::Haproxy { child, .. } = &mut p {
                    if let Ok(Some(st)) = child.try_wait() {
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        return Err(format!("haproxy exited ({st}): {}", text.trim()));
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!("haproxy: nothing listens on {vip}:{svc}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(p)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        match self {
            Peer::Nftables { ns } => {
                let _ = run_in(ns, &["nft", "delete", "table", "ip", "kube-proxy"], None);
            }
            Peer::Ipvs { ns } => {
                let _ = run_in(ns, &["ipvsadm", "-C"], None);
                let _ = run_in(
                    ns,
                    &["nft", "delete", "table", "ip", "kube-proxy-ipvs"],
                    None,
                );
                let _ = run_in(ns, &["ip", "link", "del", "kube-ipvs0"], None);
            }
            Peer::Haproxy { ns, vip, child } => {
                // Only the pid this suite started.
                let _ = child.kill();
                let _ = child.wait();
                let _ = run_in(
                    ns,
                    &["ip", "addr", "del", &format!("{vip}/32"), "dev", "lo"],
                    None,
                );
            }
        }
    }
}
