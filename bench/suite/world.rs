//! The suite's test world: a client pod and a server pod on one node
//! bridge, both in the harness's child cgroup, with the servers (kmesh-load
//! echo/sink, sockperf, iperf3, qperf) and the user-space proxy running in the
//! server pod, the daemon started in whichever state a mode needs, and a
//! peer's state (peers.rs) set up in the client pod for a peer mode.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    harness::{Daemon, Env, Pod},
    peers::{self, Peer},
};

pub const LOAD: &str = env!("CARGO_BIN_EXE_kmesh-load");
pub const KMESH: &str = crate::harness::KMESH;

const VIP: &str = "10.96.0.10";

/// A server the client reaches: its port in the server pod, the service
/// port on the VIP, and the proxy's listening port for it.
#[derive(Clone, Copy)]
pub enum Server {
    Load,
    Sockperf,
    Iperf,
    /// qperf's control connection; its test connection goes to QperfData,
    /// a port the client names (`--ip_port`) and the server reports back,
    /// so both keep their numbers through the VIP (not through the proxy,
    /// which would have to rewrite the port the server reports).
    Qperf,
    QperfData,
}

impl Server {
    const ALL: [Server; 5] = [
        Server::Load,
        Server::Sockperf,
        Server::Iperf,
        Server::Qperf,
        Server::QperfData,
    ];

    fn ports(self) -> (u16, u16, u16) {
        match self {
            // The VIP's port differs from the target port so the redirect
            // also rewrites the port, as a Kubernetes service usually does.
            Server::Load => (8080, 80, 15080),
            Server::Sockperf => (11111, 11111, 15111),
            Server::Iperf => (5201, 5201, 15201),
            Server::Qperf => (19765, 19765, 15765),
            Server::QperfData => (19766, 19766, 15766),
        }
    }
}

/// The paths the suite compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Client to the server pod's IP, no kmesh programs attached.
    Direct,
    /// Client to the service VIP, redirected by connect4.
    Mesh,
    /// As Mesh, with the daemon flags of KMESH_BENCH_MESH_VARIANT.
    MeshVariant,
    /// As Mesh, with the daemon's `--accelerate` (same-host sockmap).
    Accel,
    /// Client to a user-space TCP proxy in the server pod (a sidecar or
    /// waypoint stand-in), no kmesh programs attached.
    Proxy,
    /// Peer: kube-proxy's nftables mode (DNAT), no daemon.
    Nftables,
    /// Peer: kube-proxy's IPVS mode, no daemon.
    Ipvs,
    /// Peer: HAProxy in TCP mode on the VIP in the client pod, no daemon.
    Haproxy,
}

/// A mesh row with extra daemon flags: (label, flags).
pub type Variant = (String, Vec<String>);

static VARIANT: OnceLock<Option<Variant>> = OnceLock::new();

/// Parses KMESH_BENCH_MESH_VARIANT ("label:--flag value ..."); None if
/// unset, a message naming what is wrong if malformed.
pub fn parse_variant(v: &str) -> Result<Variant, String> {
    let (label, flags) = v.split_once(':').ok_or_else(|| {
        format!("KMESH_BENCH_MESH_VARIANT {v:?}: expected \"label:--flag value ...\"")
    })?;
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if label.is_empty() || !label.chars().all(ok) {
        return Err(format!(
            "KMESH_BENCH_MESH_VARIANT: label {label:?} must be letters, digits, - or _"
        ));
    }
    let flags: Vec<String> = flags.split_whitespace().map(String::from).collect();
    if flags.first().is_none_or(|f| !f.starts_with("--")) {
        return Err(format!(
            "KMESH_BENCH_MESH_VARIANT: {v:?} names no daemon flag after the label"
        ));
    }
    Ok((label.to_string(), flags))
}

/// Sets the variant once, before any Mode is printed.
pub fn set_variant(v: Option<Variant>) {
    VARIANT.set(v).expect("variant set twice");
}

pub fn variant() -> Option<&'static Variant> {
    VARIANT.get().and_then(|v| v.as_ref())
}

impl Mode {
    pub const ALL: [Mode; 8] = [
        Mode::Direct,
        Mode::Mesh,
        Mode::MeshVariant,
        Mode::Accel,
        Mode::Proxy,
        Mode::Nftables,
        Mode::Ipvs,
        Mode::Haproxy,
    ];

