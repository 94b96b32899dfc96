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
}
