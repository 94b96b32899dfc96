//! Policies → the data path's tables (bpf/lib/authz.h).
//!
//! A verdict depends on four inputs: the source's identity, the source
//! address, the destination address and the destination port. The
//! policies that apply to a destination (its "set") can only tell apart
//! the values their conditions name, so each input reduces to a class: the
//! tuple of answers it gives to every condition of that kind. A dense table
//! then gives the outcome of every class combination, computed by the same
//! evaluator that decides a concrete connection (`eval::decide_with` over
//! the classes' answers); the data path only looks classes and outcomes up.
//! Class 0 of each input is the answer tuple of every value no table entry
//! names (no identity, no named prefix, an unnamed port), so those values
//! need no entry.
//!
//! A set is split in two parts, its DENY policies and its ALLOW policies,
//! each with its own classes and table, and the data path combines the two
//! outcomes as the evaluator does (any matching DENY denies; otherwise some
//! ALLOW must match if any exists). Tables grow with the product of the
//! classes of one part, so the common shape "deny these address ranges,
//! allow these identities" adds up instead of multiplying.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::{
    eval::{self, Facts},
    Action, Cidr, Identity, Policy, ServiceAccountMatch, StringMatch,
};

/// A destination this node enforces: a workload with an address in an
/// enrolled netns here.
#[derive(Debug, Clone)]
pub struct Destination<'a> {
    pub uid: &'a str,
    pub addrs: Vec<IpAddr>,
    /// The policies that apply to it, in applicable order.
    pub policies: Vec<Arc<Policy>>,
}

/// The DENY part's outcome for one class combination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DenyOutcome {
    /// An enforced DENY matches.
    pub denied: bool,
    /// No enforced DENY matches, a dry-run one does.
    pub dry_denied: bool,
    /// Index (PolicyIndex) of the first enforced DENY that matches (0: none,
    /// or a policy past the counters' room).
    pub policy: u32,
    /// Index of the first dry-run DENY that matches, as `policy`.
    pub dry_policy: u32,
}

/// The ALLOW part's outcome for one class combination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AllowOutcome {
    /// Enforced ALLOW policies exist and none matches.
    pub not_allowed: bool,
    /// Counting the dry-run ones too, ALLOW policies exist and none matches.
    pub dry_not_allowed: bool,
    /// The first enforced ALLOW that matches; 0: none.
    pub policy: u32,
    /// The first dry-run ALLOW of the set, when only the dry-run ones make
    /// the connection not allowed; 0 otherwise.
    pub dry_policy: u32,
}

/// (identity class, source class, destination class, port class).
pub type Combo = (u32, u32, u32, u32);

/// One part's classes and table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Part<T> {
    pub ports: BTreeMap<u16, u32>,
    /// Source prefixes (IPv4 as IPv4) → class.
    pub sources: BTreeMap<(IpAddr, u8), u32>,
    pub table: BTreeMap<Combo, T>,
    /// The answer tuple of each identity class, so that a class number
    /// keeps its meaning while the core is unchanged.
    pub id_classes: Vec<Vec<bool>>,
    /// The part holds policies (else the data path skips its table).
    pub has_policies: bool,
}

impl<T> Part<T> {
    fn entries(&self) -> usize {
        self.ports.len() + self.sources.len() + self.table.len()
    }
}

/// What one set's tables hold, less the identity entries: two sets with
/// equal cores decide alike for identities of equal classes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Core {
    pub deny: Part<DenyOutcome>,
    pub allow: Part<AllowOutcome>,
}

impl Core {
    pub fn entries(&self) -> usize {
        self.deny.entries() + self.allow.entries()
    }

    /// Port → (DENY class, ALLOW class), as km_authz_port holds it.
    pub fn ports(&self) -> BTreeMap<u16, (u32, u32)> {
        pair(&self.deny.ports, &self.allow.ports)
    }

    /// Source prefix → (DENY class, ALLOW class), as km_authz_src holds it.
    pub fn sources(&self) -> BTreeMap<(IpAddr, u8), (u32, u32)> {
        pair(&self.deny.sources, &self.allow.sources)
    }
}

/// Two parts' maps as one, a key missing from one being its class 0.
fn pair<K: Ord + Copy>(d: &BTreeMap<K, u32>, a: &BTreeMap<K, u32>) -> BTreeMap<K, (u32, u32)> {
    let mut out: BTreeMap<K, (u32, u32)> = d.iter().map(|(k, c)| (*k, (*c, 0))).collect();
    for (k, c) in a {
        out.entry(*k).or_default().1 = *c;
    }
    out
}

