//! One throwaway Kubernetes control plane on loopback: etcd, kube-apiserver and, unless
//! turned off, kube-controller-manager, each a child process stopped by PID on drop.

use std::{
    net::{IpAddr, Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::{
    HarnessError,
    components::Process,
    io_err,
    pki::{self, Pki},
    prereqs,
};

const APISERVER: &str = "kube-apiserver";

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Run kube-controller-manager: ServiceAccounts, Deployments → ReplicaSets → Pods,
    /// EndpointSlices, garbage collection, namespace deletion.
    pub controller_manager: bool,
    /// Extra kube-apiserver flags (`--flag=value`).
    pub extra_apiserver_args: Vec<String>,
    /// How long the control plane may take to become ready.
    pub ready_timeout: Duration,
    /// Where kube-apiserver and kube-controller-manager are (default:
    /// [`prereqs::k8s_bin_dir`]).
    pub k8s_bin_dir: Option<PathBuf>,
    /// A command every process is started through (e.g. entering a node's network
    /// namespace); empty: started directly.
    pub launcher: Vec<String>,
    /// The apiserver's port (default: a free one). A node's forwarder reserves a host port
    /// and the apiserver listens on the same number inside the node's namespace, so one
    /// kubeconfig serves both sides.
    pub api_port: Option<u16>,
    /// kube-apiserver `--bind-address` (default 127.0.0.1).
    pub bind_address: IpAddr,
    /// kube-apiserver `--advertise-address`, the `kubernetes` Service's endpoint; also
    /// named in its serving certificate (default 127.0.0.1).
    pub advertise_address: IpAddr,
    /// kube-controller-manager flags replacing the default controller set and
    /// service-account credential mode (the kubeconfig, key and CA flags stay).
    pub controller_manager_args: Option<Vec<String>>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            controller_manager: true,
            extra_apiserver_args: Vec::new(),
            ready_timeout: Duration::from_secs(120),
            k8s_bin_dir: None,
            launcher: Vec::new(),
            api_port: None,
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            controller_manager_args: None,
        }
    }
}

/// A running control plane. Dropping it stops every process (controller-manager, then
/// apiserver, then etcd) and removes its directory, unless `REMORA_E2E_KEEP` is set or the
/// test is panicking, in which case the directory (logs, PKI) is kept and its path printed.
#[derive(Debug)]
pub struct Cluster {
    processes: Vec<Process>,
    dir: Option<tempfile::TempDir>,
    api_url: String,
    kubeconfig: PathBuf,
    pki: Pki,
    /// How kube-apiserver was started, to start it again after [`Cluster::stop_apiserver`].
    apiserver: (PathBuf, Vec<String>),
    ready_timeout: Duration,
    launcher: Vec<String>,
}

/// `N` distinct free TCP ports on 127.0.0.1 (free when chosen; bind them promptly).
pub fn free_ports<const N: usize>() -> Result<[u16; N], HarnessError> {
    // Hold every listener until all ports are chosen so the N ports differ.
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let l = TcpListener::bind("127.0.0.1:0").map_err(io_err("choosing a free port"))?;
        *port = l
            .local_addr()
            .map_err(io_err("choosing a free port"))?
            .port();
        listeners.push(l);
    }
    Ok(ports)
}

