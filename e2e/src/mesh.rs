//! Remora's control-plane components run as local processes against a test cluster: the
//! operator with the cluster's kubeconfig, and the webhook on loopback, registered with
//! the apiserver through a URL `clientConfig` and a serving certificate from the
//! cluster's CA.

use std::{
    net::TcpStream,
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, WebhookClientConfig},
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    },
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};

use crate::{
    Cluster, HarnessError,
    apply::{FIELD_MANAGER, repo_root},
    cluster::free_ports,
    components::{Process, workspace_binary},
    io_err,
};

/// A running operator and its loopback ports.
#[derive(Debug)]
pub struct LocalOperator {
    pub process: Process,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin_port: u16,
    /// The certificate authority (`/v1/certify`, TLS).
    pub ca_port: u16,
}

/// Starts `remora-operator` against `cluster`, on free loopback ports.
pub fn start_operator(cluster: &Cluster) -> Result<LocalOperator, HarnessError> {
    let [admin_port, ca_port] = free_ports::<2>()?;
    start_operator_on(cluster, admin_port, ca_port)
}

/// Starts `remora-operator` against `cluster` on the given loopback ports (a restarted
/// operator keeps the address its clients know).
pub fn start_operator_on(
    cluster: &Cluster,
    admin_port: u16,
    ca_port: u16,
) -> Result<LocalOperator, HarnessError> {
    let process = Process::start(
        "remora-operator",
        &workspace_binary("remora-operator")?,
        &[
            format!("--metrics-listen=127.0.0.1:{admin_port}"),
            format!("--ca-listen=127.0.0.1:{ca_port}"),
            // A local webhook is served with a harness certificate and registered by URL
            // ([`register_webhook`]): the operator must not replace its caBundle with the
            // mesh bundle (that is for the in-cluster webhook Service).
            "--manage-webhook-certificate=false".to_owned(),
        ],
        &[
            ("KUBECONFIG", cluster.kubeconfig().display().to_string()),
            ("POD_NAMESPACE", "remora-system".to_owned()),
            ("POD_NAME", "remora-operator-local".to_owned()),
        ],
        cluster.dir()?,
    )?;
    Ok(LocalOperator {
        process,
        admin_port,
        ca_port,
    })
}

/// A token for service account `ns/name` from the TokenRequest API, for `audience`
/// (`remora` is what the webhook's projected volume asks for), valid `seconds`.
pub async fn service_account_token(
    client: &Client,
    ns: &str,
    name: &str,
    audience: &str,
    seconds: i64,
) -> Result<String, HarnessError> {
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(seconds),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(name, &PostParams::default(), &req)
        .await?
        .status
        .map(|s| s.token)
        .ok_or_else(|| HarnessError::Missing {
            what: format!("a token in the TokenRequest answer for {ns}/{name}"),
            how: "check the apiserver's --service-account-signing-key-file and --api-audiences"
                .to_owned(),
        })
}

/// A running webhook and where the apiserver reaches it.
#[derive(Debug)]
pub struct LocalWebhook {
    pub process: Process,
    pub url: String,
    pub port: u16,
    pub metrics_port: u16,
    pub ca_pem: String,
}

/// Starts `remora-webhook serve` on loopback with a serving certificate for 127.0.0.1
/// signed by the cluster's CA, and waits until it accepts connections.
pub async fn start_webhook(
    cluster: &Cluster,
    extra_args: &[&str],
) -> Result<LocalWebhook, HarnessError> {
    let dir = cluster.dir()?.join("webhook-tls");
    std::fs::create_dir_all(&dir).map_err(io_err("creating the webhook TLS directory"))?;
    let (cert, key) = serving_certificate(cluster)?;
    std::fs::write(dir.join("tls.crt"), cert).map_err(io_err("writing the webhook certificate"))?;
    std::fs::write(dir.join("tls.key"), key).map_err(io_err("writing the webhook key"))?;

    let [port, metrics_port] = free_ports::<2>()?;
    let mut args = vec![
        "serve".to_owned(),
        format!("--listen=127.0.0.1:{port}"),
        format!("--metrics-listen=127.0.0.1:{metrics_port}"),
        format!("--tls-cert={}", dir.join("tls.crt").display()),
        format!("--tls-key={}", dir.join("tls.key").display()),
        format!("--kubeconfig={}", cluster.kubeconfig().display()),
    ];
    args.extend(extra_args.iter().map(|a| (*a).to_owned()));
    let mut process = Process::start(
        "remora-webhook",
        &workspace_binary("remora-webhook")?,
        &args,
        &[],
        cluster.dir()?,
    )?;
    wait_listening(&mut process, port, Duration::from_secs(30)).await?;
    Ok(LocalWebhook {
        process,
        url: format!("https://127.0.0.1:{port}/mutate"),
        port,
        metrics_port,
        ca_pem: cluster.pki().ca_pem.clone(),
    })
}

fn serving_certificate(cluster: &Cluster) -> Result<(String, String), HarnessError> {
    let ca_key_pem = std::fs::read_to_string(&cluster.pki().ca_key)
        .map_err(io_err("reading the cluster CA key"))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&cluster.pki().ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub async fn wait_listening(
    process: &mut Process,
    port: u16,
    timeout: Duration,
) -> Result<(), HarnessError> {
    let start = Instant::now();
    loop {
        process.check_running()?;
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(HarnessError::Timeout {
                what: format!("{} listening on port {port}", process.name()),
                secs: timeout.as_secs(),
                last: format!("see {}", process.log().display()),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers `config/webhook/mutatingwebhookconfiguration.yaml` with its `clientConfig`
/// pointed at `url` (instead of the in-cluster Service) and `ca_pem` as the caBundle.
pub async fn register_webhook(
    client: &Client,
    url: &str,
    ca_pem: &str,
) -> Result<(), HarnessError> {
    let path = repo_root().join("config/webhook/mutatingwebhookconfiguration.yaml");
    let text =
        std::fs::read_to_string(&path).map_err(io_err(format!("reading {}", path.display())))?;
    let mut config: MutatingWebhookConfiguration =
        serde_yaml::from_str(&text).map_err(|e| HarnessError::Yaml {
            source_name: path.display().to_string(),
            index: 0,
            message: e.to_string(),
        })?;
    for webhook in config.webhooks.iter_mut().flatten() {
        webhook.client_config = WebhookClientConfig {
            url: Some(url.to_owned()),
            ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
            service: None,
        };
    }
    let name = config.metadata.name.clone().unwrap_or_default();
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&config),
    )
    .await?;
    Ok(())
}

/// Runs `remora-webhook inject -f <file>` and returns its output.
pub fn inject_offline(file: &Path, native_sidecar: bool) -> Result<String, HarnessError> {
    let binary = workspace_binary("remora-webhook")?;
    let out = std::process::Command::new(&binary)
        .arg("inject")
        .arg("-f")
        .arg(file)
        .arg(format!("--native-sidecar={native_sidecar}"))
        .output()
        .map_err(io_err("running remora-webhook inject"))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: format!("remora-webhook inject -f {}", file.display()),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
