//! The daemon under test: started with the harness's cgroup, bpffs and
//! admin socket, asked for its dump in-process, stopped by Drop.

use super::*;

impl Env {
    /// As `daemon_args`, with its own config file and log (`config-NAME.json`,
    /// `daemon-NAME.log`) but the same admin socket and bpffs: a second
    /// daemon overlapping a running one, as in a rolling update. Returns
    /// once it has bound the admin socket (taking it over).
    pub fn daemon_named(
        &mut self,
        name: &str,
        config: &Value,
        extra: &[&str],
    ) -> Result<Daemon, String> {
        use std::os::unix::fs::MetadataExt;
        let suffix = if name.is_empty() {
            String::new()
        } else {
            format!("-{name}")
        };
        let cfg = self.dir.join(format!("config{suffix}.json"));
        fs::write(&cfg, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        let sock = self.dir.join("admin.sock");
        let log = self.dir.join(format!("daemon{suffix}.log"));
        let ino = |p: &Path| fs::metadata(p).ok().map(|m| m.ino());
        let before = if name.is_empty() {
            let _ = fs::remove_file(&sock);
            None
        } else {
            ino(&sock)
        };
        let mut cmd = Command::new(KMESH);
        // If the test process dies without running Drop (kill -9), the
        // daemon shuts down (detaching) instead of outliving it. Set from
        // the spawning thread, which is the one holding the Daemon.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .args(["daemon", "--config", cfg.to_str().unwrap()])
            .args(["--cgroup", self.cgroup.to_str().unwrap()])
            .args(if extra.contains(&"--bpffs") {
                vec![]
            } else {
                vec!["--bpffs".into(), self.bpffs.join("kmesh").into_os_string()]
            })
            .args([
                "--admin-socket",
                sock.to_str().unwrap(),
                "--watch-interval",
                "0.2",
            ])
            .args(extra)
            .args(http::OFF.iter().flat_map(|&(flag, off)| {
                let given = extra
                    .iter()
                    .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
                (!given).then_some([flag, off]).into_iter().flatten()
            }))
            .env("KMESH_LOG", "info")
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn daemon");
        let deadline = Instant::now() + Duration::from_secs(10) * time_scale();
        while ino(&sock).is_none() || ino(&sock) == before {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!(
                    "{status}: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Daemon {
            child: Some(child),
            config: cfg,
            sock,
            log,
        })
    }
}

pub struct Daemon {
    child: Option<Child>,
    pub config: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The dump, asked over the admin socket as `kmesh ctl dump` asks it
    /// (kmesh::admin::request), in this process: tests poll it, and each
    /// `kmesh` process costs seconds in an emulated guest. The command
    /// itself is run by redirect.rs `vip_connect_is_redirected_with_port_rewrite`.
    pub fn dump(&self) -> Value {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = rt
            .block_on(kmesh::admin::request(
                &self.sock,
                "dump",
                Duration::from_secs(10) * time_scale(),
            ))
            .unwrap_or_else(|e| panic!("dump: {e}\ndaemon log:\n{}", self.log()));
        serde_json::from_str(&out).expect("dump is JSON")
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.dump()["stats"][name].as_u64().unwrap()
    }

    pub fn write_config(&self, config: &Value) {
        // Write-then-rename so the daemon never reads a half-written file.
        let tmp = self.config.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn write_raw_config(&self, text: &str) {
        let tmp = self.config.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().expect("running").id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `cond` on the dump until true or `timeout`.
    pub fn wait_dump(&self, timeout: Duration, cond: impl Fn(&Value) -> bool) -> Value {
        poll_until(
            timeout,
            || self.dump(),
            |d| cond(d),
            |d| {
                format!(
                    "condition not reached; last dump: {d:#}\nlog:\n{}",
                    self.log()
                )
            },
        )
    }

    /// SIGKILL (a crash: no cleanup runs) and wait; returns the exit status.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        child.wait().unwrap()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        wait_or_kill(&mut child, Duration::from_secs(10) * time_scale())
    }
}

/// Waits up to `within` for `child` to exit, then kills it.
pub fn wait_or_kill(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}
