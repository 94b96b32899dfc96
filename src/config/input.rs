//! Getting at what a config names without trusting it: the file itself and
//! the enrolled netns paths may be anything (a FIFO, a directory, a
//! device), and none of them may block the daemon's main loop. Paths are
//! stat'ed first and opened O_NONBLOCK; the JSON's shape is checked where
//! serde is lenient.

use std::{
    fs,
    io::{self, Read},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::{FileTypeExt, OpenOptionsExt},
    },
    path::Path,
};

use serde_json::Value;

/// What a non-regular file is, for error messages.
pub(super) fn kind(ft: fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading only if it is a regular file: stat first (a
/// FIFO's open would wait for a writer; a device's open may act), then
/// open O_NONBLOCK and check again, in case it was swapped in between.
fn open_regular(path: &Path) -> io::Result<fs::File> {
    let not_file = |ft: fs::FileType| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("is {}, not a regular file", kind(ft)),
        )
    };
    let ft = fs::metadata(path)?.file_type();
    if !ft.is_file() {
        return Err(not_file(ft));
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        return Err(not_file(ft));
    }
    Ok(f)
}

/// The text of a config file, which must be a regular file.
pub(super) fn read_file(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    open_regular(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// NSFS_MAGIC from linux/magic.h: the filesystem of /proc/PID/ns/* and of
/// their bind mounts (/run/netns/NAME).
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// NS_GET_NSTYPE = _IO(0xb7, 0x3) from linux/nsfs.h.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens a network namespace file without blocking, refusing anything else
/// (a regular file, a FIFO, another kind of namespace). Needs no privilege
/// beyond reading the path; setns is left to `netns_cookie`.
pub(super) fn open_netns(path: &Path) -> Result<fs::File, String> {
    let f = open_regular(path).map_err(|e| e.to_string())?;
    let fs_type = nix::sys::statfs::fstatfs(f.as_fd())
        .map_err(|e| e.to_string())?
        .filesystem_type()
        .0;
    if fs_type != NSFS_MAGIC {
        return Err("is a regular file, not a network namespace \
                    (give /run/netns/NAME or /proc/PID/ns/net)"
            .into());
    }
    // SAFETY: a plain ioctl on an fd we own; it takes no argument.
    let ns_type = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if ns_type != libc::CLONE_NEWNET {
        return Err("is a namespace, but not a network namespace".into());
    }
    Ok(f)
}

/// Cookie and global addresses of the network namespace `f` (from
/// `open_netns`).
pub(super) fn netns_cookie(f: fs::File) -> Result<(u64, Vec<std::net::IpAddr>), String> {
    let addrs = crate::sys::netns_file_addresses(&f).map_err(|e| e.to_string())?;
    let cookie = crate::sys::netns_file_cookie(f).map_err(|e| e.to_string())?;
    Ok((cookie, addrs))
}

/// Keys whose value may be a JSON array. serde builds a struct from an
/// array too (its fields in order, missing ones defaulted), so `[]` would
/// read as an empty config and `"enroll": []` as no enrollment; every
/// other array in the file is a mistake.
const ARRAY_KEYS: [&str; 24] = [
    "netns",
    "split",
    "services",
    "addresses",
    "ports",
    "routing_preference",
    "workloads",
    "authorization_policies",
    "policies",
    "rules",
    "clauses",
    "matches",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "principals",
    "not_principals",
    "source_ips",
    "not_source_ips",
    "destination_ips",
    "not_destination_ips",
    "destination_ports",
    "not_destination_ports",
];

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// The field path of the first array found where an object belongs, in
/// serde_path_to_error's notation ("." for the top level).
pub(super) fn misplaced_array(v: &Value) -> Option<String> {
    let mut at = Vec::new();
    walk(v, false, &mut at).then(|| {
        if at.is_empty() {
            return ".".to_string();
        }
        let mut s = String::new();
        for seg in &at {
            match seg {
                Seg::Key(k) if s.is_empty() => s.push_str(k),
                Seg::Key(k) => {
                    s.push('.');
                    s.push_str(k);
                }
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    })
}

/// True if a misplaced array is found; `at` then leads to it.
fn walk<'a>(v: &'a Value, array_ok: bool, at: &mut Vec<Seg<'a>>) -> bool {
    match v {
        Value::Array(items) => {
            if !array_ok {
                return true;
            }
            for (i, x) in items.iter().enumerate() {
                at.push(Seg::Index(i));
                if walk(x, false, at) {
                    return true;
                }
                at.pop();
            }
        }
        Value::Object(fields) => {
            for (k, x) in fields {
                at.push(Seg::Key(k));
                if walk(x, ARRAY_KEYS.contains(&k.as_str()), at) {
                    return true;
                }
                at.pop();
            }
        }
        _ => {}
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Option<String> {
        misplaced_array(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn arrays_only_where_lists_belong() {
        assert_eq!(at("[]").as_deref(), Some("."));
        assert_eq!(at(r#"{"enroll": []}"#).as_deref(), Some("enroll"));
        assert_eq!(
            at(r#"{"services": [{"ports": [[80, 8080]]}]}"#).as_deref(),
            Some("services[0].ports[0]")
        );
        assert_eq!(
            at(r#"{"workloads": [{"services": {"a/b": []}}]}"#).as_deref(),
            Some("workloads[0].services.a/b")
        );
        assert_eq!(at(r#"{"services": [], "enroll": {"netns": ["/x"]}}"#), None);
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("kmesh-fifo-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_file(&fifo).unwrap_err().to_string();
        let n = open_netns(&fifo).unwrap_err();
        let plain = dir.join("plain");
        fs::write(&plain, "").unwrap();
        let p = open_netns(&plain).unwrap_err();
        let d = open_netns(&dir).unwrap_err();
        fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("a FIFO"), "{e}");
        assert!(n.contains("a FIFO"), "{n}");
        assert!(p.contains("not a network namespace"), "{p}");
        assert!(d.contains("a directory"), "{d}");
        assert!(open_netns(Path::new("/proc/self/ns/mnt"))
            .unwrap_err()
            .contains("not a network namespace"));
        let own = open_netns(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(
            netns_cookie(own).unwrap().0,
            crate::sys::current_netns_cookie().unwrap()
        );
    }
}
