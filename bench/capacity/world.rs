//! The capacity benchmark's world: a client pod and a server pod on one
//! node bridge, both enrolled and in the harness's child cgroup, one
//! kmesh-load echo server per target port in the server pod, the daemon,
//! and `kmesh-load hold` clients in the client pod.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::harness::{load::Hold, Daemon, Env, Pod};

pub const VIP: &str = "10.96.0.10";
/// First service port; service port 81+i leads to target port 7000+i.
pub const SVC_PORT: u16 = 81;
pub const TARGET_PORT: u16 = 7000;
/// Echo size for the checks and the latency samples.
pub const SIZE: &str = "64";
/// Connections opened or checked at once, per client process.
pub const PARALLEL: &str = "256";

/// Per-namespace settings only (these sysctls are per netns): room for
/// the ports, and queues for a connect burst.
fn tune(pod: &Pod) {
    let st = Command::new("ip")
        .args(["netns", "exec", &pod.netns, "sysctl", "-qw"])
        .args([
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.core.somaxconn=65535",
            "net.ipv4.tcp_max_syn_backlog=65535",
        ])
        .status()
        .expect("run sysctl");
    assert!(st.success(), "sysctl in netns {} failed", pod.netns);
}

/// The open-file hard limit children will inherit, raised first to `want`
/// if this process may (the soft limit stays; kmesh-load raises its own).
pub fn fd_budget(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers; a refused setrlimit changes nothing.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_max < want {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_cur,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_max
}

pub struct World {
    daemon: Option<Daemon>,
    pub server_pids: Vec<u32>,
    addrs: Vec<String>,
    global: Vec<String>,
    /// Connections one hold process may keep.
    per_proc: usize,
    max_sockets: usize,
    client: Pod,
    server: Pod,
    // Last: dropped after the daemon and the processes in its namespaces.
    env: Env,
}

impl World {
    pub fn new(ports: usize, per_proc: usize, max_sockets: usize, cpu: Option<usize>) -> World {
        let mut env = Env::new();
        let client = env.pod(1, &[]);
        let server = env.pod(2, &[]);
        tune(&client);
        tune(&server);
        let global: Vec<String> = cpu
            .map(|c| vec!["--cpu".to_string(), c.to_string()])
            .unwrap_or_default();
        let g: Vec<&str> = global.iter().map(String::as_str).collect();
        // One server process per target port, so that no process needs
        // more descriptors than a hold client.
        let server_pids = (0..ports as u16)
            .map(|i| {
                let listen = format!("{}:{}", server.v4, TARGET_PORT + i);
                env.load_serve(&server, &[listen], &g)
            })
            .collect();
        World {
            daemon: None,
            server_pids,
            addrs: (0..ports as u16)
                .map(|i| format!("{VIP}:{}", SVC_PORT + i))
                .collect(),
            global,
            per_proc,
            max_sockets,
            client,
            server,
            env,
        }
    }

    fn config(&self, accelerate: bool) -> Value {
        let ports: Vec<Value> = (0..self.addrs.len() as u16)
            .map(|i| json!({"service_port": SVC_PORT + i, "target_port": TARGET_PORT + i}))
            .collect();
        json!({
            "accelerate": accelerate,
            "enroll": {"netns": Env::enroll_list(&[&self.client, &self.server])},
            "services": [{
                "name": "web", "namespace": "cap", "hostname": "web.cap.svc.cluster.local",
                "addresses": [VIP], "ports": ports,
            }],
            "workloads": [{
                "uid": "Kubernetes//Pod/cap/web-1", "name": "web-1", "namespace": "cap",
                "addresses": [self.server.v4.to_string()],
                "services": {"cap/web.cap.svc.cluster.local": {}},
            }],
        })
    }

    /// (Re)starts the daemon, with or without acceleration.
    pub fn start_daemon(&mut self, accelerate: bool) -> &Daemon {
        drop(self.daemon.take());
        let cfg = self.config(accelerate);
        let max = self.max_sockets.to_string();
        let d = self
            .env
            .daemon_args(&cfg, &["--max-sockets", &max])
            .unwrap_or_else(|e| panic!("daemon did not start: {e}"));
        self.daemon.insert(d)
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    fn load_cmd(&self) -> Command {
        let global: Vec<&str> = self.global.iter().map(String::as_str).collect();
        self.env.load_cmd(&self.client, &global)
    }

    /// Opens `n` connections over as few processes as the descriptor
    /// budget allows, all at once; the wall time until all are open.
    pub fn hold(&self, n: usize) -> (Holds, f64) {
        let procs = n.div_ceil(self.per_proc);
        let t = Instant::now();
        let mut hs: Vec<Hold> = (0..procs)
            .map(|p| {
                let share = n / procs + usize::from(p < n % procs);
                let mut cmd = self.load_cmd();
                cmd.arg("hold").args(&self.addrs);
                cmd.args(["--conns", &share.to_string(), "--size", SIZE]);
                cmd.args(["--parallel", PARALLEL, "--timeout", "30"]);
                Hold::spawn(cmd)
            })
            .collect();
        for h in &mut hs {
            h.wait_open();
        }
        (Holds(hs), t.elapsed().as_secs_f64())
    }

    /// `kmesh-load rr` for 3 s on a fresh connection to the first port.
    pub fn fresh_rr(&self) -> Value {
        let out = self
            .load_cmd()
            .args(["rr", &self.addrs[0], "--size", SIZE, "--duration", "3"])
            .output()
            .expect("run kmesh-load rr");
        assert!(
            out.status.success(),
            "kmesh-load rr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("kmesh-load rr prints JSON")
    }

    pub fn entries(&self) -> u64 {
        self.daemon().dump()["maps"]["km_sock"]["entries"]
            .as_u64()
            .unwrap()
    }

    /// Polls km_sock until it holds `want` entries; the time it took.
    pub fn wait_entries(&self, want: u64, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let n = self.entries();
            if n == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "km_sock has {n} entries after {timeout:?}, expected {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stats(&self) -> BTreeMap<String, u64> {
        let s = self.daemon().dump()["stats"].clone();
        s.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Several `kmesh-load hold` processes acting as one.
pub struct Holds(pub Vec<Hold>);

pub fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

impl Holds {
    pub fn sum(&self, f: impl Fn(&Hold) -> u64) -> u64 {
        self.0.iter().map(f).sum()
    }

    /// `cmd` to every process at once; their answers.
    pub fn all(&mut self, cmd: &str) -> Vec<Value> {
        for h in &mut self.0 {
            h.send(cmd);
        }
        self.0.iter_mut().map(|h| h.recv(cmd)).collect()
    }

    /// The first error of each kind the processes met while opening.
    pub fn open_errors(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for h in &self.0 {
            for e in h.open["errors"].as_array().into_iter().flatten() {
                let e = e.as_str().unwrap_or_default().to_string();
                if !v.contains(&e) {
                    v.push(e);
                }
            }
        }
        v
    }

    /// Ends every hold at once; whether all exited cleanly.
    pub fn close(mut self) -> bool {
        for h in &mut self.0 {
            h.end_input();
        }
        // Collected first: every client must be waited for, not only up
        // to the first that failed.
        let exits: Vec<bool> = self.0.drain(..).map(|h| h.close().1.success()).collect();
        exits.into_iter().all(|ok| ok)
    }
}
