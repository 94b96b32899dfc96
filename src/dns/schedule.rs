//! When to look a host up next and what its answer becomes after a lookup.
//! No clock reads and no I/O: the worker passes `now` in.

use std::{net::IpAddr, time::Duration};

use tokio::time::Instant;

use super::{lookup::Outcome, HostAnswer, HostState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Timing {
    /// Refresh interval for an answer whose smallest TTL is `ttl`.
    pub(crate) fn refresh_after(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_refresh, self.max_refresh)
    }

    /// Delay before the retry that follows failure number `failures` (1-based).
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.backoff_max)
    }
}

/// What one lookup did to a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// Look the host up again this long after `now`.
    pub delay: Duration,
    /// The consumer must see the new answer.
    pub changed: bool,
    /// State before the lookup (None for the first lookup), for log lines.
    pub prev: Option<HostState>,
    /// The refused part of the answer changed (to be logged once).
    pub refused_changed: bool,
}

/// One host's answer and failure count.
#[derive(Debug, Default)]
pub(crate) struct HostSched {
    failures: u32,
    answer: Option<HostAnswer>,
}

impl HostSched {
    pub(crate) fn answer(&self) -> Option<&HostAnswer> {
        self.answer.as_ref()
    }

    #[cfg(test)]
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    pub(crate) fn apply(&mut self, outcome: &Outcome, now: Instant, t: &Timing) -> Step {
        let prev = self.answer.take();
        let last = |f: fn(&HostAnswer) -> &Vec<IpAddr>| prev.as_ref().map(f).cloned();
        let (addrs, refused, state, last_good_at, delay) = match outcome {
            Outcome::Found { addrs, ttl } => {
                self.failures = 0;
                let delay = t.refresh_after(*ttl);
                let (refused, addrs): (Vec<IpAddr>, Vec<IpAddr>) = normalize(addrs)
                    .into_iter()
                    .partition(|a| super::unusable(*a).is_some());
                (addrs, refused, HostState::Resolved, Some(now), delay)
            }
            Outcome::NotFound { negative_ttl, .. } => {
                self.failures = 0;
                // Without an SOA there is no negative TTL: re-check at the
                // ceiling, so a name that appears is seen within max_refresh.
                let delay = t.refresh_after(negative_ttl.unwrap_or(t.max_refresh));
                (
                    Vec::new(),
                    Vec::new(),
                    HostState::NxDomain,
                    Some(now),
                    delay,
                )
            }
            Outcome::Failed(error) => {
                self.failures = self.failures.saturating_add(1);
                let state = HostState::Failing {
                    error: error.clone(),
                };
                let last_good_at = prev.as_ref().and_then(|a| a.last_good_at);
                (
                    last(|a| &a.addrs).unwrap_or_default(),
                    last(|a| &a.refused).unwrap_or_default(),
                    state,
                    last_good_at,
                    t.backoff(self.failures),
                )
            }
        };
        let new = HostAnswer {
            addrs,
            refused,
            state,
            last_good_at,
            next_refresh: now + delay,
        };
        let changed = prev.as_ref().is_none_or(|p| p.differs(&new));
        let refused_changed = prev.as_ref().map_or(&[][..], |p| &p.refused[..]) != &new.refused[..];
        self.answer = Some(new);
        Step {
            delay,
            changed,
            prev: prev.map(|p| p.state),
            refused_changed,
        }
    }
}

/// IPv4 before IPv6 (IpAddr's order), each ascending, duplicates dropped, so
/// equal answers compare equal whatever order the server used.
fn normalize(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut v = addrs.to_vec();
    v.sort();
    v.dedup();
    v
}

