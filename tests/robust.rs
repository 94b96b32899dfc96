//! One bad input, or one misbehaving peer, never crashes, freezes or
//! corrupts the rest (issue 17): overlapping daemons, unresolvable enroll
//! entries, malformed configs and flags, FIFOs, admin clients that never
//! talk or never listen.

mod harness;

use std::{
    fs,
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use harness::{tally, Env, KMESH};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const VIP: &str = "10.96.0.10:80";

fn wait_log(d: &harness::Daemon, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !d.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "log never said {needle:?}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn workload_uids(dump: &Value) -> Vec<String> {
    dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["uid"].as_str().unwrap().to_string())
        .collect()
}

/// Item 3. Fails before the fix: A's SIGTERM unpinned B's links and maps
/// and removed B's admin socket, so B's crash then left nothing attached.
#[test]
fn old_daemon_stopping_leaves_a_newer_daemons_pins_and_socket() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let enrolled = Env::enroll_list(&[&client]);
    let mut a = env.daemon(&harness::web_config(
        enrolled.clone(),
        &[("web-1", &pods[0])],
    ));
    let mut b = env
        .daemon_named(
            "b",
            &harness::web_config(enrolled, &[("web-2", &pods[1])]),
            &[],
        )
        .unwrap();
    let pins = env.bpffs.join("kmesh");
    let names = [
        "link_connect4",
        "link_connect6",
        "km_vip",
        "km_endpoint",
        "km_sock",
    ];
    for n in names {
        assert!(pins.join(n).exists(), "B pinned {n}");
    }

    assert!(a.stop().success());
    for n in names {
        assert!(pins.join(n).exists(), "A's shutdown removed B's {n}");
    }
    assert!(b.sock.exists(), "A's shutdown removed B's admin socket");
    assert!(a.log().contains("another daemon"), "{}", a.log());
    // The socket answers, and it is B that answers.
    assert_eq!(workload_uids(&b.dump()), ["Kubernetes//Pod/default/web-2"]);
    assert_eq!(
        tally(&env.connect(&client, VIP, 20)).get("web-2"),
        Some(&20)
    );
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 1);

    // A crash runs no cleanup: the pinned links keep B's programs on the
    // cgroup, with B's maps, whether or not B was asked to keep them.
    assert!(!b.kill().success());
    assert_eq!(
        tally(&env.connect(&client, VIP, 20)).get("web-2"),
        Some(&20)
    );
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 1);
}

/// Item 3, the other way round: the old daemon keeps its programs
/// attached (as for a restart), the new one stops cleanly afterwards.
/// Fails before the fix: the old daemon's exit removed the new one's admin
/// socket.
#[test]
fn old_daemon_keeping_attached_hands_over_and_the_new_one_cleans_up_its_own() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let enrolled = Env::enroll_list(&[&client]);
    let mut a = env
        .daemon_args(
            &harness::web_config(enrolled.clone(), &[("web-1", &pods[0])]),
            &["--keep-attached"],
        )
        .unwrap();
    let mut b = env
        .daemon_named(
            "b",
            &harness::web_config(enrolled, &[("web-2", &pods[1])]),
            &[],
        )
        .unwrap();
    assert!(a.stop().success());
    assert!(b.sock.exists(), "A's exit removed B's admin socket");
    assert_eq!(workload_uids(&b.dump()), ["Kubernetes//Pod/default/web-2"]);
    assert_eq!(
        tally(&env.connect(&client, VIP, 10)).get("web-2"),
        Some(&10)
    );
    // A's links went with A (their pins were B's by then): B's alone.
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 1);

    // B still owns everything it pinned, so its clean stop removes it all.
    assert!(b.stop().success());
    assert!(!b.sock.exists());
    assert!(!env.bpffs.join("kmesh").exists(), "B's pins left behind");
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 0);
}

