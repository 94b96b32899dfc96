//! Bytes of accelerated connections. The sk_msg program sends them
//! straight into the peer socket's queue, so neither socket's TCP counters
//! see them: each end's close event carries what it sent that way, which
//! is also what its peer received. The two ends' closes come one after
//! the other; whichever comes second settles both: the first leaves its
//! counters and its bytes here, the second adds its bytes to the first's
//! counters and takes the first's bytes into its own report. Metrics come
//! out exact once both have closed; the access log line of the end that
//! closed first lacks what its peer sent it that way.

use std::net::SocketAddr;

use foldhash::HashMap;

use super::{ConnEvent, Counters};

/// (client, server, accepting end), as in `OpenConns`.
type End = (SocketAddr, SocketAddr, bool);

enum Pending {
    /// An end that closed while its peer was open: its counters.
    Closed(Counters),
    /// What an end that closed first redirected into this (open) end.
    Bytes(u64),
}

/// Bounded: past this many (close events lost), it starts over, which
/// only leaves some accelerated bytes uncounted.
const MAX_PENDING: usize = 1 << 16;

#[derive(Default)]
pub struct Redirects(HashMap<End, Pending>);

/// Adds `n` bytes that the end (`from_server` or not) sent to its peer to
/// a report of their connection: received is the request direction
/// (client to server), sent the response, for both reporters.
fn add(c: &Counters, from_server: bool, n: u64) {
    if from_server {
        c.sent.inc_by(n);
    } else {
        c.received.inc_by(n);
    }
}

impl Redirects {
    /// At `end`'s close, reported under `counters`: returns what its peer
    /// redirected into it (the peer closed first) and hands its own
    /// redirected bytes to the peer. `peer_open`: the peer is an end on
    /// this node that has not closed yet.
    pub fn close(&mut self, end: End, e: &ConnEvent, counters: &Counters, peer_open: bool) -> u64 {
        let (client, server, passive) = end;
        let peer = (client, server, !passive);
        let from_peer = match self.0.remove(&end) {
            Some(Pending::Bytes(n)) => n,
            _ => 0,
        };
        match self.0.remove(&peer) {
            Some(Pending::Closed(c)) => add(&c, passive, e.redirected),
            _ if peer_open && e.in_sockmap => {
                if self.0.len() + 2 > MAX_PENDING {
                    self.0.clear();
                }
                self.0.insert(end, Pending::Closed(counters.clone()));
                if e.redirected > 0 {
                    self.0.insert(peer, Pending::Bytes(e.redirected));
                }
            }
            _ => {}
        }
        from_peer
    }
}
