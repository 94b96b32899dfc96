use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use kmesh::{
    admin,
    bpf::MapSizes,
    config, daemon,
    dns::{DnsConfig, Upstream},
    http::{HttpOptions, Listen},
    logging,
    model::{LocalNode, Placement},
    sys,
    xds::{self, client::XdsOptions},
};

#[derive(Parser)]
#[command(
    name = "kmesh",
    version,
    about = "Service-mesh data plane in the kernel (eBPF)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the data path, attach it to a cgroup, and keep the maps in sync
    /// with the config source.
    Daemon(Box<DaemonArgs>),
    /// Talk to a running daemon, or check files.
    Ctl {
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// Print the version.
    Version,
    /// The CNI plugin (run by the container runtime with CNI_* variables
    /// and the network config on stdin; installed as kmesh-cni).
    Cni,
}

#[derive(Args)]
struct DaemonArgs {
    /// Standalone config file (JSON); reloaded on SIGHUP and when it changes.
    #[arg(long, env = "KMESH_CONFIG")]
    config: Option<PathBuf>,
    /// Istio control plane (delta ADS): http://host:port or https://host:port.
    /// Without --config, defaults to istiod's TLS port.
    #[arg(long, env = "KMESH_XDS_ADDRESS")]
    xds_address: Option<String>,
    /// CA certificate (PEM) for a TLS xDS address.
    #[arg(
        long,
        env = "KMESH_XDS_CA_FILE",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    xds_ca_file: PathBuf,
    /// Service-account token sent to the control plane, if the file exists.
    #[arg(
        long,
        env = "KMESH_XDS_TOKEN_FILE",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    xds_token_file: PathBuf,
    /// xDS node id [default: ztunnel~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local].
    #[arg(long, env = "KMESH_NODE_ID")]
    node_id: Option<String>,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// cgroup2 directory to attach to [default: the cgroup2 mount root].
    #[arg(long, env = "KMESH_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Directory on a bpf filesystem where maps and links are pinned.
    #[arg(long, env = "KMESH_BPFFS", default_value = "/sys/fs/bpf/kmesh")]
    bpffs: PathBuf,
    #[arg(long, env = "KMESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
    admin_socket: PathBuf,
    /// Leave the programs attached when the daemon exits (for restarts).
    #[arg(long)]
    keep_attached: bool,
    /// Seconds between checks of the config file for changes (0.05 to 86400).
    #[arg(long, default_value = "1", value_parser = seconds(0.05))]
    watch_interval: Duration,
    /// Capacity of the service VIP map.
    #[arg(long, default_value_t = MapSizes::default().vips, value_parser = map_size())]
    max_vips: u32,
    /// Capacity of the workload address map.
    #[arg(long, default_value_t = MapSizes::default().workload_ips, value_parser = map_size())]
    max_workload_ips: u32,
    /// Capacity of the endpoint map (all services, all priorities).
    #[arg(long, default_value_t = MapSizes::default().endpoints, value_parser = map_size())]
    max_endpoints: u32,
    #[arg(long, default_value_t = MapSizes::default().enrolled_netns, value_parser = map_size())]
    max_enrolled_netns: u32,
    /// Capacity of the map of workloads' own target ports (where a
    /// workload's port list differs from its service's).
    #[arg(long, default_value_t = MapSizes::default().port_overrides, value_parser = map_size())]
    max_port_overrides: u32,
    /// Capacity of the socket map: two entries per accelerated connection,
    /// one per connection to a waypoint until the TLV is sent; also of the
    /// per-connection map (km_conn, one entry per connection with an end
    /// in the socket map, until its connecting end closes).
    #[arg(long, default_value_t = MapSizes::default().sockets, value_parser = map_size())]
    max_sockets: u32,
    /// Capacity of each authorization table (verdicts, identity, port and
    /// source-address classes) the policies of this node's destinations
    /// compile to.
    #[arg(long, default_value_t = MapSizes::default().authz_entries, value_parser = map_size())]
    max_authz_entries: u32,
    /// Same-host acceleration: data between two enrolled sockets on this
    /// host skips the TCP/IP stack (also config key "accelerate").
    #[arg(long, env = "KMESH_ACCELERATE")]
    accelerate: bool,
    /// Bytes an accelerated receiver may leave unread before its sender
    /// falls back to TCP's flow control, 0 for no limit (also config key
    /// "accel_queue_limit"; default 4 MiB).
    #[arg(long, env = "KMESH_ACCEL_QUEUE_LIMIT")]
    accel_queue_limit: Option<u32>,
    /// This node's locality, region/zone/subzone, for locality-aware load
    /// balancing (Istio's LoadBalancing routing preferences).
    #[arg(long, env = "KMESH_LOCALITY", default_value = "")]
    locality: String,
    /// This node's name (the NODE scope).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// This node's network (the NETWORK scope).
    #[arg(long, env = "KMESH_NETWORK", default_value = "")]
    network: String,
    /// DNS servers for hostname workloads (ServiceEntry resolution DNS),
    /// IP or IP:port, comma-separated [default: those of /etc/resolv.conf].
    #[arg(long, env = "KMESH_DNS_SERVERS", value_delimiter = ',', value_parser = parse_dns_server)]
    dns_server: Vec<SocketAddr>,
    /// Longest time between lookups of a hostname, whatever its TTL (s).
    #[arg(long, default_value = "15", value_parser = seconds(0.001))]
    dns_max_refresh: Duration,
    /// Shortest time between lookups of a hostname, for TTLs of 0 (s).
    #[arg(long, default_value = "1", value_parser = seconds(0.001))]
    dns_min_refresh: Duration,
    /// Time to wait for a DNS server's answer (s).
    #[arg(long, default_value = "5", value_parser = seconds(0.001))]
    dns_timeout: Duration,
    /// Prometheus metrics (/metrics, /stats/prometheus): IP:PORT or "off".
    #[arg(long, env = "KMESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    metrics_addr: Listen,
    /// Admin HTTP (/config_dump, /logging, /stats): IP:PORT or "off". It
    /// can change the log level: keep it on loopback.
    #[arg(long, env = "KMESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: Listen,
    /// Readiness probe (/healthz/ready): IP:PORT or "off".
    #[arg(long, env = "KMESH_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    readiness_addr: Listen,
    /// Count the BPF programs' runs and run time (metrics
    /// kmesh_bpf_program_*) while the daemon runs. Costs two clock reads
    /// per program run, i.e. per connect on this host.
    #[arg(long, env = "KMESH_BPF_STATS")]
    bpf_stats: bool,
    /// Connection telemetry (istio_tcp_* metrics, the access log): on or
    /// off. On by default, as ztunnel's metrics are always on: a mesh's
    /// dashboards (Kiali, Grafana) need them; off saves the sockops
    /// program's runs on every TCP connection of the cgroup.
    #[arg(long, env = "KMESH_TELEMETRY", default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    telemetry: bool,
    /// Size of the telemetry ring buffer in bytes (a power of two, 4096 to
    /// 1 GiB; 96 bytes per event, two events per connection end). When the
    /// reader falls behind by this much, events are counted as lost.
    #[arg(long, env = "KMESH_TELEMETRY_RING_BYTES", default_value = "4194304", value_parser = ring_bytes)]
    telemetry_ring_bytes: u32,
    /// One line per closed connection on stderr: off, text or json (the
    /// config file's access_log key overrides; switch at run time with
    /// `kmesh ctl access-log` or POST /access_log?format=).
    #[arg(long, env = "KMESH_ACCESS_LOG", default_value = "off")]
    access_log: kmesh::telemetry::Format,
    /// Enroll pods the CNI plugin asks for over the admin socket (implied
    /// by --cni-conf-dir).
    #[arg(long, env = "KMESH_CNI")]
    cni: bool,
    /// Install the CNI plugin: append a kmesh-cni entry to the first
    /// *.conflist of this directory (e.g. /etc/cni/net.d), kept there while
    /// the daemon runs.
    #[arg(long, env = "KMESH_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// Where the plugin binary is copied to (as kmesh-cni).
    #[arg(long, env = "KMESH_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// Record of the pods the plugin enrolled, re-enrolled at start
    /// [default: cni-pods.json beside the admin socket].
    #[arg(long, env = "KMESH_CNI_STATE_FILE")]
    cni_state_file: Option<PathBuf>,
    /// Leave the conflist entry in place when the daemon stops.
    #[arg(long, env = "KMESH_CNI_KEEP_CONFIG")]
    cni_keep_config: bool,
    /// The admin socket's path as the plugin sees it on the node
    /// [default: --admin-socket].
    #[arg(long, env = "KMESH_CNI_ADMIN_SOCKET")]
    cni_admin_socket: Option<PathBuf>,
    /// Kubeconfig (its path on the node) the plugin reads pod labels with.
    /// When the daemon runs in a pod, it writes this file into
    /// --cni-conf-dir from its service account (keep it in the node's CNI
    /// conf dir).
    #[arg(long, env = "KMESH_CNI_KUBECONFIG")]
    cni_kubeconfig: Option<PathBuf>,
    /// Static rule for nodes without API access: enroll every pod.
    #[arg(long, env = "KMESH_CNI_ENROLL_ALL")]
    cni_enroll_all: bool,
    /// Static rule: enroll the pods of these namespaces (comma-separated).
    #[arg(long, env = "KMESH_CNI_ENROLL_NAMESPACES", value_delimiter = ',')]
    cni_enroll_namespace: Vec<String>,
}

