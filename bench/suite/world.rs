//! The suite's test world: a client pod and a server pod on one node
//! bridge, both in the harness's child cgroup, with the servers (kmesh-load
//! echo/sink, sockperf, iperf3, qperf) and the user-space proxy running in the
//! server pod, and the daemon started in whichever state a mode needs.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::harness::{Daemon, Env, Pod};

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

/// The four paths the suite compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Client to the server pod's IP, no kmesh programs attached.
    Direct,
    /// Client to the service VIP, redirected by connect4.
    Mesh,
    /// As Mesh, with the daemon's `--accelerate` (same-host sockmap).
    Accel,
    /// Client to a user-space TCP proxy in the server pod (a sidecar or
    /// waypoint stand-in), no kmesh programs attached.
    Proxy,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::Mesh, Mode::Accel, Mode::Proxy];

    fn daemon(self) -> State {
        match self {
            Mode::Direct | Mode::Proxy => State::Off,
            Mode::Mesh => State::Plain,
            Mode::Accel => State::Accelerated,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct",
            Mode::Mesh => "mesh",
            Mode::Accel => "accel",
            Mode::Proxy => "proxy",
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Off,
    Plain,
    Accelerated,
}

pub struct World {
    daemon: Option<Daemon>,
    state: State,
    procs: Vec<Child>,
    pub client: Pod,
    pub server: Pod,
    pub cpu: Option<usize>,
    pub accel_supported: bool,
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

fn listening(pod: &Pod, port: u16) -> bool {
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
        let mut w = World {
            daemon: None,
            state: State::Off,
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
            Mode::Mesh | Mode::Accel => SocketAddr::new(VIP.parse().unwrap(), svc),
            Mode::Proxy => SocketAddr::new(self.server.v4, px),
        }
    }

    /// The peer the client's socket must end up connected to: proves the
    /// mesh modes were redirected rather than reaching something else.
    pub fn expected_peer(&self, mode: Mode, server: Server) -> SocketAddr {
        match mode {
            Mode::Mesh | Mode::Accel => SocketAddr::new(self.server.v4, server.ports().0),
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

    /// Puts the daemon in the state `mode` needs: not running, running, or
    /// running with `--accelerate`.
    pub fn enter(&mut self, mode: Mode) -> Result<(), String> {
        let want = mode.daemon();
        if want == self.state && (want == State::Off || self.daemon.is_some()) {
            return Ok(());
        }
        self.stop_daemon();
        self.state = want;
        let extra: &[&str] = match want {
            State::Off => return Ok(()),
            State::Plain => &[],
            State::Accelerated => &["--accelerate"],
        };
        let config = self.config();
        self.daemon = Some(self.env.daemon_args(&config, extra)?);
        Ok(())
    }

    pub fn leave_daemon(&mut self) {
        self.stop_daemon();
        self.state = State::Off;
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_daemon();
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
