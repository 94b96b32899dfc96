//! Echo/sink server and the user-space TCP proxy (the sidecar stand-in).
//!
//! Both run on a tokio runtime: a connect-rate run opens tens of thousands
//! of short connections, and a thread per connection would make the
//! server's thread spawns, not the path under test, the bottleneck.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

use crate::{Error, HDR_ECHO, HDR_SINK};

/// First byte of an HTTP GET: such a connection is served as HTTP/1.1, so
/// wrk can drive the same server.
const HDR_HTTP: u8 = b'G';

/// A 256 KiB request moves in four reads; larger buffers would be mmap'd
/// per connection by malloc, a cost that shows in connect-rate runs.
const BUF: usize = 64 * 1024;

/// An echo connection starts with this much buffer and grows to BUF on the
/// first read that fills it: 100k held connections with small messages
/// would otherwise reserve 6.5 GB of buffers.
const SMALL_BUF: usize = 512;

/// std's and tokio's default backlog (128/1024) drops SYNs under a connect
/// burst, and each drop costs the client a 1 s retransmit.
fn listen(addr: SocketAddr) -> Result<TcpListener, Error> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(Error::io("socket"))?;
    s.set_reuseaddr(true).map_err(Error::io("SO_REUSEADDR"))?;
    s.bind(addr)
        .map_err(|e| Error::Io(format!("bind {addr}"), e))?;
    s.listen(4096).map_err(Error::io("listen"))
}

/// Out of descriptors or memory, accept fails at once for as long as the
/// condition lasts: pausing keeps the loop from spinning a CPU meanwhile.
/// Other errors (a connection reset before it was accepted) concern one
/// connection only.
async fn accept_failed(e: std::io::Error) {
    eprintln!("kmesh-load: accept: {e}");
    if matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn announce(addrs: &[SocketAddr]) {
    let v: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    println!("{}", serde_json::json!({ "listening": v }));
}

async fn handle(mut c: TcpStream) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut hdr = [0u8; 1];
    if c.read(&mut hdr).await? == 0 {
        return Ok(());
    }
    match hdr[0] {
        HDR_ECHO => {
            let mut buf = vec![0u8; SMALL_BUF];
            loop {
                let n = c.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                c.write_all(&buf[..n]).await?;
                if n == buf.len() && n < BUF {
                    buf.resize(BUF, 0);
                }
            }
        }
        HDR_SINK => {
            let mut buf = vec![0u8; BUF];
            let mut total = 0u64;
            loop {
                let n = c.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            c.write_all(&total.to_le_bytes()).await?;
            c.shutdown().await
        }
        HDR_HTTP => http(c, vec![0u8; BUF]).await,
        _ => Ok(()),
    }
}

/// Minimal keep-alive HTTP/1.1 for wrk: `GET /N` is answered with N body
/// bytes (0 if the path is not a number). Requests have no body.
async fn http(mut c: TcpStream, mut buf: Vec<u8>) -> std::io::Result<()> {
    let mut pending = vec![HDR_HTTP];
    loop {
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            pending.drain(..end + 4);
            let size: usize = head
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.trim_start_matches('/').parse().ok())
                .unwrap_or(0);
            // One write, so a small response leaves as one segment.
            let mut resp =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").into_bytes();
            resp.resize(resp.len() + size, b'x');
            c.write_all(&resp).await?;
        }
        let n = c.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Echo (header 'E') or count-and-report sink (header 'S') on every
/// address, until killed.
pub async fn serve(addrs: Vec<SocketAddr>) -> Result<(), Error> {
    let mut tasks = Vec::new();
    for a in &addrs {
        let l = listen(*a)?;
        tasks.push(tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((c, _)) => drop(tokio::spawn(handle(c))),
                    Err(e) => accept_failed(e).await,
                }
            }
        }));
    }
    announce(&addrs);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// A `LISTEN=UPSTREAM` pair of the proxy.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
}

impl std::str::FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Route, String> {
        let (l, u) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected LISTEN=UPSTREAM"))?;
        let p = |x: &str| x.parse().map_err(|e| format!("{x:?}: {e}"));
        Ok(Route {
            listen: p(l)?,
            upstream: p(u)?,
        })
    }
}

async fn relay(mut down: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let mut up = TcpStream::connect(upstream).await?;
    down.set_nodelay(true)?;
    up.set_nodelay(true)?;
    match tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, BUF, BUF).await {
        Ok(_) => Ok(()),
        Err(e) => {
            // One side was reset: reset the other too, as an L4 proxy must
            // for the peer to see the abort (and to leave no TIME_WAIT).
            let _ = down.set_zero_linger();
            let _ = up.set_zero_linger();
            Err(e)
        }
    }
}

/// Accepts on each route's LISTEN address and relays bytes both ways to its
/// UPSTREAM, one upstream connection per downstream one, like a sidecar.
pub async fn proxy(routes: Vec<Route>) -> Result<(), Error> {
    let mut tasks = Vec::new();
    for r in &routes {
        let l = listen(r.listen)?;
        let upstream = r.upstream;
        tasks.push(tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((c, _)) => drop(tokio::spawn(relay(c, upstream))),
                    Err(e) => accept_failed(e).await,
                }
            }
        }));
    }
    announce(&routes.iter().map(|r| r.listen).collect::<Vec<_>>());
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