/// An admin-socket request: the command, and its argument when given.
fn with_arg(cmd: &str, arg: Option<String>) -> String {
    match arg {
        Some(a) => format!("{cmd} {}", a.trim()),
        None => cmd.to_string(),
    }
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?} is not on or off")),
    }
}

fn ring_bytes(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if !(4096..=1 << 30).contains(&v) || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two from 4096 to 1073741824"));
    }
    Ok(v)
}

fn cni_options(a: &DaemonArgs) -> Option<kmesh::cni::CniOptions> {
    use kmesh::cni::{decide::StaticRule, install::InstallOptions, CniOptions};
    if !a.cni && a.cni_conf_dir.is_none() {
        return None;
    }
    let state_file = a.cni_state_file.clone().unwrap_or_else(|| {
        a.admin_socket
            .parent()
            .unwrap_or(std::path::Path::new("/run/kmesh"))
            .join("cni-pods.json")
    });
    let rule = (a.cni_enroll_all || !a.cni_enroll_namespace.is_empty()).then(|| StaticRule {
        all: a.cni_enroll_all,
        namespaces: a.cni_enroll_namespace.clone(),
    });
    let install = a.cni_conf_dir.clone().map(|conf_dir| InstallOptions {
        conf_dir,
        bin_dir: a.cni_bin_dir.clone(),
        keep_config: a.cni_keep_config,
        admin_socket: a
            .cni_admin_socket
            .clone()
            .unwrap_or_else(|| a.admin_socket.clone()),
        kubeconfig: a.cni_kubeconfig.clone(),
        rule,
    });
    Some(CniOptions {
        state_file,
        install,
    })
}

