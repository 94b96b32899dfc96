//! System tests for the DNS resolver (ServiceEntry resolution DNS) against a
//! real dnsmasq on 127.77.x.y:53 (root). The records are documentation
//! addresses: they are only compared, never connected to.

mod harness;

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use harness::dns::{Dnsmasq, DOMAIN};
use kmesh::dns::{Answers, DnsConfig, HostState, Resolver, Upstream};
use tokio::sync::watch;

fn host(name: &str) -> String {
    format!("{name}.{DOMAIN}")
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|a| a.parse().unwrap()).collect()
}

fn resolver(server: &Dnsmasq) -> Resolver {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_env_filter("kmesh=debug")
        .try_init();
    Resolver::new(DnsConfig {
        upstream: Upstream::Servers(vec![server.addr]),
        backoff_max: Duration::from_secs(4),
        query_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .unwrap()
}

fn watch(r: &Resolver, names: &[&str]) -> watch::Receiver<Arc<Answers>> {
    let rx = r.subscribe();
    r.set_hosts(names.iter().map(|n| host(n)).collect());
    rx
}

/// Waits for a publication satisfying `cond`; returns it and how long it took.
async fn wait_for(
    rx: &mut watch::Receiver<Arc<Answers>>,
    timeout: Duration,
    server: &Dnsmasq,
    cond: impl Fn(&Answers) -> bool,
) -> (Arc<Answers>, Duration) {
    let start = Instant::now();
    let got = tokio::time::timeout(timeout, rx.wait_for(|a| cond(a)))
        .await
        .map(|r| r.map(|a| a.clone()));
    match got {
        Ok(Ok(a)) => (a, start.elapsed()),
        _ => panic!(
            "not reached in {timeout:?}; answers: {:#?}\ndnsmasq log:\n{}",
            rx.borrow(),
            server.log()
        ),
    }
}

#[tokio::test]
async fn resolves_a_and_aaaa_and_steady_refreshes_stay_quiet() {
    let web = host("web");
    let server = Dnsmasq::start(
        1,
        &[
            (&web, "2001:db8::10"),
            (&web, "192.0.2.11"),
            (&web, "192.0.2.10"),
        ],
    );
    let r = resolver(&server);
    let mut rx = watch(&r, &["web"]);
    let (a, took) = wait_for(&mut rx, Duration::from_secs(3), &server, |a| {
        a.contains_key(&web)
    })
    .await;
    eprintln!("first answer after {took:?}");
    assert_eq!(a[&web].state, HostState::Resolved);
    assert_eq!(
        a[&web].addrs,
        ips(&["192.0.2.10", "192.0.2.11", "2001:db8::10"])
    );

    // TTL 1 s: about three refreshes with the same records, no publication.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!rx.has_changed().unwrap(), "{:#?}", rx.borrow());
    let queries = server.log().matches(&format!("query[A] {web}")).count();
    assert!(queries >= 3, "refreshed {queries} times:\n{}", server.log());
}

#[tokio::test]
async fn changed_record_is_seen_within_ttl() {
    const TTL: u64 = 2;
    let web = host("web");
    let mut server = Dnsmasq::start(TTL as u32, &[(&web, "192.0.2.10")]);
    let r = resolver(&server);
    let mut rx = watch(&r, &["web"]);
    wait_for(&mut rx, Duration::from_secs(3), &server, |a| {
        a.contains_key(&web)
    })
    .await;

    server.set_records(&[(&web, "192.0.2.20"), (&web, "2001:db8::20")]);
    let want = ips(&["192.0.2.20", "2001:db8::20"]);
    let (a, took) = wait_for(&mut rx, Duration::from_secs(TTL + 1), &server, |a| {
        a[&web].addrs == want
    })
    .await;
    eprintln!("record change seen after {took:?} (TTL {TTL} s)");
    assert_eq!(a[&web].state, HostState::Resolved);

    // Same again with a restarted server rather than a reload.
    server.stop();
    server.set_records(&[(&web, "192.0.2.30")]);
    server.restart();
    let want = ips(&["192.0.2.30"]);
    let (_, took) = wait_for(&mut rx, Duration::from_secs(TTL + 3), &server, |a| {
        a[&web].addrs == want
    })
    .await;
    eprintln!("after a server restart, seen after {took:?}");
}

#[tokio::test]
async fn stopped_server_keeps_the_last_good_answer() {
    let web = host("web");
    let mut server = Dnsmasq::start(1, &[(&web, "192.0.2.10"), (&web, "2001:db8::10")]);
    let r = resolver(&server);
    let mut rx = watch(&r, &["web"]);
    let (good, _) = wait_for(&mut rx, Duration::from_secs(3), &server, |a| {
        a.contains_key(&web)
    })
    .await;
    let good = good[&web].clone();

    server.stop();
    let (a, took) = wait_for(&mut rx, Duration::from_secs(5), &server, |a| {
        matches!(a[&web].state, HostState::Failing { .. })
    })
    .await;
    eprintln!("failure published after {took:?}: {:?}", a[&web].state);
    assert_eq!(a[&web].addrs, good.addrs, "last good answer kept");
    assert_eq!(
        a[&web]
            .last_good_at
            .map(|t| t >= good.last_good_at.unwrap()),
        Some(true)
    );

    // Failures go on while the server is down; nothing else is published.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!rx.has_changed().unwrap(), "{:#?}", rx.borrow());

    server.restart();
    let (a, took) = wait_for(&mut rx, Duration::from_secs(6), &server, |a| {
        a[&web].state == HostState::Resolved
    })
    .await;
    eprintln!("recovered {took:?} after the server came back");
    assert_eq!(a[&web].addrs, good.addrs);
}

#[tokio::test]
async fn nxdomain_empties_only_that_host() {
    let (web, db, nope) = (host("web"), host("db"), host("nope"));
    let server = Dnsmasq::start(1, &[(&web, "192.0.2.10"), (&db, "192.0.2.20")]);
    let r = resolver(&server);
    let mut rx = watch(&r, &["web", "db", "nope"]);
    let (before, _) = wait_for(&mut rx, Duration::from_secs(3), &server, |a| a.len() == 3).await;
    assert_eq!(before[&nope].state, HostState::NxDomain);
    assert!(before[&nope].addrs.is_empty());
    assert_eq!(before[&db].addrs, ips(&["192.0.2.20"]));

    server.set_records(&[(&web, "192.0.2.10")]);
    let (after, took) = wait_for(&mut rx, Duration::from_secs(3), &server, |a| {
        a[&db].state == HostState::NxDomain
    })
    .await;
    eprintln!("removed record seen as NXDOMAIN after {took:?}");
    assert!(after[&db].addrs.is_empty());
    assert_eq!(after[&web], before[&web], "the other host is untouched");
    assert_eq!(after[&nope], before[&nope]);
}
