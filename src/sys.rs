//! Small OS helpers: network namespaces, cgroup2, netns cookies, reads on
//! sockhash sockets.

use std::{
    fs,
    io::{self, Read},
    net::TcpStream,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Instant,
};

use nix::sched::{setns, CloneFlags};

/// The cgroup2 mount point from /proc/mounts (the production attach point).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount in /proc/mounts"))
}

/// Checks that `dir` is a directory of a cgroup2 filesystem: the programs
/// attach only there, and the kernel's own answer to anything else (a
/// cgroup v1 or tmpfs directory) is a bare EBADF at attach time.
pub fn check_cgroup2(dir: &Path) -> Result<(), String> {
    let st =
        nix::sys::statfs::statfs(dir).map_err(|e| format!("--cgroup {}: {e}", dir.display()))?;
    if st.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Ok(());
    }
    let hint = match cgroup2_mount() {
        Ok(m) => format!("cgroup2 is mounted at {}", m.display()),
        Err(_) => "no cgroup2 filesystem is mounted".into(),
    };
    Err(format!(
        "--cgroup {}: not a cgroup2 directory ({hint})",
        dir.display()
    ))
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let f = fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    setns(f.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("setns {}: {e}", path.display())))
}

/// Moves the calling process into the cgroup2 directory `dir`.
pub fn join_cgroup(dir: &Path) -> io::Result<()> {
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("joining cgroup {}: {e}", dir.display())))
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// Cookie of the calling thread's current network namespace. An unbound
/// socket suffices, so this works in a namespace whose loopback is down.
pub fn current_netns_cookie() -> io::Result<u64> {
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer sized for the u64 the kernel writes.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Cookie of the network namespace at `path` (e.g. /run/netns/NAME or
/// /proc/PID/ns/net); see `netns_file_cookie`.
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    let f = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    netns_file_cookie(f)
}

/// Cookie of the network namespace `f` (an open nsfs file), read from a
/// short-lived thread so the caller's own namespace never changes. Kernels
/// without SO_NETNS_COOKIE (before 5.14) answer through a BPF probe
/// instead (see `crate::bpf::netns`). Every reader of a netns cookie goes
/// through here, so both ways serve every caller.
pub fn netns_file_cookie(f: std::fs::File) -> io::Result<u64> {
    let (f, by_sockopt) = std::thread::spawn(move || {
        let r = nix::sched::setns(
            std::os::fd::AsFd::as_fd(&f),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .map_err(io::Error::from)
        .and_then(|()| current_netns_cookie());
        (f, r)
    })
    .join()
    .map_err(|_| io::Error::other("netns cookie thread panicked"))?;
    match by_sockopt {
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
            crate::bpf::netns::netns_cookie_by_connect(&f)
        }
        other => other,
    }
}

/// The global addresses of the network namespace `f` (an open nsfs file):
/// neither loopback nor link-local. Read from a short-lived thread, as
/// `netns_file_cookie`.
pub fn netns_file_addresses(f: &std::fs::File) -> io::Result<Vec<std::net::IpAddr>> {
    let f = f.try_clone()?;
    std::thread::spawn(move || -> io::Result<Vec<std::net::IpAddr>> {
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&f),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )?;
        let mut out = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs()? {
            let Some(a) = ifa.address else { continue };
            let ip: std::net::IpAddr = if let Some(v4) = a.as_sockaddr_in() {
                v4.ip().into()
            } else if let Some(v6) = a.as_sockaddr_in6() {
                v6.ip().into()
            } else {
                continue;
            };
            let link_local = match ip {
                std::net::IpAddr::V4(v4) => v4.is_link_local(),
                std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
            };
            if !ip.is_loopback() && !link_local && !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    })
    .join()
    .map_err(|_| io::Error::other("netns address thread panicked"))?
}

/// One read() on a blocking socket that retries EAGAIN, counting the
/// retries in `eagain` (up to 10,000 in all, then the error is returned).
/// A socket in a sockhash (accelerated and waypoint connections) can see a
/// blocking read return EAGAIN after a wake-up that brought no data, such
/// as the peer's FIN or send space freed by ACKs: the kernel's
/// tcp_bpf_recvmsg waits once and then gives up (README, Known limits).
/// Retrying is what a non-blocking application does anyway. A read that
/// waited out the socket's read timeout is not retried: that EAGAIN is the
/// timeout (TimedOut). Ok(0) is EOF.
pub fn read_blocking(s: &TcpStream, buf: &mut [u8], eagain: &mut u32) -> io::Result<usize> {
    loop {
        let start = Instant::now();
        match (&*s).read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Asked only here: benchmark clients call this per request.
                let timeout = s.read_timeout()?;
                if timeout.is_some_and(|t| start.elapsed() >= t.mul_f32(0.9)) {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out"));
                }
                if *eagain >= 10_000 {
                    return Err(e);
                }
                *eagain += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            res => return res,
        }
    }
}

/// read_exact over `read_blocking`.
pub fn read_exact_blocking(s: &TcpStream, buf: &mut [u8], eagain: &mut u32) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match read_blocking(s, &mut buf[got..], eagain)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_netns_cookie_is_stable() {
        let a = netns_cookie(Path::new("/proc/self/ns/net")).unwrap();
        let b = current_netns_cookie().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, 0);
    }

    #[test]
    fn cgroup2_is_mounted() {
        assert!(cgroup2_mount().unwrap().join("cgroup.procs").exists());
    }

    #[test]
    fn only_a_cgroup2_directory_is_taken() {
        check_cgroup2(&cgroup2_mount().unwrap()).unwrap();
        let err = check_cgroup2(Path::new("/tmp")).unwrap_err();
        assert!(
            err.contains("--cgroup /tmp: not a cgroup2 directory (cgroup2 is mounted at"),
            "{err}"
        );
        let err = check_cgroup2(Path::new("/nonexistent-kmesh")).unwrap_err();
        assert!(err.starts_with("--cgroup /nonexistent-kmesh: "), "{err}");
    }
}
