//! The bare-host packages (scripts/package.sh, docs/install-bare-host.md):
//! the .deb is installed into this machine's real filesystem with dpkg and
//! purged again, the RPM is read with `rpm -qp` (installing it needs an
//! RPM-based host), and the unit's way of running the daemon is played on
//! the harness's child cgroup: its capability set, --keep-attached, and the
//! ExecStopPost hook that keeps the programs across a restart and detaches
//! them on a stop. The service itself is never started (its default would
//! attach to the root cgroup). Root, like the other system tests.

mod harness;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use harness::{Env, Pod, KMESH};
use serde_json::json;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Files under /etc/kmesh: all configuration, the first two kept on upgrade.
const CONFIGS: [&str; 3] = [
    "/etc/kmesh/config.json",
    "/etc/kmesh/kmesh.env",
    "/etc/kmesh/README",
];

fn repo(p: &str) -> PathBuf {
    Path::new(REPO).join(p)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// stdout of a command that must succeed.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let out = ok(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_string()
}

struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
}

/// Both packages, built once per test run by scripts/package.sh (a release
/// build that is a no-op when current, then dpkg-deb and rpmbuild).
fn packages() -> &'static Packages {
    static BUILT: OnceLock<Packages> = OnceLock::new();
    BUILT.get_or_init(|| {
        let started = Instant::now();
        let out = ok(Command::new("bash").arg(repo("scripts/package.sh")));
        eprintln!(
            "package.sh: {:.1} s\n{out}",
            started.elapsed().as_secs_f64()
        );
        let built = |suffix: &str| {
            let line = out
                .lines()
                .find(|l| l.contains(suffix))
                .unwrap_or_else(|| panic!("package.sh printed no {suffix}: {out}"));
            PathBuf::from(line.split(" (").next().unwrap())
        };
        let p = Packages {
            deb: built(".deb ("),
            rpm: built(".rpm ("),
        };
        let name = p.deb.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(&format!("kmesh_{VERSION}-1_")), "{name}");
        p
    })
}

fn rpm_q(args: &[&str]) -> String {
    ok(Command::new("rpm")
        .arg("-qp")
        .args(args)
        .arg(&packages().rpm))
}

#[test]
fn rpm_holds_binary_unit_and_kept_configs_with_licences_and_library_packages() {
    let info = ok(Command::new("rpm").arg("-qip").arg(&packages().rpm));
    for want in [
        "Name        : kmesh".to_string(),
        format!("Version     : {VERSION}"),
        "Release     : 1".into(),
        "License     : Apache-2.0 AND (BSD-2-Clause OR GPL-2.0-only) AND ".into(),
    ] {
        assert!(info.contains(&want), "rpm -qip lacks {want:?}:\n{info}");
    }
    // Crates compiled in count too (MIT ones among them).
    assert!(info.contains(" AND MIT"), "{info}");

    let files: BTreeSet<String> = rpm_q(&["-l"]).lines().map(String::from).collect();
    for f in [
        "/usr/bin/kmesh",
        "/usr/lib/systemd/system/kmesh.service",
        "/usr/libexec/kmesh/stop-post",
        "/etc/kmesh/config.json",
        "/etc/kmesh/kmesh.env",
        "/etc/kmesh/README",
        "/usr/share/doc/kmesh/install-bare-host.md",
        "/usr/share/doc/kmesh/examples/config.json",
        "/usr/share/licenses/kmesh/LICENSE",
        "/usr/share/licenses/kmesh/LICENSE.BSD-2-Clause",
        "/usr/share/licenses/kmesh/LICENSE.GPL-2.0",
        "/usr/share/licenses/kmesh/THIRD-PARTY",
    ] {
        assert!(files.contains(f), "rpm -qlp lacks {f}: {files:#?}");
    }
    assert!(!files.iter().any(|f| f.contains(".build-id")), "{files:#?}");

    let configs: Vec<String> = rpm_q(&["--configfiles"])
        .lines()
        .map(String::from)
        .collect();
    let mut want: Vec<&str> = CONFIGS.to_vec();
    want.sort();
    assert_eq!(configs, want);
    // %config(noreplace) = flags "cn": an upgrade keeps an edited file.
    let flags = rpm_q(&["--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"]);
    for f in &CONFIGS[..2] {
        assert!(
            flags.contains(&format!("{f} cn\n")),
            "{f} not noreplace:\n{flags}"
        );
    }
    assert!(flags.contains("/etc/kmesh/README c\n"), "{flags}");

    let requires = rpm_q(&["--requires"]);
    for dep in [
        "elfutils-libelf",
        "zlib",
        "libgcc",
        "glibc >= 2.",
        "libelf.so.1()(64bit)",
        "libz.so.1()(64bit)",
    ] {
        assert!(
            requires.lines().any(|l| l.starts_with(dep)),
            "rpm requires lacks {dep}:\n{requires}"
        );
    }
    // The shipped files are the repository's.
    let digests = rpm_q(&["--qf", "[%{FILENAMES} %{FILEDIGESTS}\n]"]);
    for (installed, source) in [
        (
            "/usr/lib/systemd/system/kmesh.service",
            "deploy/kmesh.service",
        ),
        ("/usr/libexec/kmesh/stop-post", "packaging/stop-post"),
        ("/etc/kmesh/config.json", "packaging/etc/config.json"),
    ] {
        let line = format!("{installed} {}", sha256(&repo(source)));
        assert!(
            digests.contains(&line),
            "{installed} differs from {source}:\n{digests}"
        );
    }
    // Erase stops (detaching); upgrade restarts (kept attached).
    let scripts = rpm_q(&["--scripts"]);
    assert!(
        scripts.contains("systemctl stop kmesh.service"),
        "{scripts}"
    );
    assert!(
        scripts.contains("systemctl try-restart kmesh.service"),
        "{scripts}"
    );
}

