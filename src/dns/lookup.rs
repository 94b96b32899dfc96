//! One lookup of one host: the seam between the scheduler and hickory.

use std::{future::Future, net::IpAddr, time::Duration};

use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    lookup::Lookup as HickoryLookup,
    net::{runtime::TokioRuntimeProvider, DnsError as WireError, NetError, NoRecords},
    proto::{op::ResponseCode, rr::RecordType},
    system_conf, TokioResolver,
};

use super::{DnsError, Upstream};

/// Result of looking up A and AAAA for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// At least one address; `ttl` is the smallest TTL that bounds it.
    Found { addrs: Vec<IpAddr>, ttl: Duration },
    /// Neither A nor AAAA exists (`nxdomain`: the name itself does not).
    NotFound {
        nxdomain: bool,
        negative_ttl: Option<Duration>,
    },
    /// No usable answer (timeout, unreachable, SERVFAIL, …).
    Failed(String),
}

pub(crate) trait Lookup: Send + Sync + 'static {
    fn lookup(&self, host: &str) -> impl Future<Output = Outcome> + Send;
    /// The servers queried, for log lines.
    fn servers(&self) -> &str;
}

/// The answer for one record type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Family {
    /// `ttl` is the smallest TTL in the answer section (CNAMEs included:
    /// when an alias expires its target may change).
    Records {
        addrs: Vec<IpAddr>,
        ttl: u32,
    },
    Missing {
        nxdomain: bool,
        negative_ttl: Option<u32>,
    },
    Failed(String),
}

impl Family {
    fn from_hickory(res: Result<HickoryLookup, NetError>) -> Family {
        match res {
            Ok(l) => {
                let addrs: Vec<IpAddr> = l
                    .answers()
                    .iter()
                    .filter_map(|r| r.data.ip_addr())
                    .collect();
                match l.answers().iter().map(|r| r.ttl).min() {
                    Some(ttl) if !addrs.is_empty() => Family::Records { addrs, ttl },
                    _ => Family::Missing {
                        nxdomain: false,
                        negative_ttl: None,
                    },
                }
            }
            Err(NetError::Dns(WireError::NoRecordsFound(NoRecords {
                response_code,
                negative_ttl,
                ..
            }))) => Family::Missing {
                nxdomain: response_code == ResponseCode::NXDomain,
                negative_ttl,
            },
            Err(e) => Family::Failed(e.to_string()),
        }
    }
}

/// Merges the A and AAAA answers. Either failing fails the host: publishing
/// half an answer would drop the other family's endpoints on a lost packet.
pub(crate) fn combine(a: Family, aaaa: Family) -> Outcome {
    let secs = |s: u32| Duration::from_secs(u64::from(s));
    match (a, aaaa) {
        (Family::Failed(x), Family::Failed(y)) if x == y => Outcome::Failed(x),
        (Family::Failed(x), Family::Failed(y)) => Outcome::Failed(format!("A: {x}; AAAA: {y}")),
        (Family::Failed(x), _) => Outcome::Failed(format!("A: {x}")),
        (_, Family::Failed(y)) => Outcome::Failed(format!("AAAA: {y}")),
        (
            Family::Missing {
                nxdomain: nx_a,
                negative_ttl: n_a,
            },
            Family::Missing {
                nxdomain: nx_b,
                negative_ttl: n_b,
            },
        ) => Outcome::NotFound {
            nxdomain: nx_a && nx_b,
            negative_ttl: n_a.into_iter().chain(n_b).min().map(secs),
        },
        (x, y) => {
            let mut addrs = Vec::new();
            let mut ttl = u32::MAX;
            for f in [x, y] {
                match f {
                    Family::Records { addrs: v, ttl: t } => {
                        addrs.extend(v);
                        ttl = ttl.min(t);
                    }
                    // The missing family may appear once its negative
                    // answer expires.
                    Family::Missing {
                        negative_ttl: Some(t),
                        ..
                    } => ttl = ttl.min(t),
                    _ => {}
                }
            }
            Outcome::Found {
                addrs,
                ttl: secs(ttl),
            }
        }
    }
}

/// Lookups through hickory with its response cache disabled, so every
/// refresh reaches the server and the TTLs seen are the server's.
pub(crate) struct Hickory {
    resolver: TokioResolver,
    servers: String,
}