    pub fn is_peer(self) -> bool {
        matches!(self, Mode::Nftables | Mode::Ipvs | Mode::Haproxy)
    }

    /// The kmesh modes a peer must beat (or not) on each row.
    pub fn is_ours(self) -> bool {
        matches!(self, Mode::Mesh | Mode::MeshVariant | Mode::Accel)
    }

    fn daemon(self) -> State {
        match self {
            Mode::Direct | Mode::Proxy | Mode::Nftables | Mode::Ipvs | Mode::Haproxy => State::Off,
            Mode::Mesh => State::Plain,
            Mode::MeshVariant => State::Variant,
            Mode::Accel => State::Accelerated,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct",
            Mode::Mesh => "mesh",
            Mode::MeshVariant => {
                return write!(f, "mesh-{}", variant().map_or("variant", |v| v.0.as_str()))
            }
            Mode::Accel => "accel",
            Mode::Proxy => "proxy",
            Mode::Nftables => "nftables",
            Mode::Ipvs => "ipvs",
            Mode::Haproxy => "haproxy",
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Off,
    Plain,
    Variant,
    Accelerated,
}

pub struct World {
    daemon: Option<Daemon>,
    state: State,
    /// The peer whose state is set up now, and for which mode.
    peer: Option<(Mode, Peer)>,
    procs: Vec<Child>,
    pub client: Pod,
    pub server: Pod,
    pub cpu: Option<usize>,
    pub accel_supported: bool,
    /// Why IPVS cannot run here, if it cannot.
    pub ipvs_missing: Option<String>,
    /// Daemon counters summed over every daemon run, per daemon state.
    pub stats: BTreeMap<String, BTreeMap<String, u64>>,
    // Last: dropped after the processes living in its namespaces.
    pub env: Env,
}

/// `sh -c 'join CGROUP; exec ip netns exec NS [taskset -c CPU] ARGV…'`: a
/// Debian tool run as a pod's process would be, inside both. The cgroup is
/// joined first because `ip netns exec` remounts /sys, hiding cgroupfs.
fn in_pod(pod: &Pod, cgroup: &std::path::Path, cpu: Option<usize>, argv: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c");
    c.arg(format!(
        "echo $$ > {}/cgroup.procs && exec \"$@\"",
        cgroup.display()
    ));
    c.args(["sh", "ip", "netns", "exec", &pod.netns]);
    if let Some(cpu) = cpu {
        c.args(["taskset", "-c", &cpu.to_string()]);
    }
    c.args(argv);
    c
}

pub fn listening(pod: &Pod, port: u16) -> bool {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.netns, "ss", "-Hltn"])
        .arg(format!("sport = :{port}"))
        .output()
        .expect("ss");
    !out.stdout.is_empty()
}

impl World {
    pub fn new(cpu: Option<usize>) -> World {
        let mut env = Env::new();
        let client = env.pod(1, &[]);
        let server = env.pod(2, &[]);
        for p in [&client, &server] {
            // Scoped to the test namespaces: room for a connect-rate run's
            // ports, and reuse of the proxy's closed upstream connections.
            let st = Command::new("ip")
                .args(["netns", "exec", &p.netns, "sysctl", "-qw"])
                .args([
                    "net.ipv4.ip_local_port_range=1024 65000",
                    "net.ipv4.tcp_tw_reuse=1",
                ])
                .status()
                .expect("sysctl");
            assert!(st.success(), "sysctl in {}", p.netns);
        }
        let help = Command::new(KMESH)
            .args(["daemon", "--help"])
            .output()
            .expect("kmesh daemon --help");
        let accel_supported = String::from_utf8_lossy(&help.stdout).contains("--accelerate");
        let ipvs_missing = peers::ipvs_probe(&client.netns).err();
        let mut w = World {
            daemon: None,
            state: State::Off,
            peer: None,
            ipvs_missing,
            procs: Vec::new(),
            client,
            server,
            cpu,
            accel_supported,
            stats: BTreeMap::new(),
            env,
        };
        w.start_servers();
        w
    }

