//! A real dnsmasq serving `*.kmesh.test` from a hosts file the test writes,
//! on a 127.77.x.y address of its own, port 53 (needs root). Its files live
//! in `$TMPDIR/kmt<pid>xdns<n>`; Drop kills the dnsmasq it started and
//! removes them; leftovers of dead test processes are swept at the first start.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// Every name under it is answered from the hosts file alone; anything
/// else under it is NXDOMAIN.
pub const DOMAIN: &str = "kmesh.test";

static SEQ: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

pub struct Dnsmasq {
    pub addr: SocketAddr,
    dir: PathBuf,
    ttl: u32,
    child: Option<Child>,
}

impl Dnsmasq {
    /// Starts dnsmasq answering `records` (hostname, IP) with TTL `ttl` s.
    pub fn start(ttl: u32, records: &[(&str, &str)]) -> Dnsmasq {
        SWEEP.call_once(sweep);
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("kmt{}xdns{seq}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // dnsmasq re-reads the hosts file after dropping to an unprivileged user.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let mut d = Dnsmasq {
            addr: SocketAddr::new(IpAddr::V4(free_address(seq)), 53),
            dir,
            ttl,
            child: None,
        };
        d.write_hosts(records);
        d.restart();
        d
    }

    fn hosts_file(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    fn write_hosts(&self, records: &[(&str, &str)]) {
        let text: String = records
            .iter()
            .map(|(h, ip)| format!("{ip} {h}\n"))
            .collect();
        let tmp = self.dir.join("hosts.tmp");
        fs::write(&tmp, text).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        fs::rename(&tmp, self.hosts_file()).unwrap();
    }

    /// Replaces the records; a running dnsmasq re-reads them on SIGHUP, a
    /// stopped one at its restart.
    pub fn set_records(&self, records: &[(&str, &str)]) {
        self.write_hosts(records);
        if let Some(c) = &self.child {
            kill(Pid::from_raw(c.id() as i32), Signal::SIGHUP).unwrap();
        }
    }

    /// Kills dnsmasq, as if the server died.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (again) on the same address with the current records, and
    /// returns once it listens.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = fs::File::create(self.dir.join("log")).unwrap();
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--log-queries",
        ])
        .arg(format!("--listen-address={}", self.addr.ip()))
        .arg(format!("--port={}", self.addr.port()))
        .arg(format!("--local=/{DOMAIN}/"))
        .arg(format!("--local-ttl={}", self.ttl))
        .arg(format!("--addn-hosts={}", self.hosts_file().display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        // If the test process dies without running Drop, so does dnsmasq.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .expect("spawn dnsmasq (scripts/deps.sh installs dnsmasq-base)");
        fs::write(self.dir.join("pid"), child.id().to_string()).unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !listening(self.addr) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dnsmasq exited ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq not listening:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether something already listens on `addr` (UDP or TCP). Only for
/// picking an address: probing by bind while dnsmasq starts could make its
/// own bind fail.
fn in_use(addr: SocketAddr) -> bool {
    UdpSocket::bind(addr).is_err() || TcpListener::bind(addr).is_err()
}

/// Whether both the UDP and the listening TCP socket on the IPv4 `addr` are
/// in /proc/net (read-only, so it cannot disturb the server's start).
fn listening(addr: SocketAddr) -> bool {
    let IpAddr::V4(ip) = addr.ip() else {
        unreachable!("IPv4 only")
    };
    // /proc/net prints the address as the in-memory u32, port big-endian.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(ip.octets()),
        addr.port()
    );
    let has = |file: &str, state: Option<&str>| {
        fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&local.as_str()) && state.is_none_or(|s| f.get(3) == Some(&s))
            })
    };
    has("/proc/net/udp", None) && has("/proc/net/tcp", Some("0A"))
}

/// A 127.77.x.y that nothing listens on at port 53, spread by pid so
/// concurrent test processes rarely even probe the same one.
fn free_address(seq: u32) -> Ipv4Addr {
    let start = std::process::id().wrapping_mul(16).wrapping_add(seq);
    (0..64u32)
        .map(|i| {
            let n = start.wrapping_add(i * 16) % (255 * 254);
            Ipv4Addr::new(127, 77, (n / 254) as u8, (n % 254 + 1) as u8)
        })
        .find(|ip| !in_use(SocketAddr::new(IpAddr::V4(*ip), 53)))
        .expect("a free 127.77.x.y:53")
}

/// Removes the directories of dead test processes and kills the dnsmasq
/// each recorded, if that pid is still a dnsmasq reading that directory.
fn sweep() {
    let Ok(rd) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(owner) = name
            .strip_prefix("kmt")
            .and_then(|r| r.split_once("xdns"))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        if let Some(pid) = fs::read_to_string(e.path().join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with("dnsmasq") && cmdline.contains(&name) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = fs::remove_dir_all(e.path());
    }
}
