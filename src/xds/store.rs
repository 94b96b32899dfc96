//! The xDS source's resource store: what the control plane sent and the
//! model built from it, applied resource by resource. Kept apart from the
//! connection so that it outlives every stream: on a disconnect the data
//! path keeps the last accepted state, and the next stream resumes from
//! the names and versions held here.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use prost::Message;

use super::{
    convert::{self, Resource},
    proto::discovery::{self, DeltaDiscoveryResponseFrame},
    ADDRESS_TYPE, AUTHORIZATION_TYPE,
};
use crate::{
    model::{Changes, EntryKey, Interner, Model, Scope, ServiceRef},
    writer::Rejected,
};

/// The daemon's answer to a change of the store: the entries it left out of
/// the maps, or why it applied nothing. A response is ACKed only after it,
/// so the control plane never sees an ACK for what is not in the maps.
#[derive(Debug, Default)]
pub struct Verdict {
    pub rejected: Vec<Rejected>,
    /// The apply failed as a whole (e.g. the kernel refused a map write).
    pub failed: Option<String>,
}

/// Which resource names one response carried, as hashes (a set of 100k
/// names would cost megabytes for the few that are ever looked up).
pub struct Touched {
    hasher: std::hash::RandomState,
    names: HashSet<u64>,
}

impl Touched {
    fn new() -> Self {
        Touched {
            hasher: std::hash::RandomState::new(),
            names: HashSet::new(),
        }
    }

    fn add(&mut self, name: &str) {
        self.names
            .insert(std::hash::BuildHasher::hash_one(&self.hasher, name));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names
            .contains(&std::hash::BuildHasher::hash_one(&self.hasher, name))
    }
}

/// What one response did to the store.
pub struct Outcome {
    pub changed: bool,
    /// Resources refused at conversion, each named.
    pub errors: Vec<String>,
    pub touched: Touched,
}

/// The xDS source's accepted resources: the only copy the process keeps
/// (the daemon applies it to the maps in place, under the lock).
#[derive(Default)]
pub struct XdsStore {
    /// Services and workloads, as model types.
    pub model: Model,
    /// Address resource name → version, for initial_resource_versions;
    /// only for versioned resources: istiod leaves Resource.version empty
    /// for addresses (pilot/pkg/xds/workload.go), and an entry per
    /// resource would cost megabytes at 100k workloads for nothing.
    versions: HashMap<Arc<str>, Arc<str>>,
    /// Address resources whose name is not their model key (istiod names
    /// them by key, but the protocol does not promise it).
    aliases: HashMap<Arc<str>, Alias>,
    /// Authorization resource name → (version, policy key); the policies
    /// themselves are in `model.policies`.
    authorizations: HashMap<String, (String, String)>,
    /// Scopes (namespace, network, identity, placement), and service memberships
    /// (replicas of a deployment back the same services on the same
    /// ports), shared by the workloads.
    scopes: Interner<Scope>,
    memberships: Interner<[ServiceRef]>,
    /// The versions the last response replaced with different content,
    /// until its verdict: an update the daemon leaves out goes back to
    /// the version it replaced (as a NACKed update should).
    replaced: HashMap<EntryKey, (String, Arc<str>, Resource)>,
    /// Resources refused at conversion (NACKed, never stored), by name,
    /// until a valid version or a removal replaces them: for the dump.
    refused: BTreeMap<String, String>,
    /// What changed since the daemon last took it, for an incremental
    /// apply.
    changes: Changes,
}

enum Alias {
    Service(Arc<str>),
    Workload(Box<str>),
}

impl Alias {
    fn key(&self) -> &str {
        match self {
            Alias::Service(k) => k,
            Alias::Workload(k) => k,
        }
    }
}

pub type SharedStore = Arc<Mutex<XdsStore>>;

impl XdsStore {
    pub fn authorizations(&self) -> usize {
        self.authorizations.len()
    }

    /// Resource name → version for a stream's initial_resource_versions.
    pub(super) fn versions(&self, type_url: &str) -> HashMap<String, String> {
        match type_url {
            ADDRESS_TYPE => {
                let aliased: HashSet<&str> = self.aliases.values().map(Alias::key).collect();
                let keys = self.model.services.keys().map(|k| &**k);
                keys.chain(self.model.workloads.keys())
                    .filter(|k| !aliased.contains(k))
                    .chain(self.aliases.keys().map(|k| &**k))
                    .map(|n| {
                        let v = self.versions.get(n).map_or("", |v| &**v);
                        (n.to_string(), v.to_string())
                    })
                    .collect()
            }
            _ => self
                .authorizations
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
        }
    }

