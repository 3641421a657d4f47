//! The socket accelerator on a real node: Remora installed from `config/default` plus the
//! `config/accel` component (the agent's DaemonSet, the webhook's `--accel-registrations`),
//! then the samples. Real kubelet, containerd and runc run the agent with CAP_BPF and
//! CAP_NET_ADMIN only; every sample pod's injected `remora-init` registers with it through
//! the hostPath; the samples' traffic is redirected by the agent's programs and answered.
//! Then the agent is deleted (its programs stay attached, traffic is still answered) and a
//! pod of the same image runs `remora-accel --cleanup` (no program or pin is left, traffic
//! goes on through the iptables rules).
//!
//! Two adaptations to the box, both in the test's own kustomization or the node's own
//! namespaces: the agent attaches to the node's cgroup (not the host's root, which would
//! put the programs on every socket of the machine), and a bpffs is mounted at
//! `/sys/fs/bpf` inside the node's mount namespace (the host has none; it goes with the
//! node). The registrations directory is the default `/run/remora/accel` of the host,
//! removed afterwards if this test created it.
//!
//! It needs a kernel with BPF, cgroup BPF and sockmap, bpftool and the `remora-accel`
//! image; without them it fails saying what is missing, unless `REMORA_SKIP_ACCEL=1`
//! opts out of it (with the `netns_accel*` tests).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use remora_e2e::Node;
use remora_e2e::apply::repo_root;
use remora_e2e::node::install::images_dir;
use remora_e2e::prereqs::on_path;
use remora_e2e::scenario::prom::Metrics;

const REGISTRATIONS: &str = "/run/remora/accel";
const SHOP_DEPLOYMENTS: [&str; 4] = ["frontend", "reviews-v1", "reviews-v2", "loadgen"];
/// CAP_NET_ADMIN (12) and CAP_BPF (39), as `/proc/<pid>/status` shows them.
const AGENT_CAPS: u64 = (1 << 12) | (1 << 39);
/// What the agent attaches to its cgroup at least, as bpftool names the attach types.
const HOOKS: [&str; 4] = [
    "cgroup_getsockopt",
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_sock_ops",
];

/// What the agent's programs need of the kernel: BPF syscalls, cgroup BPF (the cgroup
/// hooks), socket cookies/cgroup data, and sockmap with sk_msg.
const KERNEL_OPTIONS: [&str; 4] = [
    "CONFIG_BPF_SYSCALL",
    "CONFIG_CGROUP_BPF",
    "CONFIG_SOCK_CGROUP_DATA",
    "CONFIG_NET_SOCK_MSG",
];

/// The kernel's build options where it tells them (`/proc/config.gz`, else
/// `/boot/config-<release>`); empty when it tells neither.
fn kernel_config() -> String {
    match Command::new("zcat").arg("/proc/config.gz").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            std::fs::read_to_string(format!("/boot/config-{}", release.trim())).unwrap_or_default()
        }
    }
}

/// Fails before a node is started when this machine cannot run the accelerator, instead
/// of a DaemonSet rollout timing out on an agent that cannot load its programs.
fn check_bpf_prerequisites() {
    const OPT_OUT: &str = "or opt out of the accelerator's tests with REMORA_SKIP_ACCEL=1";
    let config = kernel_config();
    let missing: Vec<&str> = KERNEL_OPTIONS
        .into_iter()
        .filter(|o| !config.is_empty() && !config.contains(&format!("{o}=y")))
        .collect();
    assert!(
        missing.is_empty(),
        "the kernel lacks {missing:?}: the accelerator needs BPF syscalls, cgroup BPF and \
         sockmap/sk_msg, Linux 5.15+ (accel/README.md); {OPT_OUT}"
    );
    assert!(
        Path::new("/sys/fs/bpf").is_dir(),
        "/sys/fs/bpf is missing: the kernel has no BPF filesystem; {OPT_OUT}"
    );
    assert!(
        on_path("bpftool").is_some(),
        "bpftool is not on PATH: apt-get install bpftool, {OPT_OUT}"
    );
}

/// The node's cgroup in the cgroup v2 hierarchy, as the host sees it.
fn node_cgroup_v2(node: &Node) -> PathBuf {
    let hybrid = Path::new("/sys/fs/cgroup/unified").join(node.name());
    if hybrid.is_dir() {
        hybrid
    } else {
        Path::new("/sys/fs/cgroup").join(node.name())
    }
}

