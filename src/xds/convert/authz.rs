//! istio.security.Authorization into authz::Policy. Stricter than ztunnel
//! where ztunnel silently drops a part (a malformed CIDR, a string match of
//! no known kind, a port past 65535): dropping a condition widens an ALLOW
//! policy, so such a policy is refused by name instead (NACKed).

use prost::Message;

use super::{ip_from_bytes, InvalidResource};
use crate::{
    authz::{Action, Cidr, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch},
    xds::proto::security as pb,
};

/// Decodes and checks one istio.security.Authorization resource.
pub fn authorization(name: &str, bytes: &[u8]) -> Result<Policy, InvalidResource> {
    let err = |reason: String| InvalidResource {
        name: name.to_string(),
        reason,
    };
    let a = pb::Authorization::decode(bytes)
        .map_err(|e| err(format!("not an istio.security.Authorization: {e}")))?;
    let scope = match pb::Scope::try_from(a.scope) {
        Ok(pb::Scope::Global) => Scope::Global,
        Ok(pb::Scope::Namespace) => Scope::Namespace,
        Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(err(format!("scope {} is unknown", a.scope))),
    };
    let action = match pb::Action::try_from(a.action) {
        Ok(pb::Action::Allow) => Action::Allow,
        Ok(pb::Action::Deny) => Action::Deny,
        Err(_) => return Err(err(format!("action {} is unknown", a.action))),
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for (r, rule) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let matches = clause
                .matches
                .iter()
                .enumerate()
                .map(|(m, x)| one(x, &format!("rules[{r}].clauses[{c}].matches[{m}]")))
                .collect::<Result<_, _>>()
                .map_err(err)?;
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    let p = Policy {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        dry_run: a.dry_run,
        rules,
    };
    p.validate().map_err(|e| err(e.to_string()))?;
    Ok(p)
}

fn one(m: &pb::Match, at: &str) -> Result<Match, String> {
    let strings = |v: &[pb::StringMatch], f: &str| {
        v.iter()
            .enumerate()
            .map(|(i, s)| string(s).ok_or_else(|| format!("{at}.{f}[{i}] has no known match kind")))
            .collect::<Result<Vec<_>, _>>()
    };
    let cidrs = |v: &[pb::Address], f: &str| {
        v.iter()
            .enumerate()
            .map(|(i, a)| {
                let what = format!("{at}.{f}[{i}]");
                let ip = ip_from_bytes(&a.address, &what)?;
                let len =
                    u8::try_from(a.length).map_err(|_| format!("{what}: prefix {}", a.length))?;
                Cidr::new(ip, len).map_err(|e| format!("{what}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |v: &[u32], f: &str| {
        v.iter()
            .map(|p| u16::try_from(*p).map_err(|_| format!("{at}.{f}: {p} is not a port")))
            .collect::<Result<Vec<_>, _>>()
    };
    let sas = |v: &[pb::ServiceAccountMatch]| {
        v.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(Match {
        namespaces: strings(&m.namespaces, "namespaces")?,
        not_namespaces: strings(&m.not_namespaces, "not_namespaces")?,
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        principals: strings(&m.principals, "principals")?,
        not_principals: strings(&m.not_principals, "not_principals")?,
        source_ips: cidrs(&m.source_ips, "source_ips")?,
        not_source_ips: cidrs(&m.not_source_ips, "not_source_ips")?,
        destination_ips: cidrs(&m.destination_ips, "destination_ips")?,
        not_destination_ips: cidrs(&m.not_destination_ips, "not_destination_ips")?,
        destination_ports: ports(&m.destination_ports, "destination_ports")?,
        not_destination_ports: ports(&m.not_destination_ports, "not_destination_ports")?,
    })
}

fn string(s: &pb::StringMatch) -> Option<StringMatch> {
    use pb::string_match::MatchType;
    Some(match s.match_type.as_ref()? {
        MatchType::Exact(x) => StringMatch::Exact(x.clone()),
        MatchType::Prefix(x) => StringMatch::Prefix(x.clone()),
        MatchType::Suffix(x) => StringMatch::Suffix(x.clone()),
        MatchType::Presence(_) => StringMatch::Presence {},
    })
}
