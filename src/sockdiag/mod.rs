//! Closing established TCP connections that an authorization policy now
//! denies, through the kernel's sock_diag netlink interface: a
//! SOCK_DIAG_BY_FAMILY dump lists a namespace's TCP sockets and SOCK_DESTROY
//! aborts one (tcp_abort: the local socket sees ECONNABORTED, the peer gets
//! a RST). Destroying needs CONFIG_INET_DIAG_DESTROY, which `probe_destroy`
//! checks once at start.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

mod netlink;

use netlink::{u32_at, Diag, SOCKID_LEN};

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_FIN_WAIT1: u8 = 4;
pub const TCP_FIN_WAIT2: u8 = 5;
pub const TCP_CLOSE_WAIT: u8 = 8;
/// Request sockets live in the established hash as NEW_SYN_RECV but are
/// reported as SYN_RECV; asking for both bits makes every kernel include them.
const TCP_NEW_SYN_RECV: u8 = 12;
const TCP_LISTEN: u8 = 10;

/// One TCP socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSock {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel TCP state (TCP_ESTABLISHED, ...); request sockets say SYN_RECV.
    pub state: u8,
    /// Its local port is one a listener of the netns accepts on: the
    /// connection came in (an authorization policy of its local address
    /// applies), rather than going out from an ephemeral port.
    pub inbound: bool,
    family: u8,
    /// The kernel's inet_diag_sockid verbatim: SOCK_DESTROY finds the
    /// socket by it, and its cookie keeps a destroy from hitting a newer
    /// socket that reused the 4-tuple.
    id: [u8; SOCKID_LEN],
}

impl TcpSock {
    /// The socket's kernel cookie (as SO_COOKIE and BPF's socket cookie).
    pub fn cookie(&self) -> u64 {
        u64::from(u32_at(&self.id, 40)) | u64::from(u32_at(&self.id, 44)) << 32
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("network namespace {ns}: setns: {source}{}", hint(.source))]
    Setns { ns: String, source: io::Error },
    /// Opening the netlink socket or dumping the sockets (`op` says which).
    #[error("network namespace {ns}: {op}: {source}")]
    Netlink {
        ns: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("network namespace {ns}: destroy TCP socket {local} -> {remote}: {source}{}", hint(.source))]
    Destroy {
        ns: String,
        local: SocketAddr,
        remote: SocketAddr,
        source: io::Error,
    },
    #[error("network namespace {ns}: sock_diag thread panicked")]
    Panicked { ns: String },
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        // setns's answer for a file that is not a network namespace.
        Some(libc::EINVAL) => " (not a network-namespace file?)",
        Some(libc::EOPNOTSUPP) => " (kernel built without CONFIG_INET_DIAG_DESTROY?)",
        Some(libc::EPERM) => " (needs CAP_NET_ADMIN in the namespace's user namespace)",
        _ => "",
    }
}

