//! Resolver for DNS-typed ServiceEntry hosts.
//!
//! A background task owns the set of watched hostnames, looks each one up
//! (A and AAAA), refreshes it at its record TTL bounded by
//! [`DnsConfig::min_refresh`]..[`DnsConfig::max_refresh`], and publishes the
//! answers on a `watch` channel. Failures keep the last good addresses and
//! retry with exponential backoff: a DNS outage must not empty a service's
//! endpoints. A name that does not exist publishes no addresses.
//!
//! The consumer is woken only when some host's addresses or state kind
//! change, so steady refreshes cost the map writer nothing.

mod lookup;
mod schedule;
#[cfg(test)]
mod tests;
mod worker;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use hickory_resolver::net::NetError;
use thiserror::Error;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use lookup::{Hickory, Lookup, Outcome};
use schedule::Timing;

#[derive(Debug, Error)]
pub enum DnsError {
    #[error("reading the system DNS configuration (/etc/resolv.conf): {0}")]
    SystemConfig(#[source] NetError),
    #[error("no DNS servers configured")]
    NoServers,
    #[error("DNS resolver config: {0}")]
    Config(String),
    #[error("building the DNS resolver: {0}")]
    Build(#[source] NetError),
    #[error("the DNS resolver must be started inside a tokio runtime: {0}")]
    Runtime(#[from] tokio::runtime::TryCurrentError),
}

/// Where queries go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Upstream {
    /// Nameservers, search list and options of /etc/resolv.conf, read once
    /// at [`Resolver::new`].
    #[default]
    System,
    /// These servers (UDP, TCP on truncation), no search list.
    Servers(Vec<SocketAddr>),
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub upstream: Upstream,
    /// Floor of the refresh interval, so a TTL of 0 does not turn into a
    /// query loop.
    pub min_refresh: Duration,
    /// Ceiling of the refresh interval: long TTLs still get re-checked.
    pub max_refresh: Duration,
    /// Delay before the first retry after a failure; doubles per failure.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Per-query timeout (hickory also retries per its `attempts`).
    pub query_timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            upstream: Upstream::System,
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(15),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(15),
            query_timeout: Duration::from_secs(5),
        }
    }
}

