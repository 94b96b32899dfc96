//! Deciding one connection, with ztunnel's semantics (istio/ztunnel
//! src/rbac.rs and ProxyState::assert_rbac, read for facts):
//! - any matching DENY denies; with no ALLOW policy the connection is
//!   allowed; otherwise some ALLOW must match;
//! - a policy with no rules matches nothing; a rule with no clauses, and a
//!   clause with no matches, match everything; a match with every field
//!   empty is skipped (so a clause of only such matches matches nothing);
//! - a source without an identity (the mesh knows no workload at its
//!   address) has namespace "" and no principal: positive namespace,
//!   principal and service-account matches fail for it, their `not_`
//!   forms match;
//! - dry-run policies never change the verdict; what they would have done
//!   is reported beside it.

use std::net::IpAddr;

use super::{Action, Cidr, Match, Policy, ServiceAccountMatch, StringMatch};

/// A source workload's identity, as its SPIFFE id would carry it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// The principal as policies match it: the SPIFFE id without its
    /// scheme.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// What a decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub src_identity: Option<&'a Identity>,
}

/// The answers a decision needs about one connection: each condition a
/// match can hold. A concrete connection (`Conn`) answers them from its
/// addresses; the compiler (compile.rs) from the classes it reduced them
/// to, so both go through the one evaluator below.
pub trait Facts {
    fn src_in(&self, c: &Cidr) -> bool;
    fn dst_in(&self, c: &Cidr) -> bool;
    fn port_is(&self, port: u16) -> bool;
    fn namespace_is(&self, m: &StringMatch) -> bool;
    fn principal_is(&self, m: &StringMatch) -> bool;
    fn service_account_is(&self, m: &ServiceAccountMatch) -> bool;
}

impl Facts for Conn<'_> {
    fn src_in(&self, c: &Cidr) -> bool {
        c.contains(self.src)
    }
    fn dst_in(&self, c: &Cidr) -> bool {
        c.contains(self.dst)
    }
    fn port_is(&self, port: u16) -> bool {
        port == self.dst_port
    }
    fn namespace_is(&self, m: &StringMatch) -> bool {
        identity_namespace(self.src_identity, m)
    }
    fn principal_is(&self, m: &StringMatch) -> bool {
        identity_principal(self.src_identity, m)
    }
    fn service_account_is(&self, m: &ServiceAccountMatch) -> bool {
        identity_service_account(self.src_identity, m)
    }
}

/// Identity conditions, shared by `Conn` and the compiler's identity
/// classes. No identity: namespace "", no principal, no service account.
pub fn identity_namespace(id: Option<&Identity>, m: &StringMatch) -> bool {
    string_matches(m, id.map_or("", |i| i.namespace.as_str()))
}

pub fn identity_principal(id: Option<&Identity>, m: &StringMatch) -> bool {
    id.is_some_and(|i| string_matches(m, &i.principal()))
}

pub fn identity_service_account(id: Option<&Identity>, m: &ServiceAccountMatch) -> bool {
    id.is_some_and(|i| i.namespace == m.namespace && i.service_account == m.service_account)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// A DENY policy matched (its key).
    Denied(String),
    /// ALLOW policies exist and none matched.
    NotAllowed,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        *self == Verdict::Allow
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What is enforced.
    pub verdict: Verdict,
    /// What the verdict would be if the dry-run policies were enforced too.
    pub with_dry_run: Verdict,
    /// The ALLOW policy that allowed the connection (the first in
    /// applicable order), if the verdict is Allow because of one.
    pub allowed_by: Option<String>,
    /// The dry-run policy that would have denied it: the DENY that would
    /// have matched, or the first dry-run ALLOW when only dry-run ALLOWs
    /// made it not allowed.
    pub dry_run_by: Option<String>,
}

/// Decides a connection against the policies that apply to its
/// destination (PolicyStore::applicable).
pub fn decide<'a>(policies: impl IntoIterator<Item = &'a Policy>, conn: &Conn) -> Decision {
    decide_with(policies, conn)
}

/// `decide` over any source of facts.
pub fn decide_with<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    facts: &impl Facts,
) -> Decision {
    let policies: Vec<&Policy> = policies.into_iter().collect();
    // (verdict, the ALLOW that allowed)
    let verdict_of = |dry: bool| -> (Verdict, Option<&Policy>) {
        let counts = |p: &&&Policy| !p.dry_run || dry;
        if let Some(p) = policies
            .iter()
            .filter(counts)
            .find(|p| p.action == Action::Deny && matches(p, facts))
        {
            return (Verdict::Denied(p.key()), None);
        }
        let mut allows = policies
            .iter()
            .filter(counts)
            .filter(|p| p.action == Action::Allow)
            .peekable();
        if allows.peek().is_none() {
            return (Verdict::Allow, None);
        }
        match allows.find(|p| matches(p, facts)) {
            Some(p) => (Verdict::Allow, Some(*p)),
            None => (Verdict::NotAllowed, None),
        }
    };
    let (verdict, allowed_by) = verdict_of(false);
    let (with_dry_run, _) = verdict_of(true);
    let dry_run_by = match (&verdict, &with_dry_run) {
        (Verdict::Allow, Verdict::Denied(k)) => Some(k.clone()),
        (Verdict::Allow, Verdict::NotAllowed) => policies
            .iter()
            .find(|p| p.dry_run && p.action == Action::Allow)
            .map(|p| p.key()),
        _ => None,
    };
    Decision {
        verdict,
        with_dry_run,
        allowed_by: allowed_by.map(Policy::key),
        dry_run_by,
    }
}

/// Whether `p` matches, ignoring its action.
pub fn matches(p: &Policy, facts: &impl Facts) -> bool {
    p.rules.iter().any(|rule| {
        rule.clauses.iter().all(|clause| {
            clause.matches.is_empty()
                || clause
                    .matches
                    .iter()
                    .any(|m| !m.is_empty() && match_one(m, facts))
        })
    })
}

fn match_one(m: &Match, f: &impl Facts) -> bool {
    field(&m.destination_ips, &m.not_destination_ips, |c| f.dst_in(c))
        && field(&m.source_ips, &m.not_source_ips, |c| f.src_in(c))
        && field(&m.destination_ports, &m.not_destination_ports, |p| {
            f.port_is(*p)
        })
        && field(&m.service_accounts, &m.not_service_accounts, |sa| {
            f.service_account_is(sa)
        })
        && field(&m.principals, &m.not_principals, |p| f.principal_is(p))
        && field(&m.namespaces, &m.not_namespaces, |n| f.namespace_is(n))
}

/// A field and its `not_` form: an empty list is no condition.
fn field<T>(positive: &[T], negative: &[T], mut hit: impl FnMut(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&mut hit)) && !negative.iter().any(hit)
}

pub fn string_matches(m: &StringMatch, s: &str) -> bool {
    match m {
        StringMatch::Exact(x) => s == x,
        StringMatch::Prefix(x) => s.starts_with(x.as_str()),
        StringMatch::Suffix(x) => s.ends_with(x.as_str()),
        StringMatch::Presence {} => !s.is_empty(),
    }
}
