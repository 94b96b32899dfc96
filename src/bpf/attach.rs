//! Putting the loaded data path on a cgroup, pinning it, and taking it
//! off at shutdown. Apart from loading because this is the part that must
//! get handovers right: what a restart or a rolling update keeps running
//! (pinned links and socket maps) and what an exiting daemon may remove.

use std::{fs, os::fd::AsRawFd, path::Path};

use super::{pins, BpfError, Datapath, MapId};

/// Every cgroup link the data path may have, as named in its pins.
const LINK_NAMES: [&str; 3] = ["connect4", "connect6", "sockops"];

fn pin_err(path: &Path, e: impl std::fmt::Display) -> BpfError {
    BpfError::Pin {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

impl Datapath {
    /// Attaches connect4/connect6 to the cgroup2 directory `cgroup` with
    /// bpf_links (other programs on the cgroup keep running), and sockops
    /// if `want_sockops` was called.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        let dir = fs::File::open(cgroup).map_err(|source| BpfError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        // The sk_msg program rides on km_sock; the map holds it, so sockets
        // already in the map keep being served after this process exits.
        let sock_fd = std::os::fd::AsFd::as_fd(&self.skel.maps.km_sock).as_raw_fd();
        if self.kernel.socket_programs() {
            self.sendmsg_prog()
                .attach_sockmap(sock_fd)
                .map_err(|source| BpfError::Attach {
                    prog: "sendmsg",
                    path: cgroup.to_path_buf(),
                    source,
                })?;
        }
        self.cgroup = Some((cgroup.to_path_buf(), dir));
        // sockops first: a loopback connect to a waypoint completes inside
        // connect(), so it must not fit between connect4 and sockops.
        if self.sockops_wanted {
            self.attach_link("sockops")?;
        }
        self.attach_link("connect4")?;
        self.attach_link("connect6")?;
        Ok(())
    }

    /// Puts the sockops program on the cgroup (now, or at `attach`), for
    /// good: from here on, new connections can be accelerated or carry a
    /// waypoint TLV. Without acceleration or waypoints it would only cost
    /// every TCP connection in the cgroup about nine program runs (~0.6 µs,
    /// 1.5% of a loopback connect + close), so it waits until one is
    /// configured. Call it before writing the map entries that need it; it
    /// is never taken off while running, because a connection whose connect
    /// picked a waypoint just before the change would miss its TLV (and a
    /// daemon taking over kept links keeps it too, see `pin`).
    pub fn want_sockops(&mut self) -> Result<(), BpfError> {
        // Not loaded on this kernel: load() has said so once.
        if !self.kernel.socket_programs() {
            return Ok(());
        }
        self.sockops_wanted = true;
        if self.cgroup.is_none() || self.attached().contains(&"sockops") {
            return Ok(());
        }
        self.attach_link("sockops")?;
        tracing::info!("sockops attached (acceleration or a waypoint is configured)");
        Ok(())
    }

    /// The programs on the cgroup, by link name.
    pub fn attached(&self) -> Vec<&'static str> {
        LINK_NAMES
            .into_iter()
            .filter(|n| self.links.iter().any(|(name, _)| name == n))
            .collect()
    }

    fn attach_link(&mut self, name: &'static str) -> Result<(), BpfError> {
        let Some((path, dir)) = &self.cgroup else {
            return Ok(());
        };
        let progs = &self.skel.progs;
        let prog = match name {
            "connect4" => &progs.kmesh_connect4,
            "connect6" => &progs.kmesh_connect6,
            "sockops" => self.sockops_prog(),
            other => unreachable!("no cgroup program {other}"),
        };
        let mut link = prog
            .attach_cgroup(dir.as_raw_fd())
            .map_err(|source| BpfError::Attach {
                prog: name,
                path: path.clone(),
                source,
            })?;
        if let Some(pins) = &self.pin_dir {
            // (pin() has removed any earlier daemon's pin of this name.)
            let pin = pins.join(format!("link_{name}"));
            link.pin(&pin).map_err(|e| pin_err(&pin, e))?;
        }
        self.links.push((name, link));
        Ok(())
    }

    /// Pins maps and links under `dir` (created if missing; must be on bpffs).
    /// Stale pins from an earlier run are replaced.
    pub fn pin(&mut self, dir: &Path) -> Result<(), BpfError> {
        fs::create_dir_all(dir).map_err(|e| pin_err(dir, e))?;
        if !is_bpffs(dir) {
            return Err(BpfError::NotBpffs {
                path: dir.to_path_buf(),
            });
        }
        for id in MapId::WRITTEN.into_iter().chain(MapId::SOCKETS) {
            let path = dir.join(id.name());
            let _ = fs::remove_file(&path);
            self.map_mut(id).pin(&path).map_err(|e| pin_err(&path, e))?;
        }
        // A previous daemon's kept sockops hands over to ours, not to
        // nothing: its connect4 ran until now and may have sent a
        // connection, still handshaking, to a waypoint.
        if dir.join("link_sockops").exists() {
            self.want_sockops()?;
        }
        // A previous daemon's links go with their pins.
        for name in LINK_NAMES {
            let _ = fs::remove_file(dir.join(format!("link_{name}")));
        }
        for (name, link) in &mut self.links {
            let path = dir.join(format!("link_{name}"));
            link.pin(&path).map_err(|e| pin_err(&path, e))?;
        }
        self.pin_dir = Some(dir.to_path_buf());
        Ok(())
    }

    /// Detaches from the cgroup and removes the pins. With `keep_attached`
    /// the pinned links stay, so the programs keep redirecting (with the
    /// last map contents) until a new daemon replaces them. Only pins that
    /// still hold this data path's objects are removed: a newer daemon
    /// started on the same directory (a rolling update overlaps the two)
    /// has pinned its own there, and they must outlive this one.
    pub fn shutdown(&mut self, keep_attached: bool) {
        use std::os::fd::AsFd;
        let Some(dir) = self.pin_dir.take() else {
            self.release_netns_links(None, keep_attached);
            return;
        };
        self.release_netns_links(Some(&dir), keep_attached);
        if keep_attached {
            return;
        }
        // The socket maps are shared with a daemon that reused them, so
        // their ids cannot tell; a written map pinned over ours can.
        let taken_over = MapId::WRITTEN
            .into_iter()
            .any(|id| pins::is_taken(&dir.join(id.name()), self.map(id).as_fd()));
        let mut left = Vec::new();
        for (name, link) in self.links.drain(..) {
            let path = dir.join(format!("link_{name}"));
            if pins::remove_if_ours(&path, link.as_fd()) {
                left.push(path);
            }
            if let Err(e) = link.detach() {
                tracing::warn!("detaching {name}: {e}");
            }
        }
        for id in MapId::WRITTEN {
            let path = dir.join(id.name());
            if pins::remove_if_ours(&path, self.map(id).as_fd()) {
                left.push(path);
            }
        }
        if taken_over || !left.is_empty() {
            tracing::info!(
                "another daemon has pinned its own maps and links under {}; they stay",
                dir.display()
            );
            return;
        }
        // Connections in km_sock go on being served by the sk_msg program
        // (plain TCP for new ones, since sockops is detached); dropping the
        // map now would cut them over mid-stream. It goes once empty.
        let sockets = self.socket_count();
        if sockets == 0 {
            for id in MapId::SOCKETS {
                pins::remove_if_ours(&dir.join(id.name()), self.map(id).as_fd());
            }
        } else {
            tracing::info!(
                "{sockets} sockets still use {}; its pin stays",
                dir.join(MapId::Sock.name()).display()
            );
        }
        let _ = fs::remove_dir(&dir);
    }
}
