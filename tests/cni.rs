//! Pod enrollment by CNI (src/cni): the plugin (`kmesh cni`) driven as a
//! container runtime drives it, against a running daemon on the harness's
//! child cgroup and real netns; podman with its CNI backend running a real
//! container through a conflist the daemon installed the plugin into; the
//! Kubernetes API part against a local stand-in serving API responses in
//! the real format (there is no API server here); and the daemon's
//! reconcile of recorded pods at restart.

mod harness;

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use harness::{web_config, Daemon, Env, Pod, KMESH};
use serde_json::{json, Value};

/// What bridge + host-local would have handed on: a chained plugin's
/// prevResult.
fn prev_result(pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.path()}],
        "ips": [{"address": format!("{}/24", pod.v4), "interface": 0}],
    })
}

fn conf(socket: &Path, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0", "name": "kmt", "type": "kmesh-cni",
        "adminSocket": socket, "timeoutSeconds": 10,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

struct Out {
    ok: bool,
    stdout: Value,
    stderr: String,
}

/// Runs the plugin as a runtime does: CNI_* in the environment, the
/// network config on stdin.
fn cni(command: &str, container: &str, netns: &str, args: &str, stdin: &[u8]) -> Out {
    let mut child = Command::new(KMESH)
        .arg("cni")
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    Out {
        ok: out.status.success(),
        stdout: if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout {text:?}: {e}"))
        },
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn cni_json(command: &str, container: &str, pod: &Pod, args: &str, conf: &Value) -> Out {
    cni(
        command,
        container,
        &pod.path(),
        args,
        conf.to_string().as_bytes(),
    )
}

/// A CNI error object, as the spec has it.
fn assert_cni_error(out: &Out, code: u64, what: &str) {
    assert!(!out.ok, "expected an error: {}", out.stdout);
    let e = &out.stdout;
    assert_eq!(e["code"], code, "{e}");
    assert!(e["cniVersion"].is_string() && e["msg"].is_string(), "{e}");
    let text = format!("{} {}", e["msg"], e["details"]);
    assert!(text.contains(what), "{what:?} not in {e}");
}

/// Sources of the enrolled netns in the live maps.
fn enrolled(d: &Daemon) -> Vec<String> {
    d.dump()["enrolled_netns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap().to_string())
        .collect()
}

fn is_enrolled(d: &Daemon, pod: &Pod) -> bool {
    enrolled(d)
        .iter()
        .any(|s| s.starts_with("cni:") && s.ends_with(&pod.path()))
}

/// The web service (VIP 10.96.0.10:80 → web-1 :8080), nothing enrolled by
/// the file; the daemon takes CNI requests and records them in `state`.
fn daemon(env: &mut Env, backends: &[Pod], state: &Path) -> Daemon {
    let named: Vec<(&str, &Pod)> = vec![("web-1", &backends[0])];
    env.daemon_args(
        &web_config(json!([]), &named),
        &["--cni", "--cni-state-file", state.to_str().unwrap()],
    )
    .expect("daemon starts")
}

fn redirected(env: &Env, pod: &Pod) -> bool {
    let c = &env.connect(pod, "10.96.0.10:80", 1)[0];
    c.ok && c.name == "web-1"
}

#[test]
fn version_and_malformed_config_answer_per_spec() {
    let v = cni("VERSION", "", "", "", br#"{"cniVersion": "1.0.0"}"#);
    assert!(v.ok);
    let versions: Vec<&str> = v.stdout["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(versions.contains(&"1.0.0") && versions.contains(&"0.4.0"));
    assert_eq!(v.stdout["cniVersion"], "1.0.0");

    for bad in [&b"{not json"[..], b"", br#"{"cniVersion": 1}"#] {
        let out = cni("ADD", "c1", "/proc/self/ns/net", "", bad);
        assert_cni_error(&out, 6, "malformed network configuration");
    }
    let old = br#"{"cniVersion": "0.2.0", "name": "n", "type": "kmesh-cni"}"#;
    assert_cni_error(&cni("ADD", "c1", "/proc/self/ns/net", "", old), 1, "0.2.0");
    let c = br#"{"cniVersion": "0.4.0", "name": "n", "type": "kmesh-cni"}"#;
    assert_cni_error(&cni("ADD", "", "", "", c), 4, "CNI_CONTAINERID");
    assert_cni_error(&cni("BOGUS", "c1", "", "", c), 4, "BOGUS");
    let out = cni("ADD", "c1", "/proc/self/ns/net", "", c);
    assert_eq!(
        out.stdout["cniVersion"], "0.4.0",
        "answers in the config's version"
    );
}

#[test]
fn add_enrolls_before_returning_check_and_del_undo() {
    let mut env = Env::new();
    let backends = env.backends(1);
    let client = env.pod(2, &[]);
    let gone = env.pod(3, &[]);
    let state = env.dir.join("cni-pods.json");
    let d = daemon(&mut env, &backends, &state);
    let c = conf(
        &d.sock,
        json!({"enroll": {"all": true}, "prevResult": prev_result(&client)}),
    );
    assert!(!redirected(&env, &client), "not enrolled yet");

    let add = cni_json("ADD", "ctr-a", &client, "", &c);
    assert!(add.ok, "{}", add.stderr);
    assert_eq!(
        add.stdout,
        prev_result(&client),
        "prevResult passed through"
    );
    // ADD returned: the first connect is already redirected.
    assert!(redirected(&env, &client));
    assert!(is_enrolled(&d, &client));
    let recorded: Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
    assert_eq!(recorded["pods"][0]["container_id"], "ctr-a");

    let check = cni_json("CHECK", "ctr-a", &client, "", &c);
    assert!(check.ok, "{:?}", check.stdout);
    let check = cni_json("CHECK", "ctr-b", &gone, "", &c);
    assert_cni_error(&check, 102, "not enrolled");

    let del = cni_json("DEL", "ctr-a", &client, "", &c);
    assert!(del.ok && del.stdout.is_null(), "{}", del.stderr);
    assert!(!is_enrolled(&d, &client));
    assert!(!redirected(&env, &client), "un-enrolled");
    assert_cni_error(&cni_json("CHECK", "ctr-a", &client, "", &c), 102, "ctr-a");

    // DEL of a gone netns, of an unknown container, twice: never fails.
    cni_json("ADD", "ctr-b", &gone, "", &c);
    env.delete_netns(&gone);
    for _ in 0..2 {
        let del = cni("DEL", "ctr-b", &gone.path(), "", c.to_string().as_bytes());
        assert!(del.ok, "{:?}", del.stdout);
    }
    assert!(enrolled(&d).is_empty(), "{:?}", enrolled(&d));

    // ADD of a netns that does not exist: an error, nothing recorded.
    let add = cni("ADD", "ctr-c", &gone.path(), "", c.to_string().as_bytes());
    assert_cni_error(&add, 100, "refused");
    let recorded: Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
    assert_eq!(recorded["pods"], json!([]));
}

#[test]
fn add_without_a_daemon_fails_and_del_still_succeeds() {
    let mut env = Env::new();
    let pod = env.pod(2, &[]);
    let c = conf(
        &env.dir.join("no-daemon.sock"),
        json!({"enroll": {"all": true}, "timeoutSeconds": 1, "prevResult": prev_result(&pod)}),
    );
    assert_cni_error(&cni_json("ADD", "x", &pod, "", &c), 11, "did not answer");
    assert!(cni_json("DEL", "x", &pod, "", &c).ok);
    // Not selected: no daemon needed, the result passes through.
    let skip = conf(
        &env.dir.join("no-daemon.sock"),
        json!({"enroll": {"namespaces": ["mesh"]}, "prevResult": prev_result(&pod)}),
    );
    let out = cni_json(
        "ADD",
        "x",
        &pod,
        "K8S_POD_NAMESPACE=other;K8S_POD_NAME=p",
        &skip,
    );
    assert!(
        out.ok && out.stderr.contains("not enrolled"),
        "{}",
        out.stderr
    );
}

#[test]
fn restarted_daemon_reenrolls_recorded_pods_that_still_exist() {
    let mut env = Env::new();
    let backends = env.backends(1);
    let (a, b) = (env.pod(2, &[]), env.pod(3, &[]));
    let state = env.dir.join("cni-pods.json");
    let mut d = daemon(&mut env, &backends, &state);
    let c = conf(&d.sock, json!({"enroll": {"all": true}}));
    assert!(cni_json("ADD", "ctr-a", &a, "", &c).ok);
    assert!(cni_json("ADD", "ctr-b", &b, "", &c).ok);
    assert!(redirected(&env, &a) && redirected(&env, &b));
    d.stop();
    assert!(!redirected(&env, &a), "detached while the daemon is down");
    env.delete_netns(&b);
    let d = daemon(&mut env, &backends, &state);
    assert!(is_enrolled(&d, &a), "{:?}", enrolled(&d));
    assert_eq!(enrolled(&d).len(), 1, "the gone pod is dropped");
    assert!(redirected(&env, &a));
    let recorded: Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
    assert_eq!(recorded["pods"].as_array().unwrap().len(), 1);
    assert!(d.log().contains("1 of 2 recorded pods"), "{}", d.log());
}

#[test]
fn labels_from_the_api_decide_enrollment() {
    let mut env = Env::new();
    let backends = env.backends(1);
    let state = env.dir.join("cni-pods.json");
    let d = daemon(&mut env, &backends, &state);
    let api = harness::kube::api_server();
    let kc = harness::kube::kubeconfig(&env.dir, &api.addr);
    // A static rule beside the kubeconfig is not used: the API decides.
    let c = conf(&d.sock, json!({"kubeconfig": kc, "enroll": {"all": true}}));
    // (namespace, pod, enrolled, waypoint, why when not)
    let cases = [
        ("mesh", "web-5d8f7-abcde", true, false, ""),
        ("plain", "client-9e1b2-zabcd", true, false, ""),
        (
            "mesh",
            "batch-6b4c9-fghij",
            false,
            false,
            "dataplane-mode=none",
        ),
        (
            "plain",
            "other-2c8a4-efghi",
            false,
            false,
            "neither pod nor namespace",
        ),
        ("mesh", "agent-8f2d1-klmno", false, false, "hostNetwork"),
        ("mesh", "legacy-4a7e3-pqrst", false, false, "sidecar"),
        ("mesh", "waypoint-7d9c5-uvwxy", true, true, ""),
    ];
    for (i, (ns, name, want, waypoint, why)) in cases.into_iter().enumerate() {
        let pod = env.pod(20 + i as u8, &[]);
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=c{i}");
        let out = cni_json("ADD", &format!("c{i}"), &pod, &args, &c);
        assert!(out.ok, "{ns}/{name}: {:?} {}", out.stdout, out.stderr);
        assert_eq!(is_enrolled(&d, &pod), want, "{ns}/{name}: {}", out.stderr);
        if !want {
            assert!(out.stderr.contains(why), "{ns}/{name}: {}", out.stderr);
        }
        let recorded: Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
        let rec = recorded["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["pod"] == format!("{ns}/{name}"))
            .cloned();
        assert_eq!(rec.is_some(), want);
        if let Some(r) = rec {
            assert_eq!(r["waypoint"], waypoint, "{ns}/{name}");
        }
    }
    let asked = api.asked.lock().unwrap().clone();
    assert!(asked.contains(&"/api/v1/namespaces/mesh/pods/web-5d8f7-abcde".to_string()));
    assert!(asked.contains(&"/api/v1/namespaces/plain".to_string()));

    // A pod the API does not know: an error, nothing enrolled.
    let pod = env.pod(40, &[]);
    let out = cni_json(
        "ADD",
        "c-missing",
        &pod,
        "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=nope",
        &c,
    );
    assert_cni_error(&out, 101, "nope");
    assert!(!is_enrolled(&d, &pod));
}

/// Podman's world for one test: its CNI config and plugin dirs, a
/// containers.conf pointing podman there, a rootfs made from scratch (the
/// probe and `sleep` with exactly the libraries ldd names), all run with
/// podman inside `host` (a harness netns) so its bridge lives and dies
/// with that netns. Drop removes the containers and host-local's leases.
struct Podman {
    host: Pod,
    net: String,
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    containers_conf: PathBuf,
    rootfs: PathBuf,
    cgroup_parent: String,
    names: Vec<String>,
}

const SUBNET: &str = "10.251.77";

impl Podman {
    fn new(env: &mut Env) -> Podman {
        let dir = env.dir.join("podman");
        let (conf_dir, bin_dir, rootfs) = (dir.join("net.d"), dir.join("bin"), dir.join("rootfs"));
        for d in [&conf_dir, &bin_dir, &rootfs] {
            fs::create_dir_all(d).unwrap();
        }
        for p in ["bridge", "host-local", "loopback"] {
            fs::copy(Path::new("/usr/lib/cni").join(p), bin_dir.join(p)).unwrap();
        }
        let net = format!("{}net", env.tag);
        // No route beyond the subnet: a connection to the VIP that is not
        // redirected fails in the container instead of leaving it.
        let conflist = json!({
            "cniVersion": "1.0.0", "name": net,
            "plugins": [{
                "type": "bridge", "bridge": "kmtbr0", "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("{SUBNET}.0/24")}]]}
            }]
        });
        fs::write(conf_dir.join("10-kmt.conflist"), conflist.to_string()).unwrap();
        let containers_conf = dir.join("containers.conf");
        fs::write(
            &containers_conf,
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n",
                bin_dir.display(),
                conf_dir.display()
            ),
        )
        .unwrap();
        for bin in [harness::PROBE, "/bin/sleep"] {
            let name = Path::new(bin).file_name().unwrap();
            fs::copy(bin, rootfs.join(name)).unwrap();
            let ldd = Command::new("ldd").arg(bin).output().unwrap();
            for line in String::from_utf8_lossy(&ldd.stdout).lines() {
                let lib = line
                    .split_whitespace()
                    .find(|w| w.starts_with('/'))
                    .map(Path::new);
                if let Some(lib) = lib {
                    let dst = rootfs.join(lib.strip_prefix("/").unwrap());
                    fs::create_dir_all(dst.parent().unwrap()).unwrap();
                    fs::copy(lib, dst).unwrap();
                }
            }
        }
        for d in ["proc", "sys", "dev", "etc", "tmp", "cg"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        let host = env.pod(1, &[]);
        Podman {
            host,
            net,
            conf_dir,
            bin_dir,
            containers_conf,
            rootfs,
            cgroup_parent: env.podman_cgroup_parent(),
            names: Vec::new(),
        }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.host.path()))
            .args(["podman", "--runtime", "runc"])
            .args(args)
            .env("CONTAINERS_CONF", &self.containers_conf);
        c.output().expect("run podman")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A container on the test network running `sleep`, with the attached
    /// cgroup mounted at /cg for the probe to join.
    fn start(&mut self, name: &str, cgroup: &Path) {
        let mut nofile = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the live local.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
        let nofile = format!("nofile={}:{}", nofile.rlim_cur, nofile.rlim_max);
        let volume = format!("{}:/cg", cgroup.display());
        self.names.push(name.to_string());
        self.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.net,
            "--cgroup-parent",
            &self.cgroup_parent,
            "--ulimit",
            &nofile,
            "--ulimit",
            "nproc=4096:4096",
            "-v",
            &volume,
            "--rootfs",
            self.rootfs.to_str().unwrap(),
            "/sleep",
            "600",
        ]);
    }

    fn conflist(&self) -> Value {
        serde_json::from_slice(&fs::read(self.conf_dir.join("10-kmt.conflist")).unwrap()).unwrap()
    }

    fn has_plugin(&self) -> bool {
        self.conflist()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["type"] == "kmesh-cni")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.cmd(&["rm", "-f", "-t", "0", n]);
        }
        let _ = fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(&self.net));
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10) * harness::time_scale();
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn podman_container_is_enrolled_by_the_installed_plugin() {
    if Command::new("podman").arg("--version").output().is_err()
        || !Path::new("/usr/lib/cni/bridge").exists()
    {
        eprintln!(
            "SKIPPED: needs podman and containernetworking-plugins (scripts/deps.sh installs them)"
        );
        return;
    }
    let mut env = Env::new();
    let mut podman = Podman::new(&mut env);
    // The backend listens in podman's host netns, at the bridge's gateway
    // address (any address of that netns: the bridge comes with the first
    // container).
    env.serve(&podman.host.clone(), &["0.0.0.0:8080".into()], "web-1");
    let config = json!({
        "enroll": {"netns": []},
        "services": [{
            "name": "web", "namespace": "default", "hostname": "web.default.svc.cluster.local",
            "addresses": ["10.96.0.10"], "ports": [{"service_port": 80, "target_port": 8080}]
        }],
        "workloads": [{
            "uid": "Kubernetes//Pod/default/web-1", "name": "web-1",
            "addresses": [format!("{SUBNET}.1")],
            "services": {"default/web.default.svc.cluster.local": {}}
        }],
    });
    let state = env.dir.join("cni-pods.json");
    let mut d = env
        .daemon_args(
            &config,
            &[
                "--cni-conf-dir",
                podman.conf_dir.to_str().unwrap(),
                "--cni-bin-dir",
                podman.bin_dir.to_str().unwrap(),
                "--cni-state-file",
                state.to_str().unwrap(),
                "--cni-enroll-all",
            ],
        )
        .expect("daemon starts");
    wait_for("kmesh-cni in the conflist", || podman.has_plugin());
    assert!(podman.bin_dir.join("kmesh-cni").exists());
    assert_eq!(podman.conflist()["plugins"][0]["type"], "bridge");

    let name = format!("{}a", env.tag);
    podman.start(&name, &env.cgroup);
    let recorded: Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
    let netns = recorded["pods"][0]["netns"].as_str().unwrap().to_string();
    assert!(netns.starts_with("/run/netns/"), "{recorded}");
    assert!(
        enrolled(&d).iter().any(|s| s.ends_with(&netns)),
        "{:?}",
        enrolled(&d)
    );
    let out = podman.ok(&[
        "exec",
        &name,
        "/kmesh-probe",
        "--cgroup",
        "/cg",
        "connect",
        "10.96.0.10:80",
        "--count",
        "1",
        "--timeout-ms",
        "2000",
    ]);
    let conn: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(conn["ok"], true, "{conn}");
    assert_eq!(conn["name"], "web-1", "{conn}");

    // Another CNI rewrites the conflist: the plugin entry comes back.
    let mut bare = podman.conflist();
    bare["plugins"].as_array_mut().unwrap().pop();
    fs::write(podman.conf_dir.join("10-kmt.conflist"), bare.to_string()).unwrap();
    wait_for("kmesh-cni re-added", || podman.has_plugin());

    // Stopping the container tears its network down: CNI DEL.
    podman.ok(&["stop", "-t", "0", &name]);
    assert!(
        !enrolled(&d).iter().any(|s| s.ends_with(&netns)),
        "un-enrolled at DEL: {:?}",
        enrolled(&d)
    );
    let recorded: Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
    assert_eq!(recorded["pods"], json!([]));

    d.stop();
    assert!(!podman.has_plugin(), "entry removed at stop");
}
