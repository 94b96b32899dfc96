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

use super::{Action, Match, Policy, ServiceAccountMatch, StringMatch};

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
}

/// Decides a connection against the policies that apply to its
/// destination (PolicyStore::applicable).
pub fn decide<'a>(policies: impl IntoIterator<Item = &'a Policy>, conn: &Conn) -> Decision {
    let policies: Vec<&Policy> = policies.into_iter().collect();
    let verdict_of = |dry: bool| {
        let counts = |p: &&&Policy| !p.dry_run || dry;
        if let Some(p) = policies
            .iter()
            .filter(counts)
            .find(|p| p.action == Action::Deny && matches(p, conn))
        {
            return Verdict::Denied(p.key());
        }
        let mut allows = policies
            .iter()
            .filter(counts)
            .filter(|p| p.action == Action::Allow)
            .peekable();
        if allows.peek().is_none() {
            return Verdict::Allow;
        }
        if allows.any(|p| matches(p, conn)) {
            Verdict::Allow
        } else {
            Verdict::NotAllowed
        }
    };
    Decision {
        verdict: verdict_of(false),
        with_dry_run: verdict_of(true),
    }
}

/// Whether `p` matches `conn`, ignoring its action.
pub fn matches(p: &Policy, conn: &Conn) -> bool {
    p.rules.iter().any(|rule| {
        rule.clauses.iter().all(|clause| {
            clause.matches.is_empty()
                || clause
                    .matches
                    .iter()
                    .any(|m| !m.is_empty() && match_one(m, conn))
        })
    })
}

fn match_one(m: &Match, conn: &Conn) -> bool {
    let id = conn.src_identity;
    let ns = id.map_or("", |i| i.namespace.as_str());
    let principal = id.map(Identity::principal);
    field(&m.destination_ips, &m.not_destination_ips, |c| {
        c.contains(conn.dst)
    }) && field(&m.source_ips, &m.not_source_ips, |c| c.contains(conn.src))
        && field(&m.destination_ports, &m.not_destination_ports, |p| {
            *p == conn.dst_port
        })
        && field(&m.service_accounts, &m.not_service_accounts, |sa| {
            sa_matches(sa, id)
        })
        && field(&m.principals, &m.not_principals, |p| {
            principal.as_deref().is_some_and(|id| string_matches(p, id))
        })
        && field(&m.namespaces, &m.not_namespaces, |n| string_matches(n, ns))
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

fn sa_matches(m: &ServiceAccountMatch, id: Option<&Identity>) -> bool {
    id.is_some_and(|i| i.namespace == m.namespace && i.service_account == m.service_account)
}
