//! Pod enrollment by CNI. `kmesh cni` (installed as /opt/cni/bin/kmesh-cni)
//! is a chained CNI plugin run by the container runtime for every pod; it
//! decides whether the pod belongs to the mesh and asks the daemon, over the
//! admin socket, to enroll the pod's netns. The daemon side (`source`) is
//! one of the model's sources, persisted so a restart re-enrolls the pods
//! still running; `install` puts the plugin into the node's CNI config.

pub mod decide;
pub mod install;
pub mod kube;
pub mod plugin;
pub mod serve;
pub mod source;

use serde::{Deserialize, Serialize};

/// What the plugin asks the daemon (one admin-socket line:
/// `cni-add|cni-del|cni-check <json>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRequest {
    /// CNI_CONTAINERID: the key of the record (a DEL may come when the
    /// netns is already gone).
    pub container_id: String,
    /// CNI_NETNS.
    #[serde(default)]
    pub netns: String,
    /// "namespace/name" when the runtime passed K8S_POD_* args.
    #[serde(default)]
    pub pod: String,
    /// A waypoint's netns: its own connections are never sent to a waypoint.
    #[serde(default)]
    pub waypoint: bool,
}

/// The admin-socket commands the daemon serves for the plugin.
pub const ADD: &str = "cni-add";
pub const DEL: &str = "cni-del";
pub const CHECK: &str = "cni-check";

/// The daemon's CNI settings (all off without `--cni` / `--cni-conf-dir`).
#[derive(Debug, Clone)]
pub struct CniOptions {
    /// Record of the enrolled pods, for the reconcile at start.
    pub state_file: std::path::PathBuf,
    /// Install the plugin into the node's CNI config.
    pub install: Option<install::InstallOptions>,
}
