//! The verification guides of docs/verification.md, run as the page shows
//! them (`scripts/verify.sh GUIDE`) with this build's binaries: each guide
//! sets up its own pods, cgroup and bpffs, drives real connections and
//! exits non-zero when an outcome differs from the documented one.

use std::{path::Path, process::Command};

fn guide(name: &str) {
    let bin = Path::new(env!("CARGO_BIN_EXE_kmesh")).parent().unwrap();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/verify.sh"))
        .arg(name)
        .env("KMESH_BIN", bin)
        .output()
        .expect("run scripts/verify.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("VERIFIED: {name}")),
        "guide {name} failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn locality_guide() {
    guide("locality");
}

#[test]
fn ingress_guide() {
    guide("ingress");
}

#[test]
fn egress_guide() {
    guide("egress");
}

#[test]
fn breaker_guide() {
    guide("breaker");
}

#[test]
fn ratelimit_guide() {
    guide("ratelimit");
}
