//! The CNI side: `kmesh cni`, run by the container runtime as a chained
//! plugin (CNI spec 1.0.0, also 0.3.x/0.4.0 configs). Everything it
//! prints on stdout is the CNI result or a CNI error object; its own
//! messages go to stderr, which runtimes keep in their logs.

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

use super::{
    decide::{self, Decision, StaticRule},
    PodRequest,
};
use crate::admin::{self, AdminError};

pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// CNI's well-known error codes, and ours (100 and up are the plugin's).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const ENROLL_REFUSED: u32 = 100;
    pub const API_LOOKUP: u32 = 101;
    pub const NOT_ENROLLED: u32 = 102;
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.to_string(),
            details: details.into(),
        }
    }

    /// The spec's error object.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The plugin's entry in a conflist (what the runtime sends on stdin).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// The daemon's admin socket as seen from the node.
    #[serde(default = "default_socket")]
    pub admin_socket: PathBuf,
    /// Kubeconfig for the API lookups; without it, the in-cluster config
    /// when KUBERNETES_SERVICE_HOST is set, else the static rule.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// For nodes and tests without an API server.
    #[serde(default)]
    pub enroll: Option<StaticRule>,
    /// How long ADD waits for the daemon to confirm the enrollment.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: f64,
}

fn default_socket() -> PathBuf {
    admin::DEFAULT_SOCKET.into()
}

fn default_timeout() -> f64 {
    10.0
}

/// The CNI_* variables of one invocation.
#[derive(Debug, Default, Clone)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS, "K=V;K=V".
    pub args: HashMap<String, String>,
}

impl CniEnv {
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        let args = get("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args,
        }
    }

    fn require(&self, name: &str, value: &str) -> Result<(), CniError> {
        if value.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                "missing environment variable",
                format!("{name} is required for {}", self.command),
            ));
        }
        Ok(())
    }

    fn pod(&self) -> Option<(&str, &str)> {
        let ns = self.args.get("K8S_POD_NAMESPACE")?;
        let name = self.args.get("K8S_POD_NAME")?;
        (!ns.is_empty() && !name.is_empty()).then_some((ns.as_str(), name.as_str()))
    }
}

/// The process entry: reads env and stdin, prints the result or error.
pub fn main() -> std::process::ExitCode {
    let env = CniEnv::from_env(|k| std::env::var(k).ok());
    let mut stdin = Vec::new();
    let _ = std::io::stdin().take(1 << 20).read_to_end(&mut stdin);
    // The version to answer in, if the config says one.
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match rt {
        Ok(rt) => rt.block_on(run(&env, &stdin)),
        Err(e) => Err(CniError::new(999, "starting runtime", e.to_string())),
    };
    match result {
        Ok(out) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kmesh-cni {}: {e}", env.command);
            println!("{}", e.to_json(&version));
            std::process::ExitCode::FAILURE
        }
    }
}

