//! Same-host acceleration: client and server both enrolled on this host,
//! the daemon started with --accelerate. Data must arrive byte-exact in
//! both directions whatever path it takes, and TCP semantics (half-close,
//! reset, a full receiver) must hold.

mod harness;

use std::time::Duration;

use harness::{Env, Pod};
use serde_json::{json, Value};

fn config(client: &Pod, server: &Pod, accelerate: bool) -> Value {
    json!({
        "accelerate": accelerate,
        "enroll": {"netns": [client.path(), server.path()]},
        "services": [{
            "name": "web", "hostname": "web.default.svc.cluster.local",
            "addresses": ["10.96.0.10", "fd00:96::10"],
            "ports": [
                {"service_port": 80, "target_port": 8080},
                {"service_port": 81, "target_port": 7000},
                {"service_port": 82, "target_port": 7001}
            ]
        }],
        "workloads": [{
            "uid": "Kubernetes//Pod/default/web-1", "name": "web-1",
            "addresses": [server.v4.to_string(), server.v6.to_string()],
            "services": {"default/web.default.svc.cluster.local": {}}
        }],
    })
}

fn setup() -> (Env, Pod, Pod) {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let server = env.pod(11, &[]);
    env.serve_in_mesh(
        &server,
        &[
            format!("{}:8080", server.v4),
            format!("[{}]:8080", server.v6),
        ],
        "web-1",
        &[],
    );
    (env, client, server)
}

/// kmesh-load echo servers (what `kmesh-load hold` talks to) on the
/// targets of service ports 81 and 82, in the attached cgroup.
fn load_servers(env: &mut Env, server: &Pod) {
    let listen = [format!("{}:7000", server.v4), format!("{}:7001", server.v4)];
    env.load_serve(server, &listen, &[]);
}

const HOLD_ADDRS: [&str; 2] = ["10.96.0.10:81", "10.96.0.10:82"];

fn entries(dump: &Value) -> u64 {
    dump["maps"]["km_sock"]["entries"].as_u64().unwrap()
}

fn transfer_ok(env: &Env, client: &Pod, args: &[&str]) -> Vec<Value> {
    let (lines, ok) = env.probe(client, args);
    assert!(ok, "{lines:?}");
    lines
}

#[test]
fn accelerated_transfers_are_byte_exact_both_ways() {
    if harness::skip_unless_acceleration("accelerated_transfers_are_byte_exact_both_ways") {
        return;
    }
    let (mut env, client, server) = setup();
    let d = env.daemon(&config(&client, &server, true));
    let sizes = "1,64,4096,262144,4194304";
    for addr in ["10.96.0.10:80", "[fd00:96::10]:80"] {
        transfer_ok(
            &env,
            &client,
            &["transfer", addr, "--sizes", sizes, "--conns", "4"],
        );
    }
    transfer_ok(
        &env,
        &client,
        &[
            "transfer",
            "10.96.0.10:80",
            "--sizes",
            "100000",
            "--chunk",
            "10",
        ],
    );
    // Many concurrent connections.
    let lines = transfer_ok(
        &env,
        &client,
        &[
            "transfer",
            "10.96.0.10:80",
            "--sizes",
            "1000,10",
            "--conns",
            "64",
        ],
    );
    assert_eq!(lines.len(), 64);
    assert!(
        d.stat("accel_added") >= 2 * 73,
        "both ends of every connection"
    );
    assert!(d.stat("accel_on") > 0, "no direction was accelerated");
    // Closing either side took the sockets out of the map, and each
    // connecting end's close its km_conn entry.
    d.wait_dump(Duration::from_secs(5), |v| {
        entries(v) == 0 && v["maps"]["km_conn"]["entries"] == 0
    });
}