impl DnsConfig {
    fn timing(&self) -> Result<Timing, DnsError> {
        let bad = |m: &str| Err(DnsError::Config(m.to_string()));
        if self.min_refresh.is_zero() || self.backoff_initial.is_zero() {
            return bad("min_refresh and backoff_initial must be > 0");
        }
        if self.min_refresh > self.max_refresh {
            return bad("min_refresh must not exceed max_refresh");
        }
        if self.backoff_initial > self.backoff_max {
            return bad("backoff_initial must not exceed backoff_max");
        }
        if self.query_timeout.is_zero() {
            return bad("query_timeout must be > 0");
        }
        Ok(Timing {
            min_refresh: self.min_refresh,
            max_refresh: self.max_refresh,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostState {
    /// The last lookup returned at least one A or AAAA record (`addrs`
    /// holds those usable as endpoints, possibly none).
    Resolved,
    /// The last lookup said the name does not exist (NXDOMAIN) or has
    /// neither A nor AAAA records: the service has no endpoints from it.
    NxDomain,
    /// The last lookup failed (timeout, unreachable server, SERVFAIL, …);
    /// `addrs` is still the last good answer.
    Failing { error: String },
}

impl HostState {
    /// Same variant, ignoring the error text: a host failing with a new
    /// message is not news to the consumer.
    fn same_kind(&self, other: &HostState) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// One host's published answer. `last_good_at` and `next_refresh` are as of
/// the publication: answers are republished only when `addrs` or the kind of
/// `state` change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAnswer {
    /// IPv4 then IPv6, each sorted, no duplicates.
    pub addrs: Vec<IpAddr>,
    /// Addresses of the answer that are never endpoints (see
    /// [`unusable`]), same order; not in `addrs`.
    pub refused: Vec<IpAddr>,
    pub state: HostState,
    /// When a lookup last succeeded (addresses or NXDOMAIN); None if none has.
    pub last_good_at: Option<Instant>,
    pub next_refresh: Instant,
}

impl HostAnswer {
    /// Whether the consumer must hear about the change from `self` to `new`.
    fn differs(&self, new: &HostAnswer) -> bool {
        self.addrs != new.addrs || self.refused != new.refused || !self.state.same_kind(&new.state)
    }
}

/// Why a DNS answer must not become an endpoint, if it must not: a name
/// outside the mesh's control could otherwise send a pod's connections to
/// the pod's own loopback (or to every host on a link). Loopback,
/// unspecified (0.0.0.0/8 and ::; connecting to them reaches this host),
/// multicast and broadcast, in IPv4, IPv6 and IPv4-mapped IPv6 form.
pub fn unusable(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(a) if a.is_loopback() => Some("loopback"),
        IpAddr::V4(a) if a.octets()[0] == 0 => Some("unspecified"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
        IpAddr::V6(a) if a.is_loopback() => Some("loopback"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast"),
        _ => None,
    }
}

/// Watched hostname → its answer. A host appears after its first lookup
/// completes and disappears when it is no longer watched.
pub type Answers = BTreeMap<String, HostAnswer>;

/// Lookups done since the resolver started, for the metrics endpoint.
/// Counted around the lookup itself, so the scheduler needs no part in it.
#[derive(Debug, Default)]
pub struct DnsCounters {
    /// Lookups of one host (A and AAAA together count once).
    pub lookups: AtomicU64,
    /// Lookups with no usable answer (timeout, unreachable, SERVFAIL, ...).
    pub failures: AtomicU64,
    /// Lookups that found the name has no address (NXDOMAIN or no records).
    pub not_found: AtomicU64,
}

struct Counted<L> {
    inner: L,
    counters: Arc<DnsCounters>,
}

impl<L: Lookup> Lookup for Counted<L> {
    async fn lookup(&self, host: &str) -> Outcome {
        let out = self.inner.lookup(host).await;
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        match out {
            Outcome::Failed(_) => &self.counters.failures,
            Outcome::NotFound { .. } => &self.counters.not_found,
            Outcome::Found { .. } => return out,
        }
        .fetch_add(1, Ordering::Relaxed);
        out
    }
    fn servers(&self) -> &str {
        self.inner.servers()
    }
}

/// Handle to the background resolver task; dropping it stops the task.
pub struct Resolver {
    hosts: watch::Sender<BTreeSet<String>>,
    answers: watch::Receiver<Arc<Answers>>,
    task: JoinHandle<()>,
    counters: Arc<DnsCounters>,
}

impl Resolver {
    /// Starts the resolver task on the current tokio runtime. Nothing is
    /// looked up until [`Resolver::set_hosts`].
    pub fn new(cfg: DnsConfig) -> Result<Resolver, DnsError> {
        let timing = cfg.timing()?;
        tokio::runtime::Handle::try_current()?;
        let lookup = Hickory::new(&cfg.upstream, cfg.query_timeout)?;
        Ok(Resolver::spawn(timing, lookup))
    }

    fn spawn<L: Lookup>(timing: Timing, lookup: L) -> Resolver {
        let (hosts, hosts_rx) = watch::channel(BTreeSet::new());
        let (answers_tx, answers) = watch::channel(Arc::new(Answers::new()));
        let counters = Arc::new(DnsCounters::default());
        let lookup = Counted {
            inner: lookup,
            counters: counters.clone(),
        };
        let task = tokio::spawn(worker::run(Arc::new(lookup), timing, hosts_rx, answers_tx));
        Resolver {
            hosts,
            answers,
            task,
            counters,
        }
    }

    /// The lookup counters (shared: they keep counting).
    pub fn counters(&self) -> Arc<DnsCounters> {
        self.counters.clone()
    }

    /// Replaces the watched set: new names are looked up at once, removed
    /// names are dropped from the answers (an in-flight lookup is
    /// cancelled). Never blocks; only the latest set matters.
    pub fn set_hosts(&self, hosts: BTreeSet<String>) {
        self.hosts.send_replace(hosts);
    }

    /// A receiver of the answers. Its first `changed()` fires for anything
    /// published since the resolver started; `borrow()` gives the current map.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Answers>> {
        self.answers.clone()
    }

    /// The current answers.
    pub fn answers(&self) -> Arc<Answers> {
        self.answers.borrow().clone()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        // Dropping `hosts` would end the task at its next wakeup; abort so
        // it also stops holding sockets now.
        self.task.abort();
    }
}
