//! Byte-exact transfers against the echo server, for the waypoint and
//! acceleration tests: each connection sends messages of the given sizes
//! and checks that exactly the same bytes come back.

use std::{
    io::{self, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use serde_json::json;

use super::{connect_once, connect_plain, tcp_socket};

pub struct Opts {
    pub sizes: Vec<usize>,
    /// Write in pieces of this many bytes (0: one write per message).
    pub chunk: usize,
    /// Shut down the sending side after the messages and expect EOF back.
    pub half_close: bool,
    /// Send this many bytes, then reset the connection (SO_LINGER 0).
    pub abort_after: Option<usize>,
    pub timeout: Duration,
    /// Local address to connect from.
    pub bind: Option<SocketAddr>,
    /// With `half_close`: send every message and shut down first, wait
    /// this long, then read the echoes. They and the server's FIN arrive
    /// while nothing reads, so the socket is closed (TIME_WAIT) before its
    /// bytes are read, as an HTTP/1.0 client's can be.
    pub late_read: Option<Duration>,
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

/// read_exact that retries a blocking sockhash socket's spurious EAGAIN
/// (kmesh::sys::read_blocking); the count is reported.
fn read_full(s: &TcpStream, buf: &mut [u8], eagain: &mut u32) -> io::Result<()> {
    kmesh::sys::read_exact_blocking(s, buf, eagain)
}

/// The server's greeting line, read byte by byte so nothing after it is
/// consumed.
fn greeting(s: &TcpStream, eagain: &mut u32) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        read_full(s, &mut b, eagain)?;
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
}

/// Sends `n` bytes after the greeting, then resets the connection
/// (SO_LINGER 0) with the echo unread.
fn reset_after(
    addr: SocketAddr,
    n: usize,
    seed: usize,
    o: &Opts,
) -> io::Result<(String, usize, u32)> {
    let (s, name) = connect_once(addr, o.bind, o.timeout)?;
    (&s).write_all(&pattern(seed, n))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
    drop(s);
    Ok((name, 0, 0))
}

/// Sends each message of `o.sizes` and checks its echo; returns the
/// server's greeting (read after the first write) and the bytes verified.
fn echo_messages(
    s: &TcpStream,
    o: &Opts,
    seed: usize,
    eagain: &mut u32,
) -> io::Result<(String, usize)> {
    let mut name = String::new();
    let mut verified = 0;
    for (k, &size) in o.sizes.iter().enumerate() {
        let msg = pattern(seed + k, size);
        let mut w = s.try_clone()?;
        let chunk = if o.chunk == 0 { size.max(1) } else { o.chunk };
        let sent = msg.clone();
        // Writing and reading at once: a 4 MiB echo does not fit in the
        // socket buffers of one direction.
        let writer = std::thread::spawn(move || -> io::Result<()> {
            for piece in sent.chunks(chunk) {
                w.write_all(piece)?;
            }
            Ok(())
        });
        if k == 0 {
            name = greeting(s, eagain)?;
        }
        read_echo(s, &msg, eagain)?;
        writer.join().expect("writer thread")?;
        verified += size;
    }
    Ok((name, verified))
}

/// Reads `msg.len()` bytes and checks they are `msg`.
fn read_echo(s: &TcpStream, msg: &[u8], eagain: &mut u32) -> io::Result<()> {
    let mut back = vec![0u8; msg.len()];
    read_full(s, &mut back, eagain)?;
    if back != msg {
        let at = back.iter().zip(msg).position(|(a, b)| a != b);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "message of {} bytes came back different (first difference at {at:?})",
                msg.len()
            ),
        ));
    }
    Ok(())
}

/// Half-closed, the server's EOF must come next. Read with the retrying
/// read: the FIN's wake-up is one that can bring a spurious EAGAIN.
fn expect_eof(s: &TcpStream, eagain: &mut u32) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut rest = 0;
    loop {
        match kmesh::sys::read_blocking(s, &mut buf, eagain)? {
            0 => break,
            n => rest += n,
        }
    }
    if rest != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{rest} unexpected bytes after half-close"),
        ));
    }
    Ok(())
}

/// Sends every message, shuts down the sending side, waits, then reads
/// the greeting, the echoes and EOF (see `Opts::late_read`).
fn half_close_then_read(
    s: &TcpStream,
    o: &Opts,
    seed: usize,
    wait: Duration,
    eagain: &mut u32,
) -> io::Result<(String, usize)> {
    let msgs: Vec<Vec<u8>> = o
        .sizes
        .iter()
        .enumerate()
        .map(|(k, &size)| pattern(seed + k, size))
        .collect();
    let mut w = s;
    for m in &msgs {
        w.write_all(m)?;
    }
    s.shutdown(Shutdown::Write)?;
    std::thread::sleep(wait);
    let name = greeting(s, eagain)?;
    for m in &msgs {
        read_echo(s, m, eagain)?;
    }
    expect_eof(s, eagain)?;
    Ok((name, msgs.iter().map(Vec::len).sum()))
}