#[test]
fn half_close_reset_and_full_receiver_behave_like_tcp() {
    if harness::skip_unless_acceleration("half_close_reset_and_full_receiver_behave_like_tcp") {
        return;
    }
    let (mut env, client, server) = setup();
    let d = env.daemon(&config(&client, &server, true));
    // Half-close: the echo of everything sent arrives, then EOF. With
    // --late-read-ms the client half-closes first, and the echoes and the
    // server's FIN arrive while nothing reads: its socket is closed
    // (TIME_WAIT) with bytes unread, which TCP keeps readable, and so must
    // the map.
    for late in [None, Some("300")] {
        let mut args = vec![
            "transfer",
            "10.96.0.10:80",
            "--sizes",
            "1,70000",
            "--half-close",
            "--conns",
            "4",
        ];
        if let Some(ms) = late {
            args.extend(["--late-read-ms", ms]);
        }
        transfer_ok(&env, &client, &args);
    }
    // Reset mid-stream, then the server still serves.
    transfer_ok(
        &env,
        &client,
        &["transfer", "10.96.0.10:80", "--abort-after", "1048576"],
    );
    transfer_ok(
        &env,
        &client,
        &["transfer", "10.96.0.10:80", "--sizes", "4096"],
    );
    assert!(d.stat("accel_added") > 0);
    // Sockets kept for their unread bytes left at close().
    d.wait_dump(Duration::from_secs(5), |d| entries(d) == 0);
}

/// Writes after the peer closed its end: TCP lets the first one through
/// (the closed peer answers it with RST) and fails the next ones with
/// EPIPE. An accelerated direction must do the same: not fail earlier
/// (a cached redirect to the gone peer's queue would) nor hang.
#[test]
fn writes_after_the_peer_closed_fail_like_tcp() {
    if harness::skip_unless_acceleration("writes_after_the_peer_closed_fail_like_tcp") {
        return;
    }
    let (mut env, client, server) = setup();
    let addr = format!("{}:8082", server.v4);
    env.serve_in_mesh(
        &server,
        std::slice::from_ref(&addr),
        "closer",
        &["--close-after", "1"],
    );
    let writes = |env: &Env| {
        let (lines, ok) = env.probe(&client, &["after-close", &addr]);
        assert!(ok, "{lines:?}");
        lines[0]["writes"].clone()
    };
    let d = env.daemon(&config(&client, &server, false));
    let plain = writes(&env);
    assert_eq!(plain[0], json!({"ok": 1}), "plain TCP: {plain}");
    d.write_config(&config(&client, &server, true));
    std::thread::sleep(Duration::from_millis(1500));
    let on = d.stat("accel_on");
    let accel = writes(&env);
    assert!(d.stat("accel_on") >= on + 2, "both directions accelerated");
    assert_eq!(accel, plain, "accelerated vs plain TCP");
}

#[test]
fn connections_survive_enabling_acceleration_and_daemon_stop() {
    if harness::skip_unless_acceleration(
        "connections_survive_enabling_acceleration_and_daemon_stop",
    ) {
        return;
    }
    let (mut env, client, server) = setup();
    let d = env.daemon(&config(&client, &server, false));
    // Established before acceleration: stays plain and keeps working.
    let mut before = env.hold(&client, "10.96.0.10:80");
    assert_eq!(before.echo("one").unwrap(), "one");
    d.write_config(&config(&client, &server, true));
    std::thread::sleep(Duration::from_millis(1500));
    let mut after = env.hold(&client, "10.96.0.10:80");
    assert_eq!(after.echo("two").unwrap(), "two");
    assert_eq!(before.echo("three").unwrap(), "three");
    assert!(d.dump()["maps"]["km_sock"]["entries"].as_u64().unwrap() >= 2);
    // The daemon goes away: both connections keep working.
    let mut d = d;
    d.stop();
    for i in 0..5 {
        let m = format!("after-stop-{i}");
        assert_eq!(before.echo(&m).unwrap(), m);
        assert_eq!(after.echo(&m).unwrap(), m);
    }
}

