//! Load clients: request/response, one-way stream, connect rate.
//!
//! Blocking sockets on plain threads, so a measured latency is the network
//! path plus two syscalls, with no runtime scheduling in it.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{hist::Histogram, Error, HDR_ECHO, HDR_SINK};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Above this, a request is written and its echo read concurrently: the
/// echo can outgrow what the socket buffers hold while the request is still
/// being written, and blocking on the write alone would deadlock.
const BLOCKING_MAX: usize = 16 * 1024;

fn connect(addr: SocketAddr) -> Result<TcpStream, Error> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(Error::io("connect"))?;
    Ok(s)
}

/// Closes with RST (SO_LINGER 0) so that hundreds of thousands of connects
/// leave no TIME_WAIT sockets behind to exhaust the port range.
fn abort(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &l);
}

/// read_exact that retries a blocking sockhash socket's spurious EAGAIN
/// (kmesh::sys::read_blocking); returns the retries.
fn read_exact_blocking(s: &TcpStream, buf: &mut [u8]) -> io::Result<u32> {
    let mut retries = 0;
    kmesh::sys::read_exact_blocking(s, buf, &mut retries)?;
    Ok(retries)
}

/// Writes `out` while reading the echo into `back`, with poll(2) waiting for
/// whichever side can progress. `s` must be non-blocking.
fn exchange_polled(s: &mut TcpStream, out: &[u8], back: &mut [u8]) -> io::Result<()> {
    let (mut w, mut r) = (0, 0);
    while r < back.len() {
        let mut progressed = false;
        if w < out.len() {
            match s.write(&out[w..]) {
                Ok(n) => {
                    w += n;
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        match s.read(&mut back[r..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                r += n;
                progressed = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if !progressed {
            let mut events = libc::POLLIN;
            if w < out.len() {
                events |= libc::POLLOUT;
            }
            let mut pfd = libc::pollfd {
                fd: s.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, 5000) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

struct RrThread {
    hist: Histogram,
    mismatches: u64,
    peer: String,
}

fn rr_conn(
    addr: SocketAddr,
    size: usize,
    warmup: Instant,
    end: Instant,
) -> Result<RrThread, Error> {
    let mut s = connect(addr)?;
    s.set_nodelay(true).map_err(Error::io("TCP_NODELAY"))?;
    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    s.write_all(&[HDR_ECHO]).map_err(Error::io("header"))?;
    let polled = size > BLOCKING_MAX;
    s.set_nonblocking(polled).map_err(Error::io("O_NONBLOCK"))?;
    // Content that differs per request, so a stale or reordered echo is
    // caught, not only a short one.
    let mut out: Vec<u8> = (0..size).map(|i| (i * 7 + 13) as u8).collect();
    let mut back = vec![0u8; size];
    let mut t = RrThread {
        hist: Histogram::default(),
        mismatches: 0,
        peer,
    };
    for seq in 0u64.. {
        let stamp = seq.to_le_bytes();
        let k = size.min(8);
        out[..k].copy_from_slice(&stamp[..k]);
        let t0 = Instant::now();
        let r = if polled {
            exchange_polled(&mut s, &out, &mut back)
        } else {
            s.write_all(&out)
                .and_then(|()| read_exact_blocking(&s, &mut back).map(drop))
        };
        let t1 = Instant::now();
        r.map_err(Error::io("request/response"))?;
        if back != out {
            t.mismatches += 1;
        }
        if t0 >= warmup {
            t.hist.record((t1 - t0).as_nanos() as u64);
        }
        if t1 >= end {
            break;
        }
    }
    abort(s);
    Ok(t)
}

/// `conns` connections, each sending SIZE bytes and waiting for their echo,
/// back to back, for `duration` after `warmup`.
pub fn rr(
    addr: SocketAddr,
    size: usize,
    conns: u32,
    warmup: Duration,
    duration: Duration,
) -> Result<Value, Error> {
    let start = Instant::now();
    let (w, end) = (start + warmup, start + warmup + duration);
    let threads: Vec<_> = (0..conns)
        .map(|_| std::thread::spawn(move || rr_conn(addr, size, w, end)))
        .collect();
    let mut hist = Histogram::default();
    let (mut mismatches, mut peer) = (0, String::new());
    for t in threads {
        let t = t.join().map_err(|_| Error::Panic)??;
        hist.merge(&t.hist);
        mismatches += t.mismatches;
        peer = t.peer;
    }
    let secs = (Instant::now() - w).as_secs_f64();
    let us = |ns: u64| ns as f64 / 1e3;
    let v = json!({
        "mode": "rr", "size": size, "conns": conns, "peer": peer,
        "requests": hist.count(), "seconds": secs,
        "rps": hist.count() as f64 / secs,
        "p50_us": us(hist.quantile(0.50)), "p90_us": us(hist.quantile(0.90)),
        "p99_us": us(hist.quantile(0.99)), "mean_us": hist.mean() / 1e3,
        "mismatches": mismatches,
    });
    if mismatches > 0 {
        return Err(Error::Mismatch(mismatches, v));
    }
    Ok(v)
}

/// One connection writing SIZE-byte buffers for `duration`; the rate is
/// what the server counted as received, up to its reply after our FIN, so
/// data still sitting in socket buffers is not counted as delivered.
pub fn stream(addr: SocketAddr, size: usize, duration: Duration) -> Result<Value, Error> {
    let mut s = connect(addr)?;
    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    s.write_all(&[HDR_SINK]).map_err(Error::io("header"))?;
    let buf = vec![0x5au8; size];
    let (start, mut sent) = (Instant::now(), 0u64);
    let end = start + duration;
    while Instant::now() < end {
        s.write_all(&buf).map_err(Error::io("write"))?;
        sent += size as u64;
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(Error::io("shutdown"))?;
    let mut got = [0u8; 8];
    let retries = read_exact_blocking(&s, &mut got).map_err(Error::io("byte count"))?;
    let secs = start.elapsed().as_secs_f64();
    let received = u64::from_le_bytes(got);
    let v = json!({
        "mode": "stream", "size": size, "peer": peer, "bytes": received,
        "seconds": secs, "mb_per_s": received as f64 / secs / 1e6,
        "eagain_retries": retries,
    });
    if received != sent {
        return Err(Error::Mismatch(sent.abs_diff(received), v));
    }
    Ok(v)
}

/// Connect (and, with `echo`, one 1-byte round trip) then RST, back to back
/// for `duration`.
pub fn connect_rate(addr: SocketAddr, duration: Duration, echo: bool) -> Result<Value, Error> {
    let start = Instant::now();
    let (mut ok, mut errors, mut last_error) = (0u64, 0u64, String::new());
    while start.elapsed() < duration {
        let r = connect(addr).and_then(|mut s| {
            if echo {
                s.set_nodelay(true).map_err(Error::io("TCP_NODELAY"))?;
                s.write_all(&[HDR_ECHO, 0xa5]).map_err(Error::io("write"))?;
                let mut b = [0u8; 1];
                read_exact_blocking(&s, &mut b).map_err(Error::io("read"))?;
                if b[0] != 0xa5 {
                    return Err(Error::Mismatch(1, Value::Null));
                }
            }
            abort(s);
            Ok(())
        });
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                errors += 1;
                last_error = e.to_string();
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "connect", "echo": echo, "connects": ok, "errors": errors,
        "last_error": last_error, "seconds": secs, "cps": ok as f64 / secs,
    }))
}