/// In the network namespace `netns` (an open nsfs file, e.g. /run/netns/X or
/// /proc/PID/ns/net), lists the TCP sockets (IPv4 and IPv6; states
/// ESTABLISHED, SYN_RECV, CLOSE_WAIT and FIN_WAIT1/2) and destroys
/// (SOCK_DESTROY) each for which `doom` returns true. Returns what was
/// destroyed; a socket that closed by itself between the dump and its
/// destroy is not an error and is not in the result. The first other
/// failure ends the run (they are not per-socket: missing
/// CONFIG_INET_DIAG_DESTROY, no CAP_NET_ADMIN). Runs in a short-lived
/// thread that setns()es into `netns`, so the caller's namespace never
/// changes.
pub fn destroy_matching(
    netns: &std::fs::File,
    doom: impl Fn(&TcpSock) -> bool + Send,
) -> Result<Vec<TcpSock>, DiagError> {
    let ns = &describe(netns);
    let netlink = |op| {
        move |source| DiagError::Netlink {
            ns: ns.clone(),
            op,
            source,
        }
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                |e| DiagError::Setns {
                    ns: ns.clone(),
                    source: e.into(),
                },
            )?;
            let mut nl = Diag::open().map_err(netlink("open NETLINK_SOCK_DIAG socket"))?;
            let mut socks = Vec::new();
            nl.dump(libc::AF_INET as u8, &mut socks)
                .map_err(netlink("dump IPv4 TCP sockets"))?;
            nl.dump(libc::AF_INET6 as u8, &mut socks)
                .map_err(netlink("dump IPv6 TCP sockets"))?;
            let (listeners, mut socks): (Vec<TcpSock>, Vec<TcpSock>) =
                socks.into_iter().partition(|sk| sk.state == TCP_LISTEN);
            for sk in &mut socks {
                sk.inbound = listeners.iter().any(|l| {
                    l.local.port() == sk.local.port()
                        && (l.local.ip().is_unspecified() || l.local.ip() == sk.local.ip())
                });
            }
            let mut destroyed = Vec::new();
            for sk in socks.into_iter().filter(|sk| doom(sk)) {
                match nl.destroy(&sk) {
                    Ok(()) => destroyed.push(sk),
                    // Gone already (ENOENT), or its 4-tuple now belongs to a
                    // newer socket (ESTALE, the cookie differs).
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)) => {}
                    Err(source) => {
                        let (local, remote) = (sk.local, sk.remote);
                        return Err(DiagError::Destroy {
                            ns: ns.clone(),
                            local,
                            remote,
                            source,
                        });
                    }
                }
            }
            Ok(destroyed)
        })
        .join()
        .unwrap_or_else(|_| Err(DiagError::Panicked { ns: ns.clone() }))
    })
}

/// Whether this kernel can destroy sockets (CONFIG_INET_DIAG_DESTROY, and
/// the tcp_diag module where it is one). Destroys the server side of a
/// throwaway connection on 127.0.0.1 in the caller's own namespace and
/// checks that both ends saw it; Err says why not.
pub fn probe_destroy() -> Result<(), String> {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    let ctx = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    let listener = TcpListener::bind("127.0.0.1:0").map_err(ctx("listen"))?;
    let client = TcpStream::connect(listener.local_addr().map_err(ctx("listen"))?)
        .map_err(ctx("connect"))?;
    let (server, remote) = listener.accept().map_err(ctx("accept"))?;
    let local = server.local_addr().map_err(ctx("accept"))?;
    let mut nl = Diag::open().map_err(ctx("open NETLINK_SOCK_DIAG socket"))?;
    // An exact lookup rather than a dump: the caller's namespace may hold
    // many sockets, and the lookup returns the cookie the destroy wants.
    let sk = nl.get(local, remote).map_err(ctx("sock_diag lookup"))?;
    if let Err(e) = nl.destroy(&sk) {
        return Err(format!("SOCK_DESTROY: {e}{}", hint(&e)));
    }
    let mut buf = [0u8; 1];
    for (end, mut s, want) in [
        ("destroyed", &server, libc::ECONNABORTED),
        ("peer", &client, libc::ECONNRESET),
    ] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .map_err(ctx("set timeout"))?;
        match s.read(&mut buf) {
            Err(e) if e.raw_os_error() == Some(want) => {}
            r => {
                return Err(format!(
                    "SOCK_DESTROY done, but the {end} socket read {r:?}"
                ))
            }
        }
    }
    Ok(())
}

/// Names an nsfs file for error messages: its /proc/self/fd link reads
/// `net:[inode]` for a namespace, or the path of anything else.
fn describe(f: &std::fs::File) -> String {
    let fd = f.as_raw_fd();
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("fd {fd}"))
}

