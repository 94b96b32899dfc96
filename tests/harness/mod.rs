//! Shared harness for system tests: real namespaces, cgroups, BPF and
//! sockets. Everything created is named `kmt<pid>x<n>…` and removed by Drop
//! guards; leftovers of test processes that died are swept at start.
#![allow(dead_code)]

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};

mod daemon;
pub mod dns;
pub mod http;
pub mod kube;
pub mod load;
mod system;
pub mod xds;

#[allow(unused_imports)] // not every test binary uses each
pub use daemon::{wait_or_kill, Daemon};
use system::*;

pub const PROBE: &str = env!("CARGO_BIN_EXE_kmesh-probe");
pub const KMESH: &str = env!("CARGO_BIN_EXE_kmesh");

/// How many times slower than this machine the kernel under test runs:
/// `KMESH_TEST_TIME_SCALE` (scripts/kernels.sh sets it in emulated guests,
/// where loading the BPF programs alone takes seconds). Deadlines that wait
/// for the daemon scale with it; measured durations do not.
pub fn time_scale() -> u32 {
    std::env::var("KMESH_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// Takes a fresh value every 50 ms until `done` holds for it, for at most
/// `timeout` scaled by `time_scale`; then panics with the message `fail`
/// makes of the last value (only then: a dump is large to format).
pub fn poll_until<T>(
    timeout: Duration,
    mut get: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
    fail: impl FnOnce(T) -> String,
) -> T {
    let deadline = Instant::now() + timeout * time_scale();
    loop {
        let v = get();
        if done(&v) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("{}", fail(v));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the running kernel supports, probed as the daemon does.
pub fn kernel() -> &'static kmesh::bpf::KernelSupport {
    static K: std::sync::OnceLock<kmesh::bpf::KernelSupport> = std::sync::OnceLock::new();
    K.get_or_init(|| kmesh::bpf::KernelSupport::new(kmesh::bpf::Features::probe()))
}

/// Prints a skip line naming the test and the kernel's reason; never a
/// silent pass (scripts/kernels.sh counts these lines).
fn skip(test: &str, what: &str, why: &str) {
    let line = format!(
        "SKIP {test}: {what} is off on Linux {}: {why}",
        kernel().release
    );
    println!("{line}");
}

/// For a test that needs same-host acceleration: true (after printing why)
/// on a kernel that cannot run it.
pub fn skip_unless_acceleration(test: &str) -> bool {
    kernel()
        .acceleration
        .as_deref()
        .map(|why| skip(test, "acceleration", why))
        .is_some()
}

/// For a test that needs waypoints (sockops and sk_msg programs).
pub fn skip_unless_waypoints(test: &str) -> bool {
    kernel()
        .waypoints
        .as_deref()
        .map(|why| skip(test, "waypoints", why))
        .is_some()
}

static SEQ: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

fn cgroup_root() -> PathBuf {
    kmesh::sys::cgroup2_mount().expect("cgroup2 mounted")
}

/// A pod: its own netns with `eth0` on the node bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub netns: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

impl Pod {
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }
}

/// Result of one probe connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub ok: bool,
    pub name: String,
    pub peer: String,
    pub error: String,
    pub errno: Option<i64>,
    /// Milliseconds until connected and greeted, or until the error.
    pub ms: f64,
}

/// One test's world. Drop order: processes, namespaces, cgroups, mounts.
pub struct Env {
    pub tag: String,
    pub dir: PathBuf,
    /// Child cgroup the data path attaches to; clients run in it.
    pub cgroup: PathBuf,
    /// Child cgroup holding the test's servers (nothing attached).
    servers_cgroup: PathBuf,
    pub bpffs: PathBuf,
    netns: Vec<String>,
    node: String,
    children: Vec<Child>,
}

impl Env {
    /// `n` backend pods serving on their IPv4 :8080, named web-1..web-n.
    pub fn backends(&mut self, n: u8) -> Vec<Pod> {
        (1..=n)
            .map(|i| {
                let pod = self.pod(10 + i, &[]);
                self.serve(&pod, &[format!("{}:8080", pod.v4)], &format!("web-{i}"));
                pod
            })
            .collect()
    }

    pub fn new() -> Env {
        SWEEP.call_once(sweep);
        let tag = format!(
            "kmt{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&tag);
        fs::create_dir_all(&dir).unwrap();
        let root = cgroup_root();
        let cgroup = root.join(format!("{tag}c"));
        let servers_cgroup = root.join(format!("{tag}s"));
        let bpffs = dir.join("bpffs");
        let mut env = Env {
            tag: tag.clone(),
            dir,
            cgroup: cgroup.clone(),
            servers_cgroup: servers_cgroup.clone(),
            bpffs: bpffs.clone(),
            netns: Vec::new(),
            node: format!("{tag}node"),
            children: Vec::new(),
        };
        fs::create_dir(&cgroup).unwrap();
        fs::create_dir(&servers_cgroup).unwrap();
        fs::create_dir(&bpffs).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount bpffs");
        let node = env.node.clone();
        add_netns(&node);
        env.netns.push(node.clone());
        ip_batch(
            &node,
            &[
                "link add br0 type bridge".into(),
                "link set br0 up".into(),
                "link set lo up".into(),
            ],
        );
        env
    }

    /// The cgroup parent for podman's containers in this test
    /// (`--cgroup-parent`), removed with the env from every hierarchy:
    /// podman's default, `libpod_parent`, would stay behind in each.
    pub fn podman_cgroup_parent(&self) -> String {
        format!("/{}pod", self.tag)
    }

    /// How many programs the kernel has on the test cgroup for one attach
    /// type (e.g. libbpf_sys::BPF_CGROUP_SOCK_OPS), asked with
    /// BPF_PROG_QUERY rather than taken from the daemon's word.
    pub fn cgroup_progs(&self, attach_type: libbpf_sys::bpf_attach_type) -> u32 {
        use std::os::fd::AsRawFd;
        let dir = fs::File::open(&self.cgroup).unwrap();
        let (mut flags, mut ids, mut count) = (0u32, [0u32; 16], 16u32);
        // SAFETY: the pointers are to live locals; count is ids' length.
        let rc = unsafe {
            libbpf_sys::bpf_prog_query(
                dir.as_raw_fd(),
                attach_type,
                0,
                &mut flags,
                ids.as_mut_ptr(),
                &mut count,
            )
        };
        assert_eq!(rc, 0, "BPF_PROG_QUERY on {}", self.cgroup.display());
        count
    }

    /// Adds a pod netns with 10.244.0.<n>/24 and fd00:244::<n>/64 on the
    /// node bridge, plus any `extra` addresses (e.g. a decoy owning a VIP).
    pub fn pod(&mut self, n: u8, extra: &[&str]) -> Pod {
        let ns = format!("{}p{}", self.tag, n);
        add_netns(&ns);
        self.netns.push(ns.clone());
        let (node, peer) = (self.node.clone(), format!("v{n}"));
        ip_batch(
            &node,
            &[
                format!("link add eth0 netns {ns} type veth peer name {peer}"),
                format!("link set {peer} master br0 up"),
            ],
        );
        let v4 = format!("10.244.0.{n}");
        let v6 = format!("fd00:244::{n}");
        let mut cmds = vec![
            format!("addr add {v4}/24 dev eth0"),
            format!("addr add {v6}/64 dev eth0 nodad"),
        ];
        for a in extra {
            if a.contains(':') {
                cmds.push(format!("addr add {a}/128 dev eth0 nodad"));
            } else {
                cmds.push(format!("addr add {a}/32 dev eth0"));
            }
        }
        // Everything else is on-link, so an unredirected VIP reaches a decoy
        // that owns it, and nothing can leave the test's namespaces.
        cmds.extend(
            [
                "link set lo up",
                "link set eth0 up",
                "route add default dev eth0",
                "route add ::/0 dev eth0",
            ]
            .map(String::from),
        );
        ip_batch(&ns, &cmds);
        Pod {
            netns: ns,
            v4: v4.parse().unwrap(),
            v6: v6.parse().unwrap(),
        }
    }

    /// Deletes `pod`'s network namespace now (a pod gone while still
    /// listed somewhere).
    pub fn delete_netns(&mut self, pod: &Pod) {
        del_netns(&pod.netns);
        self.netns.retain(|n| *n != pod.netns);
    }

    /// Starts a probe server in `pod` on `listen` addresses, named `name`.
    pub fn serve(&mut self, pod: &Pod, listen: &[String], name: &str) {
        let cg = self.servers_cgroup.clone();
        self.spawn_server(pod, &cg, listen, &["serve", "--name", name]);
    }

    /// As `serve`, recording each accepted peer in the returned file (one
    /// line each): proof that a refused connection never reached it.
    pub fn serve_logged(&mut self, pod: &Pod, listen: &[String], name: &str) -> PathBuf {
        let log = self.dir.join(format!("accepted-{name}.log"));
        fs::write(&log, "").unwrap();
        let cg = self.servers_cgroup.clone();
        let args = [
            "serve",
            "--name",
            name,
            "--accept-log",
            log.to_str().unwrap(),
        ];
        self.spawn_server(pod, &cg, listen, &args);
        log
    }

    /// A server whose sockets are subject to the data path (the attached
    /// cgroup): needed where both ends take part (acceleration).
    pub fn serve_in_mesh(&mut self, pod: &Pod, listen: &[String], name: &str, extra: &[&str]) {
        let cg = self.cgroup.clone();
        let mut args = vec!["serve", "--name", name];
        args.extend_from_slice(extra);
        self.spawn_server(pod, &cg, listen, &args);
    }

    /// The TLV-aware test waypoint in `pod` (in the attached cgroup, so its
    /// own connection onwards is redirected); returns its log file.
    pub fn waypoint(&mut self, pod: &Pod, listen: &str) -> PathBuf {
        let log = self.dir.join(format!("waypoint-{}.log", pod.netns));
        let cg = self.cgroup.clone();
        let args = [
            "waypoint",
            "--log",
            log.to_str().unwrap(),
            "--listen",
            listen,
        ];
        self.spawn_server(pod, &cg, &[], &args);
        log
    }

    /// Runs the probe in `pod` inside the attached cgroup with `args`; one
    /// JSON value per output line, and whether it exited successfully.
    pub fn probe(&self, pod: &Pod, args: &[&str]) -> (Vec<Value>, bool) {
        let mut cmd = self.probe_cmd(pod, true);
        cmd.args(args);
        // Its waits (5 s by default) stretch with the kernel's slowness too.
        let timed = ["transfer", "reconnect", "fill", "after-close", "connect"];
        if time_scale() > 1
            && args.first().is_some_and(|a| timed.contains(a))
            && !args.contains(&"--timeout-ms")
        {
            cmd.args(["--timeout-ms", &(5000 * time_scale()).to_string()]);
        }
        let out = cmd.output().expect("run probe");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("probe line {l:?}: {e}")))
            .collect();
        (lines, out.status.success())
    }

    fn spawn_server(&mut self, pod: &Pod, cgroup: &Path, listen: &[String], args: &[&str]) {
        let mut cmd = Command::new(PROBE);
        cmd.args(["--netns", &pod.path(), "--cgroup", cgroup.to_str().unwrap()]);
        cmd.args(args);
        for l in listen {
            cmd.args(["--listen", l]);
        }
        self.spawn_listening(cmd, &args.join(" "));
    }

    /// Spawns a server that prints a "listening" line once it accepts, waits
    /// for that line, and keeps the child for Drop; returns its pid.
    pub fn spawn_listening(&mut self, mut cmd: Command, name: &str) -> u32 {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn server {name}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("listening"),
            "server {name} did not start: {line:?}"
        );
        let pid = child.id();
        self.children.push(child);
        pid
    }

    fn probe_cmd(&self, pod: &Pod, in_cgroup: bool) -> Command {
        let mut cmd = Command::new(PROBE);
        cmd.args(["--netns", &pod.path()]);
        if in_cgroup {
            cmd.args(["--cgroup", self.cgroup.to_str().unwrap()]);
        }
        cmd
    }

    /// `count` connections from `pod` (inside the attached cgroup) to `addr`.
    pub fn connect(&self, pod: &Pod, addr: &str, count: u32) -> Vec<Conn> {
        self.connect_opts(pod, addr, count, true)
    }

    pub fn connect_opts(&self, pod: &Pod, addr: &str, count: u32, in_cgroup: bool) -> Vec<Conn> {
        let out = self
            .probe_cmd(pod, in_cgroup)
            .args([
                "connect",
                addr,
                "--count",
                &count.to_string(),
                "--timeout-ms",
                "1000",
            ])
            .output()
            .expect("run probe");
        let text = String::from_utf8_lossy(&out.stdout);
        let conns: Vec<Conn> = text.lines().map(parse_conn).collect();
        assert_eq!(
            conns.len(),
            count as usize,
            "probe output: {text} stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        conns
    }

    /// Opens one connection and keeps it for `Held::echo`.
    pub fn hold(&mut self, pod: &Pod, addr: &str) -> Held {
        self.hold_args(pod, addr, &[])
    }

    /// As `hold`, from the fixed local address `bind`.
    pub fn hold_from(&mut self, pod: &Pod, addr: &str, bind: &str) -> Held {
        self.hold_args(pod, addr, &["--bind", bind])
    }

    fn hold_args(&mut self, pod: &Pod, addr: &str, extra: &[&str]) -> Held {
        let mut child = self
            .probe_cmd(pod, true)
            .args(["connect", addr, "--hold", "--timeout-ms", "2000"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn probe");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let conn = parse_conn(&line);
        Held {
            child,
            stdin,
            stdout,
            conn,
        }
    }

    /// Starts `kmesh daemon` on this env's cgroup and bpffs with `config`.
    pub fn daemon(&mut self, config: &Value) -> Daemon {
        self.daemon_args(config, &[]).expect("daemon starts")
    }

    /// Starts the daemon; Err(stderr) if it exits before serving. `extra`
    /// may name another `--bpffs` directory (it must be under `self.bpffs`).
    /// The HTTP servers are off unless `extra` turns them on (see
    /// `http::HttpPorts::args`).
    pub fn daemon_args(&mut self, config: &Value, extra: &[&str]) -> Result<Daemon, String> {
        self.daemon_named("", config, extra)
    }

    /// Client netns: a pod enrolled via the config's enroll list.
    pub fn enroll_list(pods: &[&Pod]) -> Value {
        Value::Array(pods.iter().map(|p| Value::String(p.path())).collect())
    }

    /// A waypoint's netns: enrolled, never sent to a waypoint itself.
    pub fn enroll_waypoint(pod: &Pod) -> Value {
        json!({"path": pod.path(), "waypoint": true})
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.netns.iter().rev() {
            del_netns(ns);
        }
        remove_cgroup(&self.cgroup, false);
        remove_cgroup(&self.servers_cgroup, false);
        let podman = self.podman_cgroup_parent();
        for m in cgroup_mounts() {
            remove_cgroup_tree(&m.join(podman.trim_start_matches('/')), false);
        }
        let _ = nix::mount::umount(&self.bpffs);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn parse_conn(line: &str) -> Conn {
    let v: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("probe line {line:?}: {e}"));
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Conn {
        ok: v["ok"].as_bool().unwrap_or(false),
        name: s("name"),
        peer: s("peer"),
        error: s("error"),
        errno: v["errno"].as_i64(),
        ms: v["ms"].as_f64().unwrap_or(f64::NAN),
    }
}

pub struct Held {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub conn: Conn,
}

impl Held {
    /// Sends a line on the held connection; returns the echoed line.
    pub fn echo(&mut self, msg: &str) -> Result<String, String> {
        writeln!(self.stdin, "{msg}").map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{line:?}: {e}"))?;
        if v["ok"].as_bool() == Some(true) {
            Ok(v["echo"].as_str().unwrap_or_default().to_string())
        } else {
            Err(v["error"].to_string())
        }
    }
}

impl Held {
    /// Echoes every 20 ms until an echo fails (the connection was closed
    /// under it): true if that happened within `within` (scaled).
    pub fn wait_closed(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within * time_scale();
        while self.echo("ping").is_ok() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Endpoint names of the first service in a dump, sorted.
pub fn endpoints(dump: &Value) -> Vec<String> {
    let mut v: Vec<String> = dump["services"][0]["endpoints"]["0"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Count of connections per server name; panics on any failed connection.
pub fn tally(conns: &[Conn]) -> std::collections::BTreeMap<String, u32> {
    let mut m = std::collections::BTreeMap::new();
    for c in conns {
        assert!(c.ok, "connection failed: {c:?}");
        *m.entry(c.name.clone()).or_insert(0) += 1;
    }
    m
}

/// A config with service web (VIP 10.96.0.10:80 -> 8080) backed by the
/// named pods, enrolling `enroll` (a netns list, e.g. `Env::enroll_list`).
pub fn web_config(enroll: Value, backends: &[(&str, &Pod)]) -> Value {
    let workloads: Vec<Value> = backends
        .iter()
        .map(|(name, pod)| {
            json!({
                "uid": format!("Kubernetes//Pod/default/{name}"), "name": name,
                "addresses": [pod.v4.to_string()],
                "services": {"default/web.default.svc.cluster.local": {}}
            })
        })
        .collect();
    json!({
        "enroll": {"netns": enroll},
        "services": [{
            "name": "web", "namespace": "default", "hostname": "web.default.svc.cluster.local",
            "addresses": ["10.96.0.10"],
            "ports": [{"service_port": 80, "target_port": 8080}]
        }],
        "workloads": workloads,
    })
}
