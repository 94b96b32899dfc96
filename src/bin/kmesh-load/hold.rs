//! `hold`: opens N concurrent connections, checks each with an echo, and
//! keeps them open (the capacity benchmark and tests).
//!
//! One tokio thread drives every connection: an idle socket costs epoll
//! nothing, while a thread per connection would cost 100k stacks. Opening
//! and checking run a bounded window of connections at a time, so a burst
//! never outgrows the server's accept and SYN queues.
//!
//! Output: one JSON line per event (`open`, then one per stdin command,
//! then `closed`). Stdin commands: `check` (echo over every connection
//! again), `rr K [ROUNDS]` (round-trip latency over K of the held
//! connections, one at a time). Stdin closing, SIGTERM or SIGINT ends the
//! hold.

use std::{
    future::Future,
    io::BufRead,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    signal::unix::{signal, SignalKind},
    task::JoinSet,
};

use crate::{hist::Histogram, Error, HDR_ECHO};

pub struct Opts {
    /// Connection i goes to `addrs[i % addrs.len()]`.
    pub addrs: Vec<SocketAddr>,
    /// Source addresses, cycled over after `addrs`; empty: the kernel picks.
    pub sources: Vec<IpAddr>,
    pub conns: usize,
    /// Bytes per echo check.
    pub size: usize,
    /// Connections being opened or checked at once.
    pub parallel: usize,
    /// For one connect + echo.
    pub timeout: Duration,
    /// Check every connection once more when the hold ends.
    pub recheck: bool,
}

/// What connection `i` sends in round `round`: differs per connection and
/// per round, so an echo from the wrong connection or a stale one is
/// caught, not only a short one.
fn pattern(i: usize, round: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| ((k as u64 * 31 + i as u64 * 7 + round * 13) % 251) as u8)
        .collect()
}

async fn echo(c: &mut TcpStream, i: usize, round: u64, size: usize) -> Result<(), String> {
    let out = pattern(i, round, size);
    let mut msg = Vec::with_capacity(size + 1);
    if round == 0 {
        msg.push(HDR_ECHO);
    }
    msg.extend_from_slice(&out);
    c.write_all(&msg).await.map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; size];
    c.read_exact(&mut back)
        .await
        .map_err(|e| format!("read echo: {e}"))?;
    if back != out {
        let at = back.iter().zip(&out).position(|(a, b)| a != b);
        return Err(format!("echo differs from what was sent at byte {at:?}"));
    }
    Ok(())
}

/// Lets the kernel pick the port at connect time, from the full 4-tuple,
/// rather than at bind time, where each source address would get only one
/// port range for all destinations together.
fn bind_no_port(s: &TcpSocket) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and an int-sized option value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

async fn open(
    i: usize,
    dst: SocketAddr,
    src: Option<IpAddr>,
    size: usize,
) -> Result<TcpStream, String> {
    let s = if dst.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(src) = src {
        bind_no_port(&s).map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
        s.bind(SocketAddr::new(src, 0))
            .map_err(|e| format!("bind {src}: {e}"))?;
    }
    let mut c = s
        .connect(dst)
        .await
        .map_err(|e| format!("connect {dst}: {e}"))?;
    c.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    echo(&mut c, i, 0, size)
        .await
        .map_err(|e| format!("{dst}: {e}"))?;
    Ok(c)
}

/// Runs `task(0..n)` with at most `parallel` in flight; results in
/// completion order.
async fn windowed<T, F>(
    n: usize,
    parallel: usize,
    mut task: impl FnMut(usize) -> F,
) -> Result<Vec<T>, Error>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if set.len() >= parallel {
            out.push(set.join_next().await.unwrap().map_err(|_| Error::Panic)?);
        }
        set.spawn(task(i));
    }
    while let Some(r) = set.join_next().await {
        out.push(r.map_err(|_| Error::Panic)?);
    }
    Ok(out)
}

