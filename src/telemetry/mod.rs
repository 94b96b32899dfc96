//! Connection telemetry: the reader of the data path's connection events
//! (bpf/lib/telemetry.h), turning them into Istio's TCP metrics and the
//! access log. Addresses are named through an index of the model rebuilt
//! after each apply; nothing here writes a map.

pub mod access_log;
pub mod event;
pub mod index;
pub mod metrics;
pub mod redirect;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use foldhash::HashMap;
use thiserror::Error;

pub use access_log::{AccessLog, Format};
pub use event::{ConnEvent, Connect, Event, Kind, Reason};
use index::{Index, ServiceInfo};
pub use metrics::TcpMetrics;

use crate::model::Layers;

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("access log format {0:?} is not one of off, text, json")]
    AccessLogFormat(String),
    #[error("telemetry ring buffer: {0}")]
    Ring(String),
    #[error("telemetry reader thread: {0}")]
    Thread(std::io::Error),
}

/// Source-side connections still open, kept so that the destination's
/// report of the same connection (on this node) names the service the
/// client addressed. Bounded: past this many (close events lost), it
/// starts over, which only leaves later destination reports unnamed.
const MAX_OPEN: usize = 1 << 18;

/// Open connection ends on this node, by (client, server, accepting end),
/// with the service the client addressed and when the connection began
/// (the client's connect, the server's accept).
pub type OpenConns = HashMap<(SocketAddr, SocketAddr, bool), (Option<Arc<ServiceInfo>>, Duration)>;

/// Clients' connects not yet joined to their socket's open (or, for a
/// connect that fails, its close), by socket cookie: the service
/// addressed and when. Some never are (a connect that failed before its
/// SYN): past MAX_CONNECTING, the oldest go.
type Connecting = HashMap<u64, (Option<Arc<ServiceInfo>>, Duration)>;

const MAX_CONNECTING: usize = 1 << 14;

/// Ages past which a connect is taken as never joining: first past any
/// handshake (the kernel gives up on a SYN after about two minutes by
/// default), then, where that is not enough, past any answered one.
const CONNECT_MAX_AGES: [Duration; 2] = [Duration::from_secs(300), Duration::from_secs(5)];

/// The five counters of one label set, shared with their families (a
/// prometheus-client counter is a handle on one atomic).
#[derive(Clone)]
pub struct Counters {
    opened: prometheus_client::metrics::counter::Counter,
    closed: prometheus_client::metrics::counter::Counter,
    failed: prometheus_client::metrics::counter::Counter,
    sent: prometheus_client::metrics::counter::Counter,
    received: prometheus_client::metrics::counter::Counter,
}

/// Label sets seen since the index last changed, by the identity of what
/// they are made of: (index generation, source workload, destination
/// workload, service, response flags, reporter); the addresses are those
/// of that generation's entries, which it holds while it is current. Building and hashing 23 labels per
/// event was most of the reader's cost per connection.
#[derive(Default)]
pub struct LabelCache(HashMap<(u64, usize, usize, usize, usize, bool), Counters>);

const MAX_LABEL_SETS: usize = 1 << 14;

fn ptr<T>(a: Option<&T>) -> usize {
    a.map_or(0, |a| a as *const T as usize)
}

/// What the reader keeps between events.
#[derive(Default)]
pub struct ReaderState {
    connecting: Connecting,
    open: OpenConns,
    cache: LabelCache,
    redirects: redirect::Redirects,
}

/// What the reader shares with the daemon.
pub struct Telemetry {
    /// The model's index and its generation (one per refresh).
    index: Mutex<(u64, Arc<Index>)>,
    metrics: TcpMetrics,
    pub access_log: Arc<AccessLog>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    pub fn new(metrics: TcpMetrics, access_log: Arc<AccessLog>) -> Telemetry {
        Telemetry {
            index: Mutex::new((0, Arc::new(Index::default()))),
            metrics,
            access_log,
        }
    }

    /// After an incremental apply of `changes`: the names of just those
    /// entries change (an index rebuilt at every push would cost as much as
    /// the full apply the writer avoided).
    pub fn update(&self, layers: Layers, changes: &crate::model::Changes) {
        let mut cur = self.index.lock().unwrap_or_else(|e| e.into_inner());
        // A copy only while the reader holds the current one.
        Arc::make_mut(&mut cur.1).update(layers, changes);
        cur.0 += 1;
    }

