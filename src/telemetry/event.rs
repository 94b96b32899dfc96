//! The connection events as the data path reports them (struct
//! tele_event and struct tele_connect_event in bpf/include/kmesh.h).

use std::{net::SocketAddr, time::Duration};

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

/// What the data path reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A client's connect, let through by connect4/6 (struct
    /// tele_connect_event).
    Connect(Connect),
    /// A socket's open or close (struct tele_event).
    Conn(ConnEvent),
}

/// A client's connect: the socket's events name it by `cookie`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub cookie: u64,
    /// Where it meant to go (the service VIP, before connect's rewrite).
    pub orig: SocketAddr,
    /// When, on the kernel's monotonic clock.
    pub at: Duration,
}

/// One end's open or close. `passive`: the accepting end
/// (reporter=destination); the kernel says which end a close is only where
/// it never opened (`end_known`), the reader settles the others from the
/// open (`Telemetry::settle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnEvent {
    pub kind: Kind,
    pub passive: bool,
    pub end_known: bool,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// A client's socket cookie, as in its `Connect`; 0 at the accepting
    /// end.
    pub cookie: u64,
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

/// Sizes of struct tele_event and struct tele_connect_event.
pub const EVENT_SIZE: usize = 80;
pub const CONNECT_SIZE: usize = 40;

const KIND_OPEN: u8 = 0;
const KIND_CLOSE: u8 = 1;
const KIND_CONNECT: u8 = 2;

/// enum kmesh_tele_end (bpf/include/kmesh.h); 0 is the client.
const END_PASSIVE: u8 = 1;
const END_UNKNOWN: u8 = 2;

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes(b[o..o + 2].try_into().unwrap_or_default())
}

impl Event {
    /// None: not an event of a layout this daemon knows (too short, or
    /// of an unknown kind).
    pub fn parse(b: &[u8]) -> Option<Event> {
        match *b.first()? {
            KIND_CONNECT if b.len() >= CONNECT_SIZE => Some(Event::Connect(Connect {
                orig: SocketAddr::new(kmesh_addr::ip_at(b, 8)?, u16_at(b, 2)),
                cookie: u64_at(b, 24),
                at: Duration::from_nanos(u64_at(b, 32)),
            })),
            k @ (KIND_OPEN | KIND_CLOSE) if b.len() >= EVENT_SIZE => Some(Event::Conn(ConnEvent {
                kind: if k == KIND_OPEN {
                    Kind::Open
                } else {
                    Kind::Close(Reason::from_raw(b[1].into()))
                },
                passive: b[2] == END_PASSIVE,
                end_known: b[2] != END_UNKNOWN,
                in_sockmap: b[3] != 0,
                local: SocketAddr::new(kmesh_addr::ip_at(b, 8)?, u16_at(b, 4)),
                remote: SocketAddr::new(kmesh_addr::ip_at(b, 24)?, u16_at(b, 6)),
                cookie: u64_at(b, 40),
                at: Duration::from_nanos(u64_at(b, 48)),
                sent: u64_at(b, 56),
                received: u64_at(b, 64),
                redirected: u64_at(b, 72),
            })),
            _ => None,
        }
    }
}

impl ConnEvent {
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

    fn put_addr(b: &mut [u8], o: usize, ip: &str) {
        let a = kmesh_addr::from_ip(ip.parse().unwrap());
        for (i, w) in a.ip6.iter().enumerate() {
            b[o + 4 * i..o + 4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
    }

    #[test]
    fn parses_the_kernel_layouts() {
        let mut b = vec![0u8; EVENT_SIZE];
        b[0] = KIND_CLOSE;
        b[1] = 1;
        b[3] = 1;
        b[4..6].copy_from_slice(&40000u16.to_ne_bytes());
        b[6..8].copy_from_slice(&8080u16.to_ne_bytes());
        put_addr(&mut b, 8, "10.0.0.1");
        put_addr(&mut b, 24, "10.0.0.2");
        b[40..48].copy_from_slice(&99u64.to_ne_bytes());
        b[48..56].copy_from_slice(&7_000u64.to_ne_bytes());
        b[56..64].copy_from_slice(&100u64.to_ne_bytes());
        b[64..72].copy_from_slice(&200u64.to_ne_bytes());
        b[72..80].copy_from_slice(&40u64.to_ne_bytes());
        let Some(Event::Conn(e)) = Event::parse(&b) else {
            panic!("not an open or close")
        };
        assert_eq!(e.kind, Kind::Close(Reason::Reset));
        assert_eq!(e.local, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(e.remote, "10.0.0.2:8080".parse().unwrap());
        assert_eq!((e.sent, e.received), (100, 200));
        assert_eq!((e.cookie, e.at), (99, Duration::from_micros(7)));
        assert_eq!((e.redirected, e.in_sockmap), (40, true));
        assert!(!e.passive && e.end_known);
        assert!(Event::parse(&b[..50]).is_none());
        for (end, passive, known) in [(1, true, true), (2, false, false)] {
            b[2] = end;
            let Some(Event::Conn(e)) = Event::parse(&b) else {
                panic!("not an open or close")
            };
            assert_eq!((e.passive, e.end_known), (passive, known), "end {end}");
        }

        let mut c = vec![0u8; CONNECT_SIZE];
        c[0] = KIND_CONNECT;
        c[2..4].copy_from_slice(&80u16.to_ne_bytes());
        put_addr(&mut c, 8, "10.96.0.1");
        c[24..32].copy_from_slice(&99u64.to_ne_bytes());
        c[32..40].copy_from_slice(&5_000u64.to_ne_bytes());
        assert_eq!(
            Event::parse(&c),
            Some(Event::Connect(Connect {
                cookie: 99,
                orig: "10.96.0.1:80".parse().unwrap(),
                at: Duration::from_micros(5),
            }))
        );
        c[0] = 7;
        assert!(Event::parse(&c).is_none());
    }
}