async fn with_timeout<T>(
    t: Duration,
    f: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(t, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {t:?}")))
}

/// Tallies failures: a count and the first few distinct messages.
#[derive(Default)]
struct Failures {
    count: u64,
    first: Vec<String>,
}

impl Failures {
    fn add(&mut self, e: String) {
        self.count += 1;
        if self.first.len() < 5 && !self.first.contains(&e) {
            self.first.push(e);
        }
    }
}

struct Holder {
    opts: Opts,
    /// Index = connection number; None once it failed.
    conns: Vec<Option<TcpStream>>,
    round: u64,
    failed: u64,
}

impl Holder {
    fn live(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    async fn open_all(&mut self) -> Result<Value, Error> {
        let o = &self.opts;
        let (addrs, sources, size) = (o.addrs.clone(), o.sources.clone(), o.size);
        let timeout = o.timeout;
        let start = Instant::now();
        let results = windowed(o.conns, o.parallel, |i| {
            let dst = addrs[i % addrs.len()];
            let src = (!sources.is_empty()).then(|| sources[(i / addrs.len()) % sources.len()]);
            async move { (i, with_timeout(timeout, open(i, dst, src, size)).await) }
        })
        .await?;
        let secs = start.elapsed().as_secs_f64();
        let mut fails = Failures::default();
        self.conns = (0..o.conns).map(|_| None).collect();
        for (i, r) in results {
            match r {
                Ok(c) => self.conns[i] = Some(c),
                Err(e) => fails.add(e),
            }
        }
        self.failed += fails.count;
        let opened = self.live();
        Ok(json!({
            "event": "open", "conns": o.conns, "opened": opened,
            "failed": fails.count, "errors": fails.first, "seconds": secs,
            "per_s": opened as f64 / secs,
            "addrs": o.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "sources": o.sources.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        }))
    }

    /// One more echo over every live connection; failed ones are closed.
    async fn check(&mut self) -> Result<Value, Error> {
        self.round += 1;
        let (round, size, timeout) = (self.round, self.opts.size, self.opts.timeout);
        let idx: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].is_some())
            .collect();
        let start = Instant::now();
        let conns = &mut self.conns;
        let results = windowed(idx.len(), self.opts.parallel, |k| {
            let i = idx[k];
            let mut c = conns[i].take().expect("live connection");
            async move {
                let r = with_timeout(timeout, echo(&mut c, i, round, size)).await;
                (i, c, r)
            }
        })
        .await?;
        let mut fails = Failures::default();
        for (i, c, r) in results {
            match r {
                Ok(()) => self.conns[i] = Some(c),
                Err(e) => fails.add(format!("connection {i}: {e}")),
            }
        }
        self.failed += fails.count;
        Ok(json!({
            "event": "check", "checked": idx.len(), "ok": self.live(),
            "failed": fails.count, "errors": fails.first,
            "seconds": start.elapsed().as_secs_f64(),
        }))
    }

    /// Round-trip latency over `k` held connections spread evenly over all
    /// of them, one request at a time, `rounds` requests each.
    async fn rr(&mut self, k: usize, rounds: usize) -> Result<Value, Error> {
        let live: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].is_some())
            .collect();
        let k = k.clamp(1, live.len().max(1));
        let step = (live.len() / k).max(1);
        let mut hist = Histogram::default();
        let mut fails = Failures::default();
        for _ in 0..rounds {
            self.round += 1;
            for &i in live.iter().step_by(step).take(k) {
                let Some(c) = self.conns[i].as_mut() else {
                    continue;
                };
                let t0 = Instant::now();
                let r = with_timeout(self.opts.timeout, echo(c, i, self.round, self.opts.size));
                match r.await {
                    Ok(()) => hist.record(t0.elapsed().as_nanos() as u64),
                    Err(e) => {
                        fails.add(format!("connection {i}: {e}"));
                        self.conns[i] = None;
                    }
                }
            }
        }
        self.failed += fails.count;
        let us = |ns: u64| ns as f64 / 1e3;
        Ok(json!({
            "event": "rr", "conns": k, "held": self.live(), "size": self.opts.size,
            "requests": hist.count(), "failed": fails.count, "errors": fails.first,
            "p50_us": us(hist.quantile(0.50)), "p90_us": us(hist.quantile(0.90)),
            "p99_us": us(hist.quantile(0.99)), "mean_us": hist.mean() / 1e3,
        }))
    }

    async fn command(&mut self, line: &str) -> Result<Value, Error> {
        let mut w = line.split_whitespace();
        let num =
            |s: Option<&str>, default: usize| s.and_then(|s| s.parse().ok()).unwrap_or(default);
        match w.next() {
            Some("check") => self.check().await,
            Some("rr") => {
                let k = num(w.next(), 100);
                let rounds = num(w.next(), 10);
                self.rr(k, rounds).await
            }
            _ => Ok(json!({
                "event": "error",
                "error": format!("unknown command {line:?}: expected `check` or `rr K [ROUNDS]`"),
            })),
        }
    }

    /// Closes with RST: tens of thousands of FIN closes would leave as many
    /// TIME_WAIT sockets, using up ports a next run in the netns needs.
    fn close_all(&mut self) -> usize {
        let n = self.live();
        for c in self.conns.drain(..).flatten() {
            let _ = c.set_zero_linger();
        }
        n
    }
}

fn emit(v: &Value) {
    println!("{v}");
}

pub async fn hold(opts: Opts) -> Result<(), Error> {
    let mut h = Holder {
        opts,
        conns: Vec::new(),
        round: 0,
        failed: 0,
    };
    // Registered before anything is opened, so a signal sent as soon as the
    // `open` line appears is never the default (kill without clean-up).
    let mut term = signal(SignalKind::terminate()).map_err(Error::io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::io("SIGINT handler"))?;
    emit(&h.open_all().await?);
    // Stdin is read on a plain thread: tokio's stdin needs a feature the
    // rest of the crate does not, and one thread is no cost here.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some(l) if l.trim().is_empty() => {}
                Some(l) => emit(&h.command(&l).await?),
                None => break,
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if h.opts.recheck {
        emit(&h.check().await?);
    }
    let closed = h.close_all();
    emit(&json!({"event": "closed", "conns": closed, "failed": h.failed}));
    if h.failed > 0 {
        return Err(Error::Failed(h.failed));
    }
    Ok(())
}
