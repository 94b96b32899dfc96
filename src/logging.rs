//! The process's log subscriber, with a filter that can be changed while
//! the daemon runs (admin HTTP `/logging`, `kmesh ctl log-level`): an
//! operator chasing a problem turns on debug without a restart, which
//! would reload the programs and lose the state being looked at.

use std::sync::Arc;

use thiserror::Error;
use tracing_subscriber::{
    layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LogError {
    #[error("empty log level (expected e.g. \"debug\" or \"kmesh=debug,info\")")]
    Empty,
    #[error(
        "bad log level {directive:?} in {spec:?}: {why} \
         (expected LEVEL or TARGET=LEVEL, comma-separated; \
         LEVEL is one of trace, debug, info, warn, error, off)"
    )]
    Bad {
        spec: String,
        directive: String,
        why: &'static str,
    },
    #[error("bad log level {spec:?}: {reason}")]
    Filter { spec: String, reason: String },
    #[error("changing the log level: {0}")]
    Reload(String),
}

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a filter spec more strictly than EnvFilter does: EnvFilter reads
/// a misspelt level ("verbose", "debgu") as a target name, which would
/// silently turn all logging off instead of being refused.
pub fn parse(spec: &str) -> Result<EnvFilter, LogError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(LogError::Empty);
    }
    let bad = |directive: &str, why| LogError::Bad {
        spec: spec.to_string(),
        directive: directive.to_string(),
        why,
    };
    for d in spec.split(',').map(str::trim) {
        let level = match d.split_once('=') {
            Some((target, level)) => {
                let ok_char = |c: char| c.is_ascii_alphanumeric() || "_:-.".contains(c);
                if target.is_empty() || !target.chars().all(ok_char) {
                    return Err(bad(d, "the target is not a module path"));
                }
                level
            }
            None if d.is_empty() => return Err(bad(d, "empty directive")),
            None => d,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad(d, "unknown level"));
        }
    }
    // Spaces around directives are refused by EnvFilter; people type them.
    let clean: Vec<&str> = spec.split(',').map(str::trim).collect();
    EnvFilter::try_new(clean.join(",")).map_err(|e| LogError::Filter {
        spec: spec.to_string(),
        reason: e.to_string(),
    })
}

/// Reads and replaces the live filter. Cheap to clone.
#[derive(Clone)]
pub struct LogControl {
    handle: Arc<reload::Handle<EnvFilter, Registry>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("level", &self.get())
            .finish()
    }
}

impl LogControl {
    /// The current filter, in the form `set` takes.
    pub fn get(&self) -> String {
        self.handle
            .with_current(|f| f.to_string())
            .unwrap_or_else(|e| format!("<unavailable: {e}>"))
    }

    /// Replaces the filter; a refused spec changes nothing.
    pub fn set(&self, spec: &str) -> Result<String, LogError> {
        let filter = parse(spec)?;
        self.handle
            .reload(filter)
            .map_err(|e| LogError::Reload(e.to_string()))?;
        let now = self.get();
        tracing::info!("log level set to {now}");
        Ok(now)
    }
}

/// Installs the global subscriber (stderr, filter from `env_var` or
/// `default`); a bad value of the variable falls back to the default, as
/// before run-time changes existed.
pub fn init(env_var: &str, default: &str) -> LogControl {
    let filter = std::env::var(env_var)
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    LogControl {
        handle: Arc::new(handle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_targets_parse() {
        for ok in [
            "debug",
            "INFO",
            "kmesh=debug,info",
            " warn , kmesh::xds=trace",
            "off",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn misspelt_levels_are_refused_by_name() {
        let e = parse("kmesh=debgu,info").unwrap_err();
        assert!(e.to_string().contains("\"kmesh=debgu\""), "{e}");
        // EnvFilter alone would take this as a target and log nothing.
        assert!(matches!(parse("verbose"), Err(LogError::Bad { .. })));
        assert!(matches!(parse("  "), Err(LogError::Empty)));
        assert!(matches!(parse("info,"), Err(LogError::Bad { .. })));
        assert!(matches!(parse("a b=info"), Err(LogError::Bad { .. })));
        assert!(matches!(parse("=info"), Err(LogError::Bad { .. })));
    }
}
