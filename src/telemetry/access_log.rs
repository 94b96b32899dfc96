//! The access log: one line per closed connection, off by default, text
//! or JSON, switchable while the daemon runs (flag, config key, admin
//! HTTP `/access_log`, `kmesh ctl access-log`).

use std::{
    io::Write,
    str::FromStr,
    sync::atomic::{AtomicU8, Ordering},
};

use serde::Serialize;

use super::TelemetryError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Off,
    Text,
    Json,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Off => "off",
            Format::Text => "text",
            Format::Json => "json",
        }
    }
}

impl FromStr for Format {
    type Err = TelemetryError;
    fn from_str(s: &str) -> Result<Format, TelemetryError> {
        match s.trim() {
            "off" => Ok(Format::Off),
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => Err(TelemetryError::AccessLogFormat(other.to_string())),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The current format, shared by the reader and the admin endpoints.
#[derive(Debug, Default)]
pub struct AccessLog(AtomicU8);

impl AccessLog {
    pub fn new(f: Format) -> AccessLog {
        let l = AccessLog::default();
        l.set(f);
        l
    }

    pub fn get(&self) -> Format {
        match self.0.load(Ordering::Relaxed) {
            1 => Format::Text,
            2 => Format::Json,
            _ => Format::Off,
        }
    }

    pub fn set(&self, f: Format) {
        let v = match f {
            Format::Off => 0,
            Format::Text => 1,
            Format::Json => 2,
        };
        self.0.store(v, Ordering::Relaxed);
    }
}

/// One closed connection, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub reporter: &'a str,
    pub src: String,
    pub dst: String,
    pub src_workload: &'a str,
    pub src_namespace: &'a str,
    pub dst_workload: &'a str,
    pub dst_namespace: &'a str,
    pub dst_service: &'a str,
    /// Client to server, and back (as the reporting end counted them).
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    pub duration_ms: f64,
    pub reason: &'a str,
}

impl Entry<'_> {
    pub fn line(&self, f: Format) -> Option<String> {
        match f {
            Format::Off => None,
            Format::Json => serde_json::to_string(self).ok(),
            Format::Text => Some(format!(
                "access: reporter={} src={} dst={} src_workload={}.{} dst_workload={}.{} \
                 dst_service={} to_server={} to_client={} duration_ms={:.3} reason={}",
                self.reporter,
                self.src,
                self.dst,
                self.src_workload,
                self.src_namespace,
                self.dst_workload,
                self.dst_namespace,
                self.dst_service,
                self.bytes_to_server,
                self.bytes_to_client,
                self.duration_ms,
                self.reason
            )),
        }
    }
}

/// Writes a line to stderr, where the daemon's log goes; one write per
/// line so lines from two threads never interleave.
pub fn write(line: &str) {
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    let _ = std::io::stderr().lock().write_all(buf.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_switch() {
        let l = AccessLog::default();
        assert_eq!(l.get(), Format::Off);
        l.set("json".parse().unwrap());
        assert_eq!(l.get(), Format::Json);
        let e = "yaml".parse::<Format>().unwrap_err();
        assert!(e.to_string().contains("\"yaml\""), "{e}");
    }

    #[test]
    fn a_json_line_is_one_object() {
        let e = Entry {
            reporter: "source",
            src: "10.0.0.1:4000".into(),
            dst: "10.0.0.2:80".into(),
            src_workload: "a",
            src_namespace: "ns",
            dst_workload: "b",
            dst_namespace: "ns",
            dst_service: "b.ns.svc.cluster.local",
            bytes_to_server: 3,
            bytes_to_client: 4,
            duration_ms: 1.5,
            reason: "normal",
        };
        let v: serde_json::Value = serde_json::from_str(&e.line(Format::Json).unwrap()).unwrap();
        assert_eq!(v["bytes_to_server"], 3);
        assert!(e.line(Format::Text).unwrap().contains("reason=normal"));
        assert!(e.line(Format::Off).is_none());
    }
}
