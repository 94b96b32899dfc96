//! Delta ADS client for istio.workload.Address and istio.security.Authorization.
//!
//! One long-lived bidirectional stream; each response is applied resource
//! by resource: valid resources enter the store, invalid ones are reported
//! in the NACK's error_detail (and the last good version of that resource is
//! kept). The store survives disconnects, so the data path keeps its last
//! known state; on reconnect the client sends initial_resource_versions and
//! the server sends only what changed.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, ClientTlsConfig, Endpoint},
};

use super::{
    convert::{self, Resource},
    proto::{
        discovery::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status,
        },
        security,
    },
    ADDRESS_TYPE, AUTHORIZATION_TYPE,
};
use crate::model::{Service, Workload};

#[derive(Debug, Error)]
pub enum XdsError {
    #[error("xDS address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("xDS CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("xDS stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("xDS stream closed by the server")]
    Closed,
}

#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// http://host:port (plaintext) or https://host:port (TLS).
    pub address: String,
    /// CA bundle (PEM) the server certificate must chain to; required for https.
    pub ca_file: Option<PathBuf>,
    /// Bearer token sent as `authorization` metadata, if the file exists
    /// (istiod on 15012 authenticates clients with a service-account token).
    pub token_file: Option<PathBuf>,
    pub node_id: String,
    /// Node metadata (istiod reads e.g. NAMESPACE, CLUSTER_ID, NODE_NAME).
    pub metadata: BTreeMap<String, String>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// The xDS source's last accepted state, as model types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdsState {
    /// By service key ("namespace/hostname").
    pub services: BTreeMap<String, Service>,
    /// By uid.
    pub workloads: BTreeMap<String, Workload>,
    pub authorizations: usize,
    pub connected: bool,
}

#[derive(Default)]
struct Store {
    /// Resource name → (version, resource).
    addresses: HashMap<String, (String, Resource)>,
    authorizations: HashMap<String, (String, security::Authorization)>,
}

impl Store {
    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        match type_url {
            ADDRESS_TYPE => self
                .addresses
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
            _ => self
                .authorizations
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
        }
    }

    /// Applies one response; returns the per-resource errors.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<String> {
        let mut errors = Vec::new();
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                errors.push(format!("resource {:?}: no payload", r.name));
                continue;
            };
            let result = match resp.type_url.as_str() {
                ADDRESS_TYPE => convert::address(&r.name, &any.value).map(|res| {
                    self.addresses
                        .insert(r.name.clone(), (r.version.clone(), res));
                }),
                AUTHORIZATION_TYPE => convert::authorization(&r.name, &any.value).map(|a| {
                    self.authorizations
                        .insert(r.name.clone(), (r.version.clone(), a));
                }),
                other => {
                    errors.push(format!("type {other:?} was not subscribed"));
                    break;
                }
            };
            if let Err(e) = result {
                errors.push(e.to_string());
            }
        }
        for name in &resp.removed_resources {
            match resp.type_url.as_str() {
                ADDRESS_TYPE => self.addresses.remove(name).map(drop),
                _ => self.authorizations.remove(name).map(drop),
            };
        }
        errors
    }

    fn snapshot(&self, connected: bool) -> XdsState {
        let mut s = XdsState {
            authorizations: self.authorizations.len(),
            connected,
            ..Default::default()
        };
        for (_, r) in self.addresses.values() {
            match r {
                Resource::Service(svc) => {
                    s.services.insert(svc.key(), svc.clone());
                }
                Resource::Workload(w) => {
                    s.workloads.insert(w.uid.clone(), w.clone());
                }
            }
        }
        s
    }
}

fn node(opts: &XdsOptions) -> Node {
    let fields = opts
        .metadata
        .iter()
        .map(|(k, v)| {
            let value = prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(v.clone())),
            };
            (k.clone(), value)
        })
        .collect();
    Node {
        id: opts.node_id.clone(),
        metadata: Some(prost_types::Struct { fields }),
        build_version: format!("kmesh-rs/{}", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    }
}

async fn channel(opts: &XdsOptions) -> Result<tonic::transport::Channel, XdsError> {
    let bad = |reason: String| XdsError::Address {
        address: opts.address.clone(),
        reason,
    };
    let mut ep = Endpoint::from_shared(opts.address.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if opts.address.starts_with("https://") {
        let path = opts
            .ca_file
            .clone()
            .ok_or_else(|| bad("TLS needs a CA file (--xds-ca-file)".into()))?;
        let pem = std::fs::read(&path).map_err(|source| XdsError::CaFile { path, source })?;
        ep = ep
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| bad(e.to_string()))?;
    } else if !opts.address.starts_with("http://") {
        return Err(bad("must start with http:// or https://".into()));
    }
    ep.connect().await.map_err(|source| XdsError::Connect {
        address: opts.address.clone(),
        source,
    })
}

