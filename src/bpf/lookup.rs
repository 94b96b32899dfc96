//! The authorization program on each enrolled netns (sk_lookup links).
//! sk_lookup attaches to a network namespace, not a cgroup: every netns
//! the daemon enrolls gets one link, and loses it when it leaves. With a
//! pin directory each link is pinned as `link_authz_<cookie>`, so a daemon
//! stopped with --keep-attached leaves destinations enforced, and the next
//! one replaces the links (attaching its own before dropping the old pin).

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use libbpf_rs::Link;

use super::{pins, Datapath};

fn pin_path(dir: &Path, cookie: u64) -> PathBuf {
    dir.join(format!("link_authz_{cookie}"))
}

/// Per-netns links, by netns cookie.
#[derive(Default)]
pub(super) struct NetnsLinks(HashMap<u64, Link>);

impl Datapath {
    /// Attaches the authorization program to each netns of `enrolled`
    /// (cookie → path) that lacks it and detaches it from the ones gone.
    /// A netns that cannot take it is named in the returned lines (its
    /// connections are then authorized only at enrolled clients).
    pub fn sync_netns_links(&mut self, enrolled: &BTreeMap<u64, String>) -> Vec<String> {
        let mut errors = Vec::new();
        let gone: Vec<u64> = self
            .netns_links
            .0
            .keys()
            .filter(|c| !enrolled.contains_key(c))
            .copied()
            .collect();
        for cookie in gone {
            if let Some(link) = self.netns_links.0.remove(&cookie) {
                if let Some(dir) = &self.pin_dir {
                    pins::remove_if_ours(&pin_path(dir, cookie), link.as_fd());
                }
            }
        }
        for (&cookie, path) in enrolled {
            if self.netns_links.0.contains_key(&cookie) {
                continue;
            }
            match self.attach_netns(cookie, path) {
                Ok(link) => {
                    self.netns_links.0.insert(cookie, link);
                }
                Err(e) => errors.push(format!(
                    "netns {path}: authorization program not attached: {e}"
                )),
            }
        }
        errors
    }

    fn attach_netns(&self, cookie: u64, path: &str) -> Result<Link, String> {
        let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
        // The path may name another netns by now (a pod replaced).
        let now = crate::sys::netns_file_cookie(f.try_clone().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        if now != cookie {
            return Err("the path names another network namespace now".into());
        }
        let mut link = self
            .skel
            .progs
            .kmesh_authz_lookup
            .attach_netns(f.as_raw_fd())
            .map_err(|e| e.to_string())?;
        if let Some(dir) = &self.pin_dir {
            let pin = pin_path(dir, cookie);
            // A previous daemon's link goes once ours runs.
            let _ = std::fs::remove_file(&pin);
            link.pin(&pin).map_err(|e| e.to_string())?;
        }
        Ok(link)
    }

    /// The ring buffer of denials (struct authz_event).
    pub fn authz_events(&self) -> &libbpf_rs::MapMut<'static> {
        &self.skel.maps.km_authz_events
    }

    /// Netns cookies with the authorization program attached.
    pub fn netns_attached(&self) -> usize {
        self.netns_links.0.len()
    }

    /// At shutdown: unpins (unless `keep`) and drops the links.
    pub(super) fn release_netns_links(&mut self, dir: Option<&Path>, keep: bool) {
        for (cookie, link) in self.netns_links.0.drain() {
            if let (Some(dir), false) = (dir, keep) {
                pins::remove_if_ours(&pin_path(dir, cookie), link.as_fd());
            }
        }
    }
}
