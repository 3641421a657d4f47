//! The pure injection builder: a pod and the injector's settings in, either a skip reason
//! or the injected pod and the JSON patch that produces it out. No I/O; the webhook and the
//! offline `inject` command are thin callers of [`inject`].
//!
//! What gets added:
//! - `remora-init` (iptables setup, NET_ADMIN and NET_RAW only), configured through
//!   `REMORA_INIT_*` environment variables derived from the pod and its annotations;
//! - `remora-proxy`, either as a native sidecar (an init container with
//!   `restartPolicy: Always` right after `remora-init`, gated by a startupProbe on
//!   `/ready`), or classically as the first app container with a postStart hold until
//!   ready and a preStop drain. In classic mode `remora-init` runs *after* the pod's own
//!   init containers, so those keep plain network access instead of being captured by a
//!   proxy that is not running yet;
//! - a projected service-account token (audience `remora`, 1 h) and the trust bundle;
//! - with `--accel-registrations`, the node's registration directory for `remora-init`
//!   (see [`crate::accel`]);
//! - HTTP/TCP/gRPC probes rewritten to the proxy (see [`crate::probes`]);
//! - the annotation `remora.dev/injected: <version>`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, PodSpec,
    Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::accel;
use crate::annotations::{
    self, AnnotationError, InjectMode, PodOverrides, PortList, PortRange, Quantity,
};
use crate::patch::{self, PatchOp};
use crate::probes::{self, ADMIN_PORT, ProbeError};

/// Name of the init container that installs the iptables rules.
pub const INIT_CONTAINER: &str = "remora-init";
/// Name of the proxy container.
pub const PROXY_CONTAINER: &str = "remora-proxy";
/// UID and GID the proxy runs as; its traffic is excluded from capture.
pub const PROXY_UID: i64 = 1337;
/// Outbound capture port.
pub const OUTBOUND_PORT: i32 = 15001;
/// Inbound capture port.
pub const INBOUND_PORT: i32 = 15006;
/// Volume holding the projected service-account token.
pub const TOKEN_VOLUME: &str = "remora-token";
/// Where the token volume is mounted in the proxy.
pub const TOKEN_DIR: &str = "/var/run/remora/tokens";
/// File name of the token inside [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "remora-token";
/// Audience of the projected token, checked by the operator's TokenReview.
pub const TOKEN_AUDIENCE: &str = "remora";
/// Lifetime of the projected token.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Volume holding the trust bundle ConfigMap.
pub const TRUST_VOLUME: &str = "remora-trust-bundle";
/// Where the trust bundle is mounted in the proxy.
pub const TRUST_DIR: &str = "/var/run/remora/trust";
/// Key of the trust bundle in its ConfigMap.
pub const TRUST_KEY: &str = "ca.crt";
/// How long the app waits for the proxy to be ready, unless the pod's
/// `config.remora.dev/proxy-ready-timeout` says otherwise.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Annotation telling kubectl which container `logs`/`exec` use by default.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Proxy settings that annotations can override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyDefaults {
    /// CPU request, if any.
    pub cpu_request: Option<String>,
    /// CPU limit, if any (none by default: CPU limits add latency through throttling).
    pub cpu_limit: Option<String>,
    /// Memory request, if any.
    pub memory_request: Option<String>,
    /// Memory limit, if any.
    pub memory_limit: Option<String>,
    /// Proxy log level.
    pub log_level: String,
    /// Drain period on shutdown.
    pub shutdown_grace_period: Duration,
}

impl Default for ProxyDefaults {
    fn default() -> Self {
        Self {
            cpu_request: Some("50m".into()),
            cpu_limit: None,
            memory_request: Some("32Mi".into()),
            memory_limit: Some("128Mi".into()),
            log_level: "info".into(),
            shutdown_grace_period: Duration::from_secs(30),
        }
    }
}

