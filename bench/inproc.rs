//! What the in-process connect benchmarks (connect, authz) share: a
//! listener, connect-and-reset loops, and joining the bench cgroup.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::Instant,
};

/// One connect + immediate RST close (SO_LINGER 0), so no TIME_WAIT builds
/// up across hundreds of thousands of connects.
pub fn connect_once(addr: &SocketAddr) {
    let s = TcpStream::connect(addr).expect("connect");
    let l = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &l).expect("SO_LINGER");
}

pub fn rate(addr: &SocketAddr, n: u32) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        connect_once(addr);
    }
    f64::from(n) / t.elapsed().as_secs_f64()
}

/// std's listener has a backlog of 128: when the accept thread falls behind
/// a connect burst, SYNs are dropped and the client waits out a 1 s
/// retransmit. Use the netns' somaxconn instead.
pub fn listen(addr: SocketAddr) -> TcpListener {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )
    .unwrap();
    listen(&fd, Backlog::new(4096).unwrap()).unwrap();
    TcpListener::from(fd)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Moves this process into a cgroup and back out on drop, so the harness
/// can remove the cgroup afterwards.
pub struct InCgroup(String);

impl InCgroup {
    pub fn join(dir: &std::path::Path) -> InCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_string();
        kmesh::sys::join_cgroup(dir).unwrap();
        InCgroup(rel)
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let root = kmesh::sys::cgroup2_mount().unwrap();
        let back = root.join(self.0.trim_start_matches('/'));
        kmesh::sys::join_cgroup(&back).unwrap();
    }
}

/// Rate rounds: each round measures both sides back to back (`measure(false)`
/// then `measure(true)`, the order alternating), and the ratio true/false is
/// taken within the round, so drift of the machine between rounds cancels
/// out. Returns (false side, true side, ratios).
pub fn paired_rounds(
    rounds: u32,
    mut measure: impl FnMut(bool) -> f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut base, mut other, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let (b, o) = if r % 2 == 0 {
            let b = measure(false);
            (b, measure(true))
        } else {
            let o = measure(true);
            (measure(false), o)
        };
        base.push(b);
        other.push(o);
        ratios.push(o / b);
    }
    (base, other, ratios)
}

/// Run time per call of the data path's program `prog` over `n` connects to
/// `addr`, from the kernel's own accounting (BPF_STATS_RUN_TIME).
pub fn ns_per_run(dp: &kmesh::bpf::Datapath, prog: &str, n: u32, addr: &SocketAddr) -> f64 {
    let _stats = kmesh::bpf::RunStatsGuard::enable().expect("BPF_STATS_RUN_TIME");
    let find = || {
        dp.run_stats()
            .into_iter()
            .find(|s| s.prog == prog)
            .unwrap_or_else(|| panic!("no program {prog}"))
    };
    let before = find();
    for _ in 0..n {
        connect_once(addr);
    }
    let after = find();
    (after.run_time_ns - before.run_time_ns) as f64 / (after.runs - before.runs).max(1) as f64
}
