//! Command-line flags; each can also come from the environment variable named in its
//! help, so the Deployment can run the binary with no arguments.

use std::{net::SocketAddr, path::PathBuf};

use clap::Parser;
use remora_crds::duration::Duration;

/// The Remora control plane: reconciles MeshPolicy and TrafficSplit resources and writes
/// their status (the leader only), serves /metrics, /healthz and /readyz.
#[derive(Clone, Debug, Parser)]
#[command(name = "remora-operator", version)]
pub struct Args {
    /// Address of the HTTP server for /metrics (Prometheus), /healthz (liveness) and
    /// /readyz (readiness).
    #[arg(long, env = "REMORA_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,

    /// Namespace the operator runs in; its leader Lease lives there (downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "remora-system")]
    pub pod_namespace: String,

    /// This replica's name: the Lease holder identity and the Events' reporting instance
    /// (downward API). Defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Elect a leader with a Lease so only one replica writes status. `false` makes this
    /// replica write status unconditionally (a single replica, or tests).
    #[arg(long, env = "REMORA_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Name of the coordination.k8s.io/v1 Lease used for leader election.
    #[arg(long, env = "REMORA_LEASE_NAME", default_value = "remora-operator")]
    pub lease_name: String,

    /// How long the Lease stays valid without renewal (a standby takes over after it).
    #[arg(long, env = "REMORA_LEASE_DURATION", default_value = "15s")]
    pub lease_duration: Duration,

    /// How often the leader renews the Lease and a standby checks it.
    #[arg(long, env = "REMORA_LEASE_RENEW", default_value = "5s")]
    pub lease_renew: Duration,

    /// Address of the certificate authority's TLS 1.3 listener (`POST /v1/certify`), also
    /// serving the derived-config stream (`GET /v1/watch/*`, HTTP/2).
    #[arg(long, env = "REMORA_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub ca_listen: SocketAddr,

    /// Secret in --pod-namespace holding the mesh trust bundle and issuer (`ca.crt`,
    /// `tls.crt`, `tls.key`; cert-manager's layout); generated on first start when absent.
    #[arg(long, env = "REMORA_CA_SECRET", default_value = "remora-ca")]
    pub ca_secret: String,

    /// Lifetime of the workload certificates the CA issues.
    #[arg(long, env = "REMORA_CERT_TTL", default_value = "24h")]
    pub cert_ttl: Duration,

    /// Name of the operator's Service: the CA's serving certificate is for
    /// `<name>.<pod-namespace>.svc`.
    #[arg(long, env = "REMORA_SERVICE_NAME", default_value = "remora-operator")]
    pub service_name: String,

    /// SPIFFE trust domain of workload identities (`spiffe://<domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "REMORA_TRUST_DOMAIN", default_value = "cluster.local", value_parser = crate::ca::identity::parse_trust_domain)]
    pub trust_domain: String,

