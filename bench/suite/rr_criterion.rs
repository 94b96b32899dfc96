//! Criterion's view of the same comparison: one 64 B request/response on a
//! held connection per mode, timed in-process with criterion's statistics
//! (outlier analysis, confidence intervals) as a cross-check of the
//! histogram-based numbers.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
};

use criterion::Criterion;

use crate::world::{Mode, Server, World};

/// The socket's cgroup is fixed when it is created, so the process joins
/// the test cgroup only around the connect, and leaves it (on drop) so the
/// harness can remove the cgroup.
struct InCgroup(std::path::PathBuf);

impl InCgroup {
    fn join(dir: &Path) -> InCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let back = kmesh::sys::cgroup2_mount()
            .unwrap()
            .join(rel.trim_start_matches('/'));
        kmesh::sys::join_cgroup(dir).unwrap();
        InCgroup(back)
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        kmesh::sys::join_cgroup(&self.0).unwrap();
    }
}

/// A connection opened from the client pod's netns (on a thread that
/// enters it, so this process's own namespace never changes).
fn connect(w: &World, mode: Mode) -> Result<TcpStream, String> {
    let _cg = InCgroup::join(&w.env.cgroup);
    let (ns, addr) = (w.client.path(), w.addr(mode, Server::Load));
    let s = std::thread::spawn(move || -> std::io::Result<TcpStream> {
        kmesh::sys::enter_netns(Path::new(&ns))?;
        TcpStream::connect(addr)
    })
    .join()
    .map_err(|_| "connect thread panicked".to_string())?
    .map_err(|e| format!("{mode}: connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(s)
}

fn pin(cpu: Option<usize>) -> Option<nix::sched::CpuSet> {
    let cpu = cpu?;
    let me = nix::unistd::Pid::from_raw(0);
    let old = nix::sched::sched_getaffinity(me).ok()?;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).ok()?;
    nix::sched::sched_setaffinity(me, &set).ok()?;
    Some(old)
}

pub fn run(c: &mut Criterion, w: &mut World, modes: &[Mode]) {
    let restore = pin(w.cpu);
    let mut g = c.benchmark_group("rr_64B");
    for &mode in modes {
        if let Err(e) = w.enter(mode) {
            eprintln!("criterion {mode}: daemon: {e}");
            continue;
        }
        let mut s = match connect(w, mode) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("criterion {e}");
                continue;
            }
        };
        s.write_all(b"E").unwrap();
        let out = [0x3cu8; 64];
        let mut back = [0u8; 64];
        g.bench_function(mode.to_string(), |b| {
            b.iter(|| {
                s.write_all(&out).unwrap();
                s.read_exact(&mut back).unwrap();
            })
        });
        assert_eq!(back, out, "{mode}: echo differs");
    }
    g.finish();
    if let Some(old) = restore {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &old);
    }
}