    /// The count the client's reconnect warning reports (versioned
    /// addresses only: the unversioned ones have no entry to count).
    pub(super) fn held(&self) -> usize {
        self.versions.len() + self.authorizations.len()
    }

    /// The resource name an admitted or refused model entry came from.
    pub fn resource_name(&self, entry: &EntryKey) -> Option<String> {
        let (key, service) = match entry {
            EntryKey::Service(k) => (&**k, true),
            EntryKey::Workload(k) => (&**k, false),
            EntryKey::Enrollment(_) | EntryKey::Resource(_) => return None,
        };
        let held = if service {
            self.model.services.contains_key(key)
        } else {
            self.model.workloads.contains_key(key)
        };
        if !held {
            return None;
        }
        let alias = self
            .aliases
            .iter()
            .find(|(_, a)| a.key() == key && matches!(a, Alias::Service(_)) == service);
        Some(alias.map_or(key, |(n, _)| &**n).to_string())
    }

    fn remove_address(&mut self, name: &str) -> bool {
        self.versions.remove(name);
        match self.aliases.remove(name) {
            Some(Alias::Service(k)) => self.remove_service(&k),
            Some(Alias::Workload(k)) => self.remove_workload(&k),
            // An entry under its own key: unless another resource name
            // stands for it (then `name` was never a resource).
            None if self.aliases.values().any(|a| a.key() == name) => false,
            None => self.remove_workload(name) || self.remove_service(name),
        }
    }

    fn remove_service(&mut self, key: &str) -> bool {
        let Some((k, old)) = self.model.services.remove_entry(key) else {
            return false;
        };
        self.changes.service(k, Some(old));
        true
    }

    fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.model.workloads.remove(uid) else {
            return false;
        };
        self.changes.workload(uid, Some(old));
        true
    }

    /// What changed since the last call, for the daemon's apply.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Stores one resource; returns the version of the same entry it
    /// replaced, if that differs.
    fn insert_address(
        &mut self,
        name: &str,
        version: &Arc<str>,
        res: Resource,
    ) -> Option<Resource> {
        // An update of the same entry replaces it in place: a workload
        // keeps its id (and so its map entries). A name that now stands
        // for another entry drops the old one first.
        let same = match (&res, self.aliases.get(name)) {
            (Resource::Service(s), Some(Alias::Service(k))) => **k == s.key(),
            (Resource::Workload(w), Some(Alias::Workload(k))) => **k == *w.uid(),
            (Resource::Service(s), None) => {
                name == s.key() && !self.model.workloads.contains_key(name)
            }
            (Resource::Workload(w), None) => {
                name == w.uid() && !self.model.services.contains_key(name)
            }
            _ => false,
        };
        if !same {
            self.remove_address(name);
        }
        self.versions.remove(name);
        let old = match res {
            // An unchanged resource (a reconnect resends all of them) is
            // dropped rather than stored over its equal: the stored copy
            // stays where it is and this one's allocations go straight
            // back, where replacing 100k workloads by fresh copies left
            // the heap ~2 MB more fragmented after each full resend.
            Resource::Service(svc)
                if same
                    && self
                        .model
                        .services
                        .get(svc.key().as_str())
                        .is_some_and(|o| **o == svc) =>
            {
                None
            }
            Resource::Service(svc) => {
                let key: Arc<str> = svc.key().into();
                if *key != *name {
                    self.aliases
                        .insert(name.into(), Alias::Service(key.clone()));
                }
                let old = self.model.services.insert(key.clone(), Box::new(svc));
                let same = old
                    .as_ref()
                    .is_some_and(|o| **o == *self.model.services[&key]);
                if !same && !self.changes.whole {
                    self.changes.service(key.clone(), old.clone());
                }
                old.filter(|_| !same).map(|o| Resource::Service(*o))
            }
            // (Equal by value: interning changes no content.)
            Resource::Workload(w) if same && self.model.workloads.get(w.uid()) == Some(&w) => None,
            Resource::Workload(mut w) => {
                // Share the service's key allocation (see model::ServiceRef),
                // then the whole list with other replicas.
                let refs: Vec<ServiceRef> = w
                    .services
                    .iter()
                    .map(|r| ServiceRef {
                        key: self.model.intern_service_key(&r.key),
                        ports: r.ports.clone(),
                    })
                    .collect();
                w.services = self.memberships.intern_ref(&refs);
                w.scope = self.scopes.intern(w.scope);
                if w.uid() != name {
                    self.aliases
                        .insert(name.into(), Alias::Workload(w.uid().into()));
                }
                let uid: Box<str> = w.uid().into();
                let old = self.model.workloads.insert(w);
                let same = old
                    .as_ref()
                    .is_some_and(|o| *o == self.model.workloads[&*uid]);
                if !same && !self.changes.whole {
                    self.changes.workload(&uid, old.clone());
                }
                old.filter(|_| !same).map(Resource::Workload)
            }
        };
        if !version.is_empty() {
            self.versions.insert(name.into(), version.clone());
        }
        old
    }

    /// Puts back the versions the last response replaced, for the entries
    /// in `left_out`; returns those it put back. Forgets the rest.
    pub fn restore(&mut self, left_out: &[EntryKey]) -> Vec<EntryKey> {
        let replaced = std::mem::take(&mut self.replaced);
        let mut back = Vec::new();
        for (key, (name, version, old)) in replaced {
            if left_out.contains(&key) {
                self.insert_address(&name, &version, old);
                back.push(key);
            }
        }
        back
    }

    /// Resources refused at conversion and not replaced since, as the
    /// dump lists them.
    pub fn refused(&self) -> Vec<Rejected> {
        self.refused
            .iter()
            .map(|(name, reason)| Rejected {
                entry: EntryKey::Resource(name.as_str().into()),
                reason: reason.clone(),
            })
            .collect()
    }

    /// Whether the last response replaced any entry with other content.
    pub fn replaced_any(&self) -> bool {
        !self.replaced.is_empty()
    }

    /// Applies one response; returns whether the model changed and the
    /// per-resource errors. (Public for the scale benchmark.)
    pub fn apply_response(&mut self, resp: &DeltaDiscoveryResponseFrame) -> (bool, Vec<String>) {
        let o = self.apply_response_tracked(resp);
        (o.changed, o.errors)
    }

    /// Applies one response, remembering which names it carried.
    /// Resources are decoded one at a time from the received message.
    pub fn apply_response_tracked(&mut self, resp: &DeltaDiscoveryResponseFrame) -> Outcome {
        self.replaced.clear();
        self.changes.resources += resp.resources.len() + resp.removed_resources.len();
        let mut touched = Touched::new();
        let mut errors = Vec::new();
        let mut changed = false;
        // istiod stamps a push's resources with one version: share it.
        let mut version: Arc<str> = Arc::from("");
        let addresses = resp.type_url == ADDRESS_TYPE;
        let mut services = 0;
        // Services go in first so that the workloads' service references
        // can share the services' key allocations. Each workload is stored
        // as soon as it is converted: holding 100k converted workloads
        // back would leave their temporaries as holes between the stored
        // ones (tens of MB the allocator cannot give back).
        for services_pass in [true, false] {
            // The initial sync sizes the store exactly; later responses
            // mostly replace what is there, and growth is by 1/8.
            if addresses && !services_pass && self.model.workloads.is_empty() {
                let workloads = resp.resources.len() - services;
                self.model.workloads.reserve(workloads);
            }
            for (i, raw) in resp.resources.iter().enumerate() {
                let r = match discovery::Resource::decode(raw.as_ref()) {
                    Ok(r) => r,
                    Err(e) if !services_pass => {
                        errors.push(format!("resources[{i}]: not an envoy Resource: {e}"));
                        continue;
                    }
                    Err(_) => continue,
                };
                let service = addresses
                    && r.resource
                        .as_ref()
                        .is_some_and(|a| convert::is_service(&a.value));
                if service != services_pass {
                    continue;
                }
                services += usize::from(service);
                let Some(any) = r.resource else {
                    errors.push(format!("resource {:?}: no payload", r.name));
                    continue;
                };
                if *version != *r.version {
                    version = r.version.as_str().into();
                }
                touched.add(&r.name);
                if !self.refused.is_empty() {
                    self.refused.remove(r.name.as_str());
                }
                let result = match resp.type_url.as_str() {
                    ADDRESS_TYPE => convert::address(&r.name, &any.value).map(|res| {
                        changed = true;
                        let before = self.versions.get(r.name.as_str()).cloned();
                        if let Some(old) = self.insert_address(&r.name, &version, res) {
                            let key = match &old {
                                Resource::Service(s) => EntryKey::Service(s.key().into()),
                                Resource::Workload(w) => EntryKey::Workload(w.uid().into()),
                            };
                            let before = before.unwrap_or_else(|| Arc::from(""));
                            self.replaced.insert(key, (r.name.clone(), before, old));
                        }
                    }),
                    AUTHORIZATION_TYPE => convert::authorization(&r.name, &any.value).map(|p| {
                        let key = p.key();
                        if let Some((_, old)) = self.authorizations.get(&r.name) {
                            if *old != key {
                                self.model.policies.remove(old);
                            }
                        }
                        self.model.policies.insert(p);
                        self.authorizations.insert(r.name, (r.version, key));
                        self.changes.everything();
                        changed = true;
                    }),
                    other => {
                        errors.push(format!("type {other:?} was not subscribed"));
                        break;
                    }
                };
                if let Err(e) = result {
                    errors.push(e.to_string());
                    self.refused.insert(e.name, e.reason);
                }
            }
        }
        for name in &resp.removed_resources {
            self.refused.remove(name.as_str());
            match resp.type_url.as_str() {
                ADDRESS_TYPE => changed |= self.remove_address(name),
                _ => {
                    if let Some((_, key)) = self.authorizations.remove(name) {
                        changed |= self.model.policies.remove(&key).is_some();
                        self.changes.everything();
                    }
                }
            };
        }
        // Cheap: one entry per distinct namespace, network and place.
        self.scopes.prune();
        self.memberships.prune();
        Outcome {
            changed,
            errors,
            touched,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::xds::proto::{discovery::DeltaDiscoveryResponse, workload as pb};

    fn workload(uid: &str, node: &str) -> prost_types::Any {
        let w = pb::Workload {
            uid: uid.into(),
            name: uid.rsplit('/').next().unwrap().into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 244, 0, 1]],
            node: node.into(),
            cluster_id: "Kubernetes".into(),
            ..Default::default()
        };
        let a = pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        };
        crate::xds::to_any(ADDRESS_TYPE, &a)
    }

    /// Applies (name, version, payload) additions and removals as one
    /// response, through the same wire decoding the client uses.
    pub(in crate::xds) fn apply(
        store: &mut XdsStore,
        add: &[(&str, &str, prost_types::Any)],
        remove: &[&str],
    ) -> (bool, Vec<String>) {
        let raw = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            resources: add
                .iter()
                .map(|(n, v, a)| discovery::Resource {
                    name: n.to_string(),
                    version: v.to_string(),
                    resource: Some(a.clone()),
                    ..Default::default()
                })
                .collect(),
            removed_resources: remove.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
        .encode_to_vec();
        store.apply_response(&DeltaDiscoveryResponseFrame::decode(&raw[..]).unwrap())
    }

    /// Reconnect bookkeeping without a per-resource version map: every
    /// known name is listed (versioned or not), an alias under its own
    /// name, and an aliased entry cannot be removed by its key.
    #[test]
    fn names_versions_and_aliases_survive_without_a_version_map() {
        let mut s = XdsStore::default();
        let (changed, errors) = apply(
            &mut s,
            &[
                ("c//Pod/default/a", "", workload("c//Pod/default/a", "n1")),
                ("c//Pod/default/b", "7", workload("c//Pod/default/b", "n1")),
                ("vm-entry", "", workload("c//Pod/default/c", "n2")),
            ],
            &[],
        );
        assert!(changed && errors.is_empty(), "{errors:?}");
        let v = s.versions(ADDRESS_TYPE);
        let want: HashMap<String, String> = [
            ("c//Pod/default/a", ""),
            ("c//Pod/default/b", "7"),
            ("vm-entry", ""),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .into();
        assert_eq!(v, want);
        // Workloads on one node share one placement; uids keep their ids
        // when replaced.
        let (a, b) = (
            &s.model.workloads["c//Pod/default/a"],
            &s.model.workloads["c//Pod/default/b"],
        );
        assert!(Arc::ptr_eq(&a.scope, &b.scope));
        let id = a.id();
        apply(
            &mut s,
            &[("c//Pod/default/a", "", workload("c//Pod/default/a", "n2"))],
            &[],
        );
        assert_eq!(s.model.workloads["c//Pod/default/a"].id(), id);
        assert_eq!(
            s.model.workloads["c//Pod/default/a"]
                .placement()
                .unwrap()
                .node,
            "n2"
        );

        // The aliased workload's uid is not a resource name.
        let (changed, _) = apply(&mut s, &[], &["c//Pod/default/c"]);
        assert!(!changed);
        assert!(s.model.workloads.contains_key("c//Pod/default/c"));
        let (changed, _) = apply(&mut s, &[], &["vm-entry", "c//Pod/default/b"]);
        assert!(changed);
        assert_eq!(
            s.model.workloads.keys().collect::<Vec<_>>(),
            ["c//Pod/default/a"]
        );
        assert_eq!(s.versions(ADDRESS_TYPE).len(), 1);
    }
}