/// A receiver that stops reading pushes back on an accelerated sender
/// (EAGAIN) once it holds accel_queue_limit bytes of memory, or its own
/// SO_RCVBUF if it set one: the sender's direction falls back to TCP, whose
/// flow control then applies. Plain TCP on loopback stops at about 160 KB.
/// Memory counts each queued message's overhead (~1 KiB), so 1-byte writes
/// stop after a few thousand, not 4 million (4 GB of slab, measured). The
/// bytes queued before the switch and those sent through TCP after it must
/// reach the reader once each, in order, when it starts reading.
#[test]
fn full_receiver_pushes_back_on_the_sender() {
    if harness::skip_unless_acceleration("full_receiver_pushes_back_on_the_sender") {
        return;
    }
    let (mut env, client, server) = setup();
    // The sink starts reading after this; the fill must reach EAGAIN before
    // (both stretch on a slow, emulated kernel).
    let drain_ms = (1000 * harness::time_scale()).to_string();
    let drain = ["--stall", "--drain-after-ms", drain_ms.as_str()];
    env.serve_in_mesh(&server, &[format!("{}:9091", server.v4)], "sink", &drain);
    let small = [&drain[..], &["--rcvbuf", "131072"]].concat();
    env.serve_in_mesh(&server, &[format!("{}:9092", server.v4)], "small", &small);
    let d = env.daemon(&config(&client, &server, true));
    let fill = |port: u16, extra: &[&str]| {
        let addr = format!("{}:{port}", server.v4);
        let mut args = vec!["fill", &addr, "--finish", "8388608"];
        args.extend_from_slice(extra);
        let (lines, ok) = env.probe(&client, &args);
        assert!(ok, "{lines:?}");
        let r = lines[0].clone();
        // Otherwise the sink was reading before EAGAIN: inconclusive.
        assert!(
            r["fill_ms"].as_u64().unwrap() < 800 * u64::from(harness::time_scale()),
            "{r}"
        );
        assert_eq!(r["sink"]["received"], r["total"], "{r}");
        assert_eq!(r["sink"]["in_order"], true, "{r}");
        r["written"].as_u64().unwrap()
    };
    const LIMIT: u64 = 4 << 20; // the default accel_queue_limit
    let written = fill(9091, &[]);
    assert!(
        (LIMIT / 2..LIMIT + (1 << 20)).contains(&written),
        "{written} bytes accepted before EAGAIN"
    );
    assert_eq!(d.stat("accel_pushback"), 1);
    // On TCP for good, with a reader that never redirected to it: the
    // sender left km_sock (the reader, holding its queue, stays).
    assert_eq!(d.stat("accel_left"), 1);
    // SO_RCVBUF 128 KiB (256 KiB in the kernel) is below the limit.
    let written = fill(9092, &[]);
    assert!(written < 1 << 20, "{written} bytes accepted before EAGAIN");
    assert_eq!(d.stat("accel_pushback"), 2);
    let written = fill(9091, &["--write-size", "1"]);
    assert!(written < 1 << 20, "{written} 1-byte writes before EAGAIN");
    assert_eq!(d.stat("accel_pushback"), 3);
}

/// A connection with one end outside the mesh cannot be accelerated, and
/// in km_sock its mesh end would only pay for the sockmap hooks on every
/// send and read: an accepting end does not enter (accel_skipped), a
/// connecting end leaves once its first data is acknowledged (accel_left).
/// The connections go on working, byte-exact.
#[test]
fn ends_that_cannot_be_accelerated_stay_out_of_the_map() {
    if harness::skip_unless_acceleration("ends_that_cannot_be_accelerated_stay_out_of_the_map") {
        return;
    }
    let (mut env, client, server) = setup();
    let outside = env.pod(12, &[]);
    let out_addr = format!("{}:8080", outside.v4);
    env.serve(&outside, std::slice::from_ref(&out_addr), "outside");
    let d = env.daemon(&config(&client, &server, true));

    let mut held = env.hold(&client, &out_addr);
    assert_eq!(held.echo("one").unwrap(), "one");
    let dump = d.wait_dump(Duration::from_secs(5), |v| v["stats"]["accel_left"] == 1);
    assert_eq!(entries(&dump), 0, "the open connection left km_sock");
    assert_eq!(dump["stats"]["accel_added"], 1);
    for m in ["two", "three"] {
        assert_eq!(held.echo(m).unwrap(), m);
    }
    // Leaving in the middle of a 4 MiB write loses nothing.
    transfer_ok(
        &env,
        &client,
        &[
            "transfer",
            &out_addr,
            "--sizes",
            "4194304,1,4096",
            "--conns",
            "4",
        ],
    );
    assert_eq!(d.stat("accel_left"), 5);

    // Clients outside the attached cgroup, to a server in the mesh.
    let conns = env.connect_opts(&client, &format!("{}:8080", server.v4), 3, false);
    assert!(conns.iter().all(|c| c.ok && c.name == "web-1"), "{conns:?}");
    assert_eq!(d.stat("accel_skipped"), 3);
    assert_eq!(d.stat("accel_added"), 5);
    drop(held);
    d.wait_dump(Duration::from_secs(5), |v| {
        v["maps"]["km_conn"]["entries"] == 0
    });
}