/// A v4-mapped IPv6 address as plain IPv4, so policy sees one spelling of a
/// peer whether the socket is AF_INET or a dual-stack AF_INET6 one.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(crate::model::canonical(a.ip()), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Ipv4Addr;
    use std::net::{TcpListener, TcpStream};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// A throwaway named netns with lo up, deleted on drop (also when a
    /// test fails).
    struct Netns {
        name: String,
        file: std::fs::File,
    }

    impl Netns {
        fn new() -> Netns {
            static N: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "kmeshdiag-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            ip(&["netns", "add", &name]);
            // Guard first, so a failure below still deletes the namespace.
            let file = std::fs::File::open("/dev/null").unwrap();
            let mut ns = Netns { name, file };
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
            ns.file = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
            ns
        }

        /// Runs `f` on a thread inside the namespace; sockets it creates
        /// stay there.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .unwrap();
                    f()
                })
                .join()
                .unwrap()
            })
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn ip(args: &[&str]) {
        let st = Command::new("ip").args(args).status().unwrap();
        assert!(st.success(), "ip {args:?}: {st}");
    }

    fn own_netns() -> std::path::PathBuf {
        std::fs::read_link("/proc/thread-self/ns/net").unwrap()
    }

    /// A connection: client and accepted server ends, and each end's
    /// (local, remote) as policy would see them, taken while connected.
    struct Conn {
        client: TcpStream,
        server: TcpStream,
        server_side: (SocketAddr, SocketAddr),
        client_side: (SocketAddr, SocketAddr),
    }

    impl Conn {
        fn open(listener: &TcpListener, to: SocketAddr) -> Conn {
            let client = TcpStream::connect(to).unwrap();
            let (server, _) = listener.accept().unwrap();
            for s in [&client, &server] {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            }
            let ends = |s: &TcpStream| {
                (
                    canonical(s.local_addr().unwrap()),
                    canonical(s.peer_addr().unwrap()),
                )
            };
            Conn {
                server_side: ends(&server),
                client_side: ends(&client),
                client,
                server,
            }
        }

        fn echo_works(&self) -> bool {
            let mut b = [0u8; 4];
            (&self.client).write_all(b"ping").is_ok()
                && (&self.server).read_exact(&mut b).is_ok()
                && (&self.server).write_all(&b).is_ok()
                && (&self.client).read_exact(&mut b).is_ok()
                && &b == b"ping"
        }
    }

    fn list(ns: &Netns) -> Vec<TcpSock> {
        let seen = Mutex::new(Vec::new());
        let none = destroy_matching(&ns.file, |s| {
            seen.lock().unwrap().push(s.clone());
            false
        })
        .unwrap();
        assert!(none.is_empty());
        seen.into_inner().unwrap()
    }

    fn find(socks: &[TcpSock], (local, remote): (SocketAddr, SocketAddr)) -> Option<&TcpSock> {
        socks
            .iter()
            .find(|s| s.local == local && s.remote == remote)
    }

    /// Listeners on 127.0.0.1, ::1 and [::] (dual-stack: a v4 client there
    /// gives a v6 socket with v4-mapped addresses), 3 connections to each, and
    /// one half-closed on 127.0.0.1 (CLOSE_WAIT / FIN_WAIT).
    fn setup(ns: &Netns) -> (Vec<TcpListener>, [Vec<Conn>; 3], Conn) {
        ns.run(|| {
            let ls = ["127.0.0.1:0", "[::1]:0", "[::]:0"].map(|a| TcpListener::bind(a).unwrap());
            let to = ls.each_ref().map(|l| l.local_addr().unwrap());
            let dual4 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), to[2].port());
            let conns = |l: &TcpListener, to| (0..3).map(|_| Conn::open(l, to)).collect();
            let sets = [
                conns(&ls[0], to[0]),
                conns(&ls[1], to[1]),
                conns(&ls[2], dual4),
            ];
            let half = Conn::open(&ls[0], to[0]);
            half.client.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!((&half.server).read(&mut [0u8; 1]).unwrap(), 0);
            (ls.into(), sets, half)
        })
    }

    #[test]
    fn lists_then_destroys_exactly_the_matching_sockets() {
        let ns = Netns::new();
        let before = own_netns();
        let (_ls, [v4, v6, mapped], half) = setup(&ns);
        let socks = list(&ns);
        assert_eq!(own_netns(), before);
        let all: Vec<&Conn> = v4.iter().chain(&v6).chain(&mapped).collect();
        for side in all.iter().flat_map(|c| [c.server_side, c.client_side]) {
            let sk = find(&socks, side).unwrap_or_else(|| panic!("{side:?} not in {socks:#?}"));
            assert_eq!(sk.state, TCP_ESTABLISHED);
            assert_ne!(sk.cookie(), 0);
        }
        for c in &mapped {
            let (l, r) = c.server_side;
            assert!(l.is_ipv4() && r.is_ipv4(), "mapped shown as {l} {r}");
            // An AF_INET6 socket underneath: the id destroy uses stays v6.
            assert_eq!(find(&socks, (l, r)).unwrap().family, libc::AF_INET6 as u8);
        }
        assert!(v6.iter().all(|c| c.server_side.1.is_ipv6()));
        assert_eq!(
            find(&socks, half.server_side).unwrap().state,
            TCP_CLOSE_WAIT
        );
        // FIN_WAIT1 until the FIN's (possibly delayed) ACK arrives.
        let st = find(&socks, half.client_side).unwrap().state;
        assert!([TCP_FIN_WAIT1, TCP_FIN_WAIT2].contains(&st), "{st}");
        // Both ends of every connection, and nothing else (no listeners).
        assert_eq!(socks.len(), 2 * (all.len() + 1), "{socks:#?}");

        // Doom the server side of the first connection of each kind, by the
        // remote (client) port, as a policy keyed on the peer would.
        let doomed = [&v4[0], &v6[0], &mapped[0]];
        let ports = doomed.map(|c| c.server_side.1.port());
        let destroyed = destroy_matching(&ns.file, |sk| ports.contains(&sk.remote.port())).unwrap();
        assert_eq!(own_netns(), before);
        let mut got: Vec<_> = destroyed.iter().map(|sk| (sk.local, sk.remote)).collect();
        let mut want = doomed.map(|c| c.server_side);
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let mut b = [0u8; 8];
        for c in doomed {
            // tcp_abort: RST to the peer, ECONNABORTED locally.
            let e = (&c.client).read(&mut b).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET), "client: {e}");
            let e = (&c.server).read(&mut b).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "server: {e}");
        }
        for c in v4[1..].iter().chain(&v6[1..]).chain(&mapped[1..]) {
            assert!(c.echo_works(), "{:?} was hurt", c.server_side);
        }
        let left = list(&ns);
        assert_eq!(
            left.len(),
            socks.len() - 6,
            "both ends of each doomed one are gone"
        );
        assert!(destroyed
            .iter()
            .all(|d| find(&left, (d.local, d.remote)).is_none()));
    }

    #[test]
    fn multipart_dump_sees_every_socket() {
        let ns = Netns::new();
        // 600 sockets at >= 88 bytes a message (header + inet_diag_msg) make
        // more than 52 KB, past the 32 KiB a single dump skb can hold.
        let (l, conns): (TcpListener, Vec<Conn>) = ns.run(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let to = l.local_addr().unwrap();
            let conns = (0..300).map(|_| Conn::open(&l, to)).collect();
            (l, conns)
        });
        let socks = list(&ns);
        assert_eq!(socks.len(), 600);
        for c in &conns {
            assert!(find(&socks, c.server_side).is_some() && find(&socks, c.client_side).is_some());
        }
        // Every other server side, by the client's port.
        let listen = l.local_addr().unwrap();
        let doom: Vec<u16> = conns
            .iter()
            .step_by(2)
            .map(|c| c.server_side.1.port())
            .collect();
        let destroyed = destroy_matching(&ns.file, |sk| {
            sk.local == listen && doom.contains(&sk.remote.port())
        })
        .unwrap();
        assert_eq!(destroyed.len(), 150);
        assert_eq!(
            list(&ns).len(),
            600 - 150 - 150,
            "the RST closes the clients too"
        );
    }

    #[test]
    fn bad_netns_file_is_a_clear_error() {
        let path = std::env::temp_dir().join(format!("kmeshdiag-notns-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let before = own_netns();
        let err = destroy_matching(&f, |_| true).unwrap_err();
        assert_eq!(own_netns(), before);
        assert!(matches!(err, DiagError::Setns { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("kmeshdiag-notns") && msg.contains("setns"),
            "{msg}"
        );
        assert!(msg.contains("not a network-namespace file"), "{msg}");
    }

    #[test]
    fn probe_destroy_works_here() {
        let ns = Netns::new();
        // In a private namespace, so the probe's connection is the only one
        // there and nothing on the host is touched.
        assert_eq!(ns.run(probe_destroy), Ok(()));
    }
}
