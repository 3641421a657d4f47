//! A single-node Kubernetes in a box: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, containerd, kubelet and kube-proxy (iptables mode), all real, all inside
//! a network namespace of their own that holds only loopback and the pod bridge.
//!
//! [`Node::start`] returns when the node is Ready; tests talk to it from the host through a
//! loopback forwarder ([`forward`]). Teardown ([`Node::stop`], or drop, also on panic)
//! kills every process by PID (kubelet first, then kube-proxy, the control plane, then
//! whatever is left in the node's cgroup: shims and containers), lets the node's mount
//! namespace go (every kubelet and containerd mount with it), deletes the network
//! namespace and the cgroups, and restores the kernel settings kubelet changed.

pub mod config;
pub mod dns;
pub mod forward;
pub mod host;
pub mod install;
pub mod netns;
pub mod netthread;
pub mod pause;
pub mod teardown;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node as K8sNode;

use crate::{Cluster, ClusterOptions, HarnessError, components::Process, io_err, prereqs};

use config::{Layout, NODE_IP, POD_CIDR, SERVICE_CIDR};
use forward::Forwarder;
use host::{NodeCgroup, Sysctls};
use netns::{NodeNetns, run};
pub use teardown::Teardown;

/// The Kubernetes name of the node.
pub const NODE_NAME: &str = "remora-node";

/// What to start.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// How long the node may take to become Ready.
    pub ready_timeout: Duration,
    /// Where the Kubernetes binaries are (default: [`prereqs::k8s_bin_dir`]).
    pub k8s_bin_dir: Option<PathBuf>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            ready_timeout: Duration::from_secs(120),
            k8s_bin_dir: None,
        }
    }
}

/// A running node. See the module docs.
#[derive(Debug)]
pub struct Node {
    layout: Layout,
    dir: Option<tempfile::TempDir>,
    sysctls: Sysctls,
    cgroup: Option<NodeCgroup>,
    netns: Option<NodeNetns>,
    created_dirs: Vec<PathBuf>,
    holder: Option<Process>,
    forwarder: Option<Forwarder>,
    dns: Option<netthread::NetnsThread>,
    cluster: Option<Cluster>,
    /// kube-scheduler, containerd, kubelet, kube-proxy.
    processes: Vec<Process>,
    launcher: Vec<String>,
    started_in: Duration,
    torn_down: bool,
}

fn node_binaries() -> Result<Vec<PathBuf>, HarnessError> {
    prereqs::node_tools(prereqs::on_path, Path::new("/usr/lib/cni"), nix_is_root())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), HarnessError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
    std::fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))
}

