//! L4 authorization: Istio's AuthorizationPolicy as istiod sends it to
//! ambient data planes (istio.security.Authorization), as plain types. The
//! xDS source converts into these at its boundary and the config file
//! deserializes into them, so both fill one model. `eval` decides a
//! connection exactly as ztunnel does; the data path is compiled from it.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

pub mod compile;
mod eval;

pub use eval::{decide, decide_with, Conn, Decision, Facts, Identity, Verdict};

#[derive(Debug, Error, PartialEq, Eq)]
#[error("policy {policy}: {reason}")]
pub struct PolicyError {
    pub policy: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Every workload of the mesh.
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// The workloads that list the policy in their authorization_policies.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
}

/// One policy: it matches a connection if any rule does; a rule if all its
/// clauses do; a clause if any of its matches does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Evaluated and counted, never enforced.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub clauses: Vec<Clause>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clause {
    #[serde(default)]
    pub matches: Vec<Match>,
}

/// Every non-empty field must match (within a field, any entry; a `not_`
/// field, none of its entries). A match with every field empty is skipped.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Against the source's identity without "spiffe://":
    /// `<trust domain>/ns/<namespace>/sa/<service account>`.
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    pub fn is_empty(&self) -> bool {
        self == &Match::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence {},
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// An address range; a v4-mapped IPv6 range is stored as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// `addr` with `len` leading bits; the bits past them are cleared.
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, String> {
        let (addr, len) = match addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && len >= 96 => {
                (IpAddr::V4(v6.to_ipv4_mapped().expect("mapped")), len - 96)
            }
            a => (a, len),
        };
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if len > bits {
            return Err(format!(
                "{addr}/{len}: a prefix of {addr} has at most {bits} bits"
            ));
        }
        Ok(Cidr {
            addr: mask(addr, len),
            len,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// "10.0.0.0/8", "fd00::/16", or a single address.
impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s.as_str(), None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| de::Error::custom(format!("{s:?} is not an address or CIDR")))?;
        let len = match len {
            None => {
                if ip.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(l) => l
                .parse()
                .map_err(|_| de::Error::custom(format!("{s:?}: {l:?} is not a prefix length")))?,
        };
        Cidr::new(ip, len).map_err(de::Error::custom)
    }
}

impl Policy {
    /// Istio's key: "namespace/name".
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What conversion cannot see on its own: names and ports.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let err = |reason: String| PolicyError {
            policy: self.key(),
            reason,
        };
        if self.name.is_empty() {
            return Err(err("name is empty".into()));
        }
        if self.scope == Scope::Namespace && self.namespace.is_empty() {
            return Err(err("a NAMESPACE policy needs a namespace".into()));
        }
        for (r, rule) in self.rules.iter().enumerate() {
            for (c, clause) in rule.clauses.iter().enumerate() {
                for (m, x) in clause.matches.iter().enumerate() {
                    let at = || format!("rules[{r}].clauses[{c}].matches[{m}]");
                    for (field, ports) in [
                        ("destination_ports", &x.destination_ports),
                        ("not_destination_ports", &x.not_destination_ports),
                    ] {
                        if ports.contains(&0) {
                            return Err(err(format!("{}.{field}: 0 is not a port", at())));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The policies the mesh holds, by key, with the namespace index scoping
/// needs. Selection follows ztunnel: a destination workload is subject to
/// its own WORKLOAD_SELECTOR policies, its namespace's NAMESPACE policies
/// and every GLOBAL one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyStore {
    by_key: HashMap<Arc<str>, Arc<Policy>>,
    /// Namespace ("" for GLOBAL) → keys of its NAMESPACE (GLOBAL) policies.
    by_namespace: HashMap<String, BTreeSet<Arc<str>>>,
}

impl PolicyStore {
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Policy>> {
        self.by_key.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_key.values()
    }

    /// Inserts or replaces under the policy's own key.
    pub fn insert(&mut self, p: Policy) {
        self.insert_shared(Arc::new(p));
    }

    /// `insert` of a policy another store holds too.
    pub fn insert_shared(&mut self, p: Arc<Policy>) {
        let key: Arc<str> = p.key().into();
        self.remove(&key);
        if let Some(ns) = index_of(&p) {
            self.by_namespace.entry(ns).or_default().insert(key.clone());
        }
        self.by_key.insert(key, p);
    }

    /// Every policy held.
    pub fn iter_shared(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_key.values()
    }

    pub fn remove(&mut self, key: &str) -> Option<Arc<Policy>> {
        let p = self.by_key.remove(key)?;
        if let Some(ns) = index_of(&p) {
            if let Some(set) = self.by_namespace.get_mut(&ns) {
                set.remove(key);
                if set.is_empty() {
                    self.by_namespace.remove(&ns);
                }
            }
        }
        Some(p)
    }

    /// The policies that apply to a destination workload in `namespace`
    /// listing `selected` (keys "namespace/name"); each once. A key listed
    /// but not (yet) held is skipped, as ztunnel does while istiod's push
    /// is under way.
    pub fn applicable<'a>(
        &'a self,
        namespace: &str,
        selected: &'a [String],
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        self.applicable_shared(namespace, selected).map(|p| &**p)
    }

    /// `applicable`, as the store's shared handles.
    pub fn applicable_shared<'a>(
        &'a self,
        namespace: &str,
        selected: &'a [String],
    ) -> impl Iterator<Item = &'a Arc<Policy>> + 'a {
        let ns = self.by_namespace.get(namespace).into_iter().flatten();
        let global = self.by_namespace.get("").into_iter().flatten();
        let mut seen = BTreeSet::new();
        ns.chain(global)
            .map(|k| &**k)
            .chain(selected.iter().map(String::as_str))
            .filter(move |k| seen.insert(*k))
            .filter_map(|k| self.by_key.get(k))
    }
}

fn index_of(p: &Policy) -> Option<String> {
    match p.scope {
        Scope::Global => Some(String::new()),
        Scope::Namespace => Some(p.namespace.clone()),
        Scope::WorkloadSelector => None,
    }
}

#[cfg(test)]
mod compile_tests;
#[cfg(test)]
mod tests;