/// The tables of one policy set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// The policy keys, in applicable order: the set's name.
    pub key: Arc<str>,
    pub core: Core,
    /// Identity number → (DENY class, ALLOW class); (0, 0) left out.
    pub identities: BTreeMap<u32, (u32, u32)>,
    /// Workloads it applies to (uids), for the dump.
    pub workloads: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Compiled {
    pub sets: Vec<Set>,
    /// Destination address → (index into `sets`, its DENY and ALLOW
    /// classes).
    pub dsts: HashMap<IpAddr, (usize, (u32, u32))>,
    /// Sets that did not fit and deny every connection instead.
    pub notes: Vec<String>,
}

/// The conditions of one set, each with its position in an answer tuple.
#[derive(Default)]
struct Atoms<'p> {
    src: Index<Cidr>,
    dst: Index<Cidr>,
    ports: Index<u16>,
    /// Identity conditions: namespaces, principals, service accounts.
    ns: Index<&'p StringMatch>,
    principals: Index<&'p StringMatch>,
    sas: Index<&'p ServiceAccountMatch>,
}

struct Index<T> {
    at: HashMap<T, usize>,
    items: Vec<T>,
}

impl<T> Default for Index<T> {
    fn default() -> Self {
        Index {
            at: HashMap::new(),
            items: Vec::new(),
        }
    }
}

impl<T: std::hash::Hash + Eq + Clone> Index<T> {
    fn add(&mut self, x: T) {
        if !self.at.contains_key(&x) {
            self.at.insert(x.clone(), self.items.len());
            self.items.push(x);
        }
    }

    fn pos(&self, x: &T) -> usize {
        self.at[x]
    }
}

impl<'p> Atoms<'p> {
    fn of(policies: &'p [Arc<Policy>]) -> Self {
        let mut a = Atoms::default();
        let matches = policies
            .iter()
            .flat_map(|p| &p.rules)
            .flat_map(|r| &r.clauses)
            .flat_map(|c| &c.matches);
        for m in matches {
            m.source_ips
                .iter()
                .chain(&m.not_source_ips)
                .for_each(|c| a.src.add(*c));
            m.destination_ips
                .iter()
                .chain(&m.not_destination_ips)
                .for_each(|c| a.dst.add(*c));
            m.destination_ports
                .iter()
                .chain(&m.not_destination_ports)
                .for_each(|p| a.ports.add(*p));
            m.namespaces
                .iter()
                .chain(&m.not_namespaces)
                .for_each(|x| a.ns.add(x));
            m.principals
                .iter()
                .chain(&m.not_principals)
                .for_each(|x| a.principals.add(x));
            m.service_accounts
                .iter()
                .chain(&m.not_service_accounts)
                .for_each(|x| a.sas.add(x));
        }
        a
    }

    fn identity_answers(&self, id: Option<&Identity>) -> Vec<bool> {
        let ns = self
            .ns
            .items
            .iter()
            .map(|m| eval::identity_namespace(id, m));
        let pr = self
            .principals
            .items
            .iter()
            .map(|m| eval::identity_principal(id, m));
        let sa = self
            .sas
            .items
            .iter()
            .map(|m| eval::identity_service_account(id, m));
        ns.chain(pr).chain(sa).collect()
    }
}

/// The answers of one class combination.
struct ClassFacts<'a, 'p> {
    atoms: &'a Atoms<'p>,
    id: &'a [bool],
    src: &'a [bool],
    dst: &'a [bool],
    /// None: a port no condition names.
    port: Option<u16>,
}

impl Facts for ClassFacts<'_, '_> {
    fn src_in(&self, c: &Cidr) -> bool {
        self.src[self.atoms.src.pos(c)]
    }
    fn dst_in(&self, c: &Cidr) -> bool {
        self.dst[self.atoms.dst.pos(c)]
    }
    fn port_is(&self, port: u16) -> bool {
        self.port == Some(port)
    }
    fn namespace_is(&self, m: &StringMatch) -> bool {
        self.id[self.atoms.ns.pos(&m)]
    }
    fn principal_is(&self, m: &StringMatch) -> bool {
        self.id[self.atoms.ns.items.len() + self.atoms.principals.pos(&m)]
    }
    fn service_account_is(&self, m: &ServiceAccountMatch) -> bool {
        let a = self.atoms;
        self.id[a.ns.items.len() + a.principals.items.len() + a.sas.pos(&m)]
    }
}

/// Numbers distinct answer tuples; the tuple of class 0 is given.
struct Classes {
    by_answers: HashMap<Vec<bool>, u32>,
    answers: Vec<Vec<bool>>,
}

