//! Workloads, laid out for 100k of them in a few tens of bytes each beyond
//! their uid: one allocation per workload (uid and name together), parts
//! that replicas share (service memberships, namespace, network) shared,
//! and a store of dense slots with an index of slot numbers instead of a
//! hash map of whole workloads.

use std::{fmt, net::IpAddr, ops::Deref, sync::Arc};

use super::{ModelError, Placement, PortMapping, Waypoint};

mod store;

pub use store::{fresh_id, Workloads};

/// A short list kept inline when it has one element: a Vec would cost an
/// allocation per workload for what is nearly always one address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Compact<T> {
    #[default]
    None,
    One(T),
    Many(Box<[T]>),
}

impl<T> Deref for Compact<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Compact::None => &[],
            Compact::One(x) => std::slice::from_ref(x),
            Compact::Many(v) => v,
        }
    }
}

impl<T> FromIterator<T> for Compact<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Vec::from_iter(iter).into()
    }
}

impl<T> From<Vec<T>> for Compact<T> {
    fn from(mut v: Vec<T>) -> Self {
        match v.len() {
            0 => Compact::None,
            1 => Compact::One(v.pop().expect("one")),
            _ => Compact::Many(v.into_boxed_slice()),
        }
    }
}

/// A workload's addresses.
pub type Addresses = Compact<IpAddr>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// A workload's membership in a service, with per-workload port overrides
/// (empty = the service's ports).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    /// The service key ("namespace/hostname"); shared with the service's
    /// own map key where the source could intern it.
    pub key: Arc<str>,
    pub ports: Vec<PortMapping>,
}

/// A workload's namespace, network, identity and placement: one shared
/// value for the replicas of a deployment on one node where the source
/// interns it (one pointer in each workload, not one for this and one for
/// the placement: 100k workloads, 0.8 MB).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Scope {
    pub namespace: Box<str>,
    pub network: Box<str>,
    /// Empty: Istio's defaults ("cluster.local", "default").
    pub trust_domain: Box<str>,
    pub service_account: Box<str>,
    /// Istio's canonical service and revision (the telemetry labels);
    /// empty: from the workload's labels, as Istio derives them.
    pub canonical_name: Box<str>,
    pub canonical_revision: Box<str>,
    /// Where it runs (istiod sends node and cluster for every pod).
    pub placement: Option<Placement>,
}

/// The parts of a workload most do not have, in one optional box.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadExtra {
    /// Istio's Workload.hostname (ServiceEntry resolution DNS): the
    /// addresses are whatever this name resolves to, looked up by the
    /// daemon's resolver. Exclusive with `addresses`.
    pub hostname: Option<Box<str>>,
    /// Connections to this workload (direct, or picked as a service's
    /// endpoint) go to this waypoint instead.
    pub waypoint: Option<Waypoint>,
    /// Istio's authorization_policies: WORKLOAD_SELECTOR policies
    /// selecting this workload, as "namespace/name".
    pub policies: Vec<String>,
    /// Share of its services' connections relative to the other
    /// endpoints (Istio's Workload.capacity); 0: the default, 1.
    pub weight: u32,
    /// Labels a service's canary split selects by (config file).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// One workload.
#[derive(Clone)]
pub struct Workload {
    /// The uid, then the name unless the name is the uid's tail (Istio's
    /// uids end in "/<name>"): one allocation for both.
    ident: Box<str>,
    uid_len: u32,
    name_at: u32,
    /// The data path's id for this uid; set by the `Workloads` holding it.
    id: u32,
    pub scope: Arc<Scope>,
    pub addresses: Addresses,
    /// Services this workload backs, sorted by key, each once. Replicas of
    /// one deployment back the same services with the same ports, so a
    /// source can share one list between them.
    pub services: Arc<[ServiceRef]>,
    pub status: HealthStatus,
    /// hostNetwork pods share the node's address: they serve as endpoints
    /// but get no direct-access entry (the address is not theirs alone).
    pub host_network: bool,
    pub extra: Option<Box<WorkloadExtra>>,
}

