//! kmesh-load: load client, echo server and user-space proxy for the
//! benchmark suite (bench/suite), and `hold` for the capacity benchmark
//! (bench/capacity).
//!
//! Like kmesh-probe it first enters a network namespace and cgroup, so its
//! sockets meet the data path exactly as a pod's would. Clients print one
//! JSON line with their measurements; servers print `{"listening": …}` once
//! ready and run until killed.

mod client;
mod hist;
mod hold;
mod server;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};

/// First byte a client sends: what the server does with the connection.
const HDR_ECHO: u8 = b'E';
const HDR_SINK: u8 = b'S';

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0} bytes or echoes did not match what was sent: {1}")]
    Mismatch(u64, serde_json::Value),
    #[error("a client thread panicked")]
    Panic,
    #[error("{0} connections failed (see the JSON lines for the errors)")]
    Failed(u64),
    #[error("open-file limit: need {want} descriptors, {why}")]
    NoFile { want: u64, why: String },
}

impl Error {
    fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
        move |e| Error::Io(what.to_string(), e)
    }
}

#[derive(Parser)]
#[command(
    name = "kmesh-load",
    about = "Load client, echo server and TCP proxy that run inside a netns + cgroup"
)]
struct Cli {
    /// Network namespace to enter first (e.g. /run/netns/NAME).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// cgroup2 directory to join first.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Pin to this CPU (all threads). On a small machine, unpinned client
    /// and server land on the same or on different cores run by run, and
    /// the cross-core wake-up alone can double a loopback round trip.
    #[arg(long)]
    cpu: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Request/response: CONNS connections each send SIZE bytes and wait for
    /// the echo; prints latency percentiles and requests/s.
    Rr {
        addr: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        conns: u32,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Untimed requests first (connection and cache warm-up).
        #[arg(long, default_value_t = 0.2)]
        warmup: f64,
    },
    /// One-way throughput with SIZE-byte writes; prints MB/s received.
    Stream {
        addr: SocketAddr,
        #[arg(long, default_value_t = 65536)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
    /// Connect + RST close back to back; prints connects/s.
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Also do a 1-byte round trip per connection (what an application
        /// waits for; through a proxy it includes the upstream connect).
        #[arg(long)]
        echo: bool,
    },
    /// Opens CONNS connections spread over the ADDRs (and --source
    /// addresses), checks each with an echo, prints a JSON line and holds
    /// them until stdin closes or SIGTERM/SIGINT. Stdin commands: `check`
    /// (echo over all again), `rr K [ROUNDS]` (latency over K of them).
    Hold {
        #[arg(required = true)]
        addr: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Source addresses to spread over (each needs its own ports: the
        /// ephemeral range allows ~28k connections per source and
        /// destination).
        #[arg(long)]
        source: Vec<IpAddr>,
        /// Bytes echoed per check.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
        size: u16,
        /// Connections opened or checked at once.
        #[arg(long, default_value_t = 256)]
        parallel: usize,
        /// Seconds allowed for one connect + echo.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Check every connection once more when the hold ends.
        #[arg(long)]
        recheck: bool,
    },
    /// Echo server for rr / connect --echo, sink for stream.
    Serve {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// User-space TCP proxy: each --route LISTEN=UPSTREAM.
    Proxy {
        #[arg(long, required = true)]
        route: Vec<server::Route>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, Error> {
    // One thread by default: the machine has two cores, and the client
    // needs one of them.
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    }
    .enable_all()
    .build()
    .map_err(Error::io("tokio runtime"))
}

/// Raises this process's RLIMIT_NOFILE (soft, and hard if needed; the hard
/// limit can go up to fs.nr_open with CAP_SYS_RESOURCE) to at least `want`.
/// Only this process and its children are affected.
fn raise_nofile(want: u64) -> Result<u64, Error> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(Error::io("getrlimit(RLIMIT_NOFILE)")(
            std::io::Error::last_os_error(),
        ));
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(lim.rlim_max);
    if want > nr_open {
        return Err(Error::NoFile {
            want,
            why: format!("above fs.nr_open ({nr_open}), the most any process may have"),
        });
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::NoFile {
            want,
            why: format!(
                "setrlimit to {want} failed ({e}); the hard limit is {} and raising it needs CAP_SYS_RESOURCE (or split the connections over several processes)",
                lim.rlim_max
            ),
        });
    }
    Ok(want)
}

/// A server cannot know how many connections are coming: as many as the
/// hard limit allows, or fs.nr_open where this process may raise that.
fn server_nofile() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    if raise_nofile(nr_open).is_err() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid rlimit pointers; failing leaves the limit as it was.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}

fn run(cmd: Cmd) -> Result<(), Error> {
    let v = match cmd {
        Cmd::Rr {
            addr,
            size,
            conns,
            duration,
            warmup,
        } => client::rr(addr, size, conns, secs(warmup), secs(duration))?,
        Cmd::Stream {
            addr,
            size,
            duration,
        } => client::stream(addr, size, secs(duration))?,
        Cmd::Connect {
            addr,
            duration,
            echo,
        } => client::connect_rate(addr, secs(duration), echo)?,
        Cmd::Hold {
            addr,
            conns,
            source,
            size,
            parallel,
            timeout,
            recheck,
        } => {
            // Stdio, the runtime's epoll and eventfd, and a few spare.
            raise_nofile(conns as u64 + 64)?;
            let opts = hold::Opts {
                addrs: addr,
                sources: source,
                conns,
                size: size.into(),
                parallel: parallel.max(1),
                timeout: secs(timeout),
                recheck,
            };
            return runtime(1)?.block_on(hold::hold(opts));
        }
        Cmd::Serve { listen, threads } => {
            server_nofile();
            return runtime(threads)?.block_on(server::serve(listen));
        }
        Cmd::Proxy { route, threads } => {
            server_nofile();
            return runtime(threads)?.block_on(server::proxy(route));
        }
    };
    println!("{v}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Namespace and cgroup first, before any thread exists, so every socket
    // this process opens belongs to them.
    if let Some(ns) = &cli.netns {
        if let Err(e) = kmesh::sys::enter_netns(ns) {
            eprintln!("kmesh-load: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(cg) = &cli.cgroup {
        if let Err(e) = kmesh::sys::join_cgroup(cg) {
            eprintln!("kmesh-load: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(cpu) = cli.cpu {
        let mut set = nix::sched::CpuSet::new();
        let pinned = set
            .set(cpu)
            .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
        if let Err(e) = pinned {
            eprintln!("kmesh-load: pinning to CPU {cpu}: {e}");
            return ExitCode::from(2);
        }
    }
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmesh-load: {e}");
            ExitCode::FAILURE
        }
    }
}
