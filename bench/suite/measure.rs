//! One cell of the matrix: a mode and a message size (or the connect
//! group), measured by the own load client and by the Debian tools, each
//! result stored per run so ratios can be taken within a run.

use std::{collections::BTreeMap, net::SocketAddr};

use serde_json::Value;

use crate::world::{Mode, Server, World};

/// sockperf refuses messages under 14 bytes (its header) and over 64 KiB.
const SOCKPERF_SIZES: std::ops::RangeInclusive<usize> = 14..=65507;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Size(usize),
    Connect,
}

pub type Key = (Group, Mode, &'static str);

/// Named measurements of one tool run.
type Values = Vec<(&'static str, f64)>;

#[derive(Clone, Copy, Debug)]
enum Tool {
    Rr,
    Stream,
    Iperf3,
    Sockperf,
    Wrk,
    Qperf,
    Connect(bool),
}

/// wrk's connections: several, as a load generator runs, where rr measures
/// one connection's round trip.
const WRK_CONNS: u32 = 4;

/// "45.12us" / "1.20ms" / "2.00s" in µs.
fn wrk_time(t: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = t.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1e3)
    } else {
        (t.strip_suffix('s')?, 1e6)
    };
    Some(num.parse::<f64>().ok()? * scale)
}

#[derive(Default)]
pub struct Samples {
    /// Value per run index.
    pub values: BTreeMap<Key, BTreeMap<usize, f64>>,
    pub errors: Vec<String>,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Samples {
    fn put(&mut self, key: Key, run: usize, v: f64) {
        self.values.entry(key).or_default().insert(run, v);
    }

    pub fn median(&self, key: Key) -> Option<f64> {
        median(self.values.get(&key)?.values().copied().collect())
    }

    /// Median over runs of (this mode / direct) in the same run, so drift
    /// of the machine between runs cancels out.
    pub fn ratio(&self, key: Key) -> Option<f64> {
        self.ratio_to(key, Mode::Direct)
    }

    /// As `ratio`, against mode `base` instead of direct.
    pub fn ratio_to(&self, (g, m, metric): Key, base: Mode) -> Option<f64> {
        let a = self.values.get(&(g, m, metric))?;
        let d = self.values.get(&(g, base, metric))?;
        median(
            a.iter()
                .filter_map(|(r, v)| Some(v / d.get(r).filter(|x| **x > 0.0)?))
                .collect(),
        )
    }
}

pub struct Cell<'a> {
    pub w: &'a World,
    pub mode: Mode,
    pub group: Group,
    pub run: usize,
    pub secs: f64,
    /// Tool names to run (rr, stream, iperf3, sockperf, wrk, connect);
    /// None runs all.
    pub tools: Option<&'a [String]>,
}

fn num(v: &Value, k: &str) -> Result<f64, String> {
    v[k].as_f64().ok_or_else(|| format!("no {k} in {v}"))
}

