//! Remora installed on a node as users install it: the image tarballs imported into the
//! node's containerd (`make images` writes them), `kubectl apply -k config/default`, and
//! the operator and webhook running as pods from their Deployments, which bootstrap the
//! CA, the webhook's certificate and the webhook configurations' caBundles themselves.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    admissionregistration::v1::{
        MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
    },
    apps::v1::Deployment,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};

use super::Node;
use crate::{HarnessError, apply::repo_root};

/// The images `config/` and the webhook's defaults reference (`<name>.tar` each).
pub const IMAGES: [&str; 5] = [
    "remora-operator",
    "remora-webhook",
    "remora-proxy",
    "remora-init",
    "remora-demo-app",
];

/// Where the image tarballs are: `$REMORA_IMAGES_DIR`, else `<repo>/target/images`.
pub fn images_dir() -> PathBuf {
    std::env::var_os("REMORA_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/images"))
}

/// What the install took.
#[derive(Debug, Clone, Copy)]
pub struct Installed {
    /// Importing the five tarballs.
    pub import: Duration,
    /// From `kubectl apply -k config/default` to both Deployments available and the
    /// webhook's caBundle in place.
    pub ready: Duration,
}

impl Node {
    /// Imports Remora's five image tarballs from `dir`.
    pub fn import_remora_images(&self, dir: &Path) -> Result<(), HarnessError> {
        for name in IMAGES {
            let tar = dir.join(format!("{name}.tar"));
            if !tar.is_file() {
                return Err(HarnessError::Missing {
                    what: format!("the {name} image ({} not found)", tar.display()),
                    how: "build the images first: `make images` (make test-node and make demo do)"
                        .to_owned(),
                });
            }
            self.import_image(&tar)?;
        }
        Ok(())
    }

    /// Imports the images, applies `config/default` with kubectl and waits until the
    /// operator and webhook pods are Ready and the webhook is registered with its CA.
    pub async fn install_remora(&self, timeout: Duration) -> Result<Installed, HarnessError> {
        let start = Instant::now();
        self.import_remora_images(&images_dir())?;
        let import = start.elapsed();
        let applied = Instant::now();
        let config = repo_root().join("config/default");
        self.kubectl(&["apply", "-k", &config.display().to_string()])?;
        for name in ["remora-operator", "remora-webhook"] {
            self.wait_deployment("remora-system", name, timeout).await?;
        }
        self.wait_ca_bundle("remora-webhook", timeout).await?;
        self.wait_webhook_answers(timeout).await?;
        Ok(Installed {
            import,
            ready: applied.elapsed(),
        })
    }

    /// Waits until every replica of a Deployment is available.
    pub async fn wait_deployment(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let api: Api<Deployment> = Api::namespaced(self.client().await?, ns);
        let start = Instant::now();
        loop {
            let last = match api.get_opt(name).await {
                Ok(Some(d)) => {
                    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    let have = d
                        .status
                        .as_ref()
                        .and_then(|s| s.available_replicas)
                        .unwrap_or(0);
                    if have >= want {
                        return Ok(());
                    }
                    format!("{have}/{want} available; {}", self.pod_states(ns).await)
                }
                Ok(None) => "not created".to_owned(),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: format!("deployment {ns}/{name}"),
                    secs: timeout.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the operator has filled the caBundle of both webhook configurations
    /// (pods and the namespace label); until then the API server cannot call the webhook.
    async fn wait_ca_bundle(&self, name: &str, timeout: Duration) -> Result<(), HarnessError> {
        let client = self.client().await?;
        let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let validating: Api<ValidatingWebhookConfiguration> = Api::all(client);
        let filled = |c: Option<&WebhookClientConfig>| {
            c.and_then(|c| c.ca_bundle.as_ref())
                .is_some_and(|b| !b.0.is_empty())
        };
        let start = Instant::now();
        loop {
            let m = mutating
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .is_some_and(|m| {
                    let hooks = m.webhooks.unwrap_or_default();
                    !hooks.is_empty() && hooks.iter().all(|w| filled(Some(&w.client_config)))
                });
            let v = validating
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .is_some_and(|v| {
                    let hooks = v.webhooks.unwrap_or_default();
                    !hooks.is_empty() && hooks.iter().all(|w| filled(Some(&w.client_config)))
                });
            if m && v {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "the caBundle of the Mutating- and ValidatingWebhookConfiguration {name}"
                    ),
                    secs: timeout.as_secs(),
                    last: format!("mutating filled: {m}, validating filled: {v}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the API server can call the webhook through its Service: a Ready pod
    /// is not enough, because kube-proxy programs the Service's endpoints a moment later
    /// (the ClusterIP refuses connections until then). A server-side dry run of a labelled
    /// Namespace goes through the namespace-label webhook and persists nothing.
    async fn wait_webhook_answers(&self, timeout: Duration) -> Result<(), HarnessError> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        let probe = Namespace {
            metadata: ObjectMeta {
                name: Some("remora-webhook-probe".to_owned()),
                labels: Some([("remora.dev/inject".to_owned(), "enabled".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let params = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let start = Instant::now();
        loop {
            let last = match api.create(&params, &probe).await {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: "the webhook answering the API server through its Service".to_owned(),
                    secs: timeout.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// One line per pod of `ns`: name, phase and each container's state, for timeouts.
    pub async fn pod_states(&self, ns: &str) -> String {
        let Ok(client) = self.client().await else {
            return String::new();
        };
        let api: Api<Pod> = Api::namespaced(client, ns);
        let Ok(pods) = api.list(&Default::default()).await else {
            return String::new();
        };
        pods.items
            .iter()
            .map(|p| {
                let status = p.status.clone().unwrap_or_default();
                let containers: Vec<String> = status
                    .init_container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .chain(status.container_statuses.unwrap_or_default())
                    .map(|c| {
                        let state = c.state.unwrap_or_default();
                        let detail = state
                            .waiting
                            .map(|w| format!("waiting {}", w.reason.unwrap_or_default()))
                            .or(state.terminated.map(|t| {
                                format!(
                                    "terminated {} ({})",
                                    t.exit_code,
                                    t.reason.unwrap_or_default()
                                )
                            }))
                            .unwrap_or_else(|| "running".to_owned());
                        format!("{}={detail} ready={}", c.name, c.ready)
                    })
                    .collect();
                format!(
                    "{} {} [{}]",
                    p.metadata.name.clone().unwrap_or_default(),
                    status.phase.unwrap_or_default(),
                    containers.join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_images_are_the_ones_the_recipes_build() {
        assert_eq!(IMAGES, crate::image::recipes::COMPONENTS);
    }
}