/// Largest map capacity a flag takes. Each map is a hash table whose
/// bucket array (16 bytes per bucket, rounded up to a power of two) the
/// kernel allocates whole at creation, so 2^22 entries already cost 64 MiB
/// before anything is stored; and 4M addresses, endpoints, netns or
/// sockets is far beyond one node (Kubernetes supports 150k pods per
/// cluster; a node's sockets are bounded by its file descriptors). Larger
/// values failed inside the BPF loader with a bare EINVAL or E2BIG.
const MAX_MAP_SIZE: i64 = 1 << 22;

fn map_size() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=MAX_MAP_SIZE)
}

/// A number of seconds from `min` to a day: finite and positive, so that
/// Duration::from_secs_f64 cannot panic (inf, NaN) and a zero interval
/// cannot spin.
fn seconds(min: f64) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        const DAY: f64 = 86_400.0;
        let v: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number of seconds"))?;
        if !(min..=DAY).contains(&v) {
            return Err(format!("{s} is not in {min}..={DAY} seconds"));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is not an IP address or IP:port"))
}

fn dns_config(a: &DaemonArgs) -> Result<DnsConfig, String> {
    let max_refresh = a.dns_max_refresh;
    if a.dns_min_refresh > max_refresh {
        return Err(format!(
            "--dns-min-refresh {:?} exceeds --dns-max-refresh {max_refresh:?}",
            a.dns_min_refresh
        ));
    }
    Ok(DnsConfig {
        upstream: match a.dns_server.as_slice() {
            [] => Upstream::System,
            s => Upstream::Servers(s.to_vec()),
        },
        min_refresh: a.dns_min_refresh,
        max_refresh,
        backoff_initial: max_refresh.min(Duration::from_secs(1)),
        backoff_max: max_refresh,
        query_timeout: a.dns_timeout,
    })
}