/// A socket disconnected with connect(AF_UNSPEC) and connected again is a
/// new connection to the data path: its ends are decided afresh. Plain to
/// a server outside the mesh (the client leaves km_sock), accelerated to
/// one in it, and plain again; every echo byte-exact.
#[test]
fn a_reconnected_socket_is_decided_afresh() {
    if harness::skip_unless_acceleration("a_reconnected_socket_is_decided_afresh") {
        return;
    }
    let (mut env, client, server) = setup();
    let outside = env.pod(12, &[]);
    let out_addr = format!("{}:8080", outside.v4);
    env.serve(&outside, std::slice::from_ref(&out_addr), "outside");
    let d = env.daemon(&config(&client, &server, true));
    let vip = "10.96.0.10:80";
    let order = [out_addr.as_str(), vip, vip, out_addr.as_str()];
    let mut args = vec!["reconnect", "--sizes", "1,65536"];
    args.extend(order);
    let lines = transfer_ok(&env, &client, &args);
    let names: Vec<_> = lines.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["outside", "web-1", "web-1", "outside"]);
    assert!(lines.iter().all(|l| l["bytes"] == 65537), "{lines:?}");
    // Both directions of each mesh connection; the client's end of each
    // outside one left once its data was acknowledged. The socket kept
    // its decisions across a reconnect if accel_on were below 4.
    let dump = d.wait_dump(Duration::from_secs(5), |v| {
        v["stats"]["accel_left"] == 2 && entries(v) == 0 && v["maps"]["km_conn"]["entries"] == 0
    });
    assert_eq!(dump["stats"]["accel_on"], 4, "{dump}");
    assert_eq!(
        dump["stats"]["accel_added"], 6,
        "4 client ends, 2 server ends"
    );
}

/// A reset ends a connection without close(), and the kernel keeps a
/// socket in a sockhash until close(). The reset end must leave km_sock at
/// once: its client's port is free again, and a new connection from it
/// would find the old socket under its key and send its bytes there. The
/// server here reads only a second after greeting, so the reset
/// connection's socket is still open when the new one sends.
#[test]
fn a_reset_socket_leaves_before_its_addresses_are_reused() {
    if harness::skip_unless_acceleration("a_reset_socket_leaves_before_its_addresses_are_reused") {
        return;
    }
    let (mut env, client, server) = setup();
    let addr = format!("{}:8083", server.v4);
    env.serve_in_mesh(
        &server,
        std::slice::from_ref(&addr),
        "slow",
        &["--read-delay-ms", "1000"],
    );
    let d = env.daemon(&config(&client, &server, true));
    let bind = format!("{}:41000", client.v4);
    let from = ["--bind", bind.as_str()];
    let mut args = vec!["transfer", addr.as_str(), "--abort-after", "1"];
    args.extend(from);
    transfer_ok(&env, &client, &args);
    let mut args = vec!["transfer", addr.as_str(), "--sizes", "5,4096"];
    args.extend(from);
    let lines = transfer_ok(&env, &client, &args);
    assert_eq!(lines[0]["bytes"], 4101, "{lines:?}");
    assert_eq!(d.stat("accel_added"), 4, "both ends of both connections");
}