/// Everything the builder needs besides the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Image of the proxy sidecar.
    pub proxy_image: String,
    /// Image of the init container.
    pub init_image: String,
    /// Proxy version, written to `remora.dev/injected`.
    pub proxy_version: String,
    /// Address of the operator's stream and certify API.
    pub operator_addr: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// ConfigMap (in the pod's namespace) holding the trust bundle under `ca.crt`.
    pub trust_bundle_configmap: String,
    /// Whether the cluster supports native sidecars; annotations can override per pod.
    pub native_sidecar: bool,
    /// Proxy resources, log level and grace period.
    pub defaults: ProxyDefaults,
    /// The node directory where `remora-init` registers the pod with `remora-accel`
    /// (checked by [`accel::parse_dir`]); `None`: the accelerator is off.
    pub accel_registrations: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        Self {
            proxy_image: format!("ghcr.io/remora-mesh/remora-proxy:{version}"),
            init_image: format!("ghcr.io/remora-mesh/remora-init:{version}"),
            proxy_version: version.to_owned(),
            operator_addr: "remora-operator.remora-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            trust_bundle_configmap: "remora-trust-bundle".into(),
            native_sidecar: true,
            defaults: ProxyDefaults::default(),
            accel_registrations: None,
        }
    }
}

/// Why a pod was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The namespace lacks `remora.dev/inject=enabled` (offline callers that know it).
    NamespaceNotEnabled,
    /// The pod carries `remora.dev/inject: disabled`.
    OptedOut,
    /// The pod uses the host's network namespace; capturing it would capture the node.
    HostNetwork,
    /// The pod already has the proxy (idempotence).
    AlreadyInjected,
}

impl SkipReason {
    /// Short label, used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NamespaceNotEnabled => "namespace-not-enabled",
            SkipReason::OptedOut => "opted-out",
            SkipReason::HostNetwork => "host-network",
            SkipReason::AlreadyInjected => "already-injected",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of a successful injection.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// The pod with remora-init and remora-proxy.
    pub pod: Pod,
    /// RFC 6902 operations turning the input pod into [`Injection::pod`].
    pub patch: Vec<PatchOp>,
    /// Whether the proxy was injected as a native sidecar.
    pub native_sidecar: bool,
}

/// What the builder decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Injected.
    Injected(Box<Injection>),
    /// Left alone, with the reason.
    Skipped(SkipReason),
}

/// Why a pod cannot be injected; the webhook denies it with this message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InjectError {
    /// A `remora.dev/inject` or `config.remora.dev/*` annotation is invalid.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// A probe cannot be rewritten.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// An app container uses a port the proxy needs.
    #[error(
        "container {container:?} declares port {port}, which the remora proxy reserves (15001, 15006, 15020)"
    )]
    PortConflict {
        /// Container name.
        container: String,
        /// The port.
        port: i32,
    },
    /// An app container runs as the proxy's UID, so its traffic would bypass the proxy.
    #[error(
        "container {0:?} runs as UID 1337, which is reserved for remora-proxy (its traffic would bypass the mesh)"
    )]
    UidConflict(String),
    /// The pod already has a volume with a name the injector uses.
    #[error("pod already has a volume named {0:?}, which the remora injector reserves")]
    VolumeConflict(String),
    /// A request exceeds its limit.
    #[error("invalid annotation {request_key}: request {request} exceeds the limit {limit}")]
    RequestAboveLimit {
        /// Annotation (or default) that set the request.
        request_key: &'static str,
        /// Request value.
        request: String,
        /// Limit value.
        limit: String,
    },
    /// The pod or template has no spec.
    #[error("the pod has no spec")]
    MissingSpec,
    /// Serialising the pod failed (not expected for valid k8s-openapi types).
    #[error("could not serialise the pod: {0}")]
    Serialize(String),
}

