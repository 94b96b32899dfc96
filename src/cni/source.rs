//! The daemon's enrollment source fed by the CNI plugin: pods the plugin
//! asked for, as a model layer (only `enrolled` is filled), and the record
//! of them in a state file under the daemon's run dir. At start the record
//! is reconciled against the node: a pod whose netns still exists (same
//! netns cookie) is enrolled again, the others are dropped, so a restarted
//! daemon covers the pods that started before it without asking the
//! runtime.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::PodRequest;
use crate::model::{Enrollment, Model};

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("CNI state file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("netns {netns} of container {container}: {reason}")]
    Netns {
        netns: String,
        container: String,
        reason: String,
    },
    #[error("container {0}: CNI_NETNS is empty")]
    NoNetns(String),
}

/// One enrolled pod, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub container_id: String,
    pub netns: String,
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub waypoint: bool,
    /// The netns it was at ADD: a path reused by a later namespace (a
    /// recycled pid in /proc/PID/ns/net) is not the pod's any more.
    pub cookie: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    pods: Vec<Record>,
}

/// The layer, and what it was built from.
#[derive(Debug, Default)]
pub struct CniSource {
    /// None: CNI enrollment is off in this daemon.
    state_file: Option<PathBuf>,
    /// By container id.
    pods: BTreeMap<String, Record>,
    pub model: Model,
}

/// Cookie and addresses of a netns path.
fn resolve(netns: &str, container: &str) -> Result<(u64, Vec<std::net::IpAddr>), SourceError> {
    crate::config::resolve_netns(Path::new(netns)).map_err(|reason| SourceError::Netns {
        netns: netns.to_string(),
        container: container.to_string(),
        reason,
    })
}

impl CniSource {
    pub fn enabled(&self) -> bool {
        self.state_file.is_some()
    }

    /// Reads the state file and keeps the pods still on the node. A missing
    /// file is no pods; an unreadable one is logged and treated as none
    /// (the runtime's next ADDs refill it).
    pub fn reconcile(state_file: PathBuf) -> Self {
        let mut src = CniSource {
            state_file: Some(state_file.clone()),
            ..Default::default()
        };
        let recorded: StateFile = match std::fs::read(&state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(
                    "CNI state file {}: {e}; starting with no CNI pods",
                    state_file.display()
                );
                StateFile::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => {
                tracing::error!(
                    "CNI state file {}: {e}; starting with no CNI pods",
                    state_file.display()
                );
                StateFile::default()
            }
        };
        let total = recorded.pods.len();
        for r in recorded.pods {
            match resolve(&r.netns, &r.container_id) {
                Ok((cookie, addrs)) if cookie == r.cookie => src.insert(r, addrs),
                Ok(_) => tracing::info!(
                    "CNI: pod {} ({}) dropped: {} is another netns now",
                    r.pod,
                    r.container_id,
                    r.netns
                ),
                Err(e) => tracing::info!("CNI: pod {} dropped: {e}", r.pod),
            }
        }
        tracing::info!(
            "CNI: {} of {total} recorded pods still on the node, re-enrolled",
            src.pods.len()
        );
        if let Err(e) = src.save() {
            tracing::error!("{e}");
        }
        src
    }

    fn insert(&mut self, r: Record, addrs: Vec<std::net::IpAddr>) {
        self.model.enrolled.insert(
            r.cookie,
            Enrollment {
                source: format!("cni:{}:{}", r.pod, r.netns),
                waypoint: r.waypoint,
                addrs,
            },
        );
        self.pods.insert(r.container_id.clone(), r);
    }

    fn save(&self) -> Result<(), SourceError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let err = |source| SourceError::Write {
            path: path.clone(),
            source,
        };
        let file = StateFile {
            pods: self.pods.values().cloned().collect(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        // Written aside and renamed: a crash never leaves half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&file).expect("serializes")).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub fn get(&self, container_id: &str) -> Option<&Record> {
        self.pods.get(container_id)
    }

    /// Records the pod and puts its netns into the layer; the caller
    /// applies. Nothing changes on an error.
    pub fn add(&mut self, req: &PodRequest) -> Result<u64, SourceError> {
        if req.netns.is_empty() {
            return Err(SourceError::NoNetns(req.container_id.clone()));
        }
        let (cookie, addrs) = resolve(&req.netns, &req.container_id)?;
        let before = self.remove_entry(&req.container_id);
        self.insert(
            Record {
                container_id: req.container_id.clone(),
                netns: req.netns.clone(),
                pod: req.pod.clone(),
                waypoint: req.waypoint,
                cookie,
            },
            addrs,
        );
        if let Err(e) = self.save() {
            // Back to what was there: a pod the file does not hold would
            // be lost at the next restart while looking enrolled now.
            self.remove_entry(&req.container_id);
            if let Some((r, e)) = before {
                self.model.enrolled.insert(r.cookie, e);
                self.pods.insert(r.container_id.clone(), r);
            }
            return Err(e);
        }
        Ok(cookie)
    }

    fn remove_entry(&mut self, container_id: &str) -> Option<(Record, Enrollment)> {
        let r = self.pods.remove(container_id)?;
        // Another container may share the netns (a runtime calling ADD per
        // container of a pod): the netns stays while one is recorded.
        if self.pods.values().any(|o| o.cookie == r.cookie) {
            let e = self.model.enrolled.get(&r.cookie).cloned()?;
            return Some((r, e));
        }
        let e = self.model.enrolled.remove(&r.cookie)?;
        Some((r, e))
    }

    /// Forgets the pod (nothing if unknown); the caller applies.
    pub fn remove(&mut self, container_id: &str) -> Result<Option<Record>, SourceError> {
        let Some((r, _)) = self.remove_entry(container_id) else {
            return Ok(None);
        };
        self.save()?;
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, netns: &str) -> PodRequest {
        PodRequest {
            container_id: id.into(),
            netns: netns.into(),
            pod: "default/a".into(),
            waypoint: false,
        }
    }

    #[test]
    fn records_survive_a_restart_and_gone_netns_are_dropped() {
        let dir = std::env::temp_dir().join(format!("kmesh-cni-src-{}", std::process::id()));
        let file = dir.join("cni-pods.json");
        let mut s = CniSource::reconcile(file.clone());
        let cookie = s.add(&req("c1", "/proc/self/ns/net")).unwrap();
        assert!(s
            .add(&req("c2", "/run/netns/kmesh-definitely-missing"))
            .is_err());
        assert!(s.get("c2").is_none(), "a refused ADD changes nothing");
        let again = CniSource::reconcile(file.clone());
        assert_eq!(again.get("c1").map(|r| r.cookie), Some(cookie));
        assert!(again.model.enrolled.contains_key(&cookie));
        // A record whose netns is gone is dropped at start.
        let mut text: StateFile = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        text.pods[0].netns = "/run/netns/kmesh-definitely-missing".into();
        std::fs::write(&file, serde_json::to_vec(&text).unwrap()).unwrap();
        let dropped = CniSource::reconcile(file.clone());
        assert!(dropped.model.enrolled.is_empty());
        let mut s = CniSource::reconcile(file.clone());
        s.add(&req("c1", "/proc/self/ns/net")).unwrap();
        assert!(s.remove("c1").unwrap().is_some());
        assert!(s.remove("c1").unwrap().is_none(), "DEL is idempotent");
        assert!(s.model.enrolled.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
