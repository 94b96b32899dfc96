//! kmesh-rs: service-mesh data plane in Rust and eBPF.
//!
//! Data flows one way: a source (`config`, later xDS) produces a
//! `model::Model`; `writer::MapWriter` turns it into BPF map contents; the
//! programs in bpf/ act on them at connect() time.
pub mod admin;
pub mod authz;
pub mod bpf;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod enforce;
pub mod http;
pub mod logging;
pub mod model;
pub mod sockdiag;
pub mod sys;
pub mod telemetry;
pub mod writer;
pub mod xds;
