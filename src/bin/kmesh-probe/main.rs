//! kmesh-probe: acts as a pod's process for tests, the demo and operators.
//!
//! It first enters the given network namespace and cgroup (so its sockets
//! are subject to the data path exactly like an application's), then either
//! serves (greets each connection with its name, then echoes) or connects
//! and reports, one JSON line per connection, which server answered.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use serde_json::json;

mod transfer;
mod waypoint;

#[derive(Parser)]
#[command(
    name = "kmesh-probe",
    about = "Connectivity probe that runs inside a netns + cgroup"
)]
struct Cli {
    /// Network namespace to enter first (e.g. /run/netns/NAME).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// cgroup2 directory to join first.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections, greet each with NAME + "\n", then echo.
    Serve {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        name: String,
        /// Accept, then never read or write (a peer with a full buffer).
        #[arg(long)]
        stall: bool,
        /// With --stall: after this many ms, read each connection to EOF,
        /// check it is the stream `fill` writes, and answer with the result.
        #[arg(long)]
        drain_after_ms: Option<u64>,
        /// SO_RCVBUF for accepted connections (the kernel doubles it).
        #[arg(long)]
        rcvbuf: Option<usize>,
        /// Close a connection once this many bytes were echoed.
        #[arg(long)]
        close_after: Option<usize>,
        /// After the greeting, wait this long before reading.
        #[arg(long)]
        read_delay_ms: Option<u64>,
        /// Append each accepted connection's peer address to this file, so
        /// a test can tell that a refused connection never reached it.
        #[arg(long)]
        accept_log: Option<PathBuf>,
    },
    /// A test waypoint: record each connection's TLV to LOG, then forward
    /// to the original destination.
    Waypoint {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        log: PathBuf,
    },
    /// Echo messages of the given sizes over CONNS parallel connections and
    /// check every byte; one JSON line per connection.
    Transfer {
        addr: SocketAddr,
        #[arg(long, value_delimiter = ',', default_value = "1")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        conns: u32,
        #[arg(long, default_value_t = 0)]
        chunk: usize,
        #[arg(long)]
        half_close: bool,
        /// With --half-close: send everything and shut down first, wait
        /// this long, then read the echoes (they arrive unread).
        #[arg(long, requires = "half_close")]
        late_read_ms: Option<u64>,
        #[arg(long)]
        abort_after: Option<usize>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Local address and port to connect from (one connection).
        #[arg(long)]
        bind: Option<SocketAddr>,
    },
    /// Connect one socket to each ADDR in turn, echo SIZES on each and
    /// disconnect it (connect(AF_UNSPEC)) before the next.
    Reconnect {
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
        #[arg(long, value_delimiter = ',', default_value = "1")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Write to a server that does not read, until EAGAIN.
    Fill {
        addr: SocketAddr,
        #[arg(long, default_value_t = 256 << 20)]
        max_bytes: usize,
        /// After EAGAIN, write this many more bytes blocking and check the
        /// verdict of a `serve --stall --drain-after-ms` server.
        #[arg(long)]
        finish: Option<usize>,
        /// Bytes per write() while filling.
        #[arg(long, default_value_t = 64000)]
        write_size: usize,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Against `serve --close-after 1`: send a byte, read its echo, wait
    /// for the server's close (EOF), then write WRITES more single bytes,
    /// 50 ms apart; prints the result of each (bytes written or errno).
    AfterClose {
        addr: SocketAddr,
        #[arg(long, default_value_t = 3)]
        writes: u32,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Connect COUNT times; print {"ok","name","peer"} per connection.
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Keep the (last) connection open: each stdin line is sent and its
        /// echo printed, until stdin closes.
        #[arg(long)]
        hold: bool,
        /// Local address and port to connect from.
        #[arg(long)]
        bind: Option<SocketAddr>,
    },
}

struct ServeOpts {
    stall: bool,
    drain_after: Option<Duration>,
    close_after: Option<usize>,
    rcvbuf: Option<usize>,
    read_delay: Option<Duration>,
    accept_log: Option<PathBuf>,
}

fn serve(listen: Vec<SocketAddr>, name: String, o: ServeOpts) -> io::Result<()> {
    let ServeOpts {
        stall,
        drain_after,
        close_after,
        rcvbuf,
        read_delay,
        accept_log,
    } = o;
    let accept_log = accept_log
        .map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
        })
        .transpose()?
        .map(std::sync::Arc::new);
    let mut listeners = Vec::new();
    for a in &listen {
        let l =
            TcpListener::bind(a).map_err(|e| io::Error::new(e.kind(), format!("bind {a}: {e}")))?;
        // Accepted sockets inherit the size, and the lock that marks it as
        // the application's choice.
        if let Some(n) = rcvbuf {
            nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::RcvBuf, &n)
                .map_err(io::Error::from)?;
        }
        listeners.push(l);
    }
    println!(
        "{}",
        json!({"listening": listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(), "name": name})
    );
    io::stdout().flush()?;
    let mut threads = Vec::new();
    for l in listeners {
        let name = name.clone();
        let accept_log = accept_log.clone();
        threads.push(std::thread::spawn(move || {
            let mut stalled = Vec::new();
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                if let (Some(mut f), Ok(peer)) = (accept_log.as_deref(), c.peer_addr()) {
                    // One write per line: the listener threads share the file.
                    let _ = f.write_all(format!("{peer}\n").as_bytes());
                }
                if stall {
                    match drain_after {
                        Some(d) => drop(std::thread::spawn(move || transfer::sink(c, d))),
                        None => stalled.push(c),
                    }
                    continue;
                }
                let greeting = format!("{name}\n");
                std::thread::spawn(move || {
                    if c.write_all(greeting.as_bytes()).is_err() {
                        return;
                    }
                    if let Some(d) = read_delay {
                        std::thread::sleep(d);
                    }
                    let mut buf = [0u8; 16384];
                    let mut echoed = 0;
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                                echoed += n;
                                if close_after.is_some_and(|m| echoed >= m) {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// A connection (from `bind` if given) and its server's greeting.
pub(crate) fn connect_once(
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    timeout: Duration,
) -> Result<(TcpStream, String), io::Error> {
    greeted(connect_plain(addr, bind, timeout)?, timeout)
}

/// A connection, from `bind` if given.
pub(crate) fn connect_plain(
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match bind {
        Some(local) => connect_from(addr, local),
        None => TcpStream::connect_timeout(&addr, timeout),
    }
}

/// An unconnected TCP socket of `addr`'s family.
pub(crate) fn tcp_socket(addr: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    Ok(socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?.into())
}

/// A connection from a fixed local address (no connect timeout: the tests
/// use it on loopback only).
fn connect_from(addr: SocketAddr, local: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{bind, connect, SockaddrStorage};
    let s = tcp_socket(local)?;
    bind(s.as_raw_fd(), &SockaddrStorage::from(local))?;
    connect(s.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(s)
}

/// Reads the server's greeting (its name) off a new connection.
fn greeted(s: TcpStream, timeout: Duration) -> Result<(TcpStream, String), io::Error> {
    s.set_read_timeout(Some(timeout))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before greeting",
        ));
    }
    Ok((s, line.trim_end().to_string()))
}

fn connect(
    addr: SocketAddr,
    count: u32,
    timeout: Duration,
    hold: bool,
    bind: Option<SocketAddr>,
) -> io::Result<bool> {
    let mut all_ok = true;
    let mut last = None;
    for i in 0..count {
        let start = std::time::Instant::now();
        let conn = connect_once(addr, bind, timeout);
        // Until connected and greeted, or until the error: how fast a
        // refused client learns it.
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        match conn {
            Ok((s, name)) => {
                let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                println!(
                    "{}",
                    json!({"i": i, "ok": true, "name": name, "peer": peer, "ms": ms})
                );
                last = Some(s);
            }
            Err(e) => {
                all_ok = false;
                println!(
                    "{}",
                    json!({"i": i, "ok": false, "error": e.to_string(), "errno": e.raw_os_error(), "ms": ms})
                );
            }
        }
    }
    io::stdout().flush()?;
    if hold {
        let Some(s) = last else { return Ok(false) };
        let mut reader = BufReader::new(s.try_clone()?);
        let mut w = s;
        for line in io::stdin().lock().lines() {
            let line = line?;
            let mut echo = String::new();
            let res = w
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| reader.read_line(&mut echo));
            match res {
                Ok(n) if n > 0 => println!("{}", json!({"ok": true, "echo": echo.trim_end()})),
                Ok(_) => println!("{}", json!({"ok": false, "error": "connection closed"})),
                Err(e) => println!("{}", json!({"ok": false, "error": e.to_string()})),
            }
            io::stdout().flush()?;
        }
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Namespace and cgroup first, before any thread exists, so every socket
    // this process opens belongs to them.
    if let Some(ns) = &cli.netns {
        if let Err(e) = kmesh::sys::enter_netns(ns) {
            eprintln!("kmesh-probe: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(cg) = &cli.cgroup {
        if let Err(e) = kmesh::sys::join_cgroup(cg) {
            eprintln!("kmesh-probe: {e}");
            return ExitCode::from(2);
        }
    }
    let r = match cli.cmd {
        Cmd::Serve {
            listen,
            name,
            stall,
            drain_after_ms,
            close_after,
            rcvbuf,
            read_delay_ms,
            accept_log,
        } => serve(
            listen,
            name,
            ServeOpts {
                stall,
                drain_after: drain_after_ms.map(Duration::from_millis),
                close_after,
                rcvbuf,
                read_delay: read_delay_ms.map(Duration::from_millis),
                accept_log,
            },
        )
        .map(|()| true),
        Cmd::AfterClose {
            addr,
            writes,
            timeout_ms,
        } => transfer::after_close(addr, writes, Duration::from_millis(timeout_ms)),
        Cmd::Waypoint { listen, log } => waypoint::run(listen, log).map(|()| true),
        Cmd::Transfer {
            addr,
            sizes,
            conns,
            chunk,
            half_close,
            late_read_ms,
            abort_after,
            timeout_ms,
            bind,
        } => transfer::run(
            addr,
            conns,
            transfer::Opts {
                sizes,
                chunk,
                half_close,
                abort_after,
                timeout: Duration::from_millis(timeout_ms),
                bind,
                late_read: late_read_ms.map(Duration::from_millis),
            },
        ),
        Cmd::Reconnect {
            addrs,
            sizes,
            timeout_ms,
        } => transfer::reconnect(
            &addrs,
            transfer::Opts {
                sizes,
                chunk: 0,
                half_close: false,
                abort_after: None,
                timeout: Duration::from_millis(timeout_ms),
                bind: None,
                late_read: None,
            },
        ),
        Cmd::Fill {
            addr,
            max_bytes,
            finish,
            write_size,
            timeout_ms,
        } => transfer::fill(
            addr,
            transfer::FillOpts {
                max: max_bytes,
                finish,
                write_size: write_size.clamp(1, 64000),
            },
            Duration::from_millis(timeout_ms),
        ),
        Cmd::Connect {
            addr,
            count,
            timeout_ms,
            hold,
            bind,
        } => connect(addr, count, Duration::from_millis(timeout_ms), hold, bind),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kmesh-probe: {e}");
            ExitCode::from(2)
        }
    }
}
