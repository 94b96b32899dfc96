//! Test control plane handle and workload-API resource builders.

use std::net::{IpAddr, SocketAddr};

use kmesh::xds::{control_plane::ControlPlane, proto::workload as pb, to_any, ADDRESS_TYPE};

/// The in-repo delta ADS server on 127.0.0.1, on its own runtime so tests
/// stay synchronous.
pub struct Cp {
    rt: tokio::runtime::Runtime,
    pub cp: ControlPlane,
    pub addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
    tls: Option<(Vec<u8>, Vec<u8>)>,
}

impl Cp {
    /// Starts serving; `tls` is (cert PEM, key PEM) for https.
    pub fn start(tls: Option<(Vec<u8>, Vec<u8>)>) -> Cp {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let cp = ControlPlane::new();
        let task = {
            let _g = rt.enter();
            cp.serve(listener, tls.clone()).unwrap()
        };
        Cp {
            rt,
            cp,
            addr,
            task: Some(task),
            tls,
        }
    }

    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// Ends all streams and closes the listener, as if the server died.
    pub fn kill(&mut self) {
        self.cp.kill_streams();
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = self.rt.block_on(t);
        }
    }

    /// Serves again on the same port.
    pub fn restart(&mut self) {
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .unwrap();
        let _g = self.rt.enter();
        self.task = Some(self.cp.serve(listener, self.tls.clone()).unwrap());
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn address(t: pb::address::Type) -> prost_types::Any {
    to_any(ADDRESS_TYPE, &pb::Address { r#type: Some(t) })
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Service `name` in namespace default; resource name "default/<hostname>".
pub fn service_pb(name: &str, vips: &[&str], ports: &[(u32, u32)]) -> (String, pb::Service) {
    let hostname = format!("{name}.default.svc.cluster.local");
    let svc = pb::Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: hostname.clone(),
        addresses: vips
            .iter()
            .map(|v| pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(&v.parse().unwrap()),
                ..Default::default()
            })
            .collect(),
        ports: ports
            .iter()
            .map(|&(service_port, target_port)| pb::Port {
                service_port,
                target_port,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    (format!("default/{hostname}"), svc)
}

/// Workload `name` (uid Kubernetes//Pod/default/<name>) backing `services`
/// (short names in namespace default).
pub fn workload_pb(name: &str, ips: &[IpAddr], services: &[&str]) -> (String, pb::Workload) {
    let uid = format!("Kubernetes//Pod/default/{name}");
    let w = pb::Workload {
        uid: uid.clone(),
        name: name.into(),
        namespace: "default".into(),
        addresses: ips.iter().map(ip_bytes).collect(),
        services: services
            .iter()
            .map(|s| {
                (
                    format!("default/{s}.default.svc.cluster.local"),
                    pb::PortList::default(),
                )
            })
            .collect(),
        ..Default::default()
    };
    (uid, w)
}

pub fn service(name: &str, vips: &[&str], ports: &[(u32, u32)]) -> (String, prost_types::Any) {
    let (n, s) = service_pb(name, vips, ports);
    (n, address(pb::address::Type::Service(s)))
}

pub fn workload(name: &str, ips: &[IpAddr], services: &[&str]) -> (String, prost_types::Any) {
    let (n, w) = workload_pb(name, ips, services);
    (n, address(pb::address::Type::Workload(w)))
}

/// A workload given in the config file's shape (uid, name, namespace,
/// addresses, service_account, trust_domain, authorization_policies) as
/// the Address resource istiod would push; named by its uid.
pub fn workload_json(w: &serde_json::Value) -> (String, prost_types::Any) {
    let s = |k: &str| w[k].as_str().unwrap_or_default().to_string();
    let strings = |k: &str| -> Vec<String> {
        w[k].as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let wl = pb::Workload {
        uid: s("uid"),
        name: s("name"),
        namespace: s("namespace"),
        service_account: s("service_account"),
        trust_domain: s("trust_domain"),
        addresses: strings("addresses")
            .iter()
            .map(|a| ip_bytes(&a.parse().unwrap()))
            .collect(),
        authorization_policies: strings("authorization_policies"),
        ..Default::default()
    };
    (wl.uid.clone(), address(pb::address::Type::Workload(wl)))
}

/// A policy in the config file's shape as the istio.security.Authorization
/// resource istiod would push, named "namespace/name". Converted field by
/// field without validation, so invalid policies (a /40 prefix, port
/// 70000, an unknown action or scope: enum value 99) go out as given.
pub fn authorization_json(p: &serde_json::Value) -> (String, prost_types::Any) {
    use kmesh::xds::{proto::security as sec, AUTHORIZATION_TYPE};
    use serde_json::Value;
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let strings = |v: &Value| -> Vec<sec::StringMatch> {
        use sec::string_match::MatchType;
        list(v)
            .iter()
            .map(|m| {
                let (kind, x) = m.as_object().unwrap().iter().next().unwrap();
                let x = x.as_str().unwrap_or_default().to_string();
                let t = match kind.as_str() {
                    "exact" => MatchType::Exact(x),
                    "prefix" => MatchType::Prefix(x),
                    "suffix" => MatchType::Suffix(x),
                    _ => MatchType::Presence(()),
                };
                sec::StringMatch {
                    match_type: Some(t),
                }
            })
            .collect()
    };
    let cidrs = |v: &Value| -> Vec<sec::Address> {
        list(v)
            .iter()
            .map(|c| {
                let c = c.as_str().unwrap();
                let (ip, len) = c.split_once('/').unwrap_or((c, ""));
                let ip: IpAddr = ip.parse().unwrap();
                let full = if ip.is_ipv4() { 32 } else { 128 };
                sec::Address {
                    address: ip_bytes(&ip),
                    length: len.parse().unwrap_or(full),
                }
            })
            .collect()
    };
    let ports =
        |v: &Value| -> Vec<u32> { list(v).iter().map(|p| p.as_u64().unwrap() as u32).collect() };
    let sas = |v: &Value| -> Vec<sec::ServiceAccountMatch> {
        list(v)
            .iter()
            .map(|s| sec::ServiceAccountMatch {
                namespace: s["namespace"].as_str().unwrap().into(),
                service_account: s["service_account"].as_str().unwrap().into(),
            })
            .collect()
    };
    let one = |m: &Value| sec::Match {
        namespaces: strings(&m["namespaces"]),
        not_namespaces: strings(&m["not_namespaces"]),
        service_accounts: sas(&m["service_accounts"]),
        not_service_accounts: sas(&m["not_service_accounts"]),
        principals: strings(&m["principals"]),
        not_principals: strings(&m["not_principals"]),
        source_ips: cidrs(&m["source_ips"]),
        not_source_ips: cidrs(&m["not_source_ips"]),
        destination_ips: cidrs(&m["destination_ips"]),
        not_destination_ips: cidrs(&m["not_destination_ips"]),
        destination_ports: ports(&m["destination_ports"]),
        not_destination_ports: ports(&m["not_destination_ports"]),
        extensions: vec![],
    };
    let rules = list(&p["rules"])
        .iter()
        .map(|r| sec::Rule {
            clauses: list(&r["clauses"])
                .iter()
                .map(|c| sec::Clause {
                    matches: list(&c["matches"]).iter().map(one).collect(),
                })
                .collect(),
        })
        .collect();
    let e = |k: &str, names: &[&str]| {
        let v = p[k].as_str().unwrap_or_default();
        names.iter().position(|n| *n == v).map_or(99, |i| i as i32)
    };
    let a = sec::Authorization {
        name: p["name"].as_str().unwrap().into(),
        namespace: p["namespace"].as_str().unwrap().into(),
        scope: e("scope", &["GLOBAL", "NAMESPACE", "WORKLOAD_SELECTOR"]),
        action: e("action", &["ALLOW", "DENY"]),
        rules,
        dry_run: p["dry_run"].as_bool().unwrap_or(false),
        extensions: vec![],
    };
    let name = format!("{}/{}", a.namespace, a.name);
    (name, to_any(AUTHORIZATION_TYPE, &a))
}