impl Classes {
    fn new(zero: Vec<bool>) -> Self {
        Classes {
            by_answers: HashMap::from([(zero.clone(), 0)]),
            answers: vec![zero],
        }
    }

    fn class(&mut self, answers: Vec<bool>) -> u32 {
        if let Some(c) = self.by_answers.get(&answers) {
            return *c;
        }
        let c = self.answers.len() as u32;
        self.answers.push(answers.clone());
        self.by_answers.insert(answers, c);
        c
    }
}

/// Where 1-based policy indices come from (the data path's counters).
pub trait PolicyIndex {
    fn index(&self, key: &str) -> u32;
}

/// Compiles the tables for `dsts`. `identities`: every identity the mesh
/// knows, by its number. A set whose tables would take the total past
/// `budget` entries denies every connection to its destinations instead
/// (fail closed) and is named in `notes`.
pub fn compile(
    dsts: &[Destination],
    identities: &[(u32, &Identity)],
    index: &impl PolicyIndex,
    budget: usize,
) -> Compiled {
    // Destinations grouped by their set, in first-seen order.
    let mut groups: Vec<(Arc<str>, Vec<&Destination>)> = Vec::new();
    let mut by_key: HashMap<Arc<str>, usize> = HashMap::new();
    for d in dsts.iter().filter(|d| !d.policies.is_empty()) {
        let key: Arc<str> = d
            .policies
            .iter()
            .map(|p| p.key())
            .collect::<Vec<_>>()
            .join(",")
            .into();
        let i = *by_key.entry(key.clone()).or_insert_with(|| {
            groups.push((key, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(d);
    }
    let mut out = Compiled::default();
    let mut used = 0usize;
    for (key, members) in groups {
        let policies = &members[0].policies;
        let (mut set, mut classes) =
            compile_set(key.clone(), policies, &members, identities, index);
        let size = set.core.entries() + set.identities.len();
        if used + size > budget {
            out.notes.push(format!(
                "authorization: the {} policies of {} compile to {size} table entries, more than \
                 the {} left (raise --max-authz-entries); connections to it are denied",
                policies.len(),
                members[0].uid,
                budget.saturating_sub(used)
            ));
            set = deny_all(key);
            classes.values_mut().for_each(|c| *c = (0, 0));
        }
        used += set.core.entries() + set.identities.len();
        set.workloads = members.iter().map(|d| d.uid.to_string()).collect();
        let si = out.sets.len();
        out.sets.push(set);
        out.dsts
            .extend(classes.into_iter().map(|(ip, c)| (ip, (si, c))));
    }
    out
}

/// The set that refuses everything: no class entries; the ALLOW part says
/// not allowed.
fn deny_all(key: Arc<str>) -> Set {
    let mut core = Core::default();
    core.deny.table.insert((0, 0, 0, 0), DenyOutcome::default());
    core.allow.has_policies = true;
    core.allow.table.insert(
        (0, 0, 0, 0),
        AllowOutcome {
            not_allowed: true,
            ..AllowOutcome::default()
        },
    );
    Set {
        key,
        core,
        identities: BTreeMap::new(),
        workloads: Vec::new(),
    }
}

/// One set's tables, and the classes of each of its destinations'
/// addresses.
fn compile_set(
    key: Arc<str>,
    policies: &[Arc<Policy>],
    members: &[&Destination],
    identities: &[(u32, &Identity)],
    index: &impl PolicyIndex,
) -> (Set, HashMap<IpAddr, (u32, u32)>) {
    let of = |action: Action| -> Vec<Arc<Policy>> {
        policies
            .iter()
            .filter(|p| p.action == action)
            .cloned()
            .collect()
    };
    let by = |k: Option<&str>| k.map_or(0, |k| index.index(k));
    let prefixes = source_prefixes(policies);
    let deny = compile_part(&of(Action::Deny), &prefixes, members, identities, |d| {
        DenyOutcome {
            denied: !d.verdict.allowed(),
            dry_denied: d.dry_run_by.is_some(),
            policy: match &d.verdict {
                eval::Verdict::Denied(k) => index.index(k),
                _ => 0,
            },
            dry_policy: by(d.dry_run_by.as_deref()),
        }
    });
    let allow = compile_part(&of(Action::Allow), &prefixes, members, identities, |d| {
        AllowOutcome {
            not_allowed: !d.verdict.allowed(),
            dry_not_allowed: !d.with_dry_run.allowed(),
            policy: by(d.allowed_by.as_deref()),
            dry_policy: by(d.dry_run_by.as_deref()),
        }
    });
    let mut ids: BTreeMap<u32, (u32, u32)> = deny.ids.iter().map(|(n, c)| (*n, (*c, 0))).collect();
    for (n, c) in &allow.ids {
        ids.entry(*n).or_default().1 = *c;
    }
    let dsts = deny
        .dsts
        .iter()
        .map(|(ip, c)| (*ip, (*c, allow.dsts[ip])))
        .collect();
    let set = Set {
        key,
        core: Core {
            deny: deny.part,
            allow: allow.part,
        },
        identities: ids,
        workloads: Vec::new(),
    };
    (set, dsts)
}

struct Compiled1<T> {
    part: Part<T>,
    /// Identity number → class (0 left out).
    ids: BTreeMap<u32, u32>,
    dsts: HashMap<IpAddr, u32>,
}

/// Every source prefix of the set's policies, for one trie. The trie holds
/// IPv4 as ::ffff:a.b.c.d, where an IPv6 prefix such as ::/0 would hold
/// IPv4 sources too, which no IPv6 condition does: 0.0.0.0/0 then goes
/// in as well, so an IPv4 source always finds an IPv4 prefix first.
fn source_prefixes(policies: &[Arc<Policy>]) -> Vec<Cidr> {
    let mut all = Atoms::of(policies).src.items;
    let mapped = IpAddr::V6(std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped());
    let v4_any = Cidr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0).expect("valid");
    // (Cidr::contains would see the mapped address as IPv4.)
    let holds_mapped = |c: &Cidr| c.addr.is_ipv6() && super::mask(mapped, c.len) == c.addr;
    if all.iter().any(holds_mapped) && !all.contains(&v4_any) {
        all.push(v4_any);
    }
    all
}

/// One part: the classes of `policies`' conditions and the outcome of
/// every combination (`outcome` of the evaluator's decision over them).
fn compile_part<T: Default>(
    policies: &[Arc<Policy>],
    prefixes: &[Cidr],
    members: &[&Destination],
    identities: &[(u32, &Identity)],
    outcome: impl Fn(&eval::Decision) -> T,
) -> Compiled1<T> {
    let atoms = Atoms::of(policies);
    let mut part = Part::default();
    let mut ids = Classes::new(atoms.identity_answers(None));
    let mut by_identity = BTreeMap::new();
    for (n, id) in identities {
        let c = ids.class(atoms.identity_answers(Some(id)));
        if c != 0 {
            by_identity.insert(*n, c);
        }
    }
    // Source prefixes: the data path finds the longest of `prefixes` (both
    // parts' together) holding the address, so each of them gets this
    // part's class: this part's prefixes holding it are its ancestors, and
    // no longer one of this part's holds any address it decides for.
    let mut srcs = Classes::new(vec![false; atoms.src.items.len()]);
    for x in prefixes {
        let answers = atoms
            .src
            .items
            .iter()
            .map(|c| c.len <= x.len && c.contains(x.addr))
            .collect();
        part.sources.insert((x.addr, x.len), srcs.class(answers));
    }
    // Destination addresses always have an entry: no class is implied.
    let mut dst_tuples: Vec<Vec<bool>> = Vec::new();
    let mut dst_class = HashMap::new();
    for ip in members.iter().flat_map(|d| &d.addrs) {
        let answers: Vec<bool> = atoms.dst.items.iter().map(|c| c.contains(*ip)).collect();
        let c = match dst_tuples.iter().position(|t| *t == answers) {
            Some(c) => c,
            None => {
                dst_tuples.push(answers);
                dst_tuples.len() - 1
            }
        };
        dst_class.insert(*ip, c as u32);
    }
    for (i, p) in atoms.ports.items.iter().enumerate() {
        part.ports.insert(*p, i as u32 + 1);
    }
    let ports: Vec<Option<u16>> = std::iter::once(None)
        .chain(atoms.ports.items.iter().map(|p| Some(*p)))
        .collect();
    for (ic, id) in ids.answers.iter().enumerate() {
        for (sc, src) in srcs.answers.iter().enumerate() {
            for (dc, dst) in dst_tuples.iter().enumerate() {
                for (pc, port) in ports.iter().enumerate() {
                    let facts = ClassFacts {
                        atoms: &atoms,
                        id,
                        src,
                        dst,
                        port: *port,
                    };
                    let d = eval::decide_with(policies.iter().map(|p| &**p), &facts);
                    let combo = (ic as u32, sc as u32, dc as u32, pc as u32);
                    part.table.insert(combo, outcome(&d));
                }
            }
        }
    }
    part.id_classes = ids.answers;
    part.has_policies = !policies.is_empty();
    Compiled1 {
        part,
        ids: by_identity,
        dsts: dst_class,
    }
}
