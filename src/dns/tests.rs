//! The resolver task on a paused clock with a scripted lookup: refresh
//! times, backoff, what gets published.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::{sleep, Instant};

use super::{
    lookup::Lookup, lookup::Outcome, schedule::test_timing as timing, HostState, Resolver,
};

const S: Duration = Duration::from_secs(1);

/// Answers from a per-host script; the last entry repeats. Records the
/// (paused) time of every lookup.
#[derive(Clone, Default)]
struct Script {
    steps: Arc<Mutex<HashMap<String, VecDeque<Outcome>>>>,
    calls: Arc<Mutex<Vec<(String, Instant)>>>,
}

impl Script {
    fn set(&self, host: &str, steps: Vec<Outcome>) {
        self.steps.lock().unwrap().insert(host.into(), steps.into());
    }

    /// Seconds between consecutive lookups of `host`, to 0.1 s (the
    /// timer wheel rounds deadlines up to the next millisecond).
    fn gaps(&self, host: &str) -> Vec<f64> {
        let calls = self.calls.lock().unwrap();
        let t: Vec<Instant> = calls
            .iter()
            .filter(|(h, _)| h == host)
            .map(|(_, t)| *t)
            .collect();
        t.windows(2)
            .map(|w| ((w[1] - w[0]).as_secs_f64() * 10.0).round() / 10.0)
            .collect()
    }
}

impl Lookup for Script {
    async fn lookup(&self, host: &str) -> Outcome {
        self.calls
            .lock()
            .unwrap()
            .push((host.to_string(), Instant::now()));
        let mut steps = self.steps.lock().unwrap();
        let q = steps.get_mut(host).expect("scripted host");
        if q.len() > 1 {
            q.pop_front().unwrap()
        } else {
            q.front().cloned().unwrap()
        }
    }

    fn servers(&self) -> &str {
        "script"
    }
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|a| a.parse().unwrap()).collect()
}

fn found(addrs: &[&str], ttl: Duration) -> Outcome {
    Outcome::Found {
        addrs: ips(addrs),
        ttl,
    }
}

fn failed() -> Outcome {
    Outcome::Failed("request timed out".into())
}

fn hosts(h: &[&str]) -> BTreeSet<String> {
    h.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(start_paused = true)]