/// Decides and, if warranted, injects. `namespace_labels` is `None` when the caller has
/// already decided the namespace is in scope (the webhook's namespaceSelector, or an
/// explicit offline request); `Some` makes the builder check the label itself.
pub fn inject(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
    cfg: &InjectConfig,
) -> Result<Outcome, InjectError> {
    let empty = BTreeMap::new();
    let pod_annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let mode = annotations::inject_mode(pod_annotations)?;
    if mode == InjectMode::Disabled {
        return Ok(Outcome::Skipped(SkipReason::OptedOut));
    }
    let spec = pod.spec.as_ref().ok_or(InjectError::MissingSpec)?;
    let has_ours = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER);
    if has_ours || pod_annotations.contains_key(annotations::INJECTED) {
        return Ok(Outcome::Skipped(SkipReason::AlreadyInjected));
    }
    if spec.host_network == Some(true) {
        return Ok(Outcome::Skipped(SkipReason::HostNetwork));
    }
    if let Some(labels) = namespace_labels {
        let enabled =
            labels.get(annotations::NAMESPACE_LABEL).map(String::as_str) == Some("enabled");
        if !enabled && mode != InjectMode::Enabled {
            return Ok(Outcome::Skipped(SkipReason::NamespaceNotEnabled));
        }
    }
    let overrides = annotations::parse_overrides(pod_annotations)?;
    let native = overrides.native_sidecar.unwrap_or(cfg.native_sidecar);

    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for p in c.ports.iter().flatten() {
            let tcp = p.protocol.as_deref().unwrap_or("TCP") == "TCP";
            if tcp && [OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT].contains(&p.container_port) {
                return Err(InjectError::PortConflict {
                    container: c.name.clone(),
                    port: p.container_port,
                });
            }
        }
    }
    let pod_uid = spec.security_context.as_ref().and_then(|sc| sc.run_as_user);
    for c in &spec.containers {
        let uid = c
            .security_context
            .as_ref()
            .and_then(|sc| sc.run_as_user)
            .or(pod_uid);
        if uid == Some(PROXY_UID) {
            return Err(InjectError::UidConflict(c.name.clone()));
        }
    }
    let accel_volume = cfg.accel_registrations.as_ref().map(|_| accel::VOLUME);
    for v in spec.volumes.iter().flatten() {
        if v.name == TOKEN_VOLUME || v.name == TRUST_VOLUME || Some(v.name.as_str()) == accel_volume
        {
            return Err(InjectError::VolumeConflict(v.name.clone()));
        }
    }

    let mut injected = pod.clone();
    let Some(new_spec) = injected.spec.as_mut() else {
        return Err(InjectError::MissingSpec);
    };
    let app_probes = probes::rewrite(&mut new_spec.containers)?;
    let resources = proxy_resources(&overrides, &cfg.defaults)?;
    let init = init_container(cfg, &overrides);
    let app_ports = app_tcp_ports(spec);
    let proxy = proxy_container(cfg, &overrides, resources, &app_probes, &app_ports, native)?;

    let mut inits = new_spec.init_containers.take().unwrap_or_default();
    if native {
        inits.insert(0, init);
        inits.insert(1, proxy);
    } else {
        inits.push(init);
        new_spec.containers.insert(0, proxy);
    }
    new_spec.init_containers = Some(inits);
    new_spec
        .volumes
        .get_or_insert_with(Vec::new)
        .extend(volumes(cfg));

    let first_app = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone());
    let meta_annotations = injected
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    meta_annotations.insert(annotations::INJECTED.to_owned(), cfg.proxy_version.clone());
    if !native && let Some(first) = first_app {
        meta_annotations
            .entry(DEFAULT_CONTAINER_ANNOTATION.to_owned())
            .or_insert(first);
    }

    let before = serde_json::to_value(pod).map_err(|e| InjectError::Serialize(e.to_string()))?;
    let after =
        serde_json::to_value(&injected).map_err(|e| InjectError::Serialize(e.to_string()))?;
    Ok(Outcome::Injected(Box::new(Injection {
        patch: patch::diff(&before, &after),
        pod: injected,
        native_sidecar: native,
    })))
}

/// The TCP ports the app containers declare (all inbound ports are captured regardless;
/// the proxy gets the declared ones as a hint).
fn app_tcp_ports(spec: &PodSpec) -> PortList {
    let mut ports = PortList::default();
    for p in spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
    {
        if p.protocol.as_deref().unwrap_or("TCP") == "TCP"
            && let Ok(port) = u16::try_from(p.container_port)
        {
            ports.insert(PortRange::single(port));
        }
    }
    ports
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: field.to_owned(),
            }),
            ..Default::default()
        }),
    }
}