/// One connection; returns (server name, bytes verified, EAGAINs retried). The client
/// sends first and reads the greeting after: a waypoint learns where to
/// forward only from the first bytes (the TLV in front of them).
fn one(addr: SocketAddr, o: &Opts, seed: usize) -> io::Result<(String, usize, u32)> {
    if let Some(n) = o.abort_after {
        return reset_after(addr, n, seed, o);
    }
    let s = connect_plain(addr, o.bind, o.timeout)?;
    s.set_read_timeout(Some(o.timeout.max(Duration::from_secs(10))))?;
    let mut eagain = 0;
    if let (true, Some(wait)) = (o.half_close, o.late_read) {
        let (name, verified) = half_close_then_read(&s, o, seed, wait, &mut eagain)?;
        return Ok((name, verified, eagain));
    }
    let (name, verified) = echo_messages(&s, o, seed, &mut eagain)?;
    if o.half_close {
        s.shutdown(Shutdown::Write)?;
        expect_eof(&s, &mut eagain)?;
    }
    Ok((name, verified, eagain))
}

pub fn run(addr: SocketAddr, conns: u32, o: Opts) -> io::Result<bool> {
    let o = std::sync::Arc::new(o);
    let threads: Vec<_> = (0..conns as usize)
        .map(|i| {
            let o = o.clone();
            std::thread::spawn(move || one(addr, &o, i))
        })
        .collect();
    let mut all_ok = true;
    for (i, t) in threads.into_iter().enumerate() {
        match t.join().expect("connection thread") {
            Ok((name, bytes, eagain)) => println!(
                "{}",
                json!({"i": i, "ok": true, "name": name, "bytes": bytes, "eagain_retries": eagain})
            ),
            Err(e) => {
                all_ok = false;
                println!("{}", json!({"i": i, "ok": false, "error": e.to_string()}));
            }
        }
    }
    io::stdout().flush()?;
    Ok(all_ok)
}

/// Byte `off` of a fill stream: a sink that gets every byte exactly once,
/// in order, sees this sequence.
fn stream_byte(off: usize) -> u8 {
    ((off * 31) % 251) as u8
}

fn stream_chunk(off: usize, len: usize) -> Vec<u8> {
    (off..off + len).map(stream_byte).collect()
}

/// Writes without the peer reading until the kernel says EAGAIN (or
/// `max` bytes went out): a full receive buffer must push back on the
/// sender as plain TCP does. With `finish`, then writes that many more
/// bytes blocking, shuts down its side and reads the sink's verdict (see
/// `sink`): the bytes queued before the push-back and those after must
/// arrive once each, in order.
pub struct FillOpts {
    pub max: usize,
    pub finish: Option<usize>,
    /// Bytes per write() while filling (at most 64000).
    pub write_size: usize,
}

pub fn fill(addr: SocketAddr, o: FillOpts, timeout: Duration) -> io::Result<bool> {
    let FillOpts {
        max,
        finish,
        write_size,
    } = o;
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nonblocking(true)?;
    let mut written = 0;
    let mut eagain = false;
    let start = std::time::Instant::now();
    let deadline = start + timeout.max(Duration::from_secs(5));
    // 251 * 256 bytes: the pattern repeats every 251, so one buffer does.
    let buf = stream_chunk(0, 251 * 256);
    while written < max && std::time::Instant::now() < deadline {
        let at = written % 251;
        match (&s).write(&buf[at..at + write_size]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                eagain = true;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let fill_ms = start.elapsed().as_millis() as u64;
    let mut out = json!({"ok": eagain, "written": written, "eagain": eagain, "fill_ms": fill_ms});
    if let Some(more) = finish {
        match finish_fill(&s, &buf, written, more, timeout) {
            Ok(verdict) => {
                let total = written + more;
                let good = verdict["received"] == total && verdict["in_order"] == true;
                out["ok"] = json!(eagain && good);
                out["total"] = json!(total);
                out["sink"] = verdict;
            }
            Err(e) => {
                out["ok"] = json!(false);
                out["error"] = json!(e.to_string());
            }
        }
    }
    println!("{out}");
    io::stdout().flush()?;
    Ok(out["ok"] == true)
}

/// The rest of `fill --finish`: `more` bytes blocking, our side shut down,
/// the sink's verdict.
fn finish_fill(
    s: &TcpStream,
    buf: &[u8],
    written: usize,
    more: usize,
    timeout: Duration,
) -> io::Result<serde_json::Value> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut sent = 0;
    while sent < more {
        let at = (written + sent) % 251;
        let n = (more - sent).min(250 * 256);
        let mut w = s;
        w.write_all(&buf[at..at + n])
            .map_err(|e| io::Error::new(e.kind(), format!("after {sent} more bytes: {e}")))?;
        sent += n;
    }
    s.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    let mut eagain = 0;
    let mut b = [0u8; 256];
    loop {
        match kmesh::sys::read_blocking(s, &mut b, &mut eagain) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&b[..n]),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("reading the sink's verdict: {e}"),
                ))
            }
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    let mut v: serde_json::Value = serde_json::from_str(reply.trim())
        .map_err(|e| io::Error::other(format!("sink reply {reply:?}: {e}")))?;
    v["reader_eagain_retries"] = json!(eagain);
    Ok(v)
}