/// Refuses to touch a kmesh the machine has for real; purges what an earlier
/// run of this test left (its marker says so).
const MARKER: &str = "/var/lib/kmesh-packages-test.installed";

fn dpkg_installed() -> bool {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "kmesh"]));
    String::from_utf8_lossy(&out.stdout).contains("ok installed")
}

struct Installed;

impl Installed {
    fn new(deb: &Path) -> Installed {
        if dpkg_installed() {
            assert!(
                Path::new(MARKER).exists(),
                "refusing to run: package kmesh is installed on this machine, not by this test"
            );
            ok(Command::new("dpkg").args(["--purge", "kmesh"]));
        }
        for p in [
            "/usr/bin/kmesh",
            "/etc/kmesh",
            "/usr/libexec/kmesh",
            "/lib/systemd/system/kmesh.service",
            "/usr/lib/systemd/system/kmesh.service",
            "/etc/systemd/system/kmesh.service",
        ] {
            assert!(
                !Path::new(p).exists(),
                "refusing to run: {p} exists and is not from this test's package"
            );
        }
        fs::write(MARKER, "installed by tests/packages.rs\n").unwrap();
        let guard = Installed;
        ok(Command::new("dpkg").arg("-i").arg(deb));
        guard
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let out = run(Command::new("dpkg").args(["--purge", "kmesh"]));
        if out.status.success() {
            let _ = fs::remove_file(MARKER);
        } else {
            eprintln!(
                "dpkg --purge kmesh: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn deb_installs_with_dpkg_its_config_checks_and_unit_verifies_then_purges() {
    let deb = &packages().deb;
    let field = |f: &str| ok(Command::new("dpkg-deb").args(["-f"]).arg(deb).arg(f));
    assert_eq!(field("Version").trim(), format!("{VERSION}-1"));
    let depends = field("Depends");
    for dep in ["libelf1", "zlib1g", "libgcc-s1", "libc6 (>= 2."] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(deb)
        .arg("conffiles"));
    let mut got: Vec<&str> = conffiles.lines().collect();
    got.sort();
    let mut want = CONFIGS.to_vec();
    want.sort();
    assert_eq!(got, want);

    // Without the installed binary, verify fails: it checks the unit's
    // commands exist, so passing below says something about the install.
    let unit = repo("deploy/kmesh.service");
    if !Path::new("/usr/bin/kmesh").exists() {
        let out = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("/usr/bin/kmesh is not executable"),
            "{out:?}"
        );
    }

    let _installed = Installed::new(deb);
    let listed = ok(Command::new("dpkg").args(["-L", "kmesh"]));
    for f in [
        "/usr/bin/kmesh",
        "/lib/systemd/system/kmesh.service",
        "/usr/libexec/kmesh/stop-post",
        "/usr/share/doc/kmesh/copyright",
        "/usr/share/doc/kmesh/THIRD-PARTY",
    ] {
        assert!(
            listed.lines().any(|l| l == f),
            "dpkg -L lacks {f}:\n{listed}"
        );
    }
    let copyright = fs::read_to_string("/usr/share/doc/kmesh/copyright").unwrap();
    assert!(copyright.contains("License: Apache-2.0"), "{copyright}");
    assert!(
        copyright.contains("License: BSD-2-Clause or GPL-2"),
        "{copyright}"
    );

    let version = ok(Command::new("/usr/bin/kmesh").arg("version"));
    assert_eq!(version.trim(), format!("kmesh {VERSION}"));
    let checked =
        ok(Command::new("/usr/bin/kmesh").args(["ctl", "check-config", "/etc/kmesh/config.json"]));
    assert_eq!(
        checked.trim(),
        "/etc/kmesh/config.json: ok (0 services, 0 workloads, 0 enrolled netns)"
    );
    let example = "/usr/share/doc/kmesh/examples/config.json";
    let checked = ok(Command::new("/usr/bin/kmesh").args(["ctl", "check-config", example]));
    assert!(
        checked.contains("ok (2 services, 3 workloads,"),
        "{checked}"
    );

    let out =
        run(Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/kmesh.service"]));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // Every setting kmesh.env offers is one the installed daemon reads.
    let help = ok(Command::new("/usr/bin/kmesh").args(["daemon", "--help"]));
    let env = fs::read_to_string("/etc/kmesh/kmesh.env").unwrap();
    let keys: Vec<&str> = env
        .lines()
        .filter_map(|l| l.strip_prefix('#')?.split_once('=').map(|(k, _)| k))
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert!(keys.len() >= 10, "{keys:?}");
    for k in keys {
        assert!(
            k == "KMESH_LOG" || help.contains(&format!("[env: {k}=")),
            "kmesh.env offers {k}, which `kmesh daemon` does not read"
        );
    }
}

/// The unit's CapabilityBoundingSet as setpriv's list and as the CapEff mask.
fn unit_caps(unit: &str) -> (String, u64) {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("unit has CapabilityBoundingSet");
    let (mut arg, mut mask) = ("-all".to_string(), 0u64);
    for cap in line.split_whitespace() {
        let bit = match cap {
            "CAP_NET_ADMIN" => 12,
            "CAP_SYS_ADMIN" => 21,
            "CAP_SYS_RESOURCE" => 24,
            "CAP_PERFMON" => 38,
            "CAP_BPF" => 39,
            other => panic!("add {other} to this table"),
        };
        mask |= 1 << bit;
        arg += &format!(",+{}", cap.trim_start_matches("CAP_").to_lowercase());
    }
    (arg, mask)
}

/// A capability set of process `pid` from /proc ("CapEff:", "CapBnd:").
fn cap_mask(field: &str, pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// `kmesh daemon` as the unit's ExecStart runs it (its flags, its
/// capability bounding set, no new privileges), confined to `env`.
struct UnitDaemon {
    child: Child,
    log: PathBuf,
}

impl UnitDaemon {
    fn start(env: &Env, unit: &str, config: &Path) -> UnitDaemon {
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        let mut words = exec.split_whitespace();
        assert_eq!(words.next(), Some("/usr/bin/kmesh"));
        let args: Vec<String> = words
            .map(|w| match w {
                "/etc/kmesh/config.json" => config.display().to_string(),
                w => w.to_string(),
            })
            .collect();
        let (caps, _) = unit_caps(unit);
        let sock = env.dir.join("admin.sock");
        let log = env.dir.join("daemon.log");
        let _ = fs::remove_file(&sock);
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--bounding-set",
            &caps,
            "--inh-caps",
            "-all",
            "--no-new-privs",
            KMESH,
        ])
        .args(&args)
        .args(["--cgroup", env.cgroup.to_str().unwrap()])
        .args(["--bpffs", env.bpffs.join("kmesh").to_str().unwrap()])
        .args(["--admin-socket", sock.to_str().unwrap()])
        .env("KMESH_LOG", "info")
        // No listener on the machine's own ports from a test.
        .env("KMESH_METRICS_ADDR", "off")
        .env("KMESH_ADMIN_ADDR", "off")
        .env("KMESH_READINESS_ADDR", "off")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
        // Dies with the test process rather than outliving it.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("spawn setpriv kmesh");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("daemon exited {st}: {}", fs::read_to_string(&log).unwrap());
            }
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        UnitDaemon { child, log }
    }

