//! The host side of the harness: network namespaces, cgroups and the
//! sweep of what dead test runs left, each without spawning a process
//! where it can (a process start costs about a second in the matrix's
//! emulated guests).

use super::*;

/// `ip -n NS -batch -`, one command per line, panicking with ip's message
/// on failure. One process for the lot: in the kernel matrix's emulated
/// guests a process start costs about a second, and a pod took nine.
pub(super) fn ip_batch(ns: &str, cmds: &[String]) {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ip");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(cmds.join("\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} -batch {cmds:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `ip netns add` does, without a process: a new network namespace
/// (unshared by a thread of its own, so this process's stay as they are)
/// bind-mounted at /run/netns/NAME, where `ip -n` and the daemon find it.
pub(super) fn add_netns(name: &str) {
    let dir = Path::new("/run/netns");
    fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let made = std::thread::spawn(move || -> nix::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &path,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .unwrap();
    made.unwrap_or_else(|e| panic!("netns {name}: {e}"));
}

/// What `ip netns del` does, without a process: the namespace goes once
/// its last user (a process, a socket) does.
pub(super) fn del_netns(name: &str) {
    let path = Path::new("/run/netns").join(name);
    let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_file(&path);
}

/// Pid encoded in a harness name `kmt<pid>x…`, if any.
pub(super) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("kmt")?;
    rest.split('x').next()?.parse().ok()
}

pub(super) fn dead(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes a harness cgroup. Only for a dead run's cgroup does it first end
/// the processes left in it (cgroup.kill): a live run reaps its own children,
/// and a bench process may still be inside its cgroup by mistake.
pub(super) fn remove_cgroup(dir: &Path, kill_leftovers: bool) {
    if kill_leftovers {
        let _ = fs::write(dir.join("cgroup.kill"), "1");
    }
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where cgroup hierarchies are mounted: the cgroup2 one and, on a hybrid
/// host, each v1 controller's (podman with cgroupfs makes a container's
/// parent cgroup in every one).
pub(super) fn cgroup_mounts() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let at = l.split(' ').nth(4)?;
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(at))
        })
        .collect()
}

/// `remove_cgroup` for a cgroup and the cgroups under it (podman's
/// `conmon`, a container's own), deepest first.
pub(super) fn remove_cgroup_tree(dir: &Path, kill_leftovers: bool) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path(), kill_leftovers);
            }
        }
    }
    remove_cgroup(dir, kill_leftovers);
}

/// Removes namespaces, cgroups and bpffs mounts left by dead test runs.
pub(super) fn sweep() {
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if owner_pid(&name).is_some_and(dead) {
                del_netns(&name);
            }
        }
    }
    for rd in cgroup_mounts().iter().filter_map(|m| fs::read_dir(m).ok()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if owner_pid(&name).is_some_and(dead) {
                remove_cgroup_tree(&e.path(), true);
            }
        }
    }
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if owner_pid(&name).is_some_and(dead) {
                let _ = nix::mount::umount(&e.path().join("bpffs"));
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}