async fn refresh_follows_ttl_between_floor_and_ceiling() {
    let s = Script::default();
    s.set(
        "short",
        vec![found(&["10.0.0.1"], Duration::from_millis(200))],
    );
    s.set("mid", vec![found(&["10.0.0.2"], 4 * S)]);
    s.set("long", vec![found(&["10.0.0.3"], 3600 * S)]);
    let r = Resolver::spawn(timing(), s.clone());
    r.set_hosts(hosts(&["short", "mid", "long"]));
    sleep(Duration::from_millis(31_500)).await;
    assert_eq!(s.gaps("short"), vec![1.0; 31]);
    assert_eq!(s.gaps("mid"), vec![4.0; 7]);
    assert_eq!(s.gaps("long"), vec![15.0; 2]);
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_and_keep_the_last_good_answer() {
    let s = Script::default();
    let mut steps = vec![found(&["10.0.0.1", "fd00::1"], 2 * S)];
    steps.extend(std::iter::repeat_n(failed(), 6));
    steps.push(found(&["10.0.0.1", "fd00::1"], 2 * S));
    steps.push(failed());
    steps.push(found(&["10.0.0.1", "fd00::1"], 2 * S));
    s.set("h", steps);
    let r = Resolver::spawn(timing(), s.clone());
    let mut rx = r.subscribe();
    r.set_hosts(hosts(&["h"]));

    rx.changed().await.unwrap();
    let first = rx.borrow_and_update()["h"].clone();
    assert_eq!(first.state, HostState::Resolved);
    assert_eq!(first.addrs, ips(&["10.0.0.1", "fd00::1"]));
    let t0 = first.last_good_at.unwrap();

    rx.changed().await.unwrap();
    let failing = rx.borrow_and_update()["h"].clone();
    assert!(matches!(failing.state, HostState::Failing { .. }));
    assert_eq!(failing.addrs, first.addrs, "last good answer kept");
    assert_eq!(failing.last_good_at, Some(t0));

    // The next publication is the recovery: failures 2..6 changed nothing
    // the consumer cares about.
    rx.changed().await.unwrap();
    assert_eq!(rx.borrow_and_update()["h"].state, HostState::Resolved);
    sleep(10 * S).await;
    // TTL 2 s, then backoff 1, 2, 4, 8, 10, 10, then TTL 2 s, then a
    // failure starts the backoff at 1 s again, then steady TTL refreshes.
    assert_eq!(
        s.gaps("h")[..10],
        [2.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 2.0, 1.0, 2.0]
    );
}

#[tokio::test(start_paused = true)]
async fn unchanged_answers_do_not_wake_the_consumer() {
    let s = Script::default();
    s.set(
        "h",
        vec![
            found(&["10.0.0.2", "10.0.0.1"], S),
            found(&["10.0.0.1", "10.0.0.2", "10.0.0.1"], S),
        ],
    );
    let r = Resolver::spawn(timing(), s.clone());
    let mut rx = r.subscribe();
    r.set_hosts(hosts(&["h"]));
    rx.changed().await.unwrap();
    rx.borrow_and_update();
    sleep(20 * S).await;
    assert!(s.gaps("h").len() >= 19, "kept refreshing");
    assert!(!rx.has_changed().unwrap());
}

#[tokio::test(start_paused = true)]
async fn nxdomain_empties_one_host_and_leaves_the_other() {
    let s = Script::default();
    s.set("a", vec![found(&["10.0.0.1"], 5 * S)]);
    s.set(
        "b",
        vec![
            found(&["10.0.0.2"], 2 * S),
            Outcome::NotFound {
                nxdomain: true,
                negative_ttl: None,
            },
        ],
    );
    let r = Resolver::spawn(timing(), s.clone());
    let mut rx = r.subscribe();
    r.set_hosts(hosts(&["a", "b"]));
    rx.changed().await.unwrap();
    let before = rx.borrow_and_update().clone();
    assert_eq!(before.len(), 2, "both first lookups publish together");
    rx.changed().await.unwrap();
    let after = rx.borrow_and_update().clone();
    assert_eq!(after["b"].state, HostState::NxDomain);
    assert!(after["b"].addrs.is_empty());
    assert_eq!(after["a"], before["a"]);
    sleep(40 * S).await;
    // Negative answer without SOA: re-checked at max_refresh.
    assert_eq!(s.gaps("b")[..3], [2.0, 15.0, 15.0]);
}

#[tokio::test(start_paused = true)]
async fn removed_hosts_leave_the_answers_and_stop_being_queried() {
    let s = Script::default();
    s.set("a", vec![found(&["10.0.0.1"], S)]);
    s.set("b", vec![found(&["10.0.0.2"], S)]);
    let r = Resolver::spawn(timing(), s.clone());
    let mut rx = r.subscribe();
    r.set_hosts(hosts(&["a", "b"]));
    rx.changed().await.unwrap();
    r.set_hosts(hosts(&["a"]));
    rx.changed().await.unwrap();
    assert_eq!(rx.borrow_and_update().keys().collect::<Vec<_>>(), vec!["a"]);
    let calls = s.gaps("b").len();
    sleep(10 * S).await;
    assert_eq!(s.gaps("b").len(), calls);
    drop(r);
    let n = s.calls.lock().unwrap().len();
    sleep(10 * S).await;
    assert_eq!(s.calls.lock().unwrap().len(), n, "dropping stops the task");
}

#[tokio::test]
async fn bad_config_is_refused() {
    let cfg = super::DnsConfig {
        min_refresh: 20 * S,
        ..Default::default()
    };
    assert!(matches!(
        Resolver::new(cfg),
        Err(super::DnsError::Config(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn lookups_failures_and_missing_names_are_counted() {
    use std::sync::atomic::Ordering::Relaxed;
    let s = Script::default();
    s.set("ok", vec![found(&["10.0.0.1"], 3600 * S)]);
    s.set(
        "down",
        vec![failed(), failed(), found(&["10.0.0.2"], 3600 * S)],
    );
    s.set(
        "gone",
        vec![Outcome::NotFound {
            nxdomain: true,
            negative_ttl: Some(3600 * S),
        }],
    );
    let r = Resolver::spawn(timing(), s.clone());
    r.set_hosts(hosts(&["ok", "down", "gone"]));
    // Long enough for both retries of "down", short of any refresh (15 s).
    sleep(Duration::from_secs(10)).await;
    let c = r.counters();
    let calls = s.calls.lock().unwrap().len() as u64;
    assert_eq!(calls, 5, "{:?}", s.calls.lock().unwrap());
    assert_eq!(c.lookups.load(Relaxed), calls);
    assert_eq!(c.failures.load(Relaxed), 2);
    assert_eq!(c.not_found.load(Relaxed), 1);
}
