//! Two meshed pods never have their traffic redirected into each other (issue 14, tests):
//! redirecting across network namespaces would bypass netfilter, and NetworkPolicy with it.
//!
//! The sharpest case: both pods hold a connection with the very same address pair
//! (127.0.0.1:40001 → 127.0.0.1:15001), both accelerated by one agent on one cgroup. The
//! listener on 15001 stands in for the pod's proxy (its outbound port), so the app's sends
//! are handed straight to the accepted socket by `sk_msg`. If the socket map's key forgot
//! the namespace, one pod's sends would land in the other pod's socket. Each pod's server
//! prefixes every echo with its pod's name, and each client checks every round, so a single
//! crossed message fails the test. The counters show the four sockets were in the map and
//! the rounds were redirected.

mod common;

use std::process::Stdio;

use common::{
    mesh::netns::pods,
    node::Node,
    pair::{Accelerated, py},
};

const ROUNDS: &str = "3000";
/// The pods' proxy outbound port (remora-init's default), where the stand-in listens.
const PROXY_PORT: &str = "15001";

#[test]
fn identical_connections_in_two_pods_are_never_crossed() {
    let mut node = Node::new("ti");
    let mut pods = pods();
    node.start_agent();
    node.register(&pods.client);
    node.register(&pods.server);
    node.wait_registered(2);
    let peers = pods.write("peers.py", include_str!("common/peers.py"));
    for (server, name) in [(false, "pod-a"), (true, "pod-b")] {
        let serve = [
            "/usr/bin/python3".to_owned(),
            peers.display().to_string(),
            "serve".to_owned(),
            name.to_owned(),
            PROXY_PORT.to_owned(),
        ];
        pods.spawn_until(server, &format!("{name}-peers"), &serve, "peers: listening");
    }
    let before = Accelerated::read(&node);
    let logs = || {
        format!(
            "--- pod-a ---\n{}\n--- pod-b ---\n{}\n--- agent ---\n{}\n{}",
            pods.log("pod-a-peers"),
            pods.log("pod-b-peers"),
            node.agent_log(),
            node.metrics()
        )
    };
    // Both at once, so that both connections are in the map together.
    let peers_arg = peers.display().to_string();
    let b = pods
        .server
        .cmd(&[
            "/usr/bin/python3",
            &peers_arg,
            "tuple",
            "40001",
            "127.0.0.1",
            PROXY_PORT,
            ROUNDS,
            "pod-b",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pod b's client");
    py(
        &pods.client,
        &peers,
        &["tuple", "40001", "127.0.0.1", PROXY_PORT, ROUNDS, "pod-a"],
        logs,
    );
    let out = b.wait_with_output().expect("pod b's client");
    assert!(
        out.status.success(),
        "pod b's client: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    let after = Accelerated::read(&node);
    let rounds: u64 = ROUNDS.parse().expect("rounds");
    assert!(
        after.sockets - before.sockets >= 4 && after.messages - before.messages >= 2 * rounds,
        "both pods' clients' sends were redirected (else this proves nothing): before {before:?}, after {after:?}\n{}",
        logs()
    );
    assert_eq!(
        after.connects, before.connects,
        "loopback connections are never sent to a proxy"
    );
}