/// A process of the node (its mount namespace is the node's).
fn node_pid(node: &Node) -> String {
    let procs = ["pids", "unified", ""]
        .iter()
        .map(|h| {
            Path::new("/sys/fs/cgroup")
                .join(h)
                .join(node.name())
                .join("node/cgroup.procs")
        })
        .find_map(|p| std::fs::read_to_string(p).ok())
        .expect("the node's cgroup.procs");
    procs
        .lines()
        .next()
        .expect("a node process")
        .trim()
        .to_owned()
}

/// Runs a command in the node's mount namespace; its stdout.
fn in_node_mounts(node: &Node, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .args(["--target", &node_pid(node), "--mount", "--"])
        .args(args)
        .output()
        .expect("run nsenter (util-linux)");
    assert!(
        out.status.success(),
        "{args:?} in the node's mount namespace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `config/default` + `config/accel`, with the agent attached to `cgroup` (the path the
/// agent sees through its `/host/sys/fs/cgroup` mount).
fn write_kustomization(dir: &Path, cgroup: &str) {
    let root = repo_root().canonicalize().expect("repository root");
    let up = "../".repeat(dir.components().count() - 1);
    let rel = format!("{up}{}", root.to_string_lossy().trim_start_matches('/'));
    let text = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- {rel}/config/default
components:
- {rel}/config/accel
patches:
- target: {{group: apps, version: v1, kind: DaemonSet, name: remora-accel}}
  patch: |-
    - op: test
      path: /spec/template/spec/containers/0/args/0
      value: --cgroup-root=/host/sys/fs/cgroup
    - op: add
      path: /spec/template/spec/containers/0/args/-
      value: --cgroup={cgroup}
"
    );
    std::fs::write(dir.join("kustomization.yaml"), text).expect("write the kustomization");
}

fn kubectl(node: &Node, args: &[&str]) -> String {
    node.kubectl(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

fn agent_pod(node: &Node) -> String {
    kubectl(
        node,
        &[
            "-n",
            "remora-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=remora-accel",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    )
}

/// The attach types of the programs on `cgroup`, sorted (bpftool's view, from the host).
fn attached_hooks(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("run bpftool (Debian package bpftool)");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut hooks: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    hooks.sort();
    hooks
}

/// The one-off pod that runs `remora-accel --cleanup` on the node.
fn cleanup_pod(cgroup: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: remora-accel-cleanup
  namespace: remora-system
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  containers:
  - name: cleanup
    image: ghcr.io/remora-mesh/remora-accel:0.1.0
    imagePullPolicy: IfNotPresent
    args: [--cleanup, --cgroup={cgroup}, --bpffs=/sys/fs/bpf/remora]
    securityContext:
      runAsUser: 0
      privileged: false
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities: {{drop: [ALL], add: [BPF, NET_ADMIN]}}
      seccompProfile: {{type: Unconfined}}
    volumeMounts:
    - {{name: cgroup, mountPath: /host/sys/fs/cgroup, readOnly: true}}
    - {{name: bpffs, mountPath: /sys/fs/bpf, mountPropagation: HostToContainer}}
  volumes:
  - {{name: cgroup, hostPath: {{path: /sys/fs/cgroup, type: Directory}}}}
  - {{name: bpffs, hostPath: {{path: /sys/fs/bpf, type: Directory}}}}
"
    )
}

/// The loadgen's requests answered 200 over 5 s: at least 50 (it sends 20/s).
async fn assert_answered(node: &Node, loadgen: &str, when: &str) {
    let ok = |m: &Metrics| {
        m.sum(
            "remora_proxy_requests_total",
            &[("direction", "outbound"), ("status", "200")],
        )
    };
    let before = ok(&proxy_metrics(node, loadgen));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = proxy_metrics(node, loadgen);
    let answered = ok(&after) - before;
    println!("{when}: {answered} requests answered 200 in 5 s");
    assert!(
        answered >= 50.0,
        "{when}: only {answered} answers in 5 s:\n{}",
        after.text()
    );
}

async fn wait_until_gone(node: &Node, pod: &str) {
    let start = Instant::now();
    while agent_host_pid(node).is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{pod}'s process did not exit"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A pod's `/metrics` on `port`, through the apiserver's pod proxy.
fn pod_metrics(node: &Node, ns: &str, pod: &str, port: u16) -> Metrics {
    Metrics::parse(&kubectl(
        node,
        &[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy/metrics"),
        ],
    ))
}

fn agent_metrics(node: &Node, pod: &str) -> Metrics {
    pod_metrics(node, "remora-system", pod, 15090)
}

/// A `shop` pod's proxy `/metrics` (its admin port).
fn proxy_metrics(node: &Node, pod: &str) -> Metrics {
    pod_metrics(node, "shop", pod, 15020)
}

/// The host PID of the agent of this node (a `remora-accel` process in its cgroup).
fn agent_host_pid(node: &Node) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            comm.trim() == "remora-accel" && cgroup.contains(node.name())
        })
}

fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff");
    u64::from_str_radix(hex.trim(), 16).expect("hex")
}