/// Every pod has 127.0.0.1, so the same loopback connection (addresses
/// and ports) can be live in two pods at once. Each must be accelerated
/// between its own two ends, never into the other pod's socket.
#[test]
fn the_same_loopback_connection_in_two_pods_is_kept_apart() {
    if harness::skip_unless_acceleration("the_same_loopback_connection_in_two_pods_is_kept_apart") {
        return;
    }
    let (mut env, client, server) = setup();
    for (pod, name) in [(&client, "lo-a"), (&server, "lo-b")] {
        env.serve_in_mesh(pod, &["127.0.0.1:9000".to_string()], name, &[]);
    }
    let d = env.daemon(&config(&client, &server, true));
    let mut a = env.hold_from(&client, "127.0.0.1:9000", "127.0.0.1:40000");
    let mut b = env.hold_from(&server, "127.0.0.1:9000", "127.0.0.1:40000");
    assert_eq!(
        (a.conn.name.as_str(), b.conn.name.as_str()),
        ("lo-a", "lo-b")
    );
    for i in 0..5 {
        let (ma, mb) = (format!("a{i}"), format!("b{i}"));
        assert_eq!(a.echo(&ma).unwrap(), ma);
        assert_eq!(b.echo(&mb).unwrap(), mb);
    }
    let dump = d.dump();
    assert_eq!(entries(&dump), 4, "both ends of both connections");
    assert_eq!(dump["stats"]["accel_on"], 4, "both directions of both");
}

/// km_conn entries of connections that closed while no daemon ran (sockops
/// detached, so nothing removed them) are swept by the next daemon.
#[test]
fn a_new_daemon_sweeps_connections_closed_while_none_ran() {
    if harness::skip_unless_acceleration("a_new_daemon_sweeps_connections_closed_while_none_ran") {
        return;
    }
    let (mut env, client, server) = setup();
    let mut d = env.daemon(&config(&client, &server, true));
    let mut held = env.hold(&client, "10.96.0.10:80");
    assert_eq!(held.echo("one").unwrap(), "one");
    assert_eq!(d.dump()["maps"]["km_conn"]["entries"], 1);
    assert!(d.stop().success());
    assert_eq!(held.echo("two").unwrap(), "two");
    drop(held);
    let d = env.daemon(&config(&client, &server, true));
    assert!(
        d.log().contains("km_conn: removed 1 entries"),
        "{}",
        d.log()
    );
    let dump = d.dump();
    assert_eq!(dump["maps"]["km_conn"]["entries"], 0);
    assert_eq!(entries(&dump), 0);
}

/// In a handover two sockops programs are on the cgroup for a moment (the
/// new daemon attaches its own before it drops the old link), and both run
/// for a new connection, the older first. Each end enters km_sock once,
/// through the first; the second finds the socket taken (EBUSY) and leaves
/// it alone, which is not a full map. Kept apart here (a daemon pinned
/// elsewhere does not take the old links over), so the overlap lasts.
#[test]
fn a_second_sockops_program_leaves_a_taken_socket_alone() {
    if harness::skip_unless_acceleration("a_second_sockops_program_leaves_a_taken_socket_alone") {
        return;
    }
    let (mut env, client, server) = setup();
    let cfg = config(&client, &server, true);
    let mut old = env.daemon_args(&cfg, &["--keep-attached"]).unwrap();
    assert!(old.stop().success());
    let elsewhere = env.bpffs.join("elsewhere");
    let mut new = env
        .daemon_args(&cfg, &["--bpffs", elsewhere.to_str().unwrap()])
        .unwrap();
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_SOCK_OPS), 2);

    let mut held = env.hold(&client, "10.96.0.10:80");
    assert_eq!(held.echo("during").unwrap(), "during");
    let dump = new.dump();
    assert_eq!(dump["stats"]["accel_full"], 0, "{dump}");
    assert_eq!(dump["stats"]["accel_added"], 0, "{dump}");
    assert_eq!(entries(&dump), 0);
    assert!(new.stop().success());

    // The old maps hold both ends: a daemon taking them over sees them.
    let d = env.daemon(&cfg);
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_SOCK_OPS), 1);
    let dump = d.dump();
    assert_eq!(entries(&dump), 2, "{dump}");
    assert_eq!(dump["maps"]["km_conn"]["entries"], 1, "{dump}");
    assert_eq!(held.echo("after").unwrap(), "after");
    drop(held);
    d.wait_dump(Duration::from_secs(5), |d| entries(d) == 0);
}

