//! A small delta ADS server standing in for istiod in tests and benchmarks.
//!
//! It holds resources per type URL, each with a version; every connected
//! stream tracks what it has sent and pushes the difference (new, changed,
//! removed) whenever the state changes. It honours initial_resource_versions
//! on reconnect and records ACKs and NACKs so tests can assert on them.
//!
//! A push costs what changed, not what exists: every change is logged with
//! its version, and a stream only looks at the names changed since it last
//! caught up (istiod, too, sends only the changed resources; a stand-in
//! that rescans 110k resources per push would eat the CPU the daemon under
//! test is measured on). A new stream, or one the log no longer reaches
//! back for, compares everything once.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{
    transport::{Identity, Server, ServerTlsConfig},
    Request, Response, Status as GrpcStatus, Streaming,
};

use super::proto::discovery::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

/// A resource as held: (version, payload).
type Held = (u64, prost_types::Any);

#[derive(Default)]
struct State {
    /// type URL → name → (version, payload).
    resources: BTreeMap<String, BTreeMap<String, Held>>,
    next_version: u64,
    /// (version, type URL, name) of every change, oldest first.
    log: VecDeque<(u64, String, String)>,
    /// The log holds every change made after this version.
    log_from: u64,
    next_nonce: u64,
    acks: u64,
    nacks: Vec<String>,
    streams: u64,
}

struct Inner {
    state: Mutex<State>,
    /// Bumped on every change; stream tasks wake on it.
    changed: watch::Sender<u64>,
    /// Bumped by `kill`: every open stream ends.
    killed: watch::Sender<u64>,
    /// Resources go out without a version, as istiod sends addresses.
    unversioned: std::sync::atomic::AtomicBool,
    /// When the last response was handed to a stream (benches time from
    /// here to the daemon's map write).
    last_send: Mutex<Option<std::time::Instant>>,
}

/// A batch of changes published as one version.
pub struct Batch<'a> {
    state: &'a mut State,
    version: u64,
}

/// Changes the log keeps before it starts over (streams behind it then
/// compare everything once).
const LOG_MAX: usize = 1 << 18;

impl Batch<'_> {
    pub fn set(&mut self, name: &str, any: prost_types::Any) {
        self.log(&any.type_url, name);
        self.state
            .resources
            .entry(any.type_url.clone())
            .or_default()
            .insert(name.to_string(), (self.version, any));
    }

    pub fn remove(&mut self, type_url: &str, name: &str) {
        if let Some(m) = self.state.resources.get_mut(type_url) {
            if m.remove(name).is_some() {
                self.log(type_url, name);
            }
        }
    }

    fn log(&mut self, type_url: &str, name: &str) {
        let st = &mut *self.state;
        if st.log.len() >= LOG_MAX {
            // This batch's earlier entries go too: only streams that
            // caught up with it may use the log.
            st.log.clear();
            st.log_from = self.version;
        }
        st.log
            .push_back((self.version, type_url.to_string(), name.to_string()));
    }
}

#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