/// Removes on drop the directories of the registrations path that this test created.
struct RegistrationsDir {
    created: Vec<&'static Path>,
}

impl RegistrationsDir {
    fn new() -> Self {
        let created = Path::new(REGISTRATIONS)
            .ancestors()
            .take_while(|p| !p.exists())
            .collect();
        Self { created }
    }
}

impl Drop for RegistrationsDir {
    fn drop(&mut self) {
        for dir in &self.created {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accelerator_registers_every_meshed_pod_and_carries_their_traffic() {
    check_bpf_prerequisites();
    let accel_image = images_dir().join("remora-accel.tar");
    assert!(
        accel_image.is_file(),
        "{} is missing: build the images first (make images), or opt out with REMORA_SKIP_ACCEL=1",
        accel_image.display()
    );
    let _registrations = RegistrationsDir::new();
    let node = Node::start().await.expect("node starts");
    println!("node Ready in {:.1} s", node.started_in().as_secs_f64());
    node.install_remora(Duration::from_secs(180))
        .await
        .expect("Remora installs from config/default");
    node.import_image(&accel_image)
        .expect("the remora-accel image imports");
    // Shared, as systemd mounts it: the DaemonSet's HostToContainer propagation needs it.
    in_node_mounts(
        &node,
        &["mount", "--make-shared", "-t", "bpf", "bpf", "/sys/fs/bpf"],
    );

    // The component, applied over the running install.
    let cgroup = node_cgroup_v2(&node);
    let in_agent = Path::new("/host").join(cgroup.strip_prefix("/").expect("absolute"));
    let dir = tempfile::tempdir().expect("tempdir");
    write_kustomization(dir.path(), &in_agent.display().to_string());
    let applied = Instant::now();
    kubectl(&node, &["apply", "-k", &dir.path().display().to_string()]);
    for what in ["daemonset/remora-accel", "deployment/remora-webhook"] {
        kubectl(
            &node,
            &[
                "-n",
                "remora-system",
                "rollout",
                "status",
                what,
                "--timeout=90s",
            ],
        );
    }
    println!(
        "agent Ready and webhook rolled out {:.1} s after apply",
        applied.elapsed().as_secs_f64()
    );
    let agent = agent_pod(&node);
    let pid = agent_host_pid(&node).expect("the agent's process on the host");
    assert_eq!(
        effective_caps(pid),
        AGENT_CAPS,
        "the agent must hold CAP_BPF and CAP_NET_ADMIN only"
    );
    let hooks = attached_hooks(&cgroup);
    for hook in HOOKS {
        assert!(
            hooks.iter().any(|h| h == hook),
            "{hook} not attached to {}: {hooks:?}",
            cgroup.display()
        );
    }
    let pins = in_node_mounts(&node, &["ls", "/sys/fs/bpf/remora"]);
    assert!(pins.contains("meshed_pods"), "pins: {pins}");

    // The samples, created after the webhook has the flag: each pod registers.
    let samples = repo_root().join("config/samples");
    // The webhook's new pods answer through its Service once kube-proxy has their
    // endpoints; until then the API server's calls time out.
    let start = Instant::now();
    while let Err(e) = node.kubectl(&["apply", "-k", &samples.display().to_string()]) {
        assert!(
            e.to_string().contains("failed calling webhook")
                && start.elapsed() < Duration::from_secs(60),
            "kubectl apply -k config/samples: {e}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for d in SHOP_DEPLOYMENTS {
        kubectl(
            &node,
            &[
                "-n",
                "shop",
                "rollout",
                "status",
                &format!("deployment/{d}"),
                "--timeout=90s",
            ],
        );
    }
    let shop_pods = |jsonpath: &str| {
        kubectl(
            &node,
            &[
                "-n",
                "shop",
                "get",
                "pods",
                "-o",
                &format!("jsonpath={jsonpath}"),
            ],
        )
    };
    let pods = shop_pods("{.items[*].metadata.name}");
    let pods: Vec<&str> = pods.split_whitespace().collect();
    let volumes = shop_pods("{.items[*].spec.volumes[?(@.name==\"remora-accel\")].hostPath.path}");
    assert_eq!(
        volumes.split_whitespace().count(),
        pods.len(),
        "every shop pod mounts the registrations dir: {volumes}"
    );
    let start = Instant::now();
    let metrics = loop {
        let m = agent_metrics(&node, &agent);
        let loaded = m.sum("remora_accel_registrations_total", &[("outcome", "loaded")]);
        if loaded >= pods.len() as f64 || start.elapsed() > Duration::from_secs(20) {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let loaded = metrics.sum("remora_accel_registrations_total", &[("outcome", "loaded")]);
    assert!(
        loaded >= pods.len() as f64,
        "{loaded} registrations loaded for {} pods:\n{}",
        pods.len(),
        metrics.text()
    );
    for bad in ["invalid", "refused", "error"] {
        assert_eq!(
            metrics.sum("remora_accel_registrations_total", &[("outcome", bad)]),
            0.0,
            "{}",
            metrics.text()
        );
    }
    assert!(
        metrics.sum("remora_accel_map_entries", &[("map", "meshed_pods")]) >= pods.len() as f64,
        "{}",
        metrics.text()
    );

    // The loadgen calls reviews through the mesh (20 req/s): answered, and on the
    // accelerated path.
    let loadgen = pods
        .iter()
        .find(|p| p.starts_with("loadgen"))
        .expect("a loadgen pod");
    let counter = |m: &Metrics, name: &str| m.sum(name, &[]);
    let before = agent_metrics(&node, &agent);
    assert_answered(&node, loadgen, "accelerated").await;
    let after = agent_metrics(&node, &agent);
    println!(
        "agent totals: connects redirected {}, sockets accelerated {}, messages redirected {}, original destinations served {}, connect fallbacks {}",
        counter(&after, "remora_accel_connects_redirected_total"),
        counter(&after, "remora_accel_sockets_accelerated_total"),
        counter(&after, "remora_accel_messages_redirected_total"),
        counter(&after, "remora_accel_orig_dst_served_total"),
        counter(&after, "remora_accel_connect_fallbacks_total"),
    );
    for name in [
        "remora_accel_connects_redirected_total",
        "remora_accel_sockets_accelerated_total",
        "remora_accel_orig_dst_served_total",
    ] {
        assert!(
            counter(&after, name) > 0.0,
            "{name} is 0:\n{}",
            after.text()
        );
    }
    // The requests of these 5 s went through redirected sends.
    let messages = "remora_accel_messages_redirected_total";
    assert!(
        counter(&after, messages) > counter(&before, messages),
        "no message redirected while the loadgen ran:\n{}",
        after.text()
    );

    // The agent goes (SIGTERM): its programs stay attached, traffic is still answered.
    kubectl(
        &node,
        &[
            "-n",
            "remora-system",
            "delete",
            "daemonset/remora-accel",
            "--wait=true",
            "--timeout=60s",
        ],
    );
    wait_until_gone(&node, &agent).await;
    assert_eq!(
        attached_hooks(&cgroup),
        hooks,
        "the agent's exit detached programs"
    );
    assert_answered(&node, loadgen, "with the agent gone").await;

    // `--cleanup`, run as users would on each node (a pod of the same image), removes
    // every program and pin; traffic goes on through the iptables rules.
    let cleanup = dir.path().join("cleanup.yaml");
    std::fs::write(&cleanup, cleanup_pod(&in_agent.display().to_string())).expect("write");
    kubectl(&node, &["apply", "-f", &cleanup.display().to_string()]);
    kubectl(
        &node,
        &[
            "-n",
            "remora-system",
            "wait",
            "pod/remora-accel-cleanup",
            "--for=jsonpath={.status.phase}=Succeeded",
            "--timeout=60s",
        ],
    );
    assert_eq!(
        attached_hooks(&cgroup),
        Vec::<String>::new(),
        "cleanup left programs attached"
    );
    let left = in_node_mounts(&node, &["ls", "/sys/fs/bpf"]);
    assert!(
        !left.split_whitespace().any(|p| p == "remora"),
        "pins left: {left}"
    );
    assert_answered(&node, loadgen, "after --cleanup").await;

    let report = node.stop();
    assert!(
        report.problems.is_empty(),
        "teardown left: {:?}",
        report.problems
    );
}