    fn cap_eff(&self) -> u64 {
        cap_mask("CapEff:", self.child.id())
    }

    /// SIGTERM, as systemd stops it; must exit 0 (SERVICE_RESULT=success).
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let st = self.child.wait().unwrap();
        let log = fs::read_to_string(&self.log).unwrap();
        assert!(st.success(), "daemon exit {st}: {log}");
        assert!(log.contains("programs left attached"), "{log}");
    }
}

impl Drop for UnitDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs packaging/stop-post as ExecStopPost would, with `job` as the unit's
/// pending job type in a stand-in `systemctl list-jobs` (None: no job).
fn stop_post(env: &Env, result: &str, job: Option<&str>) -> String {
    let bin = env.dir.join("fakebin");
    fs::create_dir_all(&bin).unwrap();
    let line = job.map_or(String::new(), |j| {
        format!("echo '  17 kmesh.service {j} running'")
    });
    fs::write(
        bin.join("systemctl"),
        format!("#!/bin/sh\n[ \"$1\" = list-jobs ] || exit 1\n{line}\n"),
    )
    .unwrap();
    ok(Command::new("chmod").arg("+x").arg(bin.join("systemctl")));
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = run(Command::new(repo("packaging/stop-post"))
        .arg("kmesh.service")
        .env("PATH", path)
        .env("SERVICE_RESULT", result)
        .env("KMESH_BPFFS", env.bpffs.join("kmesh")));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn connect4(env: &Env) -> u32 {
    env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT)
}