impl Cluster {
    /// Starts etcd, kube-apiserver and kube-controller-manager.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(ClusterOptions::default()).await
    }

    /// Starts a control plane as `opts` says and waits until the apiserver is ready
    /// (and, with the controller-manager, until it has created the `default`
    /// ServiceAccount, so pods can be created).
    pub async fn start_with(opts: ClusterOptions) -> Result<Self, HarnessError> {
        let etcd = prereqs::system_binary("etcd", "etcd-server")?;
        let bin_dir = opts
            .k8s_bin_dir
            .clone()
            .unwrap_or_else(prereqs::k8s_bin_dir);
        let apiserver = prereqs::k8s_binary(&bin_dir, "kube-apiserver")?;
        let kcm = if opts.controller_manager {
            Some(prereqs::k8s_binary(&bin_dir, "kube-controller-manager")?)
        } else {
            None
        };

        let dir = tempfile::Builder::new()
            .prefix("remora-e2e-")
            .tempdir()
            .map_err(io_err("creating the cluster directory"))?;
        let root = dir.path().to_owned();
        let extra_ips: Vec<IpAddr> = Some(opts.advertise_address)
            .filter(|ip| !ip.is_loopback())
            .into_iter()
            .collect();
        let pki = pki::generate_with(&root.join("pki"), &extra_ips)?;
        let [etcd_client, etcd_peer, etcd_metrics, free_api_port] = free_ports::<4>()?;
        let api_port = opts.api_port.unwrap_or(free_api_port);
        let api_url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = root.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &api_url, &pki)?;

        let mut cluster = Self {
            processes: Vec::new(),
            dir: Some(dir),
            api_url,
            kubeconfig,
            pki,
            apiserver: (apiserver.clone(), Vec::new()),
            ready_timeout: opts.ready_timeout,
            launcher: opts.launcher.clone(),
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        cluster.spawn(
            "etcd",
            &etcd,
            &[
                "--name=e2e".to_owned(),
                format!("--data-dir={}", root.join("etcd").display()),
                "--unsafe-no-fsync".to_owned(),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=e2e={peer_url}"),
                format!("--listen-metrics-urls=http://127.0.0.1:{etcd_metrics}"),
                "--log-level=warn".to_owned(),
            ],
        )?;

        let p = &cluster.pki;
        let mut api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={}", opts.bind_address),
            format!("--advertise-address={}", opts.advertise_address),
            format!("--secure-port={api_port}"),
            "--insecure-port=0".to_owned(),
            format!("--cert-dir={}", root.join("certs").display()),
            format!("--tls-cert-file={}", p.serving_cert.display()),
            format!("--tls-private-key-file={}", p.serving_key.display()),
            format!("--client-ca-file={}", p.ca_cert.display()),
            "--authorization-mode=Node,RBAC".to_owned(),
            format!("--service-account-key-file={}", p.sa_pub.display()),
            format!("--service-account-signing-key-file={}", p.sa_key.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            "--api-audiences=https://kubernetes.default.svc.cluster.local,remora".to_owned(),
            "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
            "--allow-privileged=true".to_owned(),
            // How the apiserver authenticates to kubelets (logs, exec) on a node.
            format!("--kubelet-client-certificate={}", p.admin_cert.display()),
            format!("--kubelet-client-key={}", p.admin_key.display()),
            "--enable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook".to_owned(),
            "--profiling=false".to_owned(),
        ];
        if !opts.controller_manager {
            api_args.push("--disable-admission-plugins=ServiceAccount".to_owned());
        }
        api_args.extend(opts.extra_apiserver_args.iter().cloned());
        cluster.apiserver.1 = api_args;
        cluster.start_apiserver().await?;

        if let Some(kcm) = kcm {
            let kc = cluster.kubeconfig.display().to_string();
            let p = &cluster.pki;
            let mut args = vec![
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--leader-elect=false".to_owned(),
                "--port=0".to_owned(),
                "--secure-port=0".to_owned(),
                format!("--service-account-private-key-file={}", p.sa_key.display()),
                format!("--root-ca-file={}", p.ca_cert.display()),
            ];
            match &opts.controller_manager_args {
                Some(custom) => args.extend(custom.iter().cloned()),
                None => args.extend([
                    "--use-service-account-credentials=false".to_owned(),
                    "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-pvc-protection,-pv-protection,-ttl".to_owned(),
                ]),
            }
            cluster.spawn("kube-controller-manager", &kcm, &args)?;
            cluster
                .wait_for_service_account("default", "default", opts.ready_timeout)
                .await?;
        }
        Ok(cluster)
    }

    /// Kills kube-apiserver (etcd and the controller-manager keep running), so tests can
    /// show what components do while the apiserver is unavailable. Idempotent.
    pub fn stop_apiserver(&mut self) {
        self.processes.retain(|p| p.name() != APISERVER);
    }

    /// Starts kube-apiserver again, with the same flags, port and data, and waits until it
    /// is ready. (Also how [`Cluster::start_with`] starts it.)
    pub async fn start_apiserver(&mut self) -> Result<(), HarnessError> {
        if self.processes.iter().any(|p| p.name() == APISERVER) {
            return Ok(());
        }
        let (binary, args) = self.apiserver.clone();
        self.spawn(APISERVER, &binary, &args)?;
        self.wait_ready(self.ready_timeout).await
    }

    fn spawn(&mut self, name: &str, binary: &Path, args: &[String]) -> Result<(), HarnessError> {
        let dir = self.dir()?.to_owned();
        let process = if self.launcher.is_empty() {
            Process::start(name, binary, args, &[], &dir)?
        } else {
            Process::start_via(&self.launcher, name, binary, args, &[], &dir)?
        };
        self.processes.push(process);
        Ok(())
    }

    fn check_processes(&mut self) -> Result<(), HarnessError> {
        self.processes
            .iter_mut()
            .try_for_each(Process::check_running)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let start = Instant::now();
        loop {
            self.check_processes()?;
            let last = match self.readyz().await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: "kube-apiserver /readyz".to_owned(),
                    secs: timeout.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn readyz(&self) -> Result<String, HarnessError> {
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        Ok(self.client().await?.request_text(req).await?)
    }

    /// Waits until the controller-manager has created service account `name` in `ns`.
    pub async fn wait_for_service_account(
        &mut self,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let api: kube::Api<ServiceAccount> = kube::Api::namespaced(self.client().await?, ns);
        let start = Instant::now();
        loop {
            self.check_processes()?;
            match api.get_opt(name).await {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => {}
                Err(e) => tracing::debug!("waiting for service account {ns}/{name}: {e}"),
            }
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: format!("service account {ns}/{name} (kube-controller-manager)"),
                    secs: timeout.as_secs(),
                    last: "not created".to_owned(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A new client for the admin user. Each call builds its own, bound to the calling
    /// tokio runtime.
    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        Ok(kube::Client::try_from(config)?)
    }

    /// The admin kubeconfig (file paths to the PKI; usable by kubectl and Go clients).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The cluster's PKI (the CA signs the apiserver's certificate and client certificates).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The run directory: PKI, etcd data, process logs.
    pub fn dir(&self) -> Result<&Path, HarnessError> {
        self.dir.as_ref().map(|d| d.path()).ok_or_else(|| {
            HarnessError::Kubeconfig("cluster directory already released".to_owned())
        })
    }

    /// A `kubectl` command pointed at this cluster.
    pub fn kubectl(&self) -> Result<Command, HarnessError> {
        let mut cmd = Command::new(prereqs::kubectl()?);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        Ok(cmd)
    }

    /// PIDs of the running control-plane processes, by name.
    pub fn pids(&self) -> Vec<(&str, u32)> {
        self.processes.iter().map(|p| (p.name(), p.pid())).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Reverse start order; each Process is killed (SIGKILL: the data directory is
        // thrown away, nothing needs a clean shutdown) and reaped as it drops.
        while let Some(p) = self.processes.pop() {
            drop(p);
        }
        let keep = std::env::var_os("REMORA_E2E_KEEP").is_some() || std::thread::panicking();
        // Dropping the TempDir removes it; keeping it leaves logs and PKI for a post-mortem.
        if let Some(dir) = self.dir.take().filter(|_| keep) {
            let path = dir.keep();
            eprintln!(
                "remora-e2e: kept cluster directory {} (logs, PKI)",
                path.display()
            );
        }
    }
}

fn write_kubeconfig(path: &Path, server: &str, pki: &Pki) -> Result<(), HarnessError> {
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {
            "server": server,
            "certificate-authority": pki.ca_cert,
        }}],
        "users": [{"name": "admin", "user": {
            "client-certificate": pki.admin_cert,
            "client-key": pki.admin_key,
        }}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "admin"}}],
        "current-context": "e2e",
    });
    let text =
        serde_yaml::to_string(&kubeconfig).map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
    std::fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))
}
