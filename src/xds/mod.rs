//! The xDS source: Istio's workload API over delta ADS.
//!
//! `client` speaks delta ADS to istiod (or any compatible control plane),
//! `store` holds what it accepted (and outlives each connection),
//! `convert` turns resources into model types at the boundary (nothing past
//! it sees protobuf), and `control_plane` is a small delta ADS server used by
//! the tests and benchmarks in place of istiod.

pub mod client;
pub mod control_plane;
pub mod convert;
mod grpc;
#[cfg(test)]
mod resend_tests;
pub mod store;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod discovery {
        include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
    }
}

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// Wraps a message as the Any an xDS Resource carries.
pub fn to_any<M: prost::Message>(type_url: &str, m: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}