/// The timing every resolver test runs with: 1 s floor and first backoff,
/// 15 s ceiling, 10 s backoff cap.
#[cfg(test)]
pub(super) fn test_timing() -> Timing {
    const S: Duration = Duration::from_secs(1);
    Timing {
        min_refresh: S,
        max_refresh: 15 * S,
        backoff_initial: S,
        backoff_max: 10 * S,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    const S: Duration = Duration::from_secs(1);

    use super::test_timing as timing;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn found(addrs: &[&str], ttl: u64) -> Outcome {
        Outcome::Found {
            addrs: addrs.iter().map(|a| ip(a)).collect(),
            ttl: Duration::from_secs(ttl),
        }
    }

    #[test]
    fn ttl_is_clamped_between_floor_and_ceiling() {
        let t = timing();
        assert_eq!(t.refresh_after(Duration::ZERO), S);
        assert_eq!(t.refresh_after(Duration::from_millis(300)), S);
        assert_eq!(t.refresh_after(7 * S), 7 * S);
        assert_eq!(t.refresh_after(3600 * S), 15 * S);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let t = timing();
        let got: Vec<u64> = (1..=7).map(|n| t.backoff(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 10, 10, 10]);
        assert_eq!(t.backoff(u32::MAX), 10 * S);
    }

    #[test]
    fn addresses_are_v4_then_v6_sorted_and_deduplicated() {
        let mut h = HostSched::default();
        let now = Instant::now();
        h.apply(
            &found(&["2001:db8::1", "10.0.0.2", "10.0.0.1", "10.0.0.2"], 5),
            now,
            &timing(),
        );
        let want: Vec<IpAddr> = vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("2001:db8::1")];
        assert_eq!(h.answer().unwrap().addrs, want);
    }

    #[test]
    fn failure_keeps_last_good_answer_and_success_resets_backoff() {
        let t = timing();
        let mut h = HostSched::default();
        let t0 = Instant::now();
        let s = h.apply(&found(&["10.0.0.1"], 30), t0, &t);
        assert_eq!((s.delay, s.changed, s.prev), (15 * S, true, None));

        let fail = Outcome::Failed("request timed out".into());
        let mut delays = Vec::new();
        for i in 0..4 {
            let s = h.apply(&fail, t0 + (i + 1) * S, &t);
            // Only the first failure is news; later ones look the same.
            assert_eq!(s.changed, i == 0);
            delays.push(s.delay.as_secs());
            let a = h.answer().unwrap();
            assert_eq!(a.addrs, vec![ip("10.0.0.1")]);
            assert_eq!(a.last_good_at, Some(t0));
            assert!(matches!(a.state, HostState::Failing { .. }));
        }
        assert_eq!(delays, [1, 2, 4, 8]);
        assert_eq!(h.failures(), 4);

        let s = h.apply(&found(&["10.0.0.1"], 2), t0 + 20 * S, &t);
        assert_eq!(h.failures(), 0);
        assert_eq!(s.delay, 2 * S);
        assert!(
            s.changed,
            "Failing -> Resolved is news even with equal addrs"
        );
        assert_eq!(h.apply(&fail, t0 + 22 * S, &t).delay, S);
    }

    #[test]
    fn same_addresses_are_not_a_change() {
        let t = timing();
        let mut h = HostSched::default();
        let now = Instant::now();
        assert!(
            h.apply(&found(&["10.0.0.1", "10.0.0.2"], 5), now, &t)
                .changed
        );
        assert!(
            !h.apply(&found(&["10.0.0.2", "10.0.0.1"], 9), now, &t)
                .changed
        );
        assert!(h.apply(&found(&["10.0.0.2"], 9), now, &t).changed);
    }

    #[test]
    fn loopback_and_friends_are_refused_once_per_change() {
        let t = timing();
        let mut h = HostSched::default();
        let now = Instant::now();
        let bad = [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.1.1.1",
            "255.255.255.255",
            "::1",
            "::",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
            "::ffff:224.0.0.1",
            "::ffff:255.255.255.255",
        ];
        let mut answer: Vec<&str> = bad.to_vec();
        answer.extend(["192.0.2.10", "2001:db8::10", "::ffff:192.0.2.11"]);
        let s = h.apply(&found(&answer, 5), now, &t);
        assert!(s.changed && s.refused_changed);
        let a = h.answer().unwrap();
        assert_eq!(
            a.addrs,
            vec![
                ip("192.0.2.10"),
                ip("::ffff:192.0.2.11"),
                ip("2001:db8::10")
            ]
        );
        assert_eq!(a.refused.len(), bad.len(), "{:?}", a.refused);
        assert_eq!(a.state, HostState::Resolved);
        // The same answer again: nothing to publish, nothing to log.
        let s = h.apply(&found(&answer, 5), now, &t);
        assert!(!s.changed && !s.refused_changed);
        // A failure keeps both parts of the last good answer.
        let s = h.apply(&Outcome::Failed("x".into()), now, &t);
        assert!(!s.refused_changed);
        assert_eq!(h.answer().unwrap().refused.len(), bad.len());
        // Only refused answers: resolved, no endpoints.
        let s = h.apply(&found(&["127.0.0.1"], 5), now, &t);
        assert!(s.changed && s.refused_changed);
        assert!(h.answer().unwrap().addrs.is_empty());
    }

    #[test]
    fn nxdomain_empties_addresses_and_uses_negative_ttl() {
        let t = timing();
        let mut h = HostSched::default();
        let now = Instant::now();
        h.apply(&found(&["10.0.0.1"], 5), now, &t);
        let nx = |ttl| Outcome::NotFound {
            nxdomain: true,
            negative_ttl: ttl,
        };
        let s = h.apply(&nx(Some(3 * S)), now, &t);
        assert!(s.changed);
        assert_eq!(s.delay, 3 * S);
        let a = h.answer().unwrap();
        assert!(a.addrs.is_empty());
        assert_eq!(a.state, HostState::NxDomain);
        let s = h.apply(&nx(None), now, &t);
        assert!(!s.changed);
        assert_eq!(s.delay, 15 * S);
        // A failure after NXDOMAIN keeps the (empty) last answer.
        h.apply(&Outcome::Failed("x".into()), now, &t);
        assert!(h.answer().unwrap().addrs.is_empty());
    }
}
