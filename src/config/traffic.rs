//! The config file's traffic keys on services (split, max_connections,
//! rate_limit) and workloads (weight, labels), checked into the model's
//! TrafficPolicy with errors that name the field.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::{Model, RateLimit, SplitRule, TrafficPolicy, MAX_WEIGHT};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SplitEntry {
    labels: BTreeMap<String, String>,
    /// Percent of the service's connections.
    weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitEntry {
    max_tokens: u32,
    tokens_per_fill: u32,
    fill_interval_ms: u32,
}

/// A service's traffic keys as a policy; Err is (field under the service,
/// message).
pub(super) fn policy(
    split: &[SplitEntry],
    max_connections: Option<u32>,
    rate_limit: Option<&RateLimitEntry>,
) -> Result<TrafficPolicy, (String, String)> {
    let p = TrafficPolicy {
        split: split
            .iter()
            .map(|s| SplitRule {
                labels: s.labels.clone(),
                weight: s.weight,
            })
            .collect(),
        max_connections,
        rate_limit: rate_limit.map(|r| RateLimit {
            max_tokens: r.max_tokens,
            tokens_per_fill: r.tokens_per_fill,
            fill_interval_ms: r.fill_interval_ms,
        }),
    };
    p.validate()?;
    Ok(p)
}

/// A workload's `weight` key: 1..=MAX_WEIGHT.
pub(super) fn weight(w: Option<u32>) -> Result<u32, String> {
    match w {
        None => Ok(0),
        Some(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(w),
        Some(w) => Err(format!("{w} is out of range 1..={MAX_WEIGHT}")),
    }
}

/// Each split rule of `key` must select some workload of the service: a
/// rule nobody matches is a typo that would move its share elsewhere.
pub(super) fn check_split(
    model: &Model,
    key: &str,
    p: &TrafficPolicy,
) -> Result<(), (String, String)> {
    for (j, r) in p.split.iter().enumerate() {
        let matched = model.workloads.iter().any(|w| {
            w.services.iter().any(|s| &*s.key == key)
                && w.labels()
                    .is_some_and(|l| r.labels.iter().all(|(k, v)| l.get(k) == Some(v)))
        });
        if !matched {
            return Err((
                format!("split[{j}].labels"),
                format!("no workload of {key} has the labels {:?}", r.labels),
            ));
        }
    }
    Ok(())
}