/// "region/zone/subzone", any part may be missing.
fn local_node(a: &DaemonArgs) -> LocalNode {
    let mut parts = a.locality.splitn(3, '/').map(str::to_string);
    LocalNode {
        placement: Placement {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
            node: a.node_name.clone(),
            cluster: a.cluster_id.clone(),
        },
        network: a.network.clone(),
    }
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Print the live BPF maps as JSON, with ids decoded into names.
    Dump {
        #[arg(long, env = "KMESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        /// Seconds to wait for the daemon to accept, to start answering,
        /// and between parts of the answer.
        #[arg(long, default_value = "10", value_parser = seconds(0.001))]
        timeout: Duration,
    },
    /// Show the daemon's log filter, or set it (e.g. debug, or
    /// kmesh=debug,info); lasts until the daemon restarts.
    LogLevel {
        level: Option<String>,
        #[arg(long, env = "KMESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        #[arg(long, default_value = "10", value_parser = seconds(0.001))]
        timeout: Duration,
    },
    /// Print the daemon's metrics (Prometheus/OpenMetrics text), as its
    /// metrics port serves them, without needing that port.
    Metrics {
        #[arg(long, env = "KMESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        #[arg(long, default_value = "10", value_parser = seconds(0.001))]
        timeout: Duration,
    },
    /// Show the access log's format, or switch it (off, text, json);
    /// lasts until the daemon restarts or the config file's key changes.
    AccessLog {
        format: Option<String>,
        #[arg(long, env = "KMESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        #[arg(long, default_value = "10", value_parser = seconds(0.001))]
        timeout: Duration,
    },
    /// Validate a config file without touching the kernel.
    CheckConfig { file: PathBuf },
}

const ISTIOD: &str = "https://istiod.istio-system.svc:15012";

/// xDS settings: explicit --xds-address, or istiod when there is no config
/// file (a DaemonSet next to istiod); none for a bare host with a file.
fn xds_options(a: &DaemonArgs) -> Option<XdsOptions> {
    let address = match (&a.xds_address, &a.config) {
        (Some(addr), _) => addr.clone(),
        (None, None) => ISTIOD.to_string(),
        (None, Some(_)) => return None,
    };
    let (default_id, metadata) =
        xds::client::node_identity(|k| std::env::var(k).ok(), &a.cluster_id);
    if std::env::var("INSTANCE_IP").map_or(true, |v| v.is_empty()) && a.node_id.is_none() {
        tracing::info!(
            "INSTANCE_IP is not set (not in a pod): the xDS node id carries {} as ztunnel's does",
            xds::client::DEFAULT_INSTANCE_IP
        );
    }
    let node_id = a.node_id.clone().unwrap_or(default_id);
    Some(XdsOptions {
        address,
        ca_file: Some(a.xds_ca_file.clone()),
        token_file: Some(a.xds_token_file.clone()),
        node_id,
        metadata,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(15),
    })
}

