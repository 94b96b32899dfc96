//! The resolver task: runs due lookups concurrently (a slow host never
//! delays another), applies their outcomes, publishes changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use tokio::{
    sync::watch,
    task::{AbortHandle, Id, JoinError, JoinSet},
    time::{sleep_until, Instant},
};

use super::{
    lookup::{Lookup, Outcome},
    schedule::{HostSched, Step, Timing},
    Answers, HostAnswer, HostState,
};

struct Entry {
    /// Distinguishes this watch of the host from an earlier one whose
    /// lookup may still complete after the host was removed and re-added.
    generation: u64,
    sched: HostSched,
    due_at: Option<Instant>,
    inflight: Option<AbortHandle>,
}

struct Worker<L> {
    lookup: Arc<L>,
    timing: Timing,
    entries: HashMap<String, Entry>,
    /// Idle hosts by next lookup time.
    due: BTreeSet<(Instant, String)>,
    inflight: JoinSet<Outcome>,
    tasks: HashMap<Id, (String, u64)>,
    published: BTreeMap<String, HostAnswer>,
    dirty: bool,
    generations: u64,
}

pub(crate) async fn run<L: Lookup>(
    lookup: Arc<L>,
    timing: Timing,
    mut hosts: watch::Receiver<BTreeSet<String>>,
    out: watch::Sender<Arc<Answers>>,
) {
    let mut w = Worker {
        lookup,
        timing,
        entries: HashMap::new(),
        due: BTreeSet::new(),
        inflight: JoinSet::new(),
        tasks: HashMap::new(),
        published: BTreeMap::new(),
        dirty: false,
        generations: 0,
    };
    loop {
        w.start_due(Instant::now());
        let next = w.due.first().map(|(t, _)| *t);
        tokio::select! {
            changed = hosts.changed() => {
                if changed.is_err() {
                    return;
                }
                let set = hosts.borrow_and_update().clone();
                w.set_hosts(set, Instant::now());
            }
            Some(done) = w.inflight.join_next_with_id(), if !w.inflight.is_empty() => {
                w.finished(done);
                // Lookups that ended together are published together.
                while let Some(done) = w.inflight.try_join_next_with_id() {
                    w.finished(done);
                }
            }
            _ = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
        }
        if std::mem::take(&mut w.dirty) {
            out.send_replace(Arc::new(w.published.clone()));
        }
    }
}

impl<L: Lookup> Worker<L> {
    fn set_hosts(&mut self, hosts: BTreeSet<String>, now: Instant) {
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|h| !hosts.contains(*h))
            .cloned()
            .collect();
        for host in gone {
            let Some(e) = self.entries.remove(&host) else {
                continue;
            };
            if let Some(t) = e.due_at {
                self.due.remove(&(t, host.clone()));
            }
            if let Some(a) = e.inflight {
                a.abort();
            }
            self.dirty |= self.published.remove(&host).is_some();
            tracing::debug!("DNS: no longer watching {host}");
        }
        for host in hosts {
            if self.entries.contains_key(&host) {
                continue;
            }
            self.generations += 1;
            self.entries.insert(
                host.clone(),
                Entry {
                    generation: self.generations,
                    sched: HostSched::default(),
                    due_at: Some(now),
                    inflight: None,
                },
            );
            self.due.insert((now, host));
        }
    }

    fn start_due(&mut self, now: Instant) {
        while let Some((t, _)) = self.due.first() {
            if *t > now {
                break;
            }
            let Some((_, host)) = self.due.pop_first() else {
                break;
            };
            let Some(e) = self.entries.get_mut(&host) else {
                continue;
            };
            e.due_at = None;
            let (lookup, h) = (self.lookup.clone(), host.clone());
            let handle = self.inflight.spawn(async move { lookup.lookup(&h).await });
            self.tasks.insert(handle.id(), (host, e.generation));
            e.inflight = Some(handle);
        }
    }

    fn finished(&mut self, done: Result<(Id, Outcome), JoinError>) {
        let (id, outcome) = match done {
            Ok((id, o)) => (id, o),
            Err(e) if e.is_cancelled() => {
                self.tasks.remove(&e.id());
                return;
            }
            Err(e) => (e.id(), Outcome::Failed(format!("lookup task failed: {e}"))),
        };
        let Some((host, generation)) = self.tasks.remove(&id) else {
            return;
        };
        let Some(e) = self.entries.get_mut(&host) else {
            return;
        };
        if e.generation != generation {
            return;
        }
        let now = Instant::now();
        e.inflight = None;
        let step = e.sched.apply(&outcome, now, &self.timing);
        let answer = e.sched.answer().cloned();
        log(
            &host,
            self.lookup.servers(),
            &outcome,
            &step,
            answer.as_ref(),
        );
        let at = now + step.delay;
        e.due_at = Some(at);
        self.due.insert((at, host.clone()));
        if let (true, Some(a)) = (step.changed, answer) {
            self.published.insert(host, a);
            self.dirty = true;
        }
    }
}

/// Warns on every failure (at most one line per backoff interval per host)
/// and on entering NXDOMAIN; steady answers log at debug.
fn log(host: &str, servers: &str, outcome: &Outcome, step: &Step, answer: Option<&HostAnswer>) {
    let addrs = answer.map(|a| a.addrs.as_slice()).unwrap_or_default();
    let refused = answer.map(|a| a.refused.as_slice()).unwrap_or_default();
    if step.refused_changed && !refused.is_empty() {
        let why: Vec<String> = refused
            .iter()
            .map(|a| format!("{a} ({})", super::unusable(*a).unwrap_or("unusable")))
            .collect();
        tracing::warn!(
            "DNS {host} via {servers}: answer(s) {} refused: never used as endpoints",
            why.join(", ")
        );
    }
    match outcome {
        Outcome::Found { ttl, .. } if step.changed => {
            let recovered = matches!(step.prev, Some(HostState::Failing { .. }));
            tracing::info!(
                "DNS {host}: {addrs:?} (ttl {}s{})",
                ttl.as_secs(),
                if recovered {
                    ", lookups work again"
                } else {
                    ""
                }
            );
        }
        Outcome::Found { .. } => {
            tracing::debug!("DNS {host}: unchanged, next lookup in {:?}", step.delay)
        }
        Outcome::NotFound { nxdomain, .. } if step.prev != Some(HostState::NxDomain) => {
            let what = if *nxdomain {
                "does not exist (NXDOMAIN)"
            } else {
                "has no A or AAAA records"
            };
            tracing::warn!("DNS {host} {what} at {servers}: the service gets no endpoints from it");
        }
        Outcome::NotFound { .. } => tracing::debug!("DNS {host}: still not found"),
        Outcome::Failed(error) => tracing::warn!(
            "DNS lookup of {host} via {servers} failed: {error}; keeping {} last known \
             address(es), retrying in {:?}",
            addrs.len(),
            step.delay
        ),
    }
}
