//! A daemon's HTTP servers in tests: free loopback ports for them and a
//! minimal HTTP/1.1 client (std only: a test must see the status line and
//! body exactly as sent, with no client library in between).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

/// A port on 127.0.0.1 nothing listens on right now: bound to port 0 and
/// released. Another process could take it before the daemon does; the
/// kernel hands ports out in sequence, so that is unlikely in a test run.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Loopback ports for the metrics, admin and readiness servers.
#[derive(Debug, Clone, Copy)]
pub struct HttpPorts {
    pub metrics: u16,
    pub admin: u16,
    pub readiness: u16,
}

impl HttpPorts {
    pub fn new() -> HttpPorts {
        HttpPorts {
            metrics: free_port(),
            admin: free_port(),
            readiness: free_port(),
        }
    }

    /// The daemon flags that turn the servers on at these ports.
    pub fn args(&self) -> Vec<String> {
        [
            ("--metrics-addr", self.metrics),
            ("--admin-addr", self.admin),
            ("--readiness-addr", self.readiness),
        ]
        .iter()
        .flat_map(|(f, p)| [f.to_string(), format!("127.0.0.1:{p}")])
        .collect()
    }
}

/// The daemon flags the harness adds unless a test gives its own: every
/// server off, so parallel tests never contend for the default ports;
/// connection telemetry off, so the sockops program is on the cgroup only
/// where a test asks for it (tests/telemetry.rs turns it on).
pub const OFF: [(&str, &str); 4] = [
    ("--metrics-addr", "off"),
    ("--admin-addr", "off"),
    ("--readiness-addr", "off"),
    ("--telemetry", "off"),
];

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// One request to 127.0.0.1:`port`; Err if nothing answers.
pub fn request(method: &str, port: u16, path: &str) -> Result<Response, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let raw = String::from_utf8(raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Response {
        status,
        content_type,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn get(port: u16, path: &str) -> Response {
    request("GET", port, path).unwrap_or_else(|e| panic!("GET :{port}{path}: {e}"))
}

/// GETs until the server answers (it binds after the programs are
/// attached), at most `within`.
pub fn get_when_up(port: u16, path: &str, within: Duration) -> Response {
    let deadline = Instant::now() + within * super::time_scale();
    loop {
        match request("GET", port, path) {
            Ok(r) => return r,
            Err(e) if Instant::now() > deadline => panic!("GET :{port}{path}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The value of the one sample `series` (name with labels, exactly as
/// exposed, e.g. `kmesh_map_entries{map="km_vip"}`) in a metrics text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The daemon's /metrics on `ports`, waiting up to 10 s for the server:
/// a 200 in OpenMetrics text, or the test fails.
pub fn scrape(ports: &HttpPorts) -> String {
    let r = get_when_up(ports.metrics, "/metrics", Duration::from_secs(10));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.content_type.starts_with("application/openmetrics-text"),
        "{}",
        r.content_type
    );
    r.body
}