fn init_container(cfg: &InjectConfig, o: &PodOverrides) -> Container {
    let cidrs: Vec<String> = o
        .skip_outbound_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut envs = vec![
        env("REMORA_INIT_PROXY_UID", PROXY_UID.to_string()),
        env("REMORA_INIT_PROXY_GID", PROXY_UID.to_string()),
        env("REMORA_INIT_OUTBOUND_PORT", OUTBOUND_PORT.to_string()),
        env("REMORA_INIT_INBOUND_PORT", INBOUND_PORT.to_string()),
        // Never redirected, so kubelet probes reach the proxy directly.
        env("REMORA_INIT_ADMIN_PORT", ADMIN_PORT.to_string()),
        env("REMORA_INIT_INBOUND_PORTS", "*"),
        env(
            "REMORA_INIT_SKIP_INBOUND_PORTS",
            o.skip_inbound_ports.to_string(),
        ),
        env(
            "REMORA_INIT_SKIP_OUTBOUND_PORTS",
            o.skip_outbound_ports.to_string(),
        ),
        env("REMORA_INIT_SKIP_OUTBOUND_CIDRS", cidrs.join(",")),
    ];
    let mut mounts = None;
    if let Some(dir) = &cfg.accel_registrations {
        envs.push(accel::init_env(dir));
        mounts = Some(vec![accel::init_mount(dir)]);
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(cfg.init_image.clone()),
        env: Some(envs),
        volume_mounts: mounts,
        // A failed run's last log lines (remora-init's error) become the termination
        // message that `kubectl describe pod` shows under the init container.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "10m"), ("memory", "16Mi")])),
            limits: Some(quantities(&[("cpu", "100m"), ("memory", "64Mi")])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            run_as_group: Some(0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, K8sQuantity> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), K8sQuantity((*v).to_owned())))
        .collect()
}

fn pick(over: &Option<Quantity>, default: &Option<String>) -> Option<String> {
    over.as_ref()
        .map(|q| q.text.clone())
        .or_else(|| default.clone())
}

fn proxy_resources(
    o: &PodOverrides,
    d: &ProxyDefaults,
) -> Result<ResourceRequirements, InjectError> {
    let cpu_req = pick(&o.cpu_request, &d.cpu_request);
    let cpu_lim = pick(&o.cpu_limit, &d.cpu_limit);
    let mem_req = pick(&o.memory_request, &d.memory_request);
    let mem_lim = pick(&o.memory_limit, &d.memory_limit);
    let check = |key: &'static str, req: &Option<String>, lim: &Option<String>| match (req, lim) {
        (Some(r), Some(l)) => match (
            annotations::parse_quantity(r),
            annotations::parse_quantity(l),
        ) {
            (Some(rv), Some(lv)) if rv > lv => Err(InjectError::RequestAboveLimit {
                request_key: key,
                request: r.clone(),
                limit: l.clone(),
            }),
            _ => Ok(()),
        },
        _ => Ok(()),
    };
    check(annotations::PROXY_CPU_REQUEST, &cpu_req, &cpu_lim)?;
    check(annotations::PROXY_MEMORY_REQUEST, &mem_req, &mem_lim)?;
    let map = |cpu: Option<String>, mem: Option<String>| {
        let mut m = BTreeMap::new();
        if let Some(c) = cpu {
            m.insert("cpu".to_owned(), K8sQuantity(c));
        }
        if let Some(mm) = mem {
            m.insert("memory".to_owned(), K8sQuantity(mm));
        }
        (!m.is_empty()).then_some(m)
    };
    Ok(ResourceRequirements {
        requests: map(cpu_req, mem_req),
        limits: map(cpu_lim, mem_lim),
        ..Default::default()
    })
}

fn admin_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(ADMIN_PORT),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

fn exec(cmd: &[&str]) -> LifecycleHandler {
    LifecycleHandler {
        exec: Some(ExecAction {
            command: Some(cmd.iter().map(|s| (*s).to_owned()).collect()),
        }),
        ..Default::default()
    }
}