/// Runs one stream until it fails. Returns whether any response arrived
/// (then the reconnect backoff starts over).
async fn session(
    opts: &XdsOptions,
    store: &mut Store,
    tx: &watch::Sender<XdsState>,
) -> (bool, XdsError) {
    let mut got_response = false;
    let err = async {
        let ch = channel(opts).await?;
        let token = opts
            .token_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| MetadataValue::try_from(format!("Bearer {}", t.trim())).ok());
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
            ch,
            move |mut req: tonic::Request<()>| {
                if let Some(t) = &token {
                    req.metadata_mut().insert("authorization", t.clone());
                }
                Ok(req)
            },
        )
        .max_decoding_message_size(256 << 20);
        let (req_tx, req_rx) = mpsc::channel(16);
        for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
            let req = DeltaDiscoveryRequest {
                node: Some(node(opts)),
                type_url: type_url.to_string(),
                initial_resource_versions: store.versions(type_url),
                ..Default::default()
            };
            req_tx.send(req).await.map_err(|_| XdsError::Closed)?;
        }
        let mut stream = client
            .delta_aggregated_resources(ReceiverStream::new(req_rx))
            .await?
            .into_inner();
        tracing::info!("xDS stream to {} established", opts.address);
        tx.send_modify(|s| s.connected = true);
        while let Some(resp) = stream.message().await? {
            got_response = true;
            let started = Instant::now();
            let errors = store.apply(&resp);
            let snapshot = store.snapshot(true);
            tx.send_if_modified(|s| {
                let changed = *s != snapshot;
                *s = snapshot;
                changed
            });
            let error_detail = (!errors.is_empty()).then(|| {
                let message = errors.join("; ");
                tracing::warn!("NACK {} nonce {}: {message}", resp.type_url, resp.nonce);
                Status {
                    code: tonic::Code::InvalidArgument as i32,
                    message,
                    details: vec![],
                }
            });
            tracing::debug!(
                "{}: {} resources, {} removed, handled in {:?}",
                resp.type_url,
                resp.resources.len(),
                resp.removed_resources.len(),
                started.elapsed()
            );
            let ack = DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail,
                ..Default::default()
            };
            req_tx.send(ack).await.map_err(|_| XdsError::Closed)?;
        }
        Err::<(), _>(XdsError::Closed)
    }
    .await
    .expect_err("the loop only ends with an error");
    (got_response, err)
}

/// Small xorshift for backoff jitter; no need for a CSPRNG here.
fn jitter(d: Duration, seed: &mut u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    // ±25 %
    let f = 0.75 + (*seed % 1000) as f64 / 2000.0;
    d.mul_f64(f)
}

/// The delay before reconnect attempt `attempt` (0-based): exponential from
/// `initial`, capped at `max`, before jitter.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    initial.saturating_mul(1u32 << attempt.min(20)).min(max)
}

/// Runs the client forever, publishing every accepted state on `tx`.
pub async fn run(opts: XdsOptions, tx: watch::Sender<XdsState>) {
    let mut store = Store::default();
    let mut attempt = 0;
    let mut seed = u64::from(std::process::id()) << 32 | 0x9e37_79b9;
    loop {
        let (got_response, err) = session(&opts, &mut store, &tx).await;
        tx.send_if_modified(|s| std::mem::replace(&mut s.connected, false));
        if got_response {
            attempt = 0;
        }
        let delay = jitter(
            backoff(opts.backoff_initial, opts.backoff_max, attempt),
            &mut seed,
        );
        attempt += 1;
        tracing::warn!(
            "xDS: {err}; keeping last known state ({} resources), retrying in {delay:?}",
            store.addresses.len() + store.authorizations.len()
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(15));
        assert_eq!(backoff(i, m, 0), i);
        assert_eq!(backoff(i, m, 3), Duration::from_millis(800));
        assert_eq!(backoff(i, m, 30), m);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let mut seed = 42;
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(4), &mut seed);
            assert!(
                d >= Duration::from_secs(3) && d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
    }
}
