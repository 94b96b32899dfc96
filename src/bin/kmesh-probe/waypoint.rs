//! A TLV-aware test waypoint: reads the original destination the data path
//! prepends (../shared/DESIGN.md: 0x01 | u32 BE len | IP | port | 0xFE |
//! u32 0), records it, then forwards the connection there. A connection
//! that does not start with a TLV is recorded and answered with
//! "waypoint-no-tlv".

use std::{
    fs::OpenOptions,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use serde_json::json;

/// Ok(Err(first byte)) when the connection does not start with a TLV.
fn read_tlv(c: &mut TcpStream) -> io::Result<Result<SocketAddr, u8>> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut t = [0u8; 1];
    c.read_exact(&mut t)?;
    if t[0] != 0x01 {
        return Ok(Err(t[0]));
    }
    let mut len = [0u8; 4];
    c.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    let mut v = vec![0u8; len];
    c.read_exact(&mut v)?;
    let ip: IpAddr = match len {
        6 => Ipv4Addr::from(<[u8; 4]>::try_from(&v[..4]).unwrap()).into(),
        18 => Ipv6Addr::from(<[u8; 16]>::try_from(&v[..16]).unwrap()).into(),
        n => return Err(bad(format!("TLV length {n}, want 6 or 18"))),
    };
    let port = u16::from_be_bytes([v[len - 2], v[len - 1]]);
    let mut end = [0u8; 5];
    c.read_exact(&mut end)?;
    if end != [0xfe, 0, 0, 0, 0] {
        return Err(bad(format!("TLV end marker {end:02x?}")));
    }
    Ok(Ok(SocketAddr::new(ip, port)))
}

fn record(log: &PathBuf, line: serde_json::Value) {
    // One write per line: lines from concurrent connections stay whole.
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log) {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn handle(mut c: TcpStream, log: PathBuf) {
    let peer = c.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    match read_tlv(&mut c) {
        Ok(Ok(orig)) => {
            record(
                &log,
                json!({"tlv": true, "orig": orig.to_string(), "peer": peer}),
            );
            let Ok(up) = TcpStream::connect_timeout(&orig, Duration::from_secs(2)) else {
                return;
            };
            let (Ok(c2), Ok(up2)) = (c.try_clone(), up.try_clone()) else {
                return;
            };
            let t = std::thread::spawn(move || pipe(c2, up2));
            pipe(up, c);
            let _ = t.join();
        }
        Ok(Err(first)) => {
            // Answer as an echo server, so the client can check its bytes.
            record(&log, json!({"tlv": false, "peer": peer}));
            if c.write_all(b"waypoint-no-tlv\n").is_err() || c.write_all(&[first]).is_err() {
                return;
            }
            if let Ok(c2) = c.try_clone() {
                let _ = io::copy(&mut &c2, &mut c);
            }
        }
        Err(e) => record(
            &log,
            json!({"tlv": false, "error": e.to_string(), "peer": peer}),
        ),
    }
}

pub fn run(listen: SocketAddr, log: PathBuf) -> io::Result<()> {
    let l = TcpListener::bind(listen)
        .map_err(|e| io::Error::new(e.kind(), format!("bind {listen}: {e}")))?;
    println!(
        "{}",
        json!({"listening": [listen.to_string()], "name": "waypoint"})
    );
    io::stdout().flush()?;
    for c in l.incoming().flatten() {
        let log = log.clone();
        std::thread::spawn(move || handle(c, log));
    }
    Ok(())
}
