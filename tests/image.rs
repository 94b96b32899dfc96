//! The container image (deploy/Containerfile, scripts/image.sh) run as a
//! user runs it: podman, host pid and network, the capability set of the
//! DaemonSet and a read-only root, the harness's bpffs and child cgroup
//! mounted in (never the root cgroup), the config directory and the admin
//! socket's directory shared with the host. Root, like the other system
//! tests. Skipped, saying why, only where podman cannot run a container.

mod harness;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use harness::{tally, Env, Pod, KMESH};
use serde_json::{json, Value};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const VIP: &str = "10.96.0.10:80";

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"))
}

/// stdout of a command that must succeed.
fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How podman runs containers here: the global flags (OCI runtime) and the
/// `run` flags (rlimits) that work on this machine, found once.
struct Podman {
    global: Vec<String>,
    run: Vec<String>,
}

/// Podman's defaults first. Where they fail, the two known ways out: raise
/// no rlimit above what this process has (a host without CAP_SYS_RESOURCE),
/// and runc where crun refuses a hybrid cgroup v1/v2 host (as here). Tried
/// on `image` (its --help) under `env`'s cgroup parent; Err: why podman
/// cannot run a container here.
fn podman(env: &Env, image: &Image) -> Result<&'static Podman, String> {
    static FOUND: OnceLock<Result<Podman, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let mut nofile = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one rlimit into the live local.
            assert_eq!(
                unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) },
                0
            );
            let (soft, hard) = (nofile.rlim_cur, nofile.rlim_max);
            let limits = vec![
                "--ulimit".to_string(),
                format!("nofile={soft}:{hard}"),
                "--ulimit".into(),
                "nproc=4096:4096".into(),
            ];
            let mut tried = Vec::new();
            for global in [vec![], vec!["--runtime".to_string(), "runc".into()]] {
                for run_flags in [vec![], limits.clone()] {
                    let out = Command::new("podman")
                        .args(&global)
                        .args(["run", "--rm", "--network", "none"])
                        .args(["--cgroup-parent", &env.podman_cgroup_parent()])
                        .args(&run_flags)
                        .args([&image.tag, "--help"])
                        .output()
                        .map_err(|e| e.to_string())?;
                    if out.status.success() {
                        eprintln!("podman runs containers with {global:?} {run_flags:?}");
                        return Ok(Podman {
                            global,
                            run: run_flags,
                        });
                    }
                    tried.push(format!(
                        "{global:?} {run_flags:?}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
            Err(format!(
                "podman cannot run a container here:\n{}",
                tried.join("\n")
            ))
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn podman_installed() -> bool {
    Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Podman {
    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.args(&self.global);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("spawn podman");
        assert!(
            out.status.success(),
            "podman {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The image, built by scripts/image.sh under a tag of this test's own and
/// untagged again on drop (other tags of the same image are left).
struct Image {
    tag: String,
}

impl Image {
    fn build(env: &Env) -> Image {
        let tag = format!("localhost/kmesh-test:{}", env.tag);
        let started = Instant::now();
        let out = ok(&["bash", &format!("{REPO}/scripts/image.sh"), "--tag", &tag]);
        eprintln!("image.sh: {:.1} s\n{out}", started.elapsed().as_secs_f64());
        Image { tag }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", &self.tag]).output();
    }
}

/// A container of ours, removed (with force) on drop.
struct Container {
    name: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "2", &self.name])
            .output();
    }
}

/// The test's world as the container sees it: the config in a directory of
/// its own (mounted read-only; the daemon sees rename-replacements) and the
/// admin socket's directory.
struct Mounts {
    etc: PathBuf,
    run: PathBuf,
}

impl Mounts {
    fn new(env: &Env, config: &Value) -> Mounts {
        let (etc, run) = (env.dir.join("etc"), env.dir.join("run"));
        fs::create_dir_all(&etc).unwrap();
        fs::create_dir_all(&run).unwrap();
        fs::write(
            etc.join("config.json"),
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .unwrap();
        Mounts { etc, run }
    }

    fn sock(&self) -> PathBuf {
        self.run.join("admin.sock")
    }
}

/// The DaemonSet's capability set, less CAP_SYS_RESOURCE where this
/// process does not have it to give (it only raises RLIMIT_MEMLOCK on
/// kernels before 5.11).
fn capabilities() -> Vec<&'static str> {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let mut caps = vec!["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"];
    if bounding & (1 << CAP_SYS_RESOURCE) != 0 {
        caps.push("SYS_RESOURCE");
    }
    caps
}

/// `podman run -d` of the image as the DaemonSet runs it, with `run_extra`
/// for podman and `extra` for the daemon.
fn start(
    p: &Podman,
    env: &Env,
    image: &Image,
    m: &Mounts,
    name: &str,
    run_extra: &[&str],
    extra: &[&str],
) -> Container {
    let cg_root = kmesh::sys::cgroup2_mount().unwrap();
    let bind = |host: &Path, inside: &str, opts: &str| {
        format!("{}:{inside}{opts}", host.to_str().unwrap())
    };
    let bpffs = env.bpffs.to_str().unwrap().to_string();
    let cg = cg_root.to_str().unwrap().to_string();
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        name.into(),
        "--network".into(),
        "host".into(),
        "--pid".into(),
        "host".into(),
        "--read-only".into(),
        "--cgroup-parent".into(),
        env.podman_cgroup_parent(),
        "--cap-drop".into(),
        "all".into(),
        "-v".into(),
        bind(&env.bpffs, &bpffs, ""),
        "-v".into(),
        bind(&cg_root, &cg, ""),
        "-v".into(),
        "/run/netns:/run/netns:rslave".into(),
        "-v".into(),
        bind(&m.etc, "/etc/kmesh", ":ro"),
        "-v".into(),
        bind(&m.run, "/run/kmesh", ""),
        "-e".into(),
        "KMESH_LOG=info".into(),
        // Host network: no listener on the machine's own ports.
        "-e".into(),
        "KMESH_METRICS_ADDR=off".into(),
        "-e".into(),
        "KMESH_ADMIN_ADDR=off".into(),
        "-e".into(),
        "KMESH_READINESS_ADDR=off".into(),
    ];
    for c in capabilities() {
        args.push("--cap-add".into());
        args.push(c.into());
    }
    args.extend(p.run.iter().cloned());
    args.extend(run_extra.iter().map(|s| s.to_string()));
    args.push(image.tag.clone());
    args.extend(
        [
            "--config",
            "/etc/kmesh/config.json",
            "--cgroup",
            env.cgroup.to_str().unwrap(),
            "--bpffs",
            &format!("{bpffs}/kmesh"),
            "--watch-interval",
            "0.2",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    p.ok(&args);
    Container { name: name.into() }
}

fn logs(p: &Podman, c: &Container) -> String {
    let out = p.cmd().args(["logs", &c.name]).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Ready as the DaemonSet's probe sees it: `kmesh ctl dump` inside the
/// container answers (there is no HTTP readiness endpoint yet). Returns the
/// time it took.
fn wait_ready(p: &Podman, c: &Container) -> Duration {
    let started = Instant::now();
    loop {
        let out = p
            .cmd()
            .args(["exec", &c.name, "kmesh", "ctl", "dump"])
            .output()
            .unwrap();
        if out.status.success() {
            let dump: Value = serde_json::from_slice(&out.stdout).expect("dump is JSON");
            assert!(dump["services"].is_array(), "{dump:#}");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not ready: {}\nlogs:\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs(p, c)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `kmesh ctl dump` from the host, through the socket the container made.
fn host_dump(m: &Mounts) -> Value {
    let out = ok(&[
        KMESH,
        "ctl",
        "dump",
        "--admin-socket",
        m.sock().to_str().unwrap(),
    ]);
    serde_json::from_str(&out).expect("dump is JSON")
}

fn state(p: &Podman, c: &Container) -> (String, i64) {
    let out = p.ok(&[
        "inspect",
        "--format",
        "{{.State.Status}} {{.State.ExitCode}}",
        &c.name,
    ]);
    let (s, code) = out.trim().split_once(' ').unwrap();
    (s.to_string(), code.parse().unwrap())
}

fn config(client: &Pod, backends: &[Pod]) -> Value {
    let names: Vec<String> = (1..=backends.len()).map(|i| format!("web-{i}")).collect();
    let named: Vec<(&str, &Pod)> = names.iter().map(String::as_str).zip(backends).collect();
    harness::web_config(Env::enroll_list(&[client]), &named)
}

/// A client pod and two backends serving on :8080.
fn pods(env: &mut Env) -> (Pod, Vec<Pod>) {
    let client = env.pod(2, &[]);
    let backends = (1..=2)
        .map(|i| {
            let pod = env.pod(10 + i, &[]);
            env.serve(&pod, &[format!("{}:8080", pod.v4)], &format!("web-{i}"));
            pod
        })
        .collect();
    (client, backends)
}

/// Every connection to the VIP reached one of the backends (tally panics
/// on a failed one; nothing listens on the VIP itself).
fn assert_redirected(env: &Env, client: &Pod, n: u32) {
    let t = tally(&env.connect(client, VIP, n));
    assert_eq!(t.values().sum::<u32>(), n, "{t:?}");
    assert!(t.keys().all(|k| k == "web-1" || k == "web-2"), "{t:?}");
}

/// The image and how to run it, or None (printed why) where podman is
/// missing or cannot run any container.
macro_rules! podman_or_skip {
    ($env:expr) => {{
        if !podman_installed() {
            eprintln!("SKIPPED: podman is not installed (scripts/deps.sh installs it)");
            return;
        }
        let image = Image::build(&$env);
        match podman(&$env, &image) {
            Ok(p) => (p, image),
            Err(why) => {
                eprintln!("SKIPPED: {why}");
                return;
            }
        }
    }};
}

#[test]
fn image_redirects_answers_ctl_over_the_mounted_socket_and_stops_clean() {
    let mut env = Env::new();
    let (p, image) = podman_or_skip!(env);
    let (client, backends) = pods(&mut env);
    let m = Mounts::new(&env, &config(&client, &backends));
    let c = start(p, &env, &image, &m, &format!("{}-kmesh", env.tag), &[], &[]);
    let ready = wait_ready(p, &c);
    eprintln!("ready (ctl dump in the container answers) after {ready:?}");

    // 40 connections: both backends serve (all on one: 2^-39).
    let t = tally(&env.connect(&client, VIP, 40));
    assert_eq!(t.len(), 2, "{t:?}");
    assert_eq!(t.values().sum::<u32>(), 40, "{t:?}");
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 1);
    let dump = host_dump(&m);
    assert_eq!(dump["services"].as_array().unwrap().len(), 1, "{dump:#}");
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 2, "{dump:#}");
    assert_eq!(
        dump["enrolled_netns"].as_array().unwrap().len(),
        1,
        "{dump:#}"
    );
    // The daemon runs as the entrypoint, as PID 1 of the container: its
    // SIGTERM handling is what `podman stop` (and the kubelet) rely on.
    assert!(
        logs(p, &c).contains("attached to cgroup"),
        "{}",
        logs(p, &c)
    );

    let started = Instant::now();
    p.ok(&["stop", "-t", "10", &c.name]);
    let stopped = started.elapsed();
    let log = logs(p, &c);
    assert_eq!(state(p, &c), ("exited".into(), 0), "{log}");
    assert!(stopped < Duration::from_secs(5), "SIGTERM took {stopped:?}");
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 0);
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET6_CONNECT), 0);
    assert!(!env.bpffs.join("kmesh").exists(), "pins left: {log}");
    assert!(!m.sock().exists(), "admin socket left");
    assert!(log.contains("stopped (programs detached)"), "{log}");
}

/// With --keep-attached, a restart of the container (and a rolling update
/// to another container) never leaves a gap: connections made while it is
/// down are redirected by the programs it left attached.
#[test]
fn image_with_keep_attached_redirects_through_a_container_restart() {
    let mut env = Env::new();
    let (p, image) = podman_or_skip!(env);
    let (client, backends) = pods(&mut env);
    let m = Mounts::new(&env, &config(&client, &backends));
    let c = start(
        p,
        &env,
        &image,
        &m,
        &format!("{}-kmesh", env.tag),
        &[],
        &["--keep-attached"],
    );
    wait_ready(p, &c);
    assert_redirected(&env, &client, 10);

    // Connections all through the restart, in one thread; the restart in
    // this one.
    let done = std::sync::atomic::AtomicBool::new(false);
    let rounds = thread::scope(|s| {
        let h = s.spawn(|| {
            let mut rounds = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                assert_redirected(&env, &client, 4);
                rounds += 1;
            }
            rounds
        });
        p.ok(&["stop", "-t", "10", &c.name]);
        assert_eq!(state(p, &c), ("exited".into(), 0), "{}", logs(p, &c));
        // Down: still attached, still redirecting.
        assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 1);
        assert_redirected(&env, &client, 10);
        p.ok(&["start", &c.name]);
        wait_ready(p, &c);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        h.join().unwrap()
    });
    assert!(rounds > 0, "no connection was made during the restart");
    // The restarted daemon took the pins over rather than adding programs.
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 1);
    assert_eq!(host_dump(&m)["workloads"].as_array().unwrap().len(), 2);
    assert_redirected(&env, &client, 10);

    // The next version without --keep-attached (the uninstall): it takes
    // over and its stop detaches everything.
    let next = start(p, &env, &image, &m, &format!("{}-next", env.tag), &[], &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !logs(p, &next).contains("attached to cgroup") {
        assert!(Instant::now() < deadline, "{}", logs(p, &next));
        thread::sleep(Duration::from_millis(100));
    }
    p.ok(&["stop", "-t", "10", &c.name]);
    wait_ready(p, &next);
    assert_redirected(&env, &client, 10);
    p.ok(&["stop", "-t", "10", &next.name]);
    assert_eq!(state(p, &next), ("exited".into(), 0), "{}", logs(p, &next));
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 0);
    assert!(!env.bpffs.join("kmesh").exists(), "{}", logs(p, &next));
}

/// The DaemonSet's way to istiod, in miniature: a TLS control plane (the
/// harness's) reached by a hostname the image resolves with glibc through
/// /etc/hosts (podman --add-host; the kubelet writes cluster DNS the same
/// way), its CA and a token at the paths the DaemonSet mounts them, which
/// are the daemon's defaults. Services and workloads come only from it.
#[test]
fn image_takes_services_from_a_tls_control_plane_by_hostname() {
    use harness::xds::{service, workload, Cp};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    const HOST: &str = "istiod.kmesh-image.test";

    let mut env = Env::new();
    let (p, image) = podman_or_skip!(env);
    let (client, backends) = pods(&mut env);

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![HOST.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let cp = Cp::start(Some((
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
    )));
    cp.cp.update(|b| {
        let (n, s) = service("web", &["10.96.0.10"], &[(80, 8080)]);
        b.set(&n, s);
        for (i, pod) in backends.iter().enumerate() {
            let (n, w) = workload(&format!("web-{}", i + 1), &[pod.v4], &["web"]);
            b.set(&n, w);
        }
    });

    let (ca_dir, token_dir) = (env.dir.join("istio"), env.dir.join("tokens"));
    fs::create_dir_all(&ca_dir).unwrap();
    fs::create_dir_all(&token_dir).unwrap();
    fs::write(ca_dir.join("root-cert.pem"), ca_cert.pem()).unwrap();
    fs::write(token_dir.join("istio-token"), "not-a-real-jwt").unwrap();
    let m = Mounts::new(
        &env,
        &json!({"enroll": {"netns": Env::enroll_list(&[&client])}}),
    );
    let add_host = format!("{HOST}:127.0.0.1");
    let ca_mount = format!("{}:/var/run/secrets/istio:ro", ca_dir.display());
    let token_mount = format!("{}:/var/run/secrets/tokens:ro", token_dir.display());
    let address = format!("https://{HOST}:{}", cp.addr.port());
    let c = start(
        p,
        &env,
        &image,
        &m,
        &format!("{}-kmesh", env.tag),
        &["--add-host", &add_host, "-v", &ca_mount, "-v", &token_mount],
        &["--xds-address", &address],
    );
    wait_ready(p, &c);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let dump = host_dump(&m);
        if dump["workloads"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing from the control plane: {dump:#}\n{}",
            logs(p, &c)
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(cp.cp.acks() >= 1, "{}", logs(p, &c));
    assert!(cp.cp.nacks().is_empty(), "{:?}", cp.cp.nacks());
    let t = tally(&env.connect(&client, VIP, 40));
    assert_eq!(t.len(), 2, "{t:?}");
    p.ok(&["stop", "-t", "10", &c.name]);
    assert_eq!(state(p, &c), ("exited".into(), 0), "{}", logs(p, &c));
}
