//! kmesh-load: load client, echo server and user-space proxy for the
//! benchmark suite (bench/suite).
//!
//! Like kmesh-probe it first enters a network namespace and cgroup, so its
//! sockets meet the data path exactly as a pod's would. Clients print one
//! JSON line with their measurements; servers print `{"listening": …}` once
//! ready and run until killed.

mod client;
mod hist;
mod server;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

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
        Cmd::Serve { listen, threads } => return runtime(threads)?.block_on(server::serve(listen)),
        Cmd::Proxy { route, threads } => return runtime(threads)?.block_on(server::proxy(route)),
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
