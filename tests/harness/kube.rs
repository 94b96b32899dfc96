//! A stand-in for the Kubernetes API server (there is none on these
//! machines): serves the pod and namespace objects under tests/data/kube,
//! in the API server's JSON format, to kube-rs clients.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{json, Value};

/// A stand-in for the API server: GET of the fixture files under
/// tests/data/kube, by path; 404 (a Status object) otherwise. Records the
/// paths asked for.
pub struct ApiServer {
    pub addr: String,
    pub asked: Arc<Mutex<Vec<String>>>,
}

pub fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kube")
        .join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn api_server() -> ApiServer {
    let mut routes: HashMap<String, String> = HashMap::new();
    for ns in ["mesh", "plain"] {
        routes.insert(
            format!("/api/v1/namespaces/{ns}"),
            fixture(&format!("namespace-{ns}.json")),
        );
    }
    for e in fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kube")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("pod-") {
            let v: Value = serde_json::from_str(&fixture(&name)).unwrap();
            let m = &v["metadata"];
            routes.insert(
                format!(
                    "/api/v1/namespaces/{}/pods/{}",
                    m["namespace"].as_str().unwrap(),
                    m["name"].as_str().unwrap()
                ),
                fixture(&name),
            );
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            // Headers up to the blank line; GETs carry no body.
            let mut h = String::new();
            while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let path = path.split('?').next().unwrap().to_string();
            log.lock().unwrap().push(path.clone());
            let (status, body) = match routes.get(&path) {
                Some(b) => ("200 OK", b.clone()),
                None => (
                    "404 Not Found",
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": format!("{path} not found"),
                        "reason": "NotFound", "code": 404})
                    .to_string(),
                ),
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.flush();
            let mut sink = [0u8; 1];
            let _ = s.set_read_timeout(Some(Duration::from_millis(10)));
            let _ = s.read(&mut sink);
        }
    });
    ApiServer { addr, asked }
}

pub fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let p = dir.join("kubeconfig");
    fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kmt\n  cluster:\n    server: http://{server}\n\
             contexts:\n- name: kmt\n  context:\n    cluster: kmt\n    user: kmt\n\
             current-context: kmt\nusers:\n- name: kmt\n  user: {{}}\n"
        ),
    )
    .unwrap();
    p
}