impl Workload {
    pub fn new(uid: &str, name: &str, namespace: &str) -> Workload {
        let (ident, name_at) = match uid.strip_suffix(name) {
            Some(head) => (Box::from(uid), head.len()),
            None => ([uid, name].concat().into_boxed_str(), uid.len()),
        };
        Workload {
            ident,
            uid_len: uid.len() as u32,
            name_at: name_at as u32,
            id: 0,
            scope: Arc::new(Scope {
                namespace: namespace.into(),
                ..Scope::default()
            }),
            addresses: Addresses::None,
            services: Arc::from([]),
            status: HealthStatus::Healthy,
            host_network: false,
            extra: None,
        }
    }

    pub fn uid(&self) -> &str {
        &self.ident[..self.uid_len as usize]
    }

    pub fn name(&self) -> &str {
        &self.ident[self.name_at as usize..]
    }

    /// The data-path id; 0 until the workload is in a `Workloads`.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn hostname(&self) -> Option<&str> {
        self.extra.as_ref()?.hostname.as_deref()
    }

    pub fn waypoint(&self) -> Option<&Waypoint> {
        self.extra.as_ref()?.waypoint.as_ref()
    }

    pub fn placement(&self) -> Option<&Placement> {
        self.scope.placement.as_ref()
    }

    /// Sets where it runs (in the shared scope).
    pub fn set_placement(&mut self, placement: Option<Placement>) {
        if self.scope.placement != placement {
            self.scope = Arc::new(Scope {
                placement,
                ..(*self.scope).clone()
            });
        }
    }

    pub fn namespace(&self) -> &str {
        &self.scope.namespace
    }

    pub fn network(&self) -> &str {
        &self.scope.network
    }

    pub fn set_network(&mut self, network: &str) {
        if network != self.network() {
            self.scope = Arc::new(Scope {
                network: network.into(),
                ..(*self.scope).clone()
            });
        }
    }

    /// Sets the service account and trust domain (empty: Istio's default).
    pub fn set_identity(&mut self, trust_domain: &str, service_account: &str) {
        if *self.scope.trust_domain != *trust_domain
            || *self.scope.service_account != *service_account
        {
            self.scope = Arc::new(Scope {
                trust_domain: trust_domain.into(),
                service_account: service_account.into(),
                ..(*self.scope).clone()
            });
        }
    }

    /// Who the workload's connections come from, for authorization (as
    /// istiod would issue its certificate).
    pub fn identity(&self) -> crate::authz::Identity {
        let or = |s: &str, default: &str| if s.is_empty() { default } else { s }.to_string();
        crate::authz::Identity {
            trust_domain: or(&self.scope.trust_domain, "cluster.local"),
            namespace: self.namespace().to_string(),
            service_account: or(&self.scope.service_account, "default"),
        }
    }

    /// Sets the canonical service and revision (empty: derived).
    pub fn set_canonical(&mut self, name: &str, revision: &str) {
        if *self.scope.canonical_name != *name || *self.scope.canonical_revision != *revision {
            self.scope = Arc::new(Scope {
                canonical_name: name.into(),
                canonical_revision: revision.into(),
                ..(*self.scope).clone()
            });
        }
    }

    /// The first of `keys` among the workload's labels.
    fn label(&self, keys: &[&str]) -> Option<&str> {
        let labels = self.labels()?;
        keys.iter().find_map(|k| labels.get(*k).map(String::as_str))
    }

    /// Istio's canonical service: as the source gave it, else the pod
    /// labels service.istio.io/canonical-name, app.kubernetes.io/name, app,
    /// else the workload's name.
    pub fn canonical_name(&self) -> &str {
        match &*self.scope.canonical_name {
            "" => self
                .label(&[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ])
                .unwrap_or(self.name()),
            n => n,
        }
    }

    /// Istio's canonical revision: as the source gave it, else the labels
    /// service.istio.io/canonical-revision, app.kubernetes.io/version,
    /// version, else "latest".
    pub fn canonical_revision(&self) -> &str {
        match &*self.scope.canonical_revision {
            "" => self
                .label(&[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ])
                .unwrap_or("latest"),
            r => r,
        }
    }

    pub fn weight(&self) -> u32 {
        super::weight(self.extra.as_ref().map_or(1, |e| e.weight))
    }

    pub fn labels(&self) -> Option<&std::collections::BTreeMap<String, String>> {
        self.extra.as_ref().map(|e| &e.labels)
    }

    /// Keys ("namespace/name") of the WORKLOAD_SELECTOR policies that
    /// select this workload.
    pub fn policies(&self) -> &[String] {
        self.extra.as_ref().map_or(&[], |e| &e.policies)
    }

    /// Sets the rare parts; nothing is allocated when they are all empty.
    pub fn set_extra(&mut self, e: WorkloadExtra) {
        self.extra = (e != WorkloadExtra::default()).then(|| Box::new(e));
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |reason: String| ModelError::Workload {
            uid: self.uid().to_string(),
            reason,
        };
        if self.uid().is_empty() {
            return Err(ModelError::Workload {
                uid: format!("{}/{}", self.namespace(), self.name()),
                reason: "uid is empty".into(),
            });
        }
        if let Some(h) = self.hostname() {
            if !self.addresses.is_empty() {
                return Err(err(format!(
                    "hostname {h:?} and addresses are exclusive: the addresses come from DNS"
                )));
            }
            super::check_hostname(h).map_err(|e| err(format!("hostname {h:?}: {e}")))?;
        }
        // Any source: a port list entry for service port 0 names no port.
        for r in self.services.iter() {
            if r.ports.iter().any(|p| p.service_port == 0) {
                return Err(err(format!(
                    "services[{:?}]: service_port 0 is not a port",
                    r.key
                )));
            }
        }
        // Counted in canonical form: a v4-mapped address is an IPv4 one.
        let v4 = self
            .addresses
            .iter()
            .filter(|a| super::canonical(**a).is_ipv4())
            .count();
        let v6 = self.addresses.len() - v4;
        // The backend entry holds one address per family.
        if v4 > 1 || v6 > 1 {
            return Err(err(format!(
                "{} IPv4 and {} IPv6 addresses, at most one of each",
                v4, v6
            )));
        }
        Ok(())
    }
}