/// Item 5 (enrollment). Fails before the fix: a listed netns that is gone
/// made every reload fail ("config rejected"), so the backend change below
/// never applied, and a daemon would not even start with it.
#[test]
fn a_deleted_pod_netns_is_reported_and_the_rest_applies() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let gone = env.pod(3, &[]);
    let pods = env.backends(2);
    let enrolled = Env::enroll_list(&[&client, &gone]);
    let mut d = env.daemon(&harness::web_config(
        enrolled.clone(),
        &[("web-1", &pods[0])],
    ));
    assert_eq!(
        tally(&env.connect(&client, VIP, 10)).get("web-1"),
        Some(&10)
    );

    env.delete_netns(&gone);
    d.write_config(&harness::web_config(
        enrolled.clone(),
        &[("web-2", &pods[1])],
    ));
    let dump = d.wait_dump(Duration::from_secs(5), |d| {
        workload_uids(d) == ["Kubernetes//Pod/default/web-2"]
    });
    let errors = dump["enroll_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{dump:#}");
    let e = errors[0].as_str().unwrap();
    assert!(
        e.contains("enroll.netns[1]") && e.contains(&gone.path()),
        "{e}"
    );
    assert!(d.log().contains(&gone.path()), "{}", d.log());
    assert_eq!(dump["enrolled_netns"].as_array().unwrap().len(), 1);
    assert_eq!(
        tally(&env.connect(&client, VIP, 20)).get("web-2"),
        Some(&20)
    );

    // A daemon starting with the entry listed starts, and says so too.
    assert!(d.stop().success());
    let d = env.daemon(&harness::web_config(enrolled, &[("web-2", &pods[1])]));
    assert_eq!(d.dump()["enroll_errors"].as_array().unwrap().len(), 1);
    assert_eq!(tally(&env.connect(&client, VIP, 5)).get("web-2"), Some(&5));
}

fn rejections(d: &harness::Daemon) -> usize {
    d.log().matches("config rejected").count()
}

/// Item 7 (config text). Fails before the fix: `[]` was applied as an
/// empty config, `"enroll": []` unenrolled every pod, and a config
/// followed by stray bytes or a second object was applied.
#[test]
fn a_reload_of_anything_but_one_object_is_refused_and_changes_nothing() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let enrolled = Env::enroll_list(&[&client]);
    let d = env.daemon(&harness::web_config(
        enrolled.clone(),
        &[("web-1", &pods[0])],
    ));
    let before = d.dump();

    let web2 =
        serde_json::to_string(&harness::web_config(enrolled, &[("web-2", &pods[1])])).unwrap();
    let mut no_enroll: Value = serde_json::from_str(&web2).unwrap();
    no_enroll["enroll"] = json!([]);
    for (text, what) in [
        ("[]".to_string(), "top level: must be a JSON object"),
        (no_enroll.to_string(), "enroll"),
        (format!("{web2}\n{{}}"), "exactly one JSON object"),
        (format!("{web2} x"), "trailing characters"),
    ] {
        let n = rejections(&d);
        d.write_raw_config(&text);
        d.signal(Signal::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while rejections(&d) == n {
            assert!(
                Instant::now() < deadline,
                "{text:.60} was not refused:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(d.log().contains(what), "{what}: {}", d.log());
        let now = d.dump();
        assert_eq!(now["services"], before["services"], "{text:.60}");
        assert_eq!(now["workloads"], before["workloads"], "{text:.60}");
        assert_eq!(
            now["enrolled_netns"], before["enrolled_netns"],
            "{text:.60}"
        );
    }
    assert_eq!(
        tally(&env.connect(&client, VIP, 10)).get("web-1"),
        Some(&10)
    );
}

/// Item 7 (FIFOs). Fails before the fix: opening the FIFO blocked the
/// main loop (no error logged, no reload, SIGTERM not handled).
#[test]
fn fifos_as_config_or_enroll_path_never_block_the_daemon() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let mut d = env.daemon(&harness::web_config(
        Env::enroll_list(&[&client]),
        &[("web-1", &pods[0])],
    ));
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);

    // The config file replaced by a FIFO: refused, previous state kept.
    fs::remove_file(&d.config).unwrap();
    nix::unistd::mkfifo(&d.config, mode).unwrap();
    wait_log(&d, "a FIFO, not a regular file", Duration::from_secs(5));
    assert_eq!(tally(&env.connect(&client, VIP, 5)).get("web-1"), Some(&5));

    // A FIFO listed for enrollment: that entry only.
    let fifo = env.dir.join("ns-fifo");
    nix::unistd::mkfifo(&fifo, mode).unwrap();
    fs::remove_file(&d.config).unwrap();
    let enrolled = json!([client.path(), fifo.to_str().unwrap()]);
    d.write_config(&harness::web_config(enrolled, &[("web-2", &pods[1])]));
    let dump = d.wait_dump(Duration::from_secs(5), |d| {
        workload_uids(d) == ["Kubernetes//Pod/default/web-2"]
    });
    let e = dump["enroll_errors"][0].as_str().unwrap_or_default();
    assert!(
        e.contains("enroll.netns[1]") && e.contains("a FIFO"),
        "{dump:#}"
    );
    assert_eq!(tally(&env.connect(&client, VIP, 5)).get("web-2"), Some(&5));

    let t = Instant::now();
    assert!(d.stop().success(), "{}", d.log());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// Runs `kmesh ARGS` that must be refused; kills it if it is still
/// running after 5 s (it started instead). Returns (exit code, stderr).
fn refused(env: &Env, args: &[&str]) -> (Option<i32>, String) {
    let err = env.dir.join("refused.err");
    let mut child = Command::new(KMESH)
        .args(args)
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let status = harness::wait_or_kill(&mut child, Duration::from_secs(5));
    (status.code(), fs::read_to_string(&err).unwrap_or_default())
}

/// Item 7 (flags). Fails before the fix: `--watch-interval inf` panicked,
/// and a map size of 0 or 2^32-1 failed in the BPF loader ("Invalid
/// argument") without naming the flag.
#[test]
fn bad_numbers_on_the_command_line_are_refused_naming_the_flag() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let cfg = env.dir.join("cli.json");
    fs::write(
        &cfg,
        harness::web_config(Env::enroll_list(&[&client]), &[]).to_string(),
    )
    .unwrap();
    let sock = env.dir.join("cli.sock");
    let bpffs = env.bpffs.join("cli");
    let base = [
        "daemon",
        "--config",
        cfg.to_str().unwrap(),
        "--cgroup",
        env.cgroup.to_str().unwrap(),
        "--bpffs",
        bpffs.to_str().unwrap(),
        "--admin-socket",
        sock.to_str().unwrap(),
        "--metrics-addr",
        "off",
        "--admin-addr",
        "off",
        "--readiness-addr",
        "off",
    ];
    let mut cases = vec![];
    for v in ["inf", "NaN", "-1", "0", "1e300", "soon"] {
        cases.push(("--watch-interval", v, "seconds"));
        cases.push(("--dns-timeout", v, "seconds"));
    }
    for flag in [
        "--max-vips",
        "--max-workload-ips",
        "--max-endpoints",
        "--max-enrolled-netns",
        "--max-port-overrides",
        "--max-sockets",
    ] {
        for v in ["0", "4294967295", "4194305"] {
            cases.push((flag, v, "1..=4194304"));
        }
    }
    for (flag, value, want) in cases {
        let arg = format!("{flag}={value}");
        let mut args = base.to_vec();
        args.push(&arg);
        let (code, err) = refused(&env, &args);
        assert_eq!(code, Some(2), "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(want) && !err.contains("panicked"),
            "{flag} {value}: {err}"
        );
    }
    assert!(!bpffs.exists(), "nothing was loaded");
    let (code, err) = refused(
        &env,
        &[
            "ctl",
            "dump",
            "--admin-socket",
            "/nonexistent",
            "--timeout",
            "inf",
        ],
    );
    assert_eq!(code, Some(2), "{err}");

    // The largest size is accepted and loads.
    let d = env
        .daemon_args(
            &harness::web_config(Env::enroll_list(&[&client]), &[]),
            &["--max-endpoints", "4194304"],
        )
        .unwrap();
    assert_eq!(d.dump()["maps"]["km_endpoint"]["capacity"], 4194304);
}