    /// Name of the trust bundle ConfigMap (key `ca.crt`) the leader publishes in every
    /// namespace labelled `remora.dev/inject=enabled`; the injector's
    /// `--trust-bundle-configmap`.
    #[arg(
        long,
        env = "REMORA_TRUST_BUNDLE_CONFIGMAP",
        default_value = "remora-trust-bundle"
    )]
    pub trust_bundle_configmap: String,

    /// Issue and renew the injector's serving certificate (Secret --webhook-secret in
    /// --pod-namespace) with the mesh issuer and set the caBundle of its
    /// MutatingWebhookConfiguration (the leader only). `false` when cert-manager does it.
    #[arg(long, env = "REMORA_MANAGE_WEBHOOK_CERTIFICATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub manage_webhook_certificate: bool,

    /// The injector's Service in --pod-namespace: its certificate is for
    /// `<name>.<pod-namespace>.svc` and `<name>.<pod-namespace>.svc.cluster.local`.
    #[arg(long, env = "REMORA_WEBHOOK_SERVICE", default_value = "remora-webhook")]
    pub webhook_service: String,

    /// The `kubernetes.io/tls` Secret in --pod-namespace the injector serves from.
    #[arg(
        long,
        env = "REMORA_WEBHOOK_SECRET",
        default_value = "remora-webhook-tls"
    )]
    pub webhook_secret: String,

    /// The MutatingWebhookConfiguration and ValidatingWebhookConfiguration (one name)
    /// whose caBundles are set to the mesh trust bundle.
    #[arg(
        long,
        env = "REMORA_WEBHOOK_CONFIGURATION",
        default_value = "remora-webhook"
    )]
    pub webhook_configuration: String,

    /// The discovery index recomputes the derived config once no change arrived for this
    /// long… The recomputation is incremental (only the pieces a change touches: 5–10 µs
    /// for one Service's slice, 10–25 ms for all of 1,000 × 10, `examples/index_bench.rs`),
    /// so a short quiet period costs little, and it is added to every change's way to the
    /// proxies (target: 100 ms end to end). A burst arriving at once (1,000 slice events in
    /// `examples/stream_bench.rs`) still coalesces into one version; a longer storm is cut
    /// by `--index-max-delay`.
    #[arg(long, env = "REMORA_INDEX_DEBOUNCE", default_value = "10ms")]
    pub index_debounce: Duration,

    /// …or at the latest this long after the first change of a burst.
    #[arg(long, env = "REMORA_INDEX_MAX_DELAY", default_value = "250ms")]
    pub index_max_delay: Duration,

    /// How long a config stream (`/v1/watch/*`) may stay quiet before the operator sends a
    /// heartbeat; proxies reconnect after three intervals without a line.
    #[arg(long, env = "REMORA_STREAM_HEARTBEAT", default_value = "10s", value_parser = positive_duration)]
    pub stream_heartbeat: Duration,

    /// Kubeconfig file; without it, in-cluster configuration or the default kubeconfig
    /// (~/.kube/config) is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Log filter in tracing-subscriber's EnvFilter syntax (e.g. `info,remora_operator=debug`).
    #[arg(long, env = "REMORA_LOG", default_value = "info")]
    pub log: String,

    /// Log format: `text` or `json`.
    #[arg(long, env = "REMORA_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// A clap value parser for durations that must not be zero.
fn positive_duration(s: &str) -> Result<Duration, String> {
    let d: Duration = s.parse().map_err(|e| format!("{e}"))?;
    if d.get().is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

impl Args {
    /// The replica's identity: `--pod-name`, else the host name, else a per-process name.
    pub fn identity(&self) -> String {
        self.pod_name
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| format!("remora-operator-{}", std::process::id()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn defaults_need_no_arguments() {
        let args = Args::try_parse_from(["remora-operator"]).expect("defaults parse");
        assert_eq!(args.metrics_listen, "0.0.0.0:8080".parse().expect("addr"));
        assert!(args.leader_elect);
        assert_eq!(
            args.lease_duration.get(),
            std::time::Duration::from_secs(15)
        );
        assert_eq!(args.lease_renew.get(), std::time::Duration::from_secs(5));
        assert_eq!(args.lease_name, "remora-operator");
        assert_eq!(
            args.stream_heartbeat.get(),
            std::time::Duration::from_secs(10)
        );
    }

    #[test]
    fn flags_parse_and_bad_values_are_refused() {
        let args = Args::try_parse_from([
            "remora-operator",
            "--metrics-listen=127.0.0.1:0",
            "--leader-elect=false",
            "--pod-name=op-1",
            "--lease-duration=2s",
        ])
        .expect("parse");
        assert!(!args.leader_elect);
        assert_eq!(args.identity(), "op-1");
        assert!(Args::try_parse_from(["remora-operator", "--lease-duration=soon"]).is_err());
        assert!(Args::try_parse_from(["remora-operator", "--metrics-listen=nowhere"]).is_err());
        assert!(Args::try_parse_from(["remora-operator", "--log-format=xml"]).is_err());
        assert!(Args::try_parse_from(["remora-operator", "--stream-heartbeat=0s"]).is_err());
        let args = Args::try_parse_from(["remora-operator", "--stream-heartbeat=250ms"])
            .expect("heartbeat");
        assert_eq!(
            args.stream_heartbeat.get(),
            std::time::Duration::from_millis(250)
        );
    }

    #[test]
    fn every_flag_is_documented_and_has_an_env_var() {
        let cmd = Args::command();
        for arg in cmd.get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
            assert!(arg.get_env().is_some(), "--{} has no env var", arg.get_id());
        }
    }
}
