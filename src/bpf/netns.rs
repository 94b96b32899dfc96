//! A network namespace's cookie without getsockopt(SO_NETNS_COOKIE) (Linux
//! 5.14): a BPF program sees a connect made inside the namespace. Race-free:
//! the program is attached to a fresh cgroup that holds only one child
//! process of ours, made for the one question, so whatever it records is
//! that namespace's cookie. The cookie is the one the data path's connect4
//! program computes for sockets there (same helper).

use std::{
    ffi::CString,
    fs, io,
    mem::MaybeUninit,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::PathBuf,
    sync::Mutex,
};

use libbpf_rs::{
    skel::{OpenSkel, SkelBuilder},
    MapCore, MapFlags, OpenObject,
};

#[allow(
    clippy::all,
    clippy::pedantic,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    unused_imports,
    unsafe_op_in_unsafe_fn
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/netns.skel.rs"));
}

/// Removes the probe cgroup (empty once the child is reaped).
struct CgroupDir(PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("netns cookie probe: {what}: {e}"))
}

/// The cookie of the network namespace `ns` (an open nsfs file).
pub fn netns_cookie_by_connect(ns: &fs::File) -> io::Result<u64> {
    // One question at a time: the cgroup name and the map's one slot.
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let root = crate::sys::cgroup2_mount()?;
    let dir = CgroupDir(root.join(format!("kmesh-netns-probe-{}", std::process::id())));
    let _ = fs::remove_dir(&dir.0);
    fs::create_dir(&dir.0).map_err(|e| err(&dir.0.display().to_string(), e))?;
    let cg = fs::File::open(&dir.0)?;

    let mut storage = MaybeUninit::<OpenObject>::uninit();
    let open = skel::NetnsSkelBuilder::default()
        .open(&mut storage)
        .map_err(|e| err("opening the program", e))?;
    let skel = open.load().map_err(|e| err("loading the program", e))?;
    let _link = skel
        .progs
        .kmesh_netns_probe
        .attach_cgroup(cg.as_raw_fd())
        .map_err(|e| err("attaching the program", e))?;

    let procs = CString::new(dir.0.join("cgroup.procs").as_os_str().as_bytes())
        .map_err(|e| err("cgroup path", e))?;
    let ns_fd = ns.as_raw_fd();
    // SAFETY: the child makes only raw system calls (async-signal-safe) on
    // values prepared before the fork, then _exit()s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(err("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; each step's failure is the exit code.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(2);
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                libc::_exit(3);
            }
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                libc::_exit(4);
            }
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 9u16.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                },
                sin_zero: [0; 8],
            };
            // Refused by the program (EPERM) once it has the cookie.
            libc::connect(
                s,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(err("waitpid", e));
        }
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let step = match libc::WEXITSTATUS(status) {
            2 => "joining the probe cgroup",
            3 => "entering the netns",
            4 => "creating a socket in the netns",
            _ => "the child process",
        };
        return Err(err(step, format!("failed (status {status:#x})")));
    }
    let value = skel
        .maps
        .km_netns_probe
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .map_err(|e| err("reading the result", e))?
        .and_then(|v| {
            v.get(..8)
                .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
        })
        .unwrap_or(0);
    if value == 0 {
        return Err(err("result", "the program saw no connect"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Agrees with getsockopt(SO_NETNS_COOKIE) where the kernel has both.
    #[test]
    fn probe_reads_the_same_cookie_as_getsockopt() {
        let own = fs::File::open("/proc/self/ns/net").unwrap();
        let by_bpf = netns_cookie_by_connect(&own).unwrap();
        match crate::sys::current_netns_cookie() {
            Ok(by_sockopt) => assert_eq!(by_bpf, by_sockopt),
            Err(e) => println!("SKIP: no SO_NETNS_COOKIE here ({e}); probe read {by_bpf}"),
        }
        assert_ne!(by_bpf, 0);
    }
}
