//! The accelerator's life cycle around a running Remora pair (issue 14, tests):
//!
//! - the agent SIGKILLed mid-load: no connection breaks (a 100 MB transfer and a request
//!   loop in flight), and acceleration goes on without it (pinned links and maps): the
//!   connections made while it is dead are counted by the programs, as a restarted agent
//!   (reusing the pins) shows;
//! - no agent at all: everything works through the iptables rules, nothing is attached;
//! - `remora-accel --cleanup`: nothing is left (no program attached to the cgroup, none of
//!   its programs or maps in the kernel, no pin), traffic goes on through iptables, and a
//!   second cleanup finds nothing and exits 0.

mod common;

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use common::{
    mesh::netns::SERVER_IP,
    node::Objects,
    pair::{Pair, pair},
};

/// `peers.py <args>` started in the client pod, running while the test goes on.
fn start(p: &Pair, args: &[&str]) -> Child {
    let peers = p.peers.display().to_string();
    let mut all = vec!["/usr/bin/python3", peers.as_str()];
    all.extend_from_slice(args);
    p.pods
        .client
        .cmd(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start peers.py")
}

fn finish(p: &Pair, child: Child, what: &str) {
    let out = child.wait_with_output().expect("wait for peers.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("passed"),
        "{what} broke ({}):\n{text}\n{}",
        out.status,
        p.logs()
    );
}

#[test]
fn agent_killed_mid_load_breaks_no_connection_and_acceleration_goes_on() {
    let mut p = pair("lk", true);
    let bulk = start(&p, &["bulk", SERVER_IP, "7001", "100", "blocking"]);
    let load = start(&p, &["load", SERVER_IP, "8080", "6"]);
    // Let both be well under way through the accelerated hops.
    let before = p.accelerated();
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.accelerated().messages < before.messages + 50 {
        assert!(
            Instant::now() < deadline,
            "no accelerated traffic under load\n{}",
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let at_kill = p.accelerated();
    p.node.kill_agent();
    // New connections while no agent runs: still sent to the proxy by connect4.
    p.client(&["short", SERVER_IP, "7003", "200"]);
    finish(&p, bulk, "the 100 MB transfer in flight at the kill");
    finish(&p, load, "the request loop in flight at the kill");
    assert!(
        p.node.bpffs.pins().exists() && !Objects::of(&p.node.cgroup.path).is_empty(),
        "a killed agent leaves its programs attached and pinned:\n{}",
        p.node.attached()
    );
    // A new agent reuses the pins: the counters kept counting while none ran.
    p.node.start_agent();
    p.accelerated().assert_since(&at_kill, 200, || p.logs());
}

#[test]
fn without_an_agent_everything_goes_through_iptables() {
    let p = pair("la", false);
    assert!(
        Objects::of(&p.node.cgroup.path).is_empty(),
        "nothing attached without an agent:\n{}",
        p.node.attached()
    );
    p.client(&["bulk", SERVER_IP, "7001", "20", "blocking"]);
    p.client(&["http", SERVER_IP, "8080", "20"]);
    p.client(&["short", SERVER_IP, "7003", "300"]);
}

#[test]
fn cleanup_leaves_nothing_behind_and_traffic_goes_on_through_iptables() {
    let mut p = pair("lc", true);
    let before = p.accelerated();
    p.client(&["short", SERVER_IP, "7003", "100"]);
    p.accelerated().assert_since(&before, 100, || p.logs());
    let objects = Objects::of(&p.node.cgroup.path);
    assert!(
        objects.programs.len() >= 4 && !objects.maps.is_empty(),
        "the agent attached sockops, connect4, connect6 and getsockopt: {objects:?}\n{}",
        p.node.attached()
    );
    // SIGTERM: the agent exits 0 and leaves everything attached.
    p.node.stop_agent();
    assert_eq!(
        Objects::of(&p.node.cgroup.path).programs,
        objects.programs,
        "a stopped agent leaves its programs attached"
    );
    p.client(&["short", SERVER_IP, "7003", "100"]);

    let out = p.node.cleanup();
    assert!(
        out.status.success(),
        "remora-accel --cleanup: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !p.node.bpffs.pins().exists(),
        "--cleanup removes its pin directory {}",
        p.node.bpffs.pins().display()
    );
    // The kernel releases detached links, then programs and maps once their last
    // reference is gone, a moment later (RCU).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (attached, alive) = (Objects::of(&p.node.cgroup.path), objects.alive());
        if attached.is_empty() && alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after --cleanup, still attached: {attached:?}; still in the kernel: {alive:?} (of {objects:?})\n{}",
            p.node.attached()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Everything works through the iptables rules alone.
    p.client(&["bulk", SERVER_IP, "7001", "20", "blocking"]);
    p.client(&["short", SERVER_IP, "7003", "300"]);
    let again = p.node.cleanup();
    assert!(
        again.status.success(),
        "a second --cleanup finds nothing and exits 0: {}\n{}",
        again.status,
        String::from_utf8_lossy(&again.stderr)
    );
}