    fn spawn_server(&mut self, mut cmd: Command, port: u16) {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        self.procs.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(&self.server, port) {
            assert!(Instant::now() < deadline, "nothing listens on :{port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_servers(&mut self) {
        let (load, sp, ip) = (
            Server::Load.ports().0,
            Server::Sockperf.ports().0,
            Server::Iperf.ports().0,
        );
        let cmd = self.load_cmd(&self.server, "serve");
        let mut c = cmd;
        c.args(["--listen", &format!("0.0.0.0:{load}")]);
        self.spawn_server(c, load);
        let sp_s = sp.to_string();
        let c = self.tool(
            &self.server,
            &["sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", &sp_s],
        );
        self.spawn_server(c, sp);
        let ip_s = ip.to_string();
        let c = self.tool(&self.server, &["iperf3", "-s", "-p", &ip_s]);
        self.spawn_server(c, ip);
        let qp_s = Server::Qperf.ports().0.to_string();
        let c = self.tool(&self.server, &["qperf", "--listen_port", &qp_s]);
        self.spawn_server(c, Server::Qperf.ports().0);
        // The proxy relays to the servers over the pod's loopback, as a
        // sidecar does to its application.
        let mut c = self.load_cmd(&self.server, "proxy");
        for s in [Server::Load, Server::Sockperf, Server::Iperf] {
            let (target, _, px) = s.ports();
            c.args(["--route", &format!("0.0.0.0:{px}=127.0.0.1:{target}")]);
        }
        self.spawn_server(c, Server::Load.ports().2);
    }

    /// kmesh-load in `pod`, in the test cgroup, pinned if asked.
    fn load_cmd(&self, pod: &Pod, sub: &str) -> Command {
        let mut c = Command::new(LOAD);
        c.args(["--netns", &pod.path()]);
        c.args(["--cgroup", self.env.cgroup.to_str().unwrap()]);
        if let Some(cpu) = self.cpu {
            c.args(["--cpu", &cpu.to_string()]);
        }
        c.arg(sub);
        c
    }

    pub fn tool(&self, pod: &Pod, argv: &[&str]) -> Command {
        in_pod(pod, &self.env.cgroup, self.cpu, argv)
    }

    /// Runs the load client in the client pod; its JSON line, or the error.
    pub fn load(&self, sub: &str, args: &[String]) -> Result<Value, String> {
        let out = self
            .load_cmd(&self.client, sub)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("kmesh-load output: {e}"))
    }

    /// Where the client connects for `server` in `mode`.
    pub fn addr(&self, mode: Mode, server: Server) -> SocketAddr {
        let (target, svc, px) = server.ports();
        match mode {
            Mode::Direct => SocketAddr::new(self.server.v4, target),
            Mode::Mesh | Mode::MeshVariant | Mode::Accel => {
                SocketAddr::new(VIP.parse().unwrap(), svc)
            }
            // The client sees the VIP: the peers translate beneath it.
            Mode::Nftables | Mode::Ipvs | Mode::Haproxy => {
                SocketAddr::new(VIP.parse().unwrap(), svc)
            }
            Mode::Proxy => SocketAddr::new(self.server.v4, px),
        }
    }

    /// The peer the client's socket must end up connected to: proves the
    /// mesh modes were redirected rather than reaching something else.
    pub fn expected_peer(&self, mode: Mode, server: Server) -> SocketAddr {
        match mode {
            Mode::Mesh | Mode::MeshVariant | Mode::Accel => {
                SocketAddr::new(self.server.v4, server.ports().0)
            }
            _ => self.addr(mode, server),
        }
    }

    fn config(&self) -> Value {
        let ports: Vec<Value> = Server::ALL
            .iter()
            .map(|s| json!({"service_port": s.ports().1, "target_port": s.ports().0}))
            .collect();
        json!({
            "enroll": {"netns": Env::enroll_list(&[&self.client, &self.server])},
            "services": [{
                "name": "web", "namespace": "bench", "hostname": "web.bench.svc.cluster.local",
                "addresses": [VIP], "ports": ports,
            }],
            "workloads": [{
                "uid": "Kubernetes//Pod/bench/web-1", "name": "web-1", "namespace": "bench",
                "addresses": [self.server.v4.to_string()],
                "services": {"bench/web.bench.svc.cluster.local": {}},
            }],
        })
    }

    /// CPU time (user + system) the running daemon has used, from
    /// /proc/PID/stat; None when no daemon runs.
    pub fn daemon_cpu_seconds(&self) -> Option<f64> {
        let pid = self.daemon.as_ref()?.pid();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which may hold spaces: utime and
        // stime are the 14th and 15th fields of the line.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()?? as f64)
    }

    fn stop_daemon(&mut self) {
        let Some(mut d) = self.daemon.take() else {
            return;
        };
        // Not Daemon::dump, which panics: a daemon that died mid-run must
        // not take the suite (and its clean-up) with it.
        let stats = Command::new(KMESH)
            .args(["ctl", "dump", "--admin-socket", d.sock.to_str().unwrap()])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .map(|v| v["stats"].clone())
            .unwrap_or_default();
        let sum = self.stats.entry(format!("{:?}", self.state)).or_default();
        if let Some(m) = stats.as_object() {
            for (k, v) in m {
                *sum.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        d.stop();
    }

    /// Puts the daemon in the state `mode` needs (not running, running,
    /// with the variant's flags or with `--accelerate`) and sets up the
    /// peer a peer mode needs, removing any other's first.
    pub fn enter(&mut self, mode: Mode) -> Result<(), String> {
        if self.peer.as_ref().is_some_and(|(m, _)| *m != mode) {
            self.peer = None;
        }
        self.enter_daemon(mode.daemon())?;
        if mode.is_peer() && self.peer.is_none() {
            self.peer = Some((mode, self.start_peer(mode)?));
        }
        Ok(())
    }

    fn start_peer(&self, mode: Mode) -> Result<Peer, String> {
        let vip = VIP.parse().unwrap();
        let backend = self.server.v4;
        let ports: Vec<peers::PortMap> = Server::ALL
            .iter()
            .map(|s| (s.ports().1, s.ports().0))
            .collect();
        match mode {
            Mode::Nftables => Peer::nftables(&self.client, vip, backend, &ports),
            Mode::Ipvs => Peer::ipvs(&self.client, vip, backend, &ports),
            Mode::Haproxy => {
                let cfg = self.env.dir.join("haproxy.cfg");
                let cmd = in_pod(&self.client, &self.env.cgroup, self.cpu, &[]);
                Peer::haproxy(&self.client, vip, backend, &ports, &cfg, cmd)
            }
            m => Err(format!("{m} is not a peer")),
        }
    }

    fn enter_daemon(&mut self, want: State) -> Result<(), String> {
        if want == self.state && (want == State::Off || self.daemon.is_some()) {
            return Ok(());
        }
        self.stop_daemon();
        self.state = want;
        let extra: Vec<&str> = match want {
            State::Off => return Ok(()),
            State::Plain => vec![],
            State::Variant => {
                variant().map_or(vec![], |v| v.1.iter().map(String::as_str).collect())
            }
            State::Accelerated => vec!["--accelerate"],
        };
        let config = self.config();
        let d = self.env.daemon_args(&config, &extra)?;
        // KMESH_BENCH_DAEMON_CPU=other: keep the daemon off the measured
        // CPU; by default it goes where the scheduler puts it, as in
        // production.
        let other = std::env::var("KMESH_BENCH_DAEMON_CPU").is_ok_and(|v| v == "other");
        if let (Some(cpu), true) = (self.cpu, other) {
            keep_off_cpu(d.pid(), cpu);
        }
        self.daemon = Some(d);
        Ok(())
    }

    /// Stops the daemon and removes any peer's state.
    pub fn leave_daemon(&mut self) {
        self.peer = None;
        self.stop_daemon();
        self.state = State::Off;
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.peer = None;
        self.stop_daemon();
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Moves every thread of process `pid` off `cpu`, the one the measured
/// client and servers share, to tell the data path's cost from the
/// daemon's (reported apart, as cpu10k). It did not move the telemetry
/// connect ratio beyond the runs' noise (docs/benchmarks.md), hence not
/// the default. Threads started later inherit the mask from their
/// parent. On one CPU there is nowhere else to go.
fn keep_off_cpu(pid: u32, cpu: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::{sysconf, Pid, SysconfVar};
    // Not this process's own mask: it may be pinned for the moment.
    let online = match sysconf(SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(n)) if n > 1 => (n as usize).min(CpuSet::count()),
        _ => return,
    };
    let mut set = CpuSet::new();
    for c in (0..online).filter(|&c| c != cpu) {
        set.set(c).expect("cpu below CpuSet::count");
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
            // A thread that ended meanwhile: nothing to move.
            let _ = sched_setaffinity(Pid::from_raw(tid), &set);
        }
    }
}