impl Hickory {
    pub(crate) fn new(upstream: &Upstream, timeout: Duration) -> Result<Hickory, DnsError> {
        let (config, mut opts) = match upstream {
            Upstream::System => system_conf::read_system_conf().map_err(DnsError::SystemConfig)?,
            Upstream::Servers(list) => {
                let servers = list
                    .iter()
                    .map(|s| {
                        let conn = |mut c: ConnectionConfig| {
                            c.port = s.port();
                            c
                        };
                        NameServerConfig::new(
                            s.ip(),
                            true,
                            vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
                        )
                    })
                    .collect();
                (
                    ResolverConfig::from_parts(None, Vec::new(), servers),
                    ResolverOpts::default(),
                )
            }
        };
        if config.name_servers().is_empty() {
            return Err(DnsError::NoServers);
        }
        let servers = config
            .name_servers()
            .iter()
            .map(|ns| {
                let port = ns.connections.first().map_or(53, |c| c.port);
                std::net::SocketAddr::new(ns.ip, port).to_string()
            })
            .collect::<Vec<_>>()
            .join(", ");
        // Our scheduler is the cache: a cached answer would hide a changed
        // record until hickory's copy expired, and would report TTLs
        // counted down from when it was cached.
        opts.cache_size = 0;
        // ServiceEntry hosts are DNS names; this node's /etc/hosts is not
        // the mesh's and its entries carry no TTL.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.timeout = timeout;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(DnsError::Build)?;
        Ok(Hickory { resolver, servers })
    }
}

impl Lookup for Hickory {
    async fn lookup(&self, host: &str) -> Outcome {
        for t in [RecordType::A, RecordType::AAAA] {
            // cache_size 0 should keep nothing; clearing makes sure.
            self.resolver.clear_lookup_cache(host, t);
        }
        let (a, aaaa) = tokio::join!(
            self.resolver.lookup(host, RecordType::A),
            self.resolver.lookup(host, RecordType::AAAA)
        );
        combine(Family::from_hickory(a), Family::from_hickory(aaaa))
    }

    fn servers(&self) -> &str {
        &self.servers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(addrs: &[&str], ttl: u32) -> Family {
        Family::Records {
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ttl,
        }
    }

    fn missing(nxdomain: bool, negative_ttl: Option<u32>) -> Family {
        Family::Missing {
            nxdomain,
            negative_ttl,
        }
    }

    #[test]
    fn both_families_merge_with_the_smallest_ttl() {
        let got = combine(rec(&["10.0.0.1"], 30), rec(&["fd00::1"], 7));
        assert_eq!(
            got,
            Outcome::Found {
                addrs: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
                ttl: Duration::from_secs(7),
            }
        );
    }

    #[test]
    fn one_family_missing_is_still_found() {
        let Outcome::Found { addrs, ttl } =
            combine(rec(&["10.0.0.1"], 30), missing(false, Some(5)))
        else {
            panic!("not found");
        };
        assert_eq!(addrs.len(), 1);
        assert_eq!(
            ttl,
            Duration::from_secs(5),
            "negative TTL bounds the refresh"
        );
        let Outcome::Found { ttl, .. } = combine(missing(false, None), rec(&["fd00::1"], 30))
        else {
            panic!("not found");
        };
        assert_eq!(ttl, Duration::from_secs(30));
    }

    #[test]
    fn both_missing_is_not_found() {
        assert_eq!(
            combine(missing(true, Some(9)), missing(true, None)),
            Outcome::NotFound {
                nxdomain: true,
                negative_ttl: Some(Duration::from_secs(9)),
            }
        );
        assert!(matches!(
            combine(missing(false, None), missing(true, None)),
            Outcome::NotFound {
                nxdomain: false,
                ..
            }
        ));
    }

    #[test]
    fn any_failure_fails_the_host() {
        let f = |m: &str| Family::Failed(m.into());
        assert_eq!(
            combine(f("timeout"), f("timeout")),
            Outcome::Failed("timeout".into())
        );
        assert_eq!(
            combine(rec(&["10.0.0.1"], 5), f("SERVFAIL")),
            Outcome::Failed("AAAA: SERVFAIL".into())
        );
        assert_eq!(
            combine(f("a"), f("b")),
            Outcome::Failed("A: a; AAAA: b".into())
        );
    }

    #[tokio::test]
    async fn explicit_servers_are_named_for_logs() {
        let up = Upstream::Servers(vec!["127.0.0.1:5353".parse().unwrap()]);
        let h = Hickory::new(&up, Duration::from_secs(1)).unwrap();
        assert_eq!(h.servers(), "127.0.0.1:5353");
        assert!(matches!(
            Hickory::new(&Upstream::Servers(vec![]), Duration::from_secs(1)),
            Err(DnsError::NoServers)
        ));
    }
}
