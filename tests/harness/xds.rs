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