fn redirected(env: &Env, client: &Pod) -> bool {
    let conns = env.connect(client, "10.96.0.10:80", 2);
    conns
        .iter()
        .all(|c| c.ok && c.name == "web-1" && c.peer == "10.244.0.11:8080")
}

#[test]
fn unit_caps_suffice_restart_keeps_programs_attached_and_stop_detaches() {
    let unit = fs::read_to_string(repo("deploy/kmesh.service")).unwrap();
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let backend = env.pod(11, &[]);
    env.serve(&backend, &["10.244.0.11:8080".into()], "web-1");
    let config = env.dir.join("unit-config.json");
    let svc = "default/web.default.svc.cluster.local";
    let cfg = json!({
        "enroll": {"netns": Env::enroll_list(&[&client])},
        "services": [{"name": "web", "hostname": "web.default.svc.cluster.local",
            "addresses": ["10.96.0.10"], "ports": [{"service_port": 80, "target_port": 8080}]}],
        "workloads": [{"uid": "w1", "name": "web-1", "addresses": ["10.244.0.11"],
            "services": {svc: {}}}],
    });
    fs::write(&config, cfg.to_string()).unwrap();

    // Only the unit's capabilities: it loads, attaches and redirects.
    let d = UnitDaemon::start(&env, &unit, &config);
    // What the unit grants, less what this machine withholds from us all
    // (here CAP_SYS_RESOURCE).
    let ours = cap_mask("CapBnd:", std::process::id());
    assert_eq!(
        d.cap_eff(),
        unit_caps(&unit).1 & ours,
        "daemon runs with other than the unit's set"
    );
    assert!(redirected(&env, &client));
    assert_eq!(connect4(&env), 1);

    // Restart: the stop half leaves the programs working...
    d.stop();
    let said = stop_post(&env, "success", Some("restart"));
    assert!(said.contains("restarting"), "{said}");
    assert_eq!(connect4(&env), 1);
    assert!(
        redirected(&env, &client),
        "no redirect between stop and start of a restart"
    );
    // ...and the next daemon takes them over instead of adding its own.
    let d = UnitDaemon::start(&env, &unit, &config);
    assert_eq!(connect4(&env), 1, "old links not replaced on takeover");
    assert!(redirected(&env, &client));

    // A failed daemon keeps its last rules for Restart=on-failure's next one.
    d.stop();
    let said = stop_post(&env, "exit-code", None);
    assert!(said.contains("left attached"), "{said}");
    assert_eq!(connect4(&env), 1);

    // An explicit stop detaches: the kernel has no program on the cgroup.
    let said = stop_post(&env, "success", Some("stop"));
    assert!(said.contains("programs detached"), "{said}");
    assert_eq!(connect4(&env), 0);
    assert!(!env.bpffs.join("kmesh/link_connect4").exists());
    let conns = env.connect(&client, "10.96.0.10:80", 1);
    assert!(!conns[0].ok || conns[0].name != "web-1", "{conns:?}");
}
