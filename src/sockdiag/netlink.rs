//! The NETLINK_SOCK_DIAG wire protocol: requests, replies and the kernel's
//! inet_diag structures, by byte offset. Apart from the policy side
//! (which sockets to destroy) because it is the one part that must match
//! the kernel's struct layouts.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self as sock, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

use super::{
    canonical, TcpSock, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LISTEN,
    TCP_NEW_SYN_RECV, TCP_SYN_RECV,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_HDR: usize = 16;
pub(super) const SOCKID_LEN: usize = 48;
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// inet_diag_msg: family, state, timer, retrans, the sockid, five u32s.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// The states in which a connection can still carry data, so a policy
/// change must cut it, and LISTEN, to tell which of them were accepted
/// (`TcpSock::inbound`). TIME_WAIT is left alone.
const STATES: u32 = 1 << TCP_LISTEN
    | 1 << TCP_ESTABLISHED
    | 1 << TCP_SYN_RECV
    | 1 << TCP_NEW_SYN_RECV
    | 1 << TCP_FIN_WAIT1
    | 1 << TCP_FIN_WAIT2
    | 1 << TCP_CLOSE_WAIT;

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

/// One NETLINK_SOCK_DIAG socket, in the namespace current when it was opened.
pub(super) struct Diag {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Diag {
    pub(super) fn open() -> io::Result<Self> {
        let fd = sock::socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        // Dump replies come in skbs of up to 32 KiB; twice that leaves room.
        Ok(Diag {
            fd,
            seq: 0,
            buf: vec![0; 64 << 10],
        })
    }

    /// Sends one request (nlmsghdr + inet_diag_req_v2) and returns its seq.
    fn send(&mut self, ty: u16, flags: i32, family: u8, id: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut m = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
        m.extend_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&((flags | libc::NLM_F_REQUEST) as u16).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
        // Only dumps look at the states; lookups and destroys go by the id.
        m.extend_from_slice(&STATES.to_ne_bytes());
        m.extend_from_slice(id);
        let kernel = sock::NetlinkAddr::new(0, 0);
        loop {
            match sock::sendto(self.fd.as_raw_fd(), &m, &kernel, MsgFlags::empty()) {
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
                Ok(n) if n == m.len() => return Ok(self.seq),
                Ok(n) => return Err(io::Error::other(format!("short netlink send: {n}"))),
            }
        }
    }

    /// Reads the replies to `seq` until NLMSG_DONE or NLMSG_ERROR (an ack
    /// when its error is 0), collecting the sockets they report.
    fn replies(&mut self, seq: u32, out: &mut Vec<TcpSock>) -> io::Result<()> {
        loop {
            let n = match sock::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_TRUNC) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(n) if n > self.buf.len() => {
                    return Err(io::Error::other(format!(
                        "netlink reply of {n} bytes truncated"
                    )))
                }
                Ok(n) => n,
            };
            let mut at = 0;
            while at + NLMSG_HDR <= n {
                let b = &self.buf[at..n];
                let len = u32_at(b, 0) as usize;
                if len < NLMSG_HDR || len > b.len() {
                    return Err(io::Error::other(format!(
                        "bad netlink message length {len}"
                    )));
                }
                let ty = u16::from_ne_bytes([b[4], b[5]]);
                let payload = &b[NLMSG_HDR..len];
                at += (len + 3) & !3;
                if u32_at(b, 8) != seq {
                    continue;
                }
                match i32::from(ty) {
                    libc::NLMSG_DONE | libc::NLMSG_ERROR => {
                        let err = if payload.len() >= 4 {
                            u32_at(payload, 0) as i32
                        } else {
                            0
                        };
                        return match err {
                            0 => Ok(()),
                            e => Err(io::Error::from_raw_os_error(-e)),
                        };
                    }
                    _ if ty == SOCK_DIAG_BY_FAMILY => out.extend(parse(payload)),
                    _ => {}
                }
            }
        }
    }

    pub(super) fn dump(&mut self, family: u8, out: &mut Vec<TcpSock>) -> io::Result<()> {
        let seq = self.send(
            SOCK_DIAG_BY_FAMILY,
            libc::NLM_F_DUMP,
            family,
            &[0; SOCKID_LEN],
        )?;
        self.replies(seq, out)
    }

    /// Looks one socket up by its 4-tuple (any cookie).
    pub(super) fn get(&mut self, local: SocketAddr, remote: SocketAddr) -> io::Result<TcpSock> {
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&local.port().to_be_bytes());
        id[2..4].copy_from_slice(&remote.port().to_be_bytes());
        let family = match (local.ip(), remote.ip()) {
            (IpAddr::V4(l), IpAddr::V4(r)) => {
                id[4..8].copy_from_slice(&l.octets());
                id[20..24].copy_from_slice(&r.octets());
                libc::AF_INET
            }
            (l, r) => {
                id[4..20].copy_from_slice(&v6(l).octets());
                id[20..36].copy_from_slice(&v6(r).octets());
                libc::AF_INET6
            }
        };
        // INET_DIAG_NOCOOKIE: match whatever socket holds the 4-tuple.
        id[40..48].fill(0xff);
        let seq = self.send(SOCK_DIAG_BY_FAMILY, libc::NLM_F_ACK, family as u8, &id)?;
        let mut found = Vec::new();
        self.replies(seq, &mut found)?;
        found.pop().ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    pub(super) fn destroy(&mut self, sk: &TcpSock) -> io::Result<()> {
        let seq = self.send(SOCK_DESTROY, libc::NLM_F_ACK, sk.family, &sk.id)?;
        self.replies(seq, &mut Vec::new())
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Decodes an inet_diag_msg.
fn parse(p: &[u8]) -> Option<TcpSock> {
    let (family, id) = (
        p.get(..MSG_LEN)?[0],
        p[4..4 + SOCKID_LEN].try_into().unwrap(),
    );
    let addr = |port: &[u8], ip: &[u8]| {
        let port = u16::from_be_bytes([port[0], port[1]]);
        let ip: IpAddr = match i32::from(family) {
            libc::AF_INET => <[u8; 4]>::try_from(&ip[..4]).unwrap().into(),
            libc::AF_INET6 => <[u8; 16]>::try_from(ip).unwrap().into(),
            _ => return None,
        };
        Some(canonical(SocketAddr::new(ip, port)))
    };
    Some(TcpSock {
        local: addr(&p[4..6], &p[8..24])?,
        remote: addr(&p[6..8], &p[24..40])?,
        state: p[1],
        inbound: false,
        family,
        id,
    })
}
