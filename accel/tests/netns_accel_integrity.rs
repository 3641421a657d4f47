//! Data integrity with the accelerator on (issue 14, tests): every byte arrives, in order,
//! for blocking and non-blocking clients and servers, through the accelerated Remora pair
//! (the app's connect sent straight to proxy A by `connect4`, the apps' sends handed to
//! their proxy's socket by `sk_msg` in both pods) and between two apps of one meshed pod on
//! loopback.
//!
//! The peers are Python (`common/peers.py`): blocking sockets, a `selectors` non-blocking
//! client, an asyncio server, `http.client` against `http.server`. 100 MB go each way,
//! checked by sha256 at both ends, ended by a half-close; 3,000 connections write right
//! after `connect()`. A short read, or EAGAIN (`BlockingIOError`) on a blocking socket, fails
//! the test: the issue saw both on redirected sockets at end of stream.
//!
//! Each test has its own cgroup, bpffs and agent (`common::node`); root; opted out with
//! `REMORA_SKIP_ACCEL=1` (or `REMORA_SKIP_NETNS=1`).

mod common;

use common::{
    mesh::netns::SERVER_IP,
    pair::{Accelerated, pair, pair_with, py},
};

/// `peers.py bulk` through the pair, then the counters that prove it was accelerated.
fn bulk_through_pair(tag: &str, runs: &[(u16, &str, &str)]) {
    bulk_through(&pair(tag, true), runs);
}

fn bulk_through(p: &common::pair::Pair, runs: &[(u16, &str, &str)]) {
    let before = p.accelerated();
    for (port, mb, mode) in runs {
        let port = port.to_string();
        p.client(&["bulk", SERVER_IP, &port, mb, mode]);
    }
    p.accelerated()
        .assert_since(&before, runs.len() as u64, || p.logs());
}

#[test]
fn blocking_client_and_server_exchange_100_mb_each_way_intact() {
    bulk_through_pair("ib", &[(7001, "100", "blocking")]);
}

#[test]
fn non_blocking_client_and_server_exchange_100_mb_each_way_intact() {
    bulk_through_pair("in", &[(7002, "100", "nonblocking")]);
}

#[test]
fn blocking_and_non_blocking_ends_mixed_exchange_intact() {
    bulk_through_pair(
        "ix",
        &[(7002, "20", "blocking"), (7001, "20", "nonblocking")],
    );
}

/// The agent's opt-in mode that also hands the proxies' sends to the apps' sockets (both
/// loopback hops accelerated both ways), meant for nodes whose apps read with non-blocking
/// sockets: those, a non-blocking client and an asyncio server, get every byte.
#[test]
fn non_blocking_apps_get_every_byte_when_the_proxies_sends_are_handed_over_too() {
    let p = pair_with("ia", Some(&[("REMORA_ACCEL_REDIRECT_TO_APP", "true")]));
    assert!(
        p.node.agent_log().contains("redirect_to_app=true"),
        "the agent runs in the mode under test:\n{}",
        p.node.agent_log()
    );
    bulk_through(&p, &[(7002, "100", "nonblocking")]);
}

#[test]
fn http_client_puts_and_gets_100_mb_intact() {
    let p = pair("ih", true);
    let before = p.accelerated();
    p.client(&["http", SERVER_IP, "8080", "100"]);
    p.accelerated().assert_since(&before, 1, || p.logs());
}

#[test]
fn three_thousand_connections_that_write_at_once_are_answered_intact() {
    let p = pair("is", true);
    let before = p.accelerated();
    p.client(&["short", SERVER_IP, "7003", "3000"]);
    p.accelerated().assert_since(&before, 3000, || p.logs());
}

/// Two apps of one meshed pod talking over loopback, both ends blocking: `connect4` leaves
/// loopback alone and `sockops` puts both sockets in the map, so `sk_msg` runs on every
/// send. Neither is the proxy, so the agent hands nothing to their receive queues (a
/// blocking reader of a redirected socket can see EAGAIN at end of stream, the issue's
/// pitfall): whatever it does, every byte must arrive through TCP.
#[test]
fn blocking_sockets_on_loopback_inside_a_meshed_pod_get_every_byte() {
    let mut p = pair("il", true);
    let serve = [
        "/usr/bin/python3".to_owned(),
        p.peers.display().to_string(),
        "serve".to_owned(),
        "client".to_owned(),
    ];
    p.pods
        .spawn_until(false, "client-peers", &serve, "peers: listening");
    let before = Accelerated::read(&p.node);
    let logs = || format!("{}\n{}", p.pods.log("client-peers"), p.logs());
    for args in [
        ["bulk", "127.0.0.1", "7001", "100", "blocking"].as_slice(),
        &["bulk", "127.0.0.1", "7002", "100", "nonblocking"],
        &["bulk", "127.0.0.1", "7002", "20", "blocking"],
        &["bulk", "127.0.0.1", "7001", "20", "nonblocking"],
        &["http", "127.0.0.1", "8080", "100"],
        &["short", "127.0.0.1", "7003", "1000"],
    ] {
        py(&p.pods.client, &p.peers, args, logs);
    }
    let after = Accelerated::read(&p.node);
    assert_eq!(
        after.connects, before.connects,
        "loopback connections are never sent to the proxy"
    );
    assert!(
        after.sockets - before.sockets >= 2 * 1005,
        "both ends of each loopback connection were in the map (so sk_msg saw every send): before {before:?}, after {after:?}\n{}",
        logs()
    );
}
