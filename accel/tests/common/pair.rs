//! The accelerated Remora pair: two pods joined by a veth, each with `remora-init`'s
//! default rules and a `remora-proxy` (UID 1337, mTLS between them, the server pod
//! Strict), both registered with the test's `remora-accel` agent, and the Python peers
//! serving in the server pod.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use super::{
    mesh::netns::{Netns, Pods, REVIEWS, SERVER_IP, pods},
    node::Node,
};

/// Server pod ports whose protocol is opaque TCP (raw bulk, short echo, server-first).
pub const OPAQUE: [u16; 4] = [7001, 7002, 7003, 2525];
/// Server pod ports the proxies detect (HTTP/1.1, HTTP/2, gRPC).
pub const DETECTED: [u16; 3] = [8080, 8081, 50051];

/// Field order is drop order: the pods' processes and namespaces, then the node (agent,
/// bpffs, cgroup).
pub struct Pair {
    pub pods: Pods,
    pub node: Node,
    pub peers: PathBuf,
}

/// `true`: the agent runs and both pods are registered before the proxies start.
pub fn pair(tag: &str, accelerated: bool) -> Pair {
    pair_with(tag, accelerated.then_some(&[]))
}

/// [`pair`], the agent (if any) started with `agent_env`.
pub fn pair_with(tag: &str, agent_env: Option<&[(&str, &str)]>) -> Pair {
    let mut node = Node::new(tag);
    let mut pods = pods();
    if let Some(env) = agent_env {
        node.start_agent_with(env);
        node.register(&pods.client);
        node.register(&pods.server);
        node.wait_registered(2);
    }
    let (server_id, client_id) = pods.identities();
    let opaque: Vec<String> = OPAQUE
        .iter()
        .map(|p| format!("\"{p}\": {{protocol: opaque}}"))
        .collect();
    let server_cfg = pods.write(
        "server.yaml",
        &format!(
            "version: 1\n{}inbound:\n  default: {{mtls: Strict}}\n  ports: {{{}}}\n",
            server_id.yaml(),
            opaque.join(", ")
        ),
    );
    let mut services = String::new();
    for (port, opaque) in OPAQUE
        .iter()
        .map(|p| (p, true))
        .chain(DETECTED.iter().map(|p| (p, false)))
    {
        services.push_str(&format!(
            "  - name: svc{port}.shop\n    addresses: [\"{SERVER_IP}:{port}\"]\n{}    endpoints:\n    - {{address: \"{SERVER_IP}:{port}\", identity: \"{REVIEWS}\", meshed: true}}\n",
            if opaque { "    protocol: opaque\n" } else { "" }
        ));
    }
    let client_cfg = pods.write(
        "client.yaml",
        &format!(
            "version: 1\n{}outbound:\n  services:\n{services}",
            client_id.yaml()
        ),
    );
    let peers = pods.write("peers.py", include_str!("peers.py"));
    let serve = [
        "/usr/bin/python3".to_owned(),
        peers.display().to_string(),
        "serve".to_owned(),
        "server".to_owned(),
    ];
    pods.spawn_until(true, "peers", &serve, "peers: listening");
    pods.proxy(true, &server_cfg);
    pods.proxy(false, &client_cfg);
    Pair { pods, node, peers }
}

impl Pair {
    /// Runs `peers.py <args>` in the client pod; panics with every log on a failure.
    pub fn client(&self, args: &[&str]) -> String {
        py(&self.pods.client, &self.peers, args, || self.logs())
    }

    pub fn logs(&self) -> String {
        format!(
            "{}\n--- peers ---\n{}\n--- agent ---\n{}\n--- agent metrics ---\n{}",
            self.pods.proxy_logs(),
            self.pods.log("peers"),
            self.node.agent_log(),
            self.node.metrics()
        )
    }

    /// The agent's counters that show the app↔proxy hops were redirected.
    pub fn accelerated(&self) -> Accelerated {
        Accelerated::read(&self.node)
    }
}

/// Runs `python3 <peers> <args>` in `ns`, expecting `peers: <command> passed`.
pub fn py(ns: &Netns, peers: &Path, args: &[&str], logs: impl Fn() -> String) -> String {
    let peers = peers.display().to_string();
    let mut all = vec!["/usr/bin/python3", peers.as_str()];
    all.extend_from_slice(args);
    let out: Output = ns
        .cmd(&all)
        .output()
        .unwrap_or_else(|e| panic!("run peers.py {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains(&format!("peers: {} passed", args[0])),
        "peers.py {args:?} in {} failed ({}):\n{text}\n{}",
        ns.name,
        out.status,
        logs()
    );
    text
}

/// Snapshot of the agent's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accelerated {
    pub connects: u64,
    pub sockets: u64,
    pub messages: u64,
    pub orig_dst: u64,
    pub connect_fallbacks: u64,
    pub message_fallbacks: u64,
}

impl Accelerated {
    pub fn read(node: &Node) -> Self {
        let text = node.metrics();
        let m = |p: &str| super::node::sum_metric(&text, p);
        Self {
            connects: m("remora_accel_connects_redirected_total"),
            sockets: m("remora_accel_sockets_accelerated_total"),
            messages: m("remora_accel_messages_redirected_total"),
            orig_dst: m("remora_accel_orig_dst_served_total"),
            connect_fallbacks: m("remora_accel_connect_fallbacks_total"),
            message_fallbacks: m("remora_accel_message_fallbacks_total"),
        }
    }

    /// Asserts that, since `before`, at least `connections` app connections were sent to
    /// the proxy by `connect4` and had their original destination served by `getsockopt`;
    /// that both sockets of each such app→proxy hop went into the map and the app's sends
    /// were handed to the proxy's socket; and that the server pod's proxy→app hop did too
    /// (at least one more pair of sockets: proxy B may reuse its upstream connections).
    pub fn assert_since(&self, before: &Self, connections: u64, logs: impl Fn() -> String) {
        let ok = self.connects - before.connects >= connections
            && self.orig_dst - before.orig_dst >= connections
            && self.sockets - before.sockets >= 2 * connections + 2
            && self.messages - before.messages > connections;
        assert!(
            ok,
            "the accelerator did not carry the {connections} connections: before {before:?}, after {self:?}\n{}",
            logs()
        );
    }
}
