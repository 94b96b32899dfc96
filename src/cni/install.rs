//! Puts the plugin into the node's CNI setup: the daemon's own binary as
//! `<bin dir>/kmesh-cni`, and a `kmesh-cni` entry at the end of the first
//! `*.conflist` of the CNI conf dir (the primary CNI's, which the runtime
//! uses). The primary CNI may rewrite its file at any time (an upgrade, a
//! restart), dropping our entry: `ensure` puts it back, and the daemon
//! calls it on every tick.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};
use thiserror::Error;

use super::decide::StaticRule;

pub const PLUGIN_TYPE: &str = "kmesh-cni";

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("installing the CNI plugin as {path}: {source}")]
    Binary { path: PathBuf, source: io::Error },
    #[error("CNI config {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("CNI config {path} is not a conflist: {reason}")]
    Conflist { path: PathBuf, reason: String },
}

#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// Leave the conflist entry in place when the daemon stops.
    pub keep_config: bool,
    /// The plugin's settings in its entry.
    pub admin_socket: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub rule: Option<StaticRule>,
}

impl InstallOptions {
    fn entry(&self) -> Value {
        let mut e = json!({"type": PLUGIN_TYPE, "adminSocket": self.admin_socket});
        if let Some(k) = &self.kubeconfig {
            e["kubeconfig"] = json!(k);
        }
        if let Some(r) = &self.rule {
            e["enroll"] = json!({"all": r.all, "namespaces": r.namespaces});
        }
        e
    }
}

/// Copies this process's binary in as the plugin (written aside, then
/// renamed: a runtime running the old one keeps it).
pub fn install_binary(o: &InstallOptions) -> Result<PathBuf, InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let dst = o.bin_dir.join(PLUGIN_TYPE);
    let err = |source| InstallError::Binary {
        path: dst.clone(),
        source,
    };
    std::fs::create_dir_all(&o.bin_dir).map_err(err)?;
    let tmp = o.bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::copy("/proc/self/exe", &tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    std::fs::rename(&tmp, &dst).map_err(err)?;
    Ok(dst)
}