impl Default for ControlPlane {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlPlane {
    pub fn new() -> Self {
        ControlPlane {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: watch::channel(0).0,
                killed: watch::channel(0).0,
                unversioned: false.into(),
                last_send: Mutex::new(None),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends resources without versions, as istiod does for addresses
    /// (pilot/pkg/xds/workload.go leaves Resource.version empty): a client
    /// that reconnects then gets everything again.
    pub fn set_unversioned(&self, on: bool) {
        self.inner
            .unversioned
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Applies `f` as one change, pushed to every stream.
    pub fn update(&self, f: impl FnOnce(&mut Batch)) {
        {
            let mut st = self.lock();
            st.next_version += 1;
            let version = st.next_version;
            f(&mut Batch {
                state: &mut st,
                version,
            });
        }
        self.inner.changed.send_modify(|v| *v += 1);
    }

    pub fn set(&self, name: &str, any: prost_types::Any) {
        self.update(|b| b.set(name, any));
    }

    pub fn remove(&self, type_url: &str, name: &str) {
        self.update(|b| b.remove(type_url, name));
    }

    /// Error messages of the NACKs received so far.
    pub fn nacks(&self) -> Vec<String> {
        self.lock().nacks.clone()
    }

    pub fn acks(&self) -> u64 {
        self.lock().acks
    }

    /// When the last response was handed to a stream for sending.
    pub fn last_send(&self) -> Option<std::time::Instant> {
        *self
            .inner
            .last_send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Streams ever opened (reconnects count).
    pub fn streams(&self) -> u64 {
        self.lock().streams
    }

    /// Ends every open stream, as if the server had died; the listener is
    /// closed by aborting the task `serve` runs in.
    pub fn kill_streams(&self) {
        self.inner.killed.send_modify(|v| *v += 1);
    }

    /// Serves delta ADS on `listener` (TLS if an identity is given) until
    /// the returned task is aborted.
    pub fn serve(
        &self,
        listener: tokio::net::TcpListener,
        tls: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Result<tokio::task::JoinHandle<()>, tonic::transport::Error> {
        let mut builder = Server::builder();
        if let Some((cert, key)) = tls {
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
        }
        let router = builder.add_service(AggregatedDiscoveryServiceServer::new(self.clone()));
        Ok(tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
            {
                tracing::warn!("control plane: {e}");
            }
        }))
    }

    /// Difference between what a stream has and the current state. `synced`
    /// is the version the stream last caught up with (None: never); only
    /// names changed since are looked at, when the log reaches back that far.
    fn diff(
        &self,
        type_url: &str,
        sent: &mut HashMap<String, u64>,
        synced: &mut Option<u64>,
    ) -> Option<DeltaDiscoveryResponse> {
        let mut st = self.lock();
        let since = synced.filter(|v| *v >= st.log_from);
        *synced = Some(st.next_version);
        let empty = BTreeMap::new();
        let current = st.resources.get(type_url).unwrap_or(&empty);
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        let unversioned = self
            .inner
            .unversioned
            .load(std::sync::atomic::Ordering::Relaxed);
        // Names to look at, in name order as a full comparison sends them.
        let names: Vec<(&String, Option<&Held>)> = match since {
            None => current.iter().map(|(n, v)| (n, Some(v))).collect(),
            Some(since) => {
                // The log is in version order: the changes since are its tail.
                let start = st.log.partition_point(|e| e.0 <= since);
                let changed: BTreeSet<&String> = st
                    .log
                    .range(start..)
                    .filter(|e| e.1 == type_url)
                    .map(|e| &e.2)
                    .collect();
                changed.into_iter().map(|n| (n, current.get(n))).collect()
            }
        };
        let mut gone = Vec::new();
        for (name, now) in names {
            let Some((version, any)) = now else {
                if sent.contains_key(name) {
                    gone.push(name.clone());
                }
                continue;
            };
            if sent.get(name) != Some(version) {
                resources.push(Resource {
                    name: name.clone(),
                    version: if unversioned {
                        String::new()
                    } else {
                        version.to_string()
                    },
                    resource: Some(any.clone()),
                    ..Default::default()
                });
                versions.push(*version);
            }
        }
        let removed_resources: Vec<String> = match since {
            None => sent
                .keys()
                .filter(|n| !current.contains_key(*n))
                .cloned()
                .collect(),
            Some(_) => gone,
        };
        if resources.is_empty() && removed_resources.is_empty() {
            return None;
        }
        for (r, v) in resources.iter().zip(versions) {
            sent.insert(r.name.clone(), v);
        }
        for n in &removed_resources {
            sent.remove(n);
        }
        st.next_nonce += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: st.next_version.to_string(),
            resources,
            type_url: type_url.to_string(),
            removed_resources,
            nonce: st.next_nonce.to_string(),
        })
    }

    async fn run_stream(
        self,
        mut input: Streaming<DeltaDiscoveryRequest>,
        out: mpsc::Sender<Result<DeltaDiscoveryResponse, GrpcStatus>>,
    ) {
        let mut changed = self.inner.changed.subscribe();
        let mut killed = self.inner.killed.subscribe();
        let mut sent: HashMap<String, HashMap<String, u64>> = HashMap::new();
        // Type URL → the version its last comparison caught up with.
        let mut synced: HashMap<String, Option<u64>> = HashMap::new();
        let mut subscribed: BTreeSet<String> = BTreeSet::new();
        loop {
            let mut push: Vec<String> = Vec::new();
            tokio::select! {
                req = input.message() => {
                    let Ok(Some(req)) = req else { return };
                    if req.response_nonce.is_empty() {
                        // A subscription; on reconnect it says what the client has.
                        let have = req
                            .initial_resource_versions
                            .iter()
                            .map(|(n, v)| (n.clone(), v.parse().unwrap_or(0)))
                            .collect();
                        sent.insert(req.type_url.clone(), have);
                        synced.insert(req.type_url.clone(), None);
                        subscribed.insert(req.type_url.clone());
                        push.push(req.type_url);
                    } else {
                        let mut st = self.lock();
                        match req.error_detail {
                            Some(e) => st.nacks.push(e.message),
                            None => st.acks += 1,
                        }
                    }
                }
                r = changed.changed() => {
                    if r.is_err() { return }
                    push.extend(subscribed.iter().cloned());
                }
                _ = killed.changed() => {
                    let _ = out.send(Err(GrpcStatus::unavailable("control plane going away"))).await;
                    return;
                }
            }
            for t in push {
                let since = synced.entry(t.clone()).or_default();
                if let Some(resp) = self.diff(&t, sent.entry(t.clone()).or_default(), since) {
                    *self
                        .inner
                        .last_send
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
                    if out.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for ControlPlane {
    type DeltaAggregatedResourcesStream =
        ReceiverStream<Result<DeltaDiscoveryResponse, GrpcStatus>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, GrpcStatus> {
        self.lock().streams += 1;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.clone().run_stream(request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