fn main() -> ExitCode {
    // The runtime runs the plugin by its installed name with no arguments;
    // its stdout is the CNI result alone.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let as_plugin = std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == kmesh::cni::install::PLUGIN_TYPE);
    if as_plugin || std::env::args().nth(1).as_deref() == Some("cni") {
        return kmesh::cni::plugin::main();
    }
    daemon::one_malloc_arena();
    let log = logging::init("KMESH_LOG", "info");
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kmesh: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = rt.block_on(async {
        match cli.cmd {
            Cmd::Cni => unreachable!("dispatched before the runtime starts"),
            Cmd::Version => {
                println!("kmesh {}", env!("CARGO_PKG_VERSION"));
                Ok(())
            }
            Cmd::Daemon(a) => {
                let xds = xds_options(&a);
                let local = local_node(&a);
                let dns = dns_config(&a)?;
                let cni = cni_options(&a);
                let cgroup = match a.cgroup {
                    Some(c) => c,
                    None => {
                        sys::cgroup2_mount().map_err(|e| format!("finding cgroup2 mount: {e}"))?
                    }
                };
                sys::check_cgroup2(&cgroup)?;
                let opts = daemon::Options {
                    cni,
                    xds,
                    local,
                    dns,
                    accelerate: a.accelerate,
                    accel_queue_limit: a.accel_queue_limit,
                    config: a.config,
                    cgroup,
                    bpffs: a.bpffs,
                    admin_socket: a.admin_socket,
                    keep_attached: a.keep_attached,
                    sizes: MapSizes {
                        vips: a.max_vips,
                        workload_ips: a.max_workload_ips,
                        endpoints: a.max_endpoints,
                        enrolled_netns: a.max_enrolled_netns,
                        port_overrides: a.max_port_overrides,
                        sockets: a.max_sockets,
                        authz_entries: a.max_authz_entries,
                    },
                    watch_interval: a.watch_interval,
                    http: HttpOptions {
                        metrics: a.metrics_addr,
                        admin: a.admin_addr,
                        readiness: a.readiness_addr,
                    },
                    bpf_stats: a.bpf_stats,
                    telemetry: a.telemetry.then_some(a.telemetry_ring_bytes),
                    access_log: a.access_log,
                    log: Some(log),
                };
                daemon::run(opts).await.map_err(|e| e.to_string())
            }
            Cmd::Ctl {
                cmd:
                    cmd @ (CtlCmd::Dump { .. }
                    | CtlCmd::LogLevel { .. }
                    | CtlCmd::Metrics { .. }
                    | CtlCmd::AccessLog { .. }),
            } => {
                // One request over the admin socket, its answer printed.
                let (admin_socket, timeout, request) = match cmd {
                    CtlCmd::Dump {
                        admin_socket,
                        timeout,
                    } => (admin_socket, timeout, "dump".to_string()),
                    CtlCmd::LogLevel {
                        level,
                        admin_socket,
                        timeout,
                    } => (admin_socket, timeout, with_arg("log-level", level)),
                    CtlCmd::Metrics {
                        admin_socket,
                        timeout,
                    } => (admin_socket, timeout, "metrics".to_string()),
                    CtlCmd::AccessLog {
                        format,
                        admin_socket,
                        timeout,
                    } => (admin_socket, timeout, with_arg("access-log", format)),
                    CtlCmd::CheckConfig { .. } => unreachable!("matched above"),
                };
                let out = admin::request(&admin_socket, &request, timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                print!("{out}");
                Ok(())
            }
            Cmd::Ctl {
                cmd: CtlCmd::CheckConfig { file },
            } => {
                let m = config::check(&file).map_err(|e| e.to_string())?;
                println!("{}: ok ({m})", file.display());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmesh: {e}");
            ExitCode::FAILURE
        }
    }
}