fn proxy_container(
    cfg: &InjectConfig,
    o: &PodOverrides,
    resources: ResourceRequirements,
    app_probes: &probes::AppProbes,
    app_ports: &PortList,
    native: bool,
) -> Result<Container, InjectError> {
    let grace = annotations::format_duration(
        o.shutdown_grace_period
            .unwrap_or(cfg.defaults.shutdown_grace_period),
    );
    let log_level = o
        .log_level
        .clone()
        .unwrap_or_else(|| cfg.defaults.log_level.clone());
    let mut envs = vec![
        field_env("REMORA_PROXY_POD_NAME", "metadata.name"),
        field_env("REMORA_PROXY_POD_NAMESPACE", "metadata.namespace"),
        field_env("REMORA_PROXY_POD_IP", "status.podIP"),
        field_env("REMORA_PROXY_POD_IPS", "status.podIPs"),
        field_env("REMORA_PROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("REMORA_PROXY_NODE_NAME", "spec.nodeName"),
        env("REMORA_PROXY_OPERATOR_ADDR", cfg.operator_addr.clone()),
        env("REMORA_PROXY_TRUST_DOMAIN", cfg.trust_domain.clone()),
        env(
            "REMORA_PROXY_TOKEN_FILE",
            format!("{TOKEN_DIR}/{TOKEN_FILE}"),
        ),
        env(
            "REMORA_PROXY_TRUST_BUNDLE_FILE",
            format!("{TRUST_DIR}/{TRUST_KEY}"),
        ),
        env("REMORA_PROXY_LOG_LEVEL", log_level),
        env("REMORA_PROXY_SHUTDOWN_GRACE_PERIOD", grace.clone()),
        env(
            "REMORA_PROXY_SIDECAR_MODE",
            if native { "native" } else { "classic" },
        ),
    ];
    if !app_ports.is_empty() {
        envs.push(env("REMORA_PROXY_INBOUND_PORTS", app_ports.to_string()));
    }
    if !o.opaque_ports.is_empty() {
        envs.push(env("REMORA_PROXY_OPAQUE_PORTS", o.opaque_ports.to_string()));
    }
    if let Some(on) = o.access_log {
        envs.push(env("REMORA_PROXY_ACCESS_LOG", on.to_string()));
    }
    if !app_probes.is_empty() {
        let json =
            serde_json::to_string(app_probes).map_err(|e| InjectError::Serialize(e.to_string()))?;
        envs.push(env("REMORA_PROXY_APP_PROBES", json));
    }
    let mut c = Container {
        name: PROXY_CONTAINER.into(),
        image: Some(cfg.proxy_image.clone()),
        env: Some(envs),
        ports: Some(vec![ContainerPort {
            name: Some("remora-admin".into()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(resources),
        readiness_probe: Some(admin_probe("/ready", 2, 3)),
        liveness_probe: Some(admin_probe("/live", 10, 3)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: TRUST_VOLUME.into(),
                mount_path: TRUST_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let ready_timeout = o.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT);
    if native {
        c.restart_policy = Some("Always".into());
        // Kubelet starts the next init container and the app only once this succeeds.
        let tries = i32::try_from(ready_timeout.as_secs()).unwrap_or(i32::MAX);
        c.startup_probe = Some(admin_probe("/ready", 1, tries));
    } else {
        let timeout = format!("--timeout={}", annotations::format_duration(ready_timeout));
        c.lifecycle = Some(Lifecycle {
            // Kubelet does not start the next container until postStart returns; when it
            // fails, the pod's events carry its output: why the proxy is not ready.
            post_start: Some(exec(&["remora-proxy", "wait-ready", &timeout])),
            pre_stop: Some(exec(&[
                "remora-proxy",
                "drain",
                &format!("--grace-period={grace}"),
            ])),
            ..Default::default()
        });
    }
    Ok(c)
}

fn volumes(cfg: &InjectConfig) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: TOKEN_FILE.into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: TRUST_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cfg.trust_bundle_configmap.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    volumes.extend(cfg.accel_registrations.as_deref().map(accel::volume));
    volumes
}