    /// After an apply: the names from now on.
    pub fn refresh(&self, layers: Layers) {
        let ix = Arc::new(Index::build(layers));
        let mut cur = self.index.lock().unwrap_or_else(|e| e.into_inner());
        *cur = (cur.0 + 1, ix);
    }

    fn index(&self) -> (u64, Arc<Index>) {
        self.index.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads `ring` (km_tele_events) on its own thread until the process
    /// ends.
    pub fn spawn_reader(self: Arc<Self>, ring: libbpf_rs::MapHandle) -> Result<(), TelemetryError> {
        std::thread::Builder::new()
            .name("telemetry".into())
            .spawn(move || {
                let mut state = ReaderState::default();
                let got = std::cell::Cell::new(0usize);
                let mut builder = libbpf_rs::RingBufferBuilder::new();
                let cb = |data: &[u8]| -> i32 {
                    got.set(got.get() + 1);
                    match Event::parse(data) {
                        Some(Event::Conn(e)) => self.handle(&e, &mut state),
                        Some(Event::Connect(c)) => self.connect(&c, &mut state),
                        None => {}
                    }
                    0
                };
                let rb = match builder.add(&ring, cb) {
                    Ok(_) => builder.build(),
                    Err(e) => Err(e),
                }
                .map_err(|e| TelemetryError::Ring(e.to_string()));
                let rb = match rb {
                    Ok(rb) => rb,
                    Err(e) => {
                        tracing::error!("{e}; connection telemetry stops");
                        return;
                    }
                };
                // The data path does not wake this thread per event (each
                // wake-up costs the connection's CPU an interrupt): it
                // drains the ring every 10 ms while events come; idle, it
                // waits on the ring (50 ms at most), which wakes it with
                // the first event after it read everything
                // (bpf/lib/telemetry.h).
                loop {
                    let n = got.replace(0);
                    self.metrics.events_read.inc_by(n as u64);
                    let idle = n == 0;
                    let r = if idle {
                        rb.poll(Duration::from_millis(50))
                    } else {
                        std::thread::sleep(Duration::from_millis(10));
                        Ok(())
                    }
                    .and_then(|_| rb.consume());
                    if let Err(e) = r {
                        if e.kind() != libbpf_rs::ErrorKind::Interrupted {
                            tracing::error!("telemetry: reader stopped: {e}");
                            return;
                        }
                    }
                }
            })
            .map(drop)
            .map_err(TelemetryError::Thread)
    }

    /// A client's connect: named now, joined to its socket's events by
    /// cookie.
    pub fn connect(&self, c: &Connect, st: &mut ReaderState) {
        let connecting = &mut st.connecting;
        for age in CONNECT_MAX_AGES {
            if connecting.len() < MAX_CONNECTING {
                break;
            }
            let oldest = c.at.saturating_sub(age);
            connecting.retain(|_, (_, at)| *at >= oldest);
        }
        if connecting.len() >= MAX_CONNECTING {
            connecting.clear();
        }
        let service = self.index().1.service(c.orig).cloned();
        connecting.insert(c.cookie, (service, c.at));
    }

    /// What the kernel leaves to the reader about a close: which end it is
    /// (the socket's open said, and left its record in `open`; with no
    /// record, as where the open's event was lost, a socket with a cookie
    /// is taken as the client, since connect4 made it one), and a client's
    /// SYN out of its bytes acknowledged (the accepting end's counters
    /// start past the handshake). Nothing to do for an open.
    pub fn settle(e: &mut ConnEvent, open: &OpenConns) {
        if !e.end_known {
            e.passive = !open.contains_key(&(e.local, e.remote, false))
                && (open.contains_key(&(e.remote, e.local, true)) || e.cookie == 0);
            e.end_known = true;
        }
        let opened = matches!(e.kind, Kind::Close(r) if r != Reason::ConnectFailed);
        if opened && !e.passive && e.sent > e.redirected {
            e.sent -= 1;
        }
    }

    /// One open or close: metrics, and the access log line of a close.
    pub fn handle(&self, e: &ConnEvent, st: &mut ReaderState) {
        let mut e = *e;
        Self::settle(&mut e, &st.open);
        let e = &e;
        let ReaderState {
            connecting,
            open,
            cache,
            redirects,
        } = st;
        let (generation, ix) = self.index();
        let (client, server) = e.endpoints();
        let end = (client, server, e.passive);
        // The service: the client's original destination, from its
        // connect; at the server, what the client's own report said (both
        // ends on this node; the client's open always comes first). No end
        // keeps its start time in the kernel: the client's connect or the
        // server's open says when the connection began.
        let mut duration = Duration::ZERO;
        let service = match e.kind {
            Kind::Open => {
                let (s, start) = if e.passive {
                    let client = open.get(&(client, server, false));
                    (client.and_then(|o| o.0.clone()), e.at)
                } else {
                    connecting.remove(&e.cookie).unwrap_or((None, e.at))
                };
                if open.len() >= MAX_OPEN {
                    open.clear();
                }
                open.insert(end, (s.clone(), start));
                s
            }
            Kind::Close(_) => {
                let began = match open.remove(&end) {
                    Some(o) => Some(o),
                    // A connect that failed never opened: its connect
                    // named it.
                    None if !e.passive => connecting.remove(&e.cookie),
                    None => None,
                };
                began.and_then(|(s, start)| {
                    duration = e.at.saturating_sub(start);
                    s
                })
            }
        };
        let parties = metrics::Parties {
            source: !e.passive,
            src: ix.workload(client.ip()).map(|w| &**w),
            dst: ix.workload(server.ip()).map(|w| &**w),
            service: service.as_deref(),
        };
        let m = &self.metrics;
        let flags = match e.kind {
            Kind::Open | Kind::Close(Reason::Normal) => metrics::FLAG_NONE,
            Kind::Close(Reason::ConnectFailed) => metrics::FLAG_CONNECT,
            Kind::Close(Reason::Reset | Reason::Timeout) if e.passive => {
                metrics::FLAG_DOWNSTREAM_RESET
            }
            Kind::Close(Reason::Reset | Reason::Timeout) => metrics::FLAG_UPSTREAM_RESET,
        };
        let key = (
            generation,
            ptr(parties.src),
            ptr(parties.dst),
            ptr(parties.service),
            flags.as_ptr() as usize,
            parties.source,
        );
        if !cache.0.contains_key(&key) {
            // A new index (an apply) or too many sets: start over, so
            // no entry outlives what its key points to.
            let stale = cache.0.keys().next().is_some_and(|k| k.0 != generation);
            if stale || cache.0.len() >= MAX_LABEL_SETS {
                cache.0.clear();
            }
            let labels = metrics::labels(&parties, flags);
            let c = Counters {
                opened: m.opened.get_or_create(&labels).clone(),
                closed: m.closed.get_or_create(&labels).clone(),
                failed: m.failed.get_or_create(&labels).clone(),
                sent: m.sent.get_or_create(&labels).clone(),
                received: m.received.get_or_create(&labels).clone(),
            };
            cache.0.insert(key, c);
        }
        // Borrowed, not cloned: five reference counts up and down per
        // event showed in the reader's profile.
        let c = &cache.0[&key];
        let (mut to_server, mut to_client) = if e.passive {
            (e.received, e.sent)
        } else {
            (e.sent, e.received)
        };
        if matches!(e.kind, Kind::Close(r) if r != Reason::ConnectFailed) {
            let peer_open = open.contains_key(&(client, server, !e.passive));
            let from_peer = redirects.close(end, e, c, peer_open);
            if e.passive {
                to_server += from_peer;
            } else {
                to_client += from_peer;
            }
        }
        match e.kind {
            Kind::Open => {
                c.opened.inc();
                return;
            }
            Kind::Close(Reason::ConnectFailed) => {
                c.failed.inc();
            }
            Kind::Close(_) => {
                // Istio's (Envoy's) sense, the same for both reporters:
                // received = the request direction (client to server),
                // sent = the response direction.
                c.closed.inc();
                c.received.inc_by(to_server);
                c.sent.inc_by(to_client);
            }
        }
        let Kind::Close(reason) = e.kind else { return };
        let format = self.access_log.get();
        if format == Format::Off {
            return;
        }
        fn name(w: Option<&index::WorkloadInfo>) -> (&str, &str) {
            w.map_or(("unknown", "unknown"), |w| (&*w.name, &*w.namespace))
        }
        let (sw, sns) = name(parties.src);
        let (dw, dns) = name(parties.dst);
        let entry = access_log::Entry {
            reporter: if e.passive { "destination" } else { "source" },
            src: client.to_string(),
            dst: server.to_string(),
            src_workload: sw,
            src_namespace: sns,
            dst_workload: dw,
            dst_namespace: dns,
            dst_service: service.as_deref().map_or("unknown", |s| &*s.hostname),
            bytes_to_server: to_server,
            bytes_to_client: to_client,
            duration_ms: duration.as_secs_f64() * 1e3,
            reason: reason.as_str(),
        };
        if let Some(line) = entry.line(format) {
            access_log::write(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(t: &Telemetry, st: &mut ReaderState, cookie: u64, at_ms: u64) {
        let c = Connect {
            cookie,
            orig: "10.96.0.1:80".parse().unwrap(),
            at: Duration::from_millis(at_ms),
        };
        t.connect(&c, st);
    }

    /// Connects that never join (no SYN went out, or sockops could not
    /// tell the client as enrolled) make room for new ones, oldest first,
    /// and the recent ones stay to be joined.
    #[test]
    fn connects_that_never_join_are_bounded_oldest_first() {
        let t = Telemetry::new(TcpMetrics::default(), Arc::new(AccessLog::new(Format::Off)));
        let mut st = ReaderState::default();
        let n = MAX_CONNECTING as u64;
        // Half of them ten minutes ago, half a minute ago.
        for i in 0..n / 2 {
            connect(&t, &mut st, i, 0);
        }
        for i in n / 2..n {
            connect(&t, &mut st, i, 600_000);
        }
        connect(&t, &mut st, n, 630_000);
        assert_eq!(st.connecting.len() as u64, n / 2 + 1);
        assert!(st.connecting.contains_key(&(n - 1)) && !st.connecting.contains_key(&0));
        // All recent but older than a handshake: past the second age.
        for i in n + 1..2 * n {
            connect(&t, &mut st, i, 640_000);
        }
        connect(&t, &mut st, 2 * n, 650_000);
        assert!(st.connecting.contains_key(&(2 * n)));
        assert!(!st.connecting.contains_key(&(n - 1)));
        assert!(st.connecting.len() <= MAX_CONNECTING);
        // A storm within the last 5 s: starts over rather than grow.
        for i in 2 * n + 1..3 * n + 2 {
            connect(&t, &mut st, i, 650_000);
        }
        assert!(st.connecting.len() <= MAX_CONNECTING);
        assert!(st.connecting.contains_key(&(3 * n + 1)));
    }

    fn close(local: &str, remote: &str, cookie: u64, reason: Reason) -> ConnEvent {
        ConnEvent {
            kind: Kind::Close(reason),
            passive: false,
            end_known: false,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            cookie,
            at: Duration::ZERO,
            sent: 101,
            received: 50,
            redirected: 0,
            in_sockmap: false,
        }
    }

    fn settled(mut e: ConnEvent, open: &OpenConns) -> ConnEvent {
        Telemetry::settle(&mut e, open);
        e
    }

    /// A close's end comes from the open's record (by either end's view of
    /// the addresses), else from the cookie connect4 gave a client; a
    /// client's SYN leaves its bytes acknowledged.
    #[test]
    fn a_close_is_settled_from_its_open() {
        let (c, s) = ("10.0.0.1:40000", "10.0.0.2:8080");
        let mut open = OpenConns::default();
        let key = |a: &str, b: &str, p| (a.parse().unwrap(), b.parse().unwrap(), p);
        open.insert(key(c, s, false), (None, Duration::ZERO));
        let e = settled(close(c, s, 0, Reason::Normal), &open);
        assert!(!e.passive && e.end_known);
        assert_eq!((e.sent, e.received), (100, 50));

        let mut open = OpenConns::default();
        open.insert(key(c, s, true), (None, Duration::ZERO));
        let e = settled(close(s, c, 7, Reason::Reset), &open);
        assert!(e.passive && e.end_known);
        assert_eq!((e.sent, e.received), (101, 50));

        let none = OpenConns::default();
        assert!(settled(close(s, c, 0, Reason::Normal), &none).passive);
        assert!(!settled(close(c, s, 9, Reason::Normal), &none).passive);

        // A failed connect said which end it was, and acknowledged nothing.
        let mut failed = close(c, s, 9, Reason::ConnectFailed);
        (failed.end_known, failed.sent, failed.received) = (true, 0, 0);
        assert_eq!(settled(failed, &none), failed);
        // Accelerated bytes are not TCP's: nothing to take out of them.
        let mut accel = close(c, s, 9, Reason::Normal);
        (accel.sent, accel.redirected) = (40, 40);
        assert_eq!(settled(accel, &none).sent, 40);
    }
}
