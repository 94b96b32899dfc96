//! Compiles every bpf/*.bpf.c into a libbpf skeleton under OUT_DIR.
use std::{env, fs, path::PathBuf};

use libbpf_cargo::SkeletonBuilder;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR set by cargo"));
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => panic!("unsupported target arch for BPF: {other}"),
        Err(e) => panic!("CARGO_CFG_TARGET_ARCH: {e}"),
    };
    compile_protos();
    println!("cargo:rerun-if-changed=bpf");
    let mut sources: Vec<PathBuf> = fs::read_dir("bpf")
        .expect("read bpf/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for src in sources {
        let stem = src
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".bpf.c"))
            .expect("bpf source name")
            .to_string();
        // clang_args replaces libbpf-cargo's defaults, so the include path
        // and target arch define both go here.
        SkeletonBuilder::new()
            .source(&src)
            .clang_args([
                "-Ibpf/include".to_string(),
                format!("-D__TARGET_ARCH_{arch}"),
                "-O2".to_string(),
                "-g".to_string(),
                "-Wall".to_string(),
                // v3: atomic fetch-or, which km_conn's two-end handshake needs.
                "-mcpu=v3".to_string(),
                "-Werror".to_string(),
            ])
            .build_and_generate(out.join(format!("{stem}.skel.rs")))
            .unwrap_or_else(|e| panic!("building {}: {e:#}", src.display()));
    }
}

/// Istio workload API + delta ADS, compiled with protox (no protoc needed).
fn compile_protos() {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/workload.proto",
        "proto/authorization.proto",
        "proto/xds.proto",
    ];
    let fds = protox::compile(files, ["proto"]).unwrap_or_else(|e| panic!("compiling protos: {e}"));
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        // Zero-copy slices of the received message (see xds.proto).
        .bytes(".envoy.service.discovery.v3.DeltaDiscoveryResponseFrame")
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating gRPC code: {e}"));
}