/// One invocation: the stdout text on success.
pub async fn run(env: &CniEnv, stdin: &[u8]) -> Result<String, CniError> {
    if env.command == "VERSION" {
        return Ok(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "malformed network configuration on stdin",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            format!(
                "{:?}; supported: {}",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if !(conf.timeout_seconds.is_finite() && conf.timeout_seconds > 0.0) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "invalid network configuration",
            format!(
                "timeoutSeconds {} is not a positive number",
                conf.timeout_seconds
            ),
        ));
    }
    let wait = Duration::from_secs_f64(conf.timeout_seconds.min(3600.0));
    match env.command.as_str() {
        "ADD" => {
            env.require("CNI_CONTAINERID", &env.container_id)?;
            env.require("CNI_NETNS", &env.netns)?;
            if let Decision::Enroll { waypoint } = decision(env, &conf).await? {
                enroll(env, &conf, waypoint, wait).await?;
            }
            Ok(pass_through(&conf))
        }
        "DEL" => {
            env.require("CNI_CONTAINERID", &env.container_id)?;
            // Never fails: a pod being torn down must not get stuck on us.
            // Without a daemon there is nothing to undo now, and the daemon
            // drops records of gone netns when it starts.
            let req = request(env, false);
            if let Err(e) = ask(&conf.admin_socket, super::DEL, &req, wait).await {
                eprintln!("kmesh-cni DEL {}: {e}; nothing undone", env.container_id);
            }
            Ok(String::new())
        }
        "CHECK" => {
            env.require("CNI_CONTAINERID", &env.container_id)?;
            env.require("CNI_NETNS", &env.netns)?;
            if conf.prev_result.is_none() {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "invalid network configuration",
                    "CHECK needs prevResult",
                ));
            }
            if let Decision::Enroll { waypoint } = decision(env, &conf).await? {
                let req = request(env, waypoint);
                ask(&conf.admin_socket, super::CHECK, &req, wait)
                    .await
                    .map_err(|e| match e {
                        AdminError::Remote { message, .. } => {
                            CniError::new(code::NOT_ENROLLED, "pod is not enrolled", message)
                        }
                        e => unreachable_daemon(e),
                    })?;
            }
            Ok(String::new())
        }
        "" => Err(CniError::new(
            code::INVALID_ENV,
            "missing environment variable",
            "CNI_COMMAND is not set",
        )),
        other => Err(CniError::new(
            code::INVALID_ENV,
            "unknown CNI_COMMAND",
            format!("{other:?} (expected ADD, DEL, CHECK or VERSION)"),
        )),
    }
}

/// The previous plugin's result, unchanged but for the version field
/// (chained plugins pass it through); an empty result when first.
fn pass_through(conf: &NetConf) -> String {
    let mut out = conf
        .prev_result
        .clone()
        .unwrap_or_else(|| json!({"interfaces": [], "ips": []}));
    if let Some(o) = out.as_object_mut() {
        o.insert("cniVersion".into(), conf.cni_version.clone().into());
    }
    out.to_string()
}

async fn decision(env: &CniEnv, conf: &NetConf) -> Result<Decision, CniError> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let d = match (env.pod(), &conf.kubeconfig) {
        (Some((ns, name)), kc) if kc.is_some() || in_cluster => {
            let facts = super::kube::pod_facts(kc.as_deref(), ns, name)
                .await
                .map_err(|e| CniError::new(code::API_LOOKUP, "reading the pod's labels", e))?;
            decide::decide(&facts)
        }
        (pod, _) => match &conf.enroll {
            Some(rule) => rule.decide(pod.map(|p| p.0)),
            None => Decision::Skip("no API access and no static enroll rule".into()),
        },
    };
    if let Decision::Skip(why) = &d {
        eprintln!("kmesh-cni: {} not enrolled: {why}", env.container_id);
    }
    Ok(d)
}

fn request(env: &CniEnv, waypoint: bool) -> PodRequest {
    PodRequest {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        pod: env
            .pod()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .unwrap_or_default(),
        waypoint,
    }
}

async fn ask(
    socket: &Path,
    cmd: &str,
    req: &PodRequest,
    wait: Duration,
) -> Result<String, AdminError> {
    let line = format!(
        "{cmd} {}",
        serde_json::to_string(req).expect("plain struct serializes")
    );
    admin::request(socket, &line, wait).await
}

fn unreachable_daemon(e: AdminError) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        "the kmesh daemon did not answer",
        e.to_string(),
    )
}

/// Enrolls and returns once the daemon confirms the netns is in the maps.
/// On any failure the daemon is told to forget the pod, so that a retried
/// ADD (or none) starts clean.
async fn enroll(
    env: &CniEnv,
    conf: &NetConf,
    waypoint: bool,
    wait: Duration,
) -> Result<(), CniError> {
    let req = request(env, waypoint);
    match ask(&conf.admin_socket, super::ADD, &req, wait).await {
        Ok(_) => Ok(()),
        Err(AdminError::Remote { message, .. }) => Err(CniError::new(
            code::ENROLL_REFUSED,
            "the kmesh daemon refused to enroll the pod",
            message,
        )),
        Err(e) => {
            // It may have enrolled the pod after all (a timeout): undo.
            let _ = ask(&conf.admin_socket, super::DEL, &req, wait).await;
            Err(unreachable_daemon(e))
        }
    }
}