/// Item 9 (client side). Fails before the fix: `kmesh ctl dump` waited
/// forever on a daemon that accepts and never answers.
#[test]
fn ctl_dump_gives_up_on_a_daemon_that_never_answers() {
    let env = Env::new();
    let path = env.dir.join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let held = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(30));
        drop(s);
    });
    let t = Instant::now();
    let (code, err) = refused_within(
        &["ctl", "dump", "--admin-socket", path.to_str().unwrap()],
        Duration::from_secs(20),
    );
    let took = t.elapsed();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no answer for 10s"), "{err}");
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(13)).contains(&took),
        "{took:?}"
    );
    drop(held);
}

/// Like `refused`, with any timeout and no Env.
fn refused_within(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(KMESH)
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, format!("still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU time (user + system) of process `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

/// Sets the soft RLIMIT_NOFILE of `pid` (the hard one stays: raising
/// it again would need CAP_SYS_RESOURCE).
fn set_nofile(pid: u32, n: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer; no new limit given.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: old.rlim_max,
    };
    // SAFETY: lim is a valid rlimit; the old value is not asked for.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// `n` admin clients that connect and never send anything.
fn idle_clients(sock: &Path, n: usize) -> Vec<UnixStream> {
    (0..n).map(|_| UnixStream::connect(sock).unwrap()).collect()
}

/// Item 9 (server side). Fails before the fix: an idle client was held
/// forever; with descriptors exhausted the accept loop spun (a full CPU)
/// and reloads failed ("Too many open files"), since every waiting
/// client was accepted.
#[test]
fn admin_clients_are_bounded_timed_out_and_emfile_backs_off() {
    use std::io::Read;
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let enrolled = Env::enroll_list(&[&client]);
    let mut d = env.daemon(&harness::web_config(
        enrolled.clone(),
        &[("web-1", &pods[0])],
    ));
    let pid = d.pid();

    // Descriptors exhausted: accept fails with EMFILE and must back off.
    let base = open_fds(pid);
    set_nofile(pid, base + 3);
    let held = idle_clients(&d.sock, 10);
    std::thread::sleep(Duration::from_millis(500));
    let (c0, t0) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(pid) - c0;
    eprintln!(
        "daemon CPU with fds exhausted: {ticks} ticks in {:?}",
        t0.elapsed()
    );
    assert!(ticks < 20, "accept loop spins: {ticks} ticks in 2 s");
    assert!(d.log().contains("accept failed"), "{}", d.log());
    drop(held);

    // Room for the bounded number of clients and a reload, not for all
    // the waiting ones: the bound keeps the rest in the backlog.
    std::thread::sleep(Duration::from_secs(6));
    let base = open_fds(pid);
    set_nofile(pid, base + 16 + 12);
    let held = idle_clients(&d.sock, 50);
    std::thread::sleep(Duration::from_millis(500));
    let fds = open_fds(pid);
    assert!(fds <= base + 16, "{fds} fds open, {base} before 50 clients");
    let (c0, t0) = (cpu_ticks(pid), Instant::now());
    d.write_config(&harness::web_config(enrolled, &[("web-2", &pods[1])]));
    wait_log(&d, "config file changed: applied", Duration::from_secs(5));
    let ticks = cpu_ticks(pid) - c0;
    eprintln!(
        "daemon CPU with 50 idle clients and a reload: {ticks} ticks in {:?}",
        t0.elapsed()
    );
    assert_eq!(
        tally(&env.connect(&client, VIP, 10)).get("web-2"),
        Some(&10)
    );
    drop(held);
    assert_eq!(workload_uids(&d.dump()), ["Kubernetes//Pod/default/web-2"]);

    // An idle client is dropped after the request timeout (5 s).
    let mut idle = UnixStream::connect(&d.sock).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(idle.read(&mut buf).unwrap_or(usize::MAX), 0, "not closed");
    assert!(t.elapsed() >= Duration::from_secs(4), "{:?}", t.elapsed());

    assert!(d.stop().success());
}

/// Item 8. Fails before the fix: every answer was an endpoint, so about
/// half of these connections went to a server on the client pod's own
/// loopback (and the rest of the junk was written to the maps too).
#[test]
fn dns_answers_that_are_loopback_multicast_or_broadcast_are_never_endpoints() {
    use harness::dns::{Dnsmasq, DOMAIN};
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let ext = env.pod(11, &[]);
    env.serve(&ext, &[format!("{}:8443", ext.v4)], "ext");
    // What a bad answer would reach: the client's own loopback.
    env.serve(&client, &["127.0.0.1:8443".to_string()], "own-loopback");
    let api = format!("api.{DOMAIN}");
    let bad = [
        "127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "ff02::1",
        "::ffff:127.0.0.1",
    ];
    let ext_ip = ext.v4.to_string();
    let mut records: Vec<(&str, &str)> = bad.iter().map(|b| (api.as_str(), *b)).collect();
    records.push((&api, &ext_ip));
    let dns = Dnsmasq::start(1, &records);
    let cfg = json!({
        "enroll": {"netns": [client.path()]},
        "services": [{"name": "api", "hostname": api, "addresses": ["10.96.1.1"],
                      "ports": [{"service_port": 443, "target_port": 8443}],
                      "resolution": "DNS"}],
    });
    let server = dns.addr.to_string();
    let d = env
        .daemon_args(&cfg, &["--dns-server", &server, "--dns-timeout", "0.5"])
        .unwrap();
    let dump = d.wait_dump(Duration::from_secs(5), |d| d["dns"][&api] != json!([]));
    assert_eq!(
        dump["dns"][&api],
        json!([ext_ip]),
        "{dump:#}\ndnsmasq:\n{}",
        dns.log()
    );
    assert_eq!(
        tally(&env.connect(&client, "10.96.1.1:443", 30)).get("ext"),
        Some(&30)
    );
    // Logged when the answer changes, not at every refresh (TTL 1 s).
    std::thread::sleep(Duration::from_millis(2500));
    let log = d.log();
    assert_eq!(log.matches("never used as endpoints").count(), 1, "{log}");
    for b in bad {
        let ip: std::net::IpAddr = b.parse().unwrap();
        assert!(log.contains(&format!("{ip} (")), "{b} not named: {log}");
    }
}