/// The node's conflist: the first `*.conflist` by name, as runtimes pick.
pub fn first_conflist(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(InstallError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

fn read(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read(path).map_err(|source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| InstallError::Conflist {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !v.get("plugins").is_some_and(Value::is_array) {
        return Err(InstallError::Conflist {
            path: path.to_path_buf(),
            reason: "no \"plugins\" array".into(),
        });
    }
    Ok(v)
}

fn write(path: &Path, v: &Value) -> Result<(), InstallError> {
    let err = |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Not *.conflist while half written: a runtime never reads it.
    let tmp = path.with_extension("kmesh-tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).expect("serializes")).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Makes the first conflist end with our entry, as configured. Returns
/// the file when it had to be written (a first install, or a rewrite by
/// another CNI that dropped the entry), None when it was already right or
/// there is no conflist yet (the primary CNI has not installed itself).
pub fn ensure(o: &InstallOptions) -> Result<Option<PathBuf>, InstallError> {
    let Some(path) = first_conflist(&o.conf_dir)? else {
        return Ok(None);
    };
    let mut v = read(&path)?;
    let want = o.entry();
    let plugins = v["plugins"].as_array_mut().expect("checked by read");
    if plugins.last() == Some(&want)
        && plugins.iter().filter(|p| p["type"] == PLUGIN_TYPE).count() == 1
    {
        return Ok(None);
    }
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    plugins.push(want);
    write(&path, &v)?;
    Ok(Some(path))
}

/// Puts the plugin's conflist entry (and its kubeconfig) back if missing
/// or stale. A failure is retried at the next tick and logged when it
/// first happens, not every tick (`failing` holds the last one).
pub fn keep_installed(o: &InstallOptions, failing: &mut Option<String>) {
    let result = ensure(o).and_then(|added| {
        if let Some(path) = added {
            tracing::info!("CNI plugin entry added to {}", path.display());
        }
        if write_kubeconfig(o)? {
            tracing::info!("CNI plugin kubeconfig written (service account token)");
        }
        Ok(())
    });
    match result {
        Ok(()) if failing.take().is_some() => tracing::info!("CNI plugin install: working again"),
        Ok(()) => {}
        Err(e) => {
            let e = e.to_string();
            if failing.as_deref() != Some(e.as_str()) {
                tracing::error!("{e}; retrying every tick");
            }
            *failing = Some(e);
        }
    }
}

/// Where a pod's service account is mounted (in-cluster config).
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The plugin runs on the node, outside any pod, so it has no in-cluster
/// config: when the daemon runs in a pod and the plugin is configured with a
/// kubeconfig in the CNI conf dir, the daemon writes it there from its own
/// service account (API address, CA, token), as Istio's CNI agent does.
/// Rewritten whenever the token the kubelet rotates changes. Returns
/// whether it wrote.
pub fn write_kubeconfig(o: &InstallOptions) -> Result<bool, InstallError> {
    let (Ok(host), Ok(port)) = (
        std::env::var("KUBERNETES_SERVICE_HOST"),
        std::env::var("KUBERNETES_SERVICE_PORT"),
    ) else {
        return Ok(false);
    };
    write_kubeconfig_from(o, Path::new(SA_DIR), host, &port)
}

/// `write_kubeconfig` with the service account at `sa` and the API
/// server's service at `host`:`port`.
fn write_kubeconfig_from(
    o: &InstallOptions,
    sa: &Path,
    host: String,
    port: &str,
) -> Result<bool, InstallError> {
    let Some(kc) = &o.kubeconfig else {
        return Ok(false);
    };
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    let token = std::fs::read_to_string(sa.join("token")).map_err(io_err(&sa.join("token")))?;
    let ca = std::fs::read(sa.join("ca.crt")).map_err(io_err(&sa.join("ca.crt")))?;
    // The plugin reads these at their node paths: the kubeconfig's own
    // name, in the conf dir this daemon sees mounted.
    let Some(name) = kc.file_name() else {
        return Ok(false);
    };
    let ca_name = format!("{}-ca.crt", name.to_string_lossy());
    let node_dir = kc.parent().unwrap_or(Path::new("/"));
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "kubernetes", "cluster": {
            "server": format!("https://{host}:{port}"),
            "certificate-authority": node_dir.join(&ca_name),
        }}],
        "users": [{"name": PLUGIN_TYPE, "user": {"token": token.trim()}}],
        "contexts": [{"name": PLUGIN_TYPE, "context": {"cluster": "kubernetes", "user": PLUGIN_TYPE}}],
        "current-context": PLUGIN_TYPE,
    });
    let text = serde_json::to_vec_pretty(&config).expect("serializes");
    let path = o.conf_dir.join(name);
    if std::fs::read(&path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    write_private(&o.conf_dir.join(&ca_name), &ca)?;
    write_private(&path, &text)?;
    Ok(true)
}

/// Mode 0600, written aside and renamed (the token is a credential).
fn write_private(path: &Path, data: &[u8]) -> Result<(), InstallError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let err = |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("kmesh-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Takes our entry out of the first conflist (uninstall). The binary stays:
/// runtimes run DEL with the config cached at ADD, so pods set up with the
/// plugin still need it to be torn down.
pub fn remove(o: &InstallOptions) -> Result<(), InstallError> {
    let Some(path) = first_conflist(&o.conf_dir)? else {
        return Ok(());
    };
    let mut v = read(&path)?;
    let plugins = v["plugins"].as_array_mut().expect("checked by read");
    let n = plugins.len();
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    if plugins.len() != n {
        write(&path, &v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_is_appended_once_readded_after_a_rewrite_and_removed() {
        let dir = std::env::temp_dir().join(format!("kmesh-cni-inst-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let o = InstallOptions {
            conf_dir: dir.clone(),
            bin_dir: dir.join("bin"),
            keep_config: false,
            admin_socket: "/run/kmesh/admin.sock".into(),
            kubeconfig: None,
            rule: None,
        };
        assert_eq!(ensure(&o).unwrap(), None, "no conflist yet");
        let primary = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}]});
        let file = dir.join("10-n.conflist");
        std::fs::write(&file, primary.to_string()).unwrap();
        std::fs::write(dir.join("20-z.conflist"), primary.to_string()).unwrap();
        assert_eq!(ensure(&o).unwrap(), Some(file.clone()));
        assert_eq!(ensure(&o).unwrap(), None, "already there");
        let v = read(&file).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
        assert_eq!(v["plugins"][1]["type"], PLUGIN_TYPE);
        std::fs::write(&file, primary.to_string()).unwrap();
        assert_eq!(ensure(&o).unwrap(), Some(file.clone()), "re-added");
        remove(&o).unwrap();
        assert_eq!(read(&file).unwrap(), primary);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kubeconfig_from_the_service_account_is_written_private_and_refreshed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kmesh-cni-kc-{}", std::process::id()));
        let (sa, conf) = (dir.join("sa"), dir.join("net.d"));
        std::fs::create_dir_all(&sa).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(sa.join("token"), "tok-1\n").unwrap();
        std::fs::write(sa.join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let o = InstallOptions {
            conf_dir: conf.clone(),
            bin_dir: dir.join("bin"),
            keep_config: false,
            admin_socket: "/run/kmesh/admin.sock".into(),
            kubeconfig: Some("/etc/cni/net.d/kmesh-cni-kubeconfig".into()),
            rule: None,
        };
        let write = || write_kubeconfig_from(&o, &sa, "fd00::1".into(), "443").unwrap();
        assert!(write());
        assert!(!write(), "unchanged: not rewritten");
        let path = conf.join("kmesh-cni-kubeconfig");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // kube-rs reads it as the plugin will.
        let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://[fd00::1]:443"));
        assert_eq!(
            cluster.certificate_authority.as_deref(),
            Some("/etc/cni/net.d/kmesh-cni-kubeconfig-ca.crt")
        );
        assert!(conf.join("kmesh-cni-kubeconfig-ca.crt").exists());
        assert!(kc.auth_infos[0].auth_info.as_ref().unwrap().token.is_some());
        // (kube-rs keeps the token secret: read back as JSON.)
        let token = || {
            let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            v["users"][0]["user"]["token"].as_str().unwrap().to_string()
        };
        assert_eq!(token(), "tok-1");
        std::fs::write(sa.join("token"), "tok-2").unwrap();
        assert!(write(), "a rotated token is written");
        assert_eq!(token(), "tok-2");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