/// Capacity at CI size: thousands of connections held at once, both ends
/// of each in km_sock, every one echoing, and the map empty again once
/// they close. bench/capacity.sh runs the same at 100k.
#[test]
fn thousands_of_held_connections_are_accelerated() {
    if harness::skip_unless_acceleration("thousands_of_held_connections_are_accelerated") {
        return;
    }
    const N: u64 = 3000;
    let (mut env, client, server) = setup();
    load_servers(&mut env, &server);
    let d = env.daemon(&config(&client, &server, true));
    let on = d.stat("accel_on");
    // A source address exercises the explicit bind a client with several
    // addresses uses to go past one address's ports.
    let src = client.v4.to_string();
    let mut h = env.load_hold(
        &client,
        &HOLD_ADDRS,
        N as usize,
        &["--size", "64", "--source", &src],
    );
    assert_eq!(h.open["opened"], N, "{}", h.open);
    assert_eq!(h.open["failed"], 0, "{}", h.open);
    // A client that sent before its server's end was in the map stays on
    // TCP and leaves the map once its data is acknowledged.
    let dump = d.wait_dump(Duration::from_secs(5), |v| {
        entries(v) + v["stats"]["accel_left"].as_u64().unwrap() == 2 * N
    });
    assert_eq!(dump["stats"]["accel_full"], 0);
    let check = h.command("check");
    assert_eq!(check["ok"], N, "{check}");
    assert_eq!(check["failed"], 0, "{check}");
    let rr = h.command("rr 50 4");
    assert_eq!(rr["requests"], 200, "{rr}");
    // Each connection's first send in each direction picks its path; a
    // client that sends before the server's end is in the map stays plain,
    // so not every direction is accelerated, but most are.
    let on = d.stat("accel_on") - on;
    assert!(on >= N, "only {on} of {} directions accelerated", 2 * N);
    let (lines, status) = h.close();
    assert!(status.success(), "{lines:?}");
    assert_eq!(lines.last().unwrap()["conns"], N, "{lines:?}");
    d.wait_dump(Duration::from_secs(10), |v| entries(v) == 0);
}

/// With km_sock full, sockops counts accel_full for the connecting end and
/// accel_skipped for the accepting end (its client is not in the map), and
/// the connection stays plain TCP: every byte still arrives, in order.
#[test]
fn a_full_socket_map_leaves_connections_on_plain_tcp() {
    if harness::skip_unless_acceleration("a_full_socket_map_leaves_connections_on_plain_tcp") {
        return;
    }
    const CAP: u64 = 64;
    const N: u64 = 100;
    let (mut env, client, server) = setup();
    load_servers(&mut env, &server);
    let d = env
        .daemon_args(
            &config(&client, &server, true),
            &["--max-sockets", &CAP.to_string()],
        )
        .expect("daemon starts");
    let mut h = env.load_hold(
        &client,
        &HOLD_ADDRS,
        N as usize,
        &["--size", "4096", "--recheck"],
    );
    assert_eq!(h.open["opened"], N, "{}", h.open);
    let stat = |v: &Value, k: &str| v["stats"][k].as_u64().unwrap();
    let not_in = |v: &Value| stat(v, "accel_full") + stat(v, "accel_skipped");
    // Every socket entered or was counted out; a client that sent before
    // its server entered may have left again, freeing its slot.
    let dump = d.wait_dump(Duration::from_secs(5), |v| {
        stat(v, "accel_added") + not_in(v) == 2 * N
    });
    assert!(
        stat(&dump, "accel_added") >= CAP,
        "the map filled up: {dump}"
    );
    assert!(entries(&dump) <= CAP);
    assert!(stat(&dump, "accel_full") > 0 && stat(&dump, "accel_skipped") > 0);
    let check = h.command("check");
    assert_eq!(check["ok"], N, "{check}");
    // New connections while the map is full: messages up to 256 KiB both
    // ways, byte-exact.
    transfer_ok(
        &env,
        &client,
        &[
            "transfer",
            "10.96.0.10:80",
            "--sizes",
            "1,4096,262144",
            "--conns",
            "8",
        ],
    );
    let dump = d.dump();
    assert_eq!(stat(&dump, "accel_added") + not_in(&dump), 2 * N + 16);
    // --recheck: one more echo over every connection as the hold ends.
    let (lines, status) = h.close();
    assert!(status.success(), "{lines:?}");
    assert_eq!(lines[0]["event"], "check", "{lines:?}");
    assert_eq!(lines[0]["ok"], N, "{lines:?}");
    d.wait_dump(Duration::from_secs(10), |v| entries(v) == 0);
}