/// The server side of `fill --finish`: leaves the connection unread for
/// `delay`, then reads it to EOF checking every byte's place in the stream,
/// and answers with one JSON line.
pub fn sink(mut c: TcpStream, delay: Duration) {
    std::thread::sleep(delay);
    let mut buf = vec![0u8; 1 << 16];
    let (mut received, mut first_bad) = (0usize, None);
    let mut eagain = 0u32;
    loop {
        match kmesh::sys::read_blocking(&c, &mut buf, &mut eagain) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if first_bad.is_none() {
                    first_bad = (0..n)
                        .find(|&i| buf[i] != stream_byte(received + i))
                        .map(|i| received + i);
                }
                received += n;
            }
        }
    }
    let reply = json!({"received": received, "in_order": first_bad.is_none(),
                       "first_bad": first_bad, "eagain_retries": eagain});
    let _ = c.write_all(format!("{reply}\n").as_bytes());
}

/// Writes after the peer closed: one byte echoed, the server's EOF, then
/// `writes` single-byte writes 50 ms apart. TCP lets the first one through
/// (the closed peer answers it with RST) and fails the next ones (EPIPE);
/// the JSON line lists what each write returned.
pub fn after_close(addr: SocketAddr, writes: u32, timeout: Duration) -> io::Result<bool> {
    let (s, name) = connect_once(addr, None, timeout)?;
    let mut eagain = 0;
    (&s).write_all(b"x")?;
    let mut b = [0u8; 1];
    read_full(&s, &mut b, &mut eagain)?;
    // EOF: the server closed after its echo.
    let eof = kmesh::sys::read_blocking(&s, &mut b, &mut eagain)? == 0;
    let mut results = Vec::new();
    for _ in 0..writes {
        std::thread::sleep(Duration::from_millis(50));
        results.push(match (&s).write(b"y") {
            Ok(n) => json!({"ok": n}),
            Err(e) => json!({"errno": e.raw_os_error()}),
        });
    }
    println!(
        "{}",
        json!({"name": name, "eof": eof, "writes": results, "eagain": eagain})
    );
    Ok(eof)
}

/// One socket connected to each address in turn and disconnected in
/// between with connect(AF_UNSPEC), as some clients reuse a socket. Each
/// connection echoes `o.sizes`; one JSON line per connection.
pub fn reconnect(addrs: &[SocketAddr], o: Opts) -> io::Result<bool> {
    use nix::sys::socket::{self, SockaddrStorage};
    let Some(&first) = addrs.first() else {
        return Ok(true);
    };
    let s = tcp_socket(first)?;
    s.set_read_timeout(Some(o.timeout.max(Duration::from_secs(10))))?;
    let mut all_ok = true;
    for (i, addr) in addrs.iter().enumerate() {
        let mut eagain = 0;
        let r = socket::connect(s.as_raw_fd(), &SockaddrStorage::from(*addr))
            .map_err(io::Error::from)
            .and_then(|()| echo_messages(&s, &o, i, &mut eagain));
        let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
        match r {
            Ok((name, bytes)) => println!(
                "{}",
                json!({"i": i, "ok": true, "name": name, "bytes": bytes, "local": local, "eagain": eagain})
            ),
            Err(e) => {
                all_ok = false;
                println!("{}", json!({"i": i, "ok": false, "error": e.to_string()}));
            }
        }
        disconnect(&s)?;
    }
    Ok(all_ok)
}

fn disconnect(s: &TcpStream) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr is a valid value; only its family is read.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: valid fd, and sa lives across the call with its true size.
    let r = unsafe {
        libc::connect(
            s.as_raw_fd(),
            &sa,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