impl Cell<'_> {
    fn check_peer(&self, v: &Value, server: Server) -> Result<(), String> {
        let want = self.w.expected_peer(self.mode, server).to_string();
        match v["peer"].as_str() {
            Some(p) if p == want => Ok(()),
            p => Err(format!("connected to {p:?}, expected {want}")),
        }
    }

    fn addr(&self, s: Server) -> SocketAddr {
        self.w.addr(self.mode, s)
    }

    fn load_rr(&self, size: usize) -> Result<Values, String> {
        let args = [
            self.addr(Server::Load).to_string(),
            format!("--size={size}"),
            format!("--duration={}", self.secs),
        ];
        let v = self.w.load("rr", &args)?;
        self.check_peer(&v, Server::Load)?;
        Ok(vec![
            ("p50", num(&v, "p50_us")?),
            ("p90", num(&v, "p90_us")?),
            ("p99", num(&v, "p99_us")?),
            ("rps", num(&v, "rps")?),
        ])
    }

    fn load_stream(&self, size: usize) -> Result<Values, String> {
        let args = [
            self.addr(Server::Load).to_string(),
            format!("--size={size}"),
            format!("--duration={}", self.secs),
        ];
        let v = self.w.load("stream", &args)?;
        self.check_peer(&v, Server::Load)?;
        Ok(vec![("mbs", num(&v, "mb_per_s")?)])
    }

    fn connect(&self, echo: bool) -> Result<Values, String> {
        let mut args = vec![
            self.addr(Server::Load).to_string(),
            format!("--duration={}", self.secs),
        ];
        if echo {
            args.push("--echo".into());
        }
        let cpu0 = self.w.daemon_cpu_seconds();
        let t0 = std::time::Instant::now();
        let v = self.w.load("connect", &args)?;
        let (cpu1, secs) = (self.w.daemon_cpu_seconds(), t0.elapsed().as_secs_f64());
        if num(&v, "errors")? > 0.0 {
            return Err(format!("connect errors: {v}"));
        }
        let cps = num(&v, "cps")?;
        let mut out = vec![(if echo { "cps_echo" } else { "cps" }, cps)];
        // The daemon's own CPU while the kernel redirects the connects
        // (the ring-buffer reader's work with telemetry on), as % of one
        // core per 10k connections/s.
        if let (Some(a), Some(b), false) = (cpu0, cpu1, echo) {
            out.push(("cpu10k", (b - a) / secs * 100.0 / (cps / 1e4)));
        }
        Ok(out)
    }

    /// sockperf ping-pong. It reports half the round trip; stored doubled so
    /// it reads like the own client's request/response latency.
    fn sockperf(&self, size: usize) -> Result<Values, String> {
        let a = self.addr(Server::Sockperf);
        // Its first 400 ms are warm-up and not counted.
        let t = (self.secs + 0.4).ceil().max(1.0).to_string();
        let (ip, port, m) = (a.ip().to_string(), a.port().to_string(), size.to_string());
        let argv = [
            "sockperf", "pp", "--tcp", "-i", &ip, "-p", &port, "-m", &m, "-t", &t,
        ];
        let text = self.client_output(&argv)?;
        let pct = |p: &str| -> Result<f64, String> {
            let tag = format!("percentile {p} =");
            text.lines()
                .find_map(|l| l.split_once(&tag)?.1.trim().parse::<f64>().ok())
                .map(|v| v * 2.0)
                .ok_or_else(|| format!("sockperf output lacks {tag}: {text}"))
        };
        Ok(vec![("sp_p50", pct("50.000")?), ("sp_p99", pct("99.000")?)])
    }

    fn iperf3(&self, size: usize) -> Result<Values, String> {
        let a = self.addr(Server::Iperf);
        // Whole seconds only.
        let t = self.secs.round().max(1.0).to_string();
        let (ip, port, l) = (a.ip().to_string(), a.port().to_string(), size.to_string());
        let argv = [
            "iperf3",
            "-c",
            &ip,
            "-p",
            &port,
            "-t",
            &t,
            "-l",
            &l,
            "-J",
            "--connect-timeout",
            "3000",
        ];
        let out = self
            .w
            .tool(&self.w.client, &argv)
            .output()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "iperf3 output: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(e) = v["error"].as_str() {
            return Err(format!("iperf3: {e}"));
        }
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .ok_or_else(|| format!("iperf3: no sum_received in {}", v["end"]))?;
        Ok(vec![("iperf_mbs", bps / 8e6)])
    }

    /// Runs a tool in the client pod; its stdout and stderr together, or
    /// an error naming it with that text if it failed.
    fn client_output(&self, argv: &[&str]) -> Result<String, String> {
        let out = self
            .w
            .tool(&self.w.client, argv)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("{}: {}", argv[0], text.trim()));
        }
        Ok(text)
    }

    /// wrk against the server's HTTP mode: `GET /SIZE` returns SIZE bytes.
    fn wrk(&self, size: usize) -> Result<Values, String> {
        let a = self.addr(Server::Load);
        let (d, c) = (
            format!("{}s", self.secs.ceil().max(1.0)),
            WRK_CONNS.to_string(),
        );
        let url = format!("http://{a}/{size}");
        let argv = ["wrk", "-t1", "-c", &c, "-d", &d, "--latency", &url];
        let out = self
            .w
            .tool(&self.w.client, &argv)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() || text.contains("Socket errors") || text.contains("Non-2xx") {
            return Err(format!(
                "wrk: {} {}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let field = |label: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(label))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("wrk output lacks {label:?}: {text}"))
        };
        let pct = |p: &str| field(p).and_then(|v| wrk_time(&v).ok_or(format!("wrk {p} {v:?}")));
        let rps = field("Requests/sec:")?;
        Ok(vec![
            ("wrk_p50", pct("50%")?),
            ("wrk_p99", pct("99%")?),
            (
                "wrk_rps",
                rps.parse().map_err(|e| format!("wrk rps {rps:?}: {e}"))?,
            ),
        ])
    }

    fn wanted(&self, t: Tool) -> bool {
        let name = match t {
            Tool::Rr => "rr",
            Tool::Stream => "stream",
            Tool::Iperf3 => "iperf3",
            Tool::Sockperf => "sockperf",
            Tool::Wrk => "wrk",
            Tool::Qperf => "qperf",
            Tool::Connect(_) => "connect",
        };
        self.tools.is_none_or(|ts| ts.iter().any(|x| x == name))
    }

    /// qperf tcp_bw: the sender write()s SIZE bytes at a time and the
    /// receiver read()s SIZE bytes at a time (its recv_full), both blocking.
    fn qperf(&self, size: usize) -> Result<Values, String> {
        let a = self.addr(Server::Qperf);
        let t = self.secs.ceil().max(1.0).to_string();
        let (ip, lp, dp, m) = (
            a.ip().to_string(),
            a.port().to_string(),
            self.addr(Server::QperfData).port().to_string(),
            size.to_string(),
        );
        let argv = [
            "qperf",
            &ip,
            "--listen_port",
            &lp,
            "--ip_port",
            &dp,
            "-m",
            &m,
            "-t",
            &t,
            "tcp_bw",
        ];
        let text = self.client_output(&argv)?;
        // "    bw  =  876 KB/sec" (decimal units)
        let bw = text
            .lines()
            .find_map(|l| {
                let v = l.trim().strip_prefix("bw")?.trim().strip_prefix('=')?;
                let mut it = v.split_whitespace();
                let n: f64 = it.next()?.replace(',', "").parse().ok()?;
                let scale = match it.next()? {
                    "bytes/sec" => 1e-6,
                    "KB/sec" => 1e-3,
                    "MB/sec" => 1.0,
                    "GB/sec" => 1e3,
                    _ => return None,
                };
                Some(n * scale)
            })
            .ok_or_else(|| format!("qperf output lacks bw: {text}"))?;
        Ok(vec![("qperf_mbs", bw)])
    }

    fn tool(&self, t: Tool) -> Result<Values, String> {
        match (t, self.group) {
            (Tool::Rr, Group::Size(n)) => self.load_rr(n),
            (Tool::Stream, Group::Size(n)) => self.load_stream(n),
            (Tool::Iperf3, Group::Size(n)) => self.iperf3(n),
            (Tool::Sockperf, Group::Size(n)) => self.sockperf(n),
            (Tool::Wrk, Group::Size(n)) => self.wrk(n),
            (Tool::Qperf, Group::Size(n)) => self.qperf(n),
            (Tool::Connect(echo), Group::Connect) => self.connect(echo),
            (t, g) => Err(format!("{t:?} does not apply to {g:?}")),
        }
    }

    /// Measures everything for this cell into `s`; a failing tool is
    /// recorded and the rest of the cell still runs.
    pub fn run(&self, s: &mut Samples) {
        let tools = match self.group {
            Group::Size(n) if SOCKPERF_SIZES.contains(&n) => {
                vec![
                    Tool::Rr,
                    Tool::Stream,
                    Tool::Iperf3,
                    Tool::Sockperf,
                    Tool::Wrk,
                    Tool::Qperf,
                ]
            }
            Group::Size(_) => vec![Tool::Rr, Tool::Stream, Tool::Iperf3, Tool::Wrk, Tool::Qperf],
            Group::Connect => vec![Tool::Connect(false), Tool::Connect(true)],
        };
        // qperf's server reports the data port back to the client, which a
        // proxy listening on other ports cannot relay.
        let applies = |t: &Tool| !matches!((t, self.mode), (Tool::Qperf, Mode::Proxy));
        for t in tools.into_iter().filter(|t| self.wanted(*t) && applies(t)) {
            match self.tool(t) {
                Ok(vals) => {
                    for (metric, v) in vals {
                        s.put((self.group, self.mode, metric), self.run, v);
                    }
                }
                Err(e) => s.errors.push(format!(
                    "run {} {} {:?} {t:?}: {e}",
                    self.run, self.mode, self.group
                )),
            }
        }
    }
}
