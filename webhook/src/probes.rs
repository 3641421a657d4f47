//! Probe rewriting: HTTP, TCP and gRPC probes of app containers are pointed at the proxy's
//! admin port (`:15020/app-health/<container>/<livez|readyz|startupz>`), so kubelet probes
//! keep working under strict mTLS; the original targets (named ports resolved) are handed
//! to the proxy as JSON in `REMORA_PROXY_APP_PROBES`. Exec probes are left untouched.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, GRPCAction, HTTPGetAction, Probe, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

/// The proxy's admin port, where rewritten probes land.
pub const ADMIN_PORT: i32 = 15020;

/// Which probe of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `livenessProbe`
    Liveness,
    /// `readinessProbe`
    Readiness,
    /// `startupProbe`
    Startup,
}

impl ProbeKind {
    /// The last path segment under `/app-health/<container>/`.
    pub fn segment(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livez",
            ProbeKind::Readiness => "readyz",
            ProbeKind::Startup => "startupz",
        }
    }

    /// The field name in the container spec.
    pub fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livenessProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Startup => "startupProbe",
        }
    }
}

/// The original target of a rewritten probe, as the proxy receives it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// HTTP GET target (port resolved to a number).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HTTPGetAction>,
    /// TCP connect target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TCPSocketAction>,
    /// gRPC health-check target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GRPCAction>,
    /// The probe's timeout, which the proxy applies to its own check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
}

/// Original probe targets keyed by the rewritten path (`/app-health/web/livez`).
pub type AppProbes = BTreeMap<String, AppProbe>;

/// A probe that cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "container {container:?} {probe} uses port {port:?}, which is not a named port of the container"
)]
pub struct ProbeError {
    /// Container name.
    pub container: String,
    /// Probe field name.
    pub probe: &'static str,
    /// The unresolvable port name.
    pub port: String,
}

fn resolve_port(
    c: &Container,
    kind: ProbeKind,
    port: &IntOrString,
) -> Result<IntOrString, ProbeError> {
    match port {
        IntOrString::Int(p) => Ok(IntOrString::Int(*p)),
        IntOrString::String(name) => {
            if let Ok(p) = name.parse::<i32>() {
                return Ok(IntOrString::Int(p));
            }
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| IntOrString::Int(p.container_port))
                .ok_or_else(|| ProbeError {
                    container: c.name.clone(),
                    probe: kind.field(),
                    port: name.clone(),
                })
        }
    }
}

/// The path a rewritten probe uses.
pub fn health_path(container: &str, kind: ProbeKind) -> String {
    format!("/app-health/{container}/{}", kind.segment())
}

fn rewrite_one(
    c: &Container,
    kind: ProbeKind,
    probe: &Probe,
) -> Result<Option<(Probe, AppProbe)>, ProbeError> {
    let mut app = AppProbe {
        http_get: None,
        tcp_socket: None,
        grpc: None,
        timeout_seconds: probe.timeout_seconds,
    };
    if let Some(h) = &probe.http_get {
        app.http_get = Some(HTTPGetAction {
            port: resolve_port(c, kind, &h.port)?,
            ..h.clone()
        });
    } else if let Some(t) = &probe.tcp_socket {
        app.tcp_socket = Some(TCPSocketAction {
            port: resolve_port(c, kind, &t.port)?,
            ..t.clone()
        });
    } else if let Some(g) = &probe.grpc {
        app.grpc = Some(g.clone());
    } else {
        return Ok(None);
    }
    let rewritten = Probe {
        exec: None,
        grpc: None,
        tcp_socket: None,
        http_get: Some(HTTPGetAction {
            path: Some(health_path(&c.name, kind)),
            port: IntOrString::Int(ADMIN_PORT),
            scheme: Some("HTTP".to_owned()),
            host: None,
            http_headers: None,
        }),
        ..probe.clone()
    };
    Ok(Some((rewritten, app)))
}

/// Rewrites the probes of the given app containers in place and returns the originals.
pub fn rewrite(containers: &mut [Container]) -> Result<AppProbes, ProbeError> {
    let mut out = AppProbes::new();
    for c in containers.iter_mut() {
        for kind in [
            ProbeKind::Liveness,
            ProbeKind::Readiness,
            ProbeKind::Startup,
        ] {
            let slot = match kind {
                ProbeKind::Liveness => &c.liveness_probe,
                ProbeKind::Readiness => &c.readiness_probe,
                ProbeKind::Startup => &c.startup_probe,
            };
            let Some(probe) = slot else { continue };
            let Some((rewritten, app)) = rewrite_one(c, kind, probe)? else {
                continue;
            };
            out.insert(health_path(&c.name, kind), app);
            let slot = match kind {
                ProbeKind::Liveness => &mut c.liveness_probe,
                ProbeKind::Readiness => &mut c.readiness_probe,
                ProbeKind::Startup => &mut c.startup_probe,
            };
            *slot = Some(rewritten);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, ExecAction};

    fn container() -> Container {
        Container {
            name: "web".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            liveness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/healthz".into()),
                    port: IntOrString::String("http".into()),
                    ..Default::default()
                }),
                period_seconds: Some(7),
                ..Default::default()
            }),
            readiness_probe: Some(Probe {
                tcp_socket: Some(TCPSocketAction {
                    port: IntOrString::Int(8080),
                    host: None,
                }),
                ..Default::default()
            }),
            startup_probe: Some(Probe {
                exec: Some(ExecAction {
                    command: Some(vec!["true".into()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn http_and_tcp_rewritten_exec_untouched() {
        let mut cs = vec![container()];
        let probes = rewrite(&mut cs).expect("rewrite");
        let live = cs[0].liveness_probe.as_ref().expect("liveness");
        let h = live.http_get.as_ref().expect("httpGet");
        assert_eq!(h.path.as_deref(), Some("/app-health/web/livez"));
        assert_eq!(h.port, IntOrString::Int(ADMIN_PORT));
        assert_eq!(live.period_seconds, Some(7), "timing kept");
        assert!(
            cs[0]
                .readiness_probe
                .as_ref()
                .and_then(|p| p.tcp_socket.as_ref())
                .is_none()
        );
        assert_eq!(cs[0].startup_probe, container().startup_probe);
        assert_eq!(probes.len(), 2);
        let orig = probes["/app-health/web/livez"]
            .http_get
            .as_ref()
            .expect("original");
        assert_eq!(orig.port, IntOrString::Int(8080), "named port resolved");
    }

    #[test]
    fn unknown_named_port_is_an_error() {
        let mut c = container();
        c.ports = None;
        let err = rewrite(&mut [c]).expect_err("unresolvable");
        assert_eq!(err.probe, "livenessProbe");
        assert_eq!(err.port, "http");
    }
}
