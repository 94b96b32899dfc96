//! One connection event as the data path reports it (struct tele_event in
//! bpf/include/kmesh.h).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::bpf::kmesh_addr;

/// Why a connection ended (enum kmesh_tele_reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Normal,
    Reset,
    ConnectFailed,
    Timeout,
}

impl Reason {
    fn from_raw(v: u32) -> Reason {
        match v {
            1 => Reason::Reset,
            2 => Reason::ConnectFailed,
            3 => Reason::Timeout,
            _ => Reason::Normal,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Normal => "normal",
            Reason::Reset => "reset",
            Reason::ConnectFailed => "connect_failed",
            Reason::Timeout => "timeout",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Open,
    /// The socket reached TCP_CLOSE; a connect that failed is reported
    /// only this way (it never opened).
    Close(Reason),
}

/// One end's event. `passive`: the accepting end (reporter=destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnEvent {
    pub kind: Kind,
    pub passive: bool,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The client's destination before connect's rewrite (service VIP): on
    /// its open, and on the close of a connect that failed.
    pub orig: Option<SocketAddr>,
    /// Since the connect, on a client's open (its handshake) and on the
    /// close of a connect that failed; otherwise zero, and the reader takes
    /// the duration from the open.
    pub duration: Duration,
    /// When, on the kernel's monotonic clock.
    pub at: Duration,
    /// Bytes this end sent (and the peer acknowledged, or that went
    /// straight into the peer's queue), and received through TCP.
    pub sent: u64,
    pub received: u64,
    /// Of `sent`, what went straight into the peer's queue
    /// (acceleration): the peer's received, which its own event misses.
    pub redirected: u64,
    /// The socket had acceleration state: its peer may be a local end
    /// that redirected bytes into it.
    pub in_sockmap: bool,
}

/// Size of struct tele_event.
pub const EVENT_SIZE: usize = 120;

impl ConnEvent {
    pub fn parse(b: &[u8]) -> Option<ConnEvent> {
        if b.len() < EVENT_SIZE {
            return None;
        }
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let addr_at = |o: usize| -> IpAddr {
            let mut a = kmesh_addr::default();
            for (i, w) in a.ip6.iter_mut().enumerate() {
                *w = u32_at(o + 4 * i);
            }
            a.to_ip()
        };
        let port = |o: usize| u32_at(o) as u16;
        let orig_port = port(80);
        Some(ConnEvent {
            duration: Duration::from_nanos(u64_at(0)),
            sent: u64_at(8),
            received: u64_at(16),
            local: SocketAddr::new(addr_at(24), port(72)),
            remote: SocketAddr::new(addr_at(40), port(76)),
            orig: (orig_port != 0).then(|| SocketAddr::new(addr_at(56), orig_port)),
            kind: match u32_at(84) {
                0 => Kind::Open,
                _ => Kind::Close(Reason::from_raw(u32_at(88))),
            },
            passive: u32_at(92) != 0,
            at: Duration::from_nanos(u64_at(96)),
            redirected: u64_at(104),
            in_sockmap: u32_at(112) != 0,
        })
    }

    /// (client, server) addresses, whichever end reported.
    pub fn endpoints(&self) -> (SocketAddr, SocketAddr) {
        if self.passive {
            (self.remote, self.local)
        } else {
            (self.local, self.remote)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_layout() {
        let mut b = vec![0u8; EVENT_SIZE];
        b[0..8].copy_from_slice(&1_500_000u64.to_ne_bytes());
        b[8..16].copy_from_slice(&100u64.to_ne_bytes());
        b[16..24].copy_from_slice(&200u64.to_ne_bytes());
        let put = |b: &mut Vec<u8>, o: usize, ip: IpAddr| {
            let a = kmesh_addr::from_ip(ip);
            for (i, w) in a.ip6.iter().enumerate() {
                b[o + 4 * i..o + 4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
        };
        put(&mut b, 24, "10.0.0.1".parse().unwrap());
        put(&mut b, 40, "10.0.0.2".parse().unwrap());
        put(&mut b, 56, "10.96.0.1".parse().unwrap());
        b[72..76].copy_from_slice(&40000u32.to_ne_bytes());
        b[76..80].copy_from_slice(&8080u32.to_ne_bytes());
        b[80..84].copy_from_slice(&80u32.to_ne_bytes());
        b[84..88].copy_from_slice(&1u32.to_ne_bytes());
        b[88..92].copy_from_slice(&1u32.to_ne_bytes());
        b[96..104].copy_from_slice(&7_000u64.to_ne_bytes());
        b[104..112].copy_from_slice(&40u64.to_ne_bytes());
        b[112..116].copy_from_slice(&1u32.to_ne_bytes());
        let e = ConnEvent::parse(&b).unwrap();
        assert_eq!(e.kind, Kind::Close(Reason::Reset));
        assert_eq!(e.local, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(e.remote, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(e.orig, Some("10.96.0.1:80".parse().unwrap()));
        assert_eq!((e.sent, e.received), (100, 200));
        assert_eq!(e.duration, Duration::from_micros(1500));
        assert_eq!(e.at, Duration::from_micros(7));
        assert_eq!((e.redirected, e.in_sockmap), (40, true));
        assert!(!e.passive);
        assert!(ConnEvent::parse(&b[..50]).is_none());
    }
}