/// Equal content; the id is bookkeeping, not content.
impl PartialEq for Workload {
    fn eq(&self, o: &Self) -> bool {
        self.uid() == o.uid()
            && self.name() == o.name()
            && self.scope == o.scope
            && self.addresses == o.addresses
            && self.services == o.services
            && self.status == o.status
            && self.host_network == o.host_network
            && self.extra == o.extra
    }
}

impl Eq for Workload {}

impl fmt::Debug for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workload")
            .field("uid", &self.uid())
            .field("id", &self.id)
            .field("name", &self.name())
            .field("scope", &self.scope)
            .field("addresses", &self.addresses)
            .field("services", &self.services)
            .field("placement", &self.placement())
            .field("status", &self.status)
            .field("host_network", &self.host_network)
            .field("extra", &self.extra)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workload named after the last part of its uid (also the store's
    /// tests').
    pub(in crate::model::workload) fn wl(uid: &str) -> Workload {
        let name = uid.rsplit('/').next().unwrap();
        Workload::new(uid, name, "default")
    }

    #[test]
    fn canonical_service_and_revision_as_istio_derives_them() {
        let mut w = wl("c//Pod/ns/web-7d9-x2");
        assert_eq!(
            (w.canonical_name(), w.canonical_revision()),
            ("web-7d9-x2", "latest")
        );
        let labels = |pairs: &[(&str, &str)]| WorkloadExtra {
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        w.set_extra(labels(&[("app", "web"), ("version", "v2")]));
        assert_eq!((w.canonical_name(), w.canonical_revision()), ("web", "v2"));
        w.set_extra(labels(&[
            ("app", "web"),
            ("app.kubernetes.io/name", "web-k"),
            ("service.istio.io/canonical-name", "web-c"),
            ("version", "v2"),
            ("app.kubernetes.io/version", "v3"),
        ]));
        assert_eq!(
            (w.canonical_name(), w.canonical_revision()),
            ("web-c", "v3")
        );
        // What the source says (xDS canonical_name / _revision) wins.
        w.set_canonical("web-x", "v9");
        assert_eq!(
            (w.canonical_name(), w.canonical_revision()),
            ("web-x", "v9")
        );
    }

    #[test]
    fn uid_and_name_share_one_allocation() {
        let w = Workload::new("Kubernetes//Pod/default/web-1", "web-1", "default");
        assert_eq!(
            (w.uid(), w.name()),
            ("Kubernetes//Pod/default/web-1", "web-1")
        );
        let w = Workload::new("vm-7", "database", "default");
        assert_eq!((w.uid(), w.name()), ("vm-7", "database"));
        let w = Workload::new("x", "", "default");
        assert_eq!((w.uid(), w.name()), ("x", ""));
    }
}
