use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use kmesh::{admin, bpf::MapSizes, config, daemon, sys};

#[derive(Parser)]
#[command(
    name = "kmesh",
    version,
    about = "Service-mesh data plane in the kernel (eBPF)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the data path, attach it to a cgroup, and keep the maps in sync
    /// with the config source.
    Daemon(DaemonArgs),
    /// Talk to a running daemon, or check files.
    Ctl {
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// Print the version.
    Version,
}

#[derive(Args)]
struct DaemonArgs {
    /// Standalone config file (JSON); reloaded on SIGHUP and when it changes.
    #[arg(long, env = "KMESH_CONFIG")]
    config: Option<PathBuf>,
    /// cgroup2 directory to attach to [default: the cgroup2 mount root].
    #[arg(long, env = "KMESH_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Directory on a bpf filesystem where maps and links are pinned.
    #[arg(long, env = "KMESH_BPFFS", default_value = "/sys/fs/bpf/kmesh")]
    bpffs: PathBuf,
    #[arg(long, env = "KMESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
    admin_socket: PathBuf,
    /// Leave the programs attached when the daemon exits (for restarts).
    #[arg(long)]
    keep_attached: bool,
    /// Seconds between checks of the config file for changes.
    #[arg(long, default_value_t = 1.0)]
    watch_interval: f64,
    /// Capacity of the service VIP map.
    #[arg(long, default_value_t = MapSizes::default().vips)]
    max_vips: u32,
    /// Capacity of the workload address map.
    #[arg(long, default_value_t = MapSizes::default().workload_ips)]
    max_workload_ips: u32,
    /// Capacity of the endpoint map (all services, all priorities).
    #[arg(long, default_value_t = MapSizes::default().endpoints)]
    max_endpoints: u32,
    #[arg(long, default_value_t = MapSizes::default().enrolled_netns)]
    max_enrolled_netns: u32,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Print the live BPF maps as JSON, with ids decoded into names.
    Dump {
        #[arg(long, env = "KMESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Validate a config file without touching the kernel.
    CheckConfig { file: PathBuf },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KMESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kmesh: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = rt.block_on(async {
        match cli.cmd {
            Cmd::Version => {
                println!("kmesh {}", env!("CARGO_PKG_VERSION"));
                Ok(())
            }
            Cmd::Daemon(a) => {
                let cgroup = match a.cgroup {
                    Some(c) => c,
                    None => {
                        sys::cgroup2_mount().map_err(|e| format!("finding cgroup2 mount: {e}"))?
                    }
                };
                let opts = daemon::Options {
                    config: a.config,
                    cgroup,
                    bpffs: a.bpffs,
                    admin_socket: a.admin_socket,
                    keep_attached: a.keep_attached,
                    sizes: MapSizes {
                        vips: a.max_vips,
                        workload_ips: a.max_workload_ips,
                        endpoints: a.max_endpoints,
                        enrolled_netns: a.max_enrolled_netns,
                    },
                    watch_interval: Duration::from_secs_f64(a.watch_interval.max(0.05)),
                };
                daemon::run(opts).await.map_err(|e| e.to_string())
            }
            Cmd::Ctl {
                cmd: CtlCmd::Dump { admin_socket },
            } => {
                let out = admin::request(&admin_socket, "dump")
                    .await
                    .map_err(|e| e.to_string())?;
                print!("{out}");
                Ok(())
            }
            Cmd::Ctl {
                cmd: CtlCmd::CheckConfig { file },
            } => {
                let m = config::check(&file).map_err(|e| e.to_string())?;
                println!("{}: ok ({m})", file.display());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmesh: {e}");
            ExitCode::FAILURE
        }
    }
}
