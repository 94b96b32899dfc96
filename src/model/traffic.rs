//! Traffic management on a service: weighted endpoints and canary splits,
//! a circuit breaker and a per-pod connect rate limit. Sources fill these
//! (config file; xDS carries only Workload.capacity, the endpoint weight);
//! the writer turns them into pick tables and service-value limits.

use std::collections::BTreeMap;

use serde::Serialize;

/// Largest endpoint weight: the pick table has 1,024 slots, so a weight
/// ratio up to 1000:1 still gives the lightest endpoint a slot.
pub const MAX_WEIGHT: u32 = 1000;

/// A share of a service's connections for the workloads carrying
/// `labels` (each divides its share among them by their own weights).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitRule {
    pub labels: BTreeMap<String, String>,
    /// Percent; the rules of a service add up to 100.
    pub weight: u32,
}

/// Envoy's local_ratelimit token bucket, per client pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval_ms: u32,
}

/// A service's traffic settings; the default changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TrafficPolicy {
    /// Canary split by workload labels; empty: by workload weight alone.
    pub split: Vec<SplitRule>,
    /// Concurrent connections from this node; None: no limit.
    pub max_connections: Option<u32>,
    pub rate_limit: Option<RateLimit>,
}

impl TrafficPolicy {
    pub fn is_default(&self) -> bool {
        *self == TrafficPolicy::default()
    }

    /// Checks the values alone; errors name the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let e = |f: String, m: String| Err((f, m));
        for (i, r) in self.split.iter().enumerate() {
            if r.labels.is_empty() {
                return e(
                    format!("split[{i}].labels"),
                    "empty: a rule selects workloads by at least one label".into(),
                );
            }
            if r.weight == 0 || r.weight > 100 {
                return e(
                    format!("split[{i}].weight"),
                    format!("{} is not a percentage in 1..=100", r.weight),
                );
            }
            if self.split[..i].iter().any(|o| o.labels == r.labels) {
                return e(
                    format!("split[{i}].labels"),
                    "the same labels as an earlier rule".into(),
                );
            }
        }
        let sum: u32 = self.split.iter().map(|r| r.weight).sum();
        if !self.split.is_empty() && sum != 100 {
            return e("split".into(), format!("weights add up to {sum}, not 100"));
        }
        if self.max_connections == Some(0) {
            return e(
                "max_connections".into(),
                "0 would refuse every connection (leave it out for no limit)".into(),
            );
        }
        if let Some(r) = self.rate_limit {
            for (f, v) in [
                ("max_tokens", r.max_tokens),
                ("tokens_per_fill", r.tokens_per_fill),
                ("fill_interval_ms", r.fill_interval_ms),
            ] {
                if v == 0 {
                    return e(format!("rate_limit.{f}"), "must be at least 1".into());
                }
            }
        }
        Ok(())
    }

    /// The rule whose labels `labels` carries, if any (the first).
    pub fn rule_for(&self, labels: &BTreeMap<String, String>) -> Option<usize> {
        self.split
            .iter()
            .position(|r| r.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// A workload weight as given (Workload.capacity, config `weight`): 0
/// reads as 1, the default; beyond MAX_WEIGHT is capped.
pub fn weight(w: u32) -> u32 {
    w.clamp(1, MAX_WEIGHT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(v: &str, weight: u32) -> SplitRule {
        SplitRule {
            labels: [("version".to_string(), v.to_string())].into(),
            weight,
        }
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |p: TrafficPolicy| p.validate().unwrap_err().0;
        let split = |s: Vec<SplitRule>| TrafficPolicy {
            split: s,
            ..Default::default()
        };
        assert_eq!(bad(split(vec![rule("v1", 80), rule("v2", 30)])), "split");
        assert_eq!(
            bad(split(vec![rule("v1", 0), rule("v2", 100)])),
            "split[0].weight"
        );
        assert_eq!(
            bad(split(vec![rule("v1", 50), rule("v1", 50)])),
            "split[1].labels"
        );
        let limits = TrafficPolicy {
            rate_limit: Some(RateLimit {
                max_tokens: 10,
                tokens_per_fill: 5,
                fill_interval_ms: 0,
            }),
            ..Default::default()
        };
        assert_eq!(bad(limits), "rate_limit.fill_interval_ms");
        let zero = TrafficPolicy {
            max_connections: Some(0),
            ..Default::default()
        };
        assert_eq!(bad(zero), "max_connections");
        assert!(split(vec![rule("v1", 80), rule("v2", 20)])
            .validate()
            .is_ok());
        assert_eq!(weight(0), 1);
        assert_eq!(weight(5000), MAX_WEIGHT);
    }
}