fn mkdirs(dirs: &[PathBuf]) -> Result<(), HarnessError> {
    for d in dirs {
        std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    Ok(())
}

impl Node {
    /// Starts a node with the default options.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(NodeOptions::default()).await
    }

    /// Starts everything and waits until the node is Ready. On an error, what was started
    /// is torn down again (the run directory is kept for its logs).
    pub async fn start_with(opts: NodeOptions) -> Result<Self, HarnessError> {
        let started = Instant::now();
        node_binaries()?;
        let bin_dir = opts
            .k8s_bin_dir
            .clone()
            .unwrap_or_else(prereqs::k8s_bin_dir);
        let kubelet = prereqs::k8s_binary(&bin_dir, "kubelet")?;
        let kube_proxy = prereqs::k8s_binary(&bin_dir, "kube-proxy")?;
        let scheduler = prereqs::k8s_binary(&bin_dir, "kube-scheduler")?;
        let pause_bin = prereqs::k8s_binary(&bin_dir, "pause")?;

        let sysctls = Sysctls::save();
        let dir = tempfile::Builder::new()
            .prefix("remora-node-")
            .tempdir()
            .map_err(io_err("creating the node directory"))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let id = format!("{:06x}", (std::process::id() ^ nanos) & 0xff_ffff);
        let layout = Layout {
            run: dir.path().to_owned(),
            name: format!("remora-node-{id}"),
            node_name: NODE_NAME.to_owned(),
            pause_image: pause::REFERENCE.to_owned(),
        };
        let mut node = Self {
            layout,
            dir: Some(dir),
            sysctls,
            cgroup: None,
            netns: None,
            created_dirs: Vec::new(),
            holder: None,
            forwarder: None,
            dns: None,
            cluster: None,
            processes: Vec::new(),
            launcher: Vec::new(),
            started_in: Duration::ZERO,
            torn_down: false,
        };
        match node
            .bring_up(&opts, &[kubelet, kube_proxy, scheduler, pause_bin])
            .await
        {
            Ok(()) => {
                node.started_in = started.elapsed();
                Ok(node)
            }
            Err(e) => {
                // Keep the logs: the caller sees the error, not a panic.
                if let Some(dir) = node.dir.take() {
                    let path = dir.keep();
                    eprintln!("remora-e2e: node failed to start; kept {}", path.display());
                    node.layout.run = path;
                }
                let report = node.teardown();
                for p in report.problems {
                    eprintln!("remora-e2e: teardown after a failed start: {p}");
                }
                Err(e)
            }
        }
    }

    async fn bring_up(
        &mut self,
        opts: &NodeOptions,
        bins: &[PathBuf; 4],
    ) -> Result<(), HarnessError> {
        let [kubelet, kube_proxy, scheduler, pause_bin] = bins;
        let l = self.layout.clone();
        let run_dir = l.run.clone();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err("opening the node directory"))?;
        let shadowed = l.shadowed();
        mkdirs(&[
            l.containerd_root(),
            l.containerd_state(),
            l.cni_conf_dir(),
            l.kubelet_root(),
            run_dir.join("kubelet/pki"),
            run_dir.join("kubelet/volume-plugins"),
            run_dir.join("pki"),
        ])?;
        mkdirs(
            &shadowed
                .iter()
                .map(|(_, local)| local.clone())
                .collect::<Vec<_>>(),
        )?;
        std::fs::write(l.containerd_config(), config::containerd_toml(&l))
            .map_err(io_err("writing containerd's config"))?;
        write_json(
            &l.cni_conf_dir().join("10-remora.conflist"),
            &config::cni_conflist(&l),
        )?;
        // kubelet's "host" resolver configuration: no upstream (the host's would point
        // outside the node). Pods resolve through the node's own DNS responder.
        std::fs::write(l.resolv_conf(), "# remora node: no upstream DNS\n")
            .map_err(io_err("writing resolv.conf"))?;

        self.cgroup = Some(NodeCgroup::create(&l.name)?);
        let netns = NodeNetns::create(&l.name)?;
        for (host, _) in &shadowed {
            if !host.exists() {
                std::fs::create_dir_all(host)
                    .map_err(io_err(format!("creating {}", host.display())))?;
                self.created_dirs.push(host.clone());
            }
        }
        let holder = netns::start_holder(&netns, &l)?;
        let procs = self
            .cgroup
            .as_ref()
            .map(NodeCgroup::node_procs_file)
            .unwrap_or_default();
        self.launcher = netns::launcher(holder.pid(), &procs);
        self.holder = Some(holder);
        let forwarder = Forwarder::start(netns.path())?;
        self.netns = Some(netns);
        let port = forwarder.port();
        self.forwarder = Some(forwarder);

        // The apiserver reaches kubelet (logs, exec) at the node's address, as the admin.
        let pki_dir = run_dir.join("pki");
        let cluster = Cluster::start_with(ClusterOptions {
            controller_manager: true,
            extra_apiserver_args: vec!["--kubelet-preferred-address-types=InternalIP".to_owned()],
            ready_timeout: opts.ready_timeout,
            k8s_bin_dir: opts.k8s_bin_dir.clone(),
            launcher: self.launcher.clone(),
            api_port: Some(port),
            bind_address: "0.0.0.0"
                .parse()
                .map_err(|_| HarnessError::Kubeconfig("address".into()))?,
            advertise_address: NODE_IP.into(),
            controller_manager_args: Some(vec![
                "--use-service-account-credentials=true".to_owned(),
                "--controllers=*,-cloud-node-lifecycle,-route,-service".to_owned(),
                "--allocate-node-cidrs=true".to_owned(),
                format!("--cluster-cidr={POD_CIDR}"),
                "--node-cidr-mask-size=24".to_owned(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            ]),
        })
        .await?;
        let pki = cluster.pki().clone();
        let server = cluster.api_url().to_owned();
        let admin_kc = cluster.kubeconfig().to_owned();
        self.cluster = Some(cluster);

        let (kcert, kkey) = pki.issue_client(
            &pki_dir,
            "kubelet",
            &format!("system:node:{NODE_NAME}"),
            Some("system:nodes"),
        )?;
        let kubelet_kc = run_dir.join("kubelet/kubeconfig");
        write_json(
            &kubelet_kc,
            &config::kubeconfig(&server, &pki.ca_cert, &kcert, &kkey),
        )?;
        let (pcert, pkey) = pki.issue_client(&pki_dir, "kube-proxy", "system:kube-proxy", None)?;
        let proxy_kc = run_dir.join("kube-proxy.kubeconfig");
        write_json(
            &proxy_kc,
            &config::kubeconfig(&server, &pki.ca_cert, &pcert, &pkey),
        )?;
        write_json(
            &l.kubelet_config(),
            &config::kubelet_config(&l, &pki.ca_cert),
        )?;

        let netns_path = self
            .netns
            .as_ref()
            .map(|n| n.path().to_owned())
            .unwrap_or_default();
        self.dns = Some(dns::start(
            &netns_path,
            (NODE_IP, 53).into(),
            admin_kc.clone(),
        )?);

        let admin = admin_kc.display().to_string();
        self.spawn(
            "kube-scheduler",
            scheduler,
            &[
                format!("--kubeconfig={admin}"),
                format!("--authentication-kubeconfig={admin}"),
                format!("--authorization-kubeconfig={admin}"),
                "--leader-elect=false".to_owned(),
                "--port=0".to_owned(),
                "--bind-address=127.0.0.1".to_owned(),
            ],
            &[],
        )?;

        let containerd = prereqs::system_binary("containerd", "containerd")?;
        self.spawn(
            "containerd",
            &containerd,
            &[
                "--config".to_owned(),
                l.containerd_config().display().to_string(),
            ],
            &[],
        )?;
        self.wait_for_containerd(Duration::from_secs(30)).await?;
        let pause_tar = pause::write(pause_bin, &run_dir.join("pause.tar"))?;
        self.import_image(&pause_tar)?;

        let kc = kubelet_kc.display().to_string();
        let sock = l.containerd_socket().display().to_string();
        self.spawn(
            "kubelet",
            kubelet,
            &[
                format!("--config={}", l.kubelet_config().display()),
                format!("--kubeconfig={kc}"),
                "--container-runtime=remote".to_owned(),
                format!("--container-runtime-endpoint=unix://{sock}"),
                format!("--root-dir={}", l.kubelet_root().display()),
                format!("--cert-dir={}", run_dir.join("kubelet/pki").display()),
                format!(
                    "--volume-plugin-dir={}",
                    run_dir.join("kubelet/volume-plugins").display()
                ),
                format!("--pod-infra-container-image={}", l.pause_image),
                format!("--node-ip={NODE_IP}"),
                format!("--hostname-override={NODE_NAME}"),
                "--runtime-request-timeout=2m".to_owned(),
                "--v=1".to_owned(),
            ],
            // The ECR credential provider is compiled in even with `providerless`; without
            // this it asks 169.254.169.254 for credentials at start-up (the namespace has no
            // route there anyway).
            &[("AWS_EC2_METADATA_DISABLED", "true".to_owned())],
        )?;

        self.spawn(
            "kube-proxy",
            kube_proxy,
            &[
                format!("--kubeconfig={}", proxy_kc.display()),
                "--proxy-mode=iptables".to_owned(),
                // The VM refuses to lower OOM scores.
                "--oom-score-adj=0".to_owned(),
                // 0: leave the host-wide conntrack settings alone.
                "--conntrack-max-per-core=0".to_owned(),
                "--conntrack-min=0".to_owned(),
                "--conntrack-tcp-timeout-established=0".to_owned(),
                "--conntrack-tcp-timeout-close-wait=0".to_owned(),
                format!("--nodeport-addresses={NODE_IP}/32"),
                format!("--cluster-cidr={POD_CIDR}"),
                format!("--hostname-override={NODE_NAME}"),
                format!("--bind-address={NODE_IP}"),
                "--healthz-bind-address=127.0.0.1:10256".to_owned(),
                "--metrics-bind-address=127.0.0.1:10249".to_owned(),
                "--v=1".to_owned(),
            ],
            &[],
        )?;

        self.wait_node_ready(opts.ready_timeout).await
    }

    fn spawn(
        &mut self,
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<(), HarnessError> {
        let p = Process::start_via(&self.launcher, name, binary, args, env, &self.layout.run)?;
        self.processes.push(p);
        Ok(())
    }

    fn check_processes(&mut self) -> Result<(), HarnessError> {
        self.processes
            .iter_mut()
            .try_for_each(Process::check_running)
    }

    async fn wait_for_containerd(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let start = Instant::now();
        loop {
            self.check_processes()?;
            let last = match run(self.ctr().args(["version"])) {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: "containerd".to_owned(),
                    secs: timeout.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_node_ready(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let api: kube::Api<K8sNode> = kube::Api::all(self.client().await?);
        let start = Instant::now();
        loop {
            self.check_processes()?;
            let last = match api.get_opt(NODE_NAME).await {
                Ok(Some(n)) => {
                    let ready = n
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .into_iter()
                        .find(|c| c.type_ == "Ready");
                    match ready {
                        Some(c) if c.status == "True" => return Ok(()),
                        Some(c) => format!("Ready={}: {}", c.status, c.message.unwrap_or_default()),
                        None => "no Ready condition yet".to_owned(),
                    }
                }
                Ok(None) => "node not registered yet".to_owned(),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: format!("node {NODE_NAME} Ready"),
                    secs: timeout.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// How long [`Node::start`] took, from the call to node Ready.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The control plane (admin kubeconfig, PKI, apiserver URL on the host's loopback).
    pub fn cluster(&self) -> Result<&Cluster, HarnessError> {
        self.cluster
            .as_ref()
            .ok_or_else(|| HarnessError::Kubeconfig("node already stopped".to_owned()))
    }

    /// A new admin client, connected through the forwarder.
    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        self.cluster()?.client().await
    }

    /// The admin kubeconfig, usable from the host while the node runs.
    pub fn kubeconfig(&self) -> Result<&Path, HarnessError> {
        Ok(self.cluster()?.kubeconfig())
    }

    /// Runs `kubectl <args>` against the node; its stdout, or an error with its stderr.
    pub fn kubectl<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String, HarnessError> {
        run(self.cluster()?.kubectl()?.args(args))
    }

    /// `program` as a command inside the node's network namespace.
    pub fn netns_command(&self, program: &str) -> Result<Command, HarnessError> {
        self.netns
            .as_ref()
            .map(|n| n.command(program))
            .ok_or_else(|| HarnessError::Kubeconfig("node already stopped".to_owned()))
    }

    /// Runs `args[0] args[1..]` inside the node's network namespace; its stdout.
    pub fn exec_in_netns(&self, args: &[&str]) -> Result<String, HarnessError> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| HarnessError::Kubeconfig("exec_in_netns needs a command".to_owned()))?;
        run(self.netns_command(program)?.args(rest))
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.layout.containerd_socket())
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    /// Imports an image tarball (docker-archive or OCI) into the node's containerd, where
    /// kubelet finds it (`imagePullPolicy: IfNotPresent`, a tag other than `latest`).
    pub fn import_image(&self, tarball: &Path) -> Result<(), HarnessError> {
        run(self.ctr().args(["images", "import"]).arg(tarball)).map(|_| ())
    }

    /// Resident memory of every process of the box (control plane, runtime, kubelet,
    /// kube-proxy, shims, pods), in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.cgroup.as_ref().map_or(0, NodeCgroup::rss_bytes)
    }

    /// `remora-node-<id>`: the network namespace's and cgroup's name.
    pub fn name(&self) -> &str {
        &self.layout.name
    }

    /// The run directory (configs, logs, state).
    pub fn run_dir(&self) -> &Path {
        &self.layout.run
    }

    /// The network namespace's addresses and routes.
    pub fn describe_network(&self) -> String {
        self.netns
            .as_ref()
            .map(NodeNetns::describe)
            .unwrap_or_default()
    }

    /// Stops the node and checks that nothing is left behind.
    pub fn stop(mut self) -> Teardown {
        self.teardown()
    }
}
