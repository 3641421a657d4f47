//! Where the end-to-end scenarios run: the node in a box this harness starts (the node
//! tier), or a cluster that already exists and is named by `REMORA_E2E_KUBECONFIG` (the
//! kind tier: `make kind-e2e` creates a kind cluster, loads the image tarballs, applies
//! `config/default` and `config/samples`, and sets that variable before it runs the same
//! `node_*` scenario tests).
//!
//! A scenario test asks for a [`Target`] and uses only what both kinds offer: a client,
//! a kubeconfig and `kubectl`. On an external cluster Remora and the samples are already
//! installed ([`Target::is_external`]); on the node the test installs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::node::{Node, NodeOptions};
use crate::{HarnessError, prereqs};

/// The variable naming an existing cluster's kubeconfig.
pub const KUBECONFIG_ENV: &str = "REMORA_E2E_KUBECONFIG";

/// A cluster someone else started, with Remora installed.
#[derive(Debug, Clone)]
pub struct External {
    kubeconfig: PathBuf,
}

impl External {
    /// The cluster named by [`KUBECONFIG_ENV`], if the variable is set. A set variable
    /// naming a missing file is an error, never a fallback to a local node.
    pub fn from_env() -> Option<Result<Self, HarnessError>> {
        let path = std::env::var_os(KUBECONFIG_ENV).filter(|v| !v.is_empty())?;
        Some(Self::new(PathBuf::from(path)))
    }

    /// The cluster of the kubeconfig at `path`.
    pub fn new(kubeconfig: PathBuf) -> Result<Self, HarnessError> {
        if !kubeconfig.is_file() {
            return Err(HarnessError::Missing {
                what: format!("the kubeconfig {} ({KUBECONFIG_ENV})", kubeconfig.display()),
                how: "point it at a cluster prepared by `make kind-e2e` (or unset it to run the node tier)".into(),
            });
        }
        Ok(Self { kubeconfig })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        Ok(kube::Client::try_from(config)?)
    }

    pub fn kubectl<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String, HarnessError> {
        let mut cmd = Command::new(prereqs::kubectl()?);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args);
        run(&mut cmd)
    }
}

/// The cluster a scenario runs against.
#[derive(Debug)]
pub enum Target {
    /// The node in a box, started for this test.
    Node(Box<Node>),
    /// A cluster from [`KUBECONFIG_ENV`].
    External(External),
}

impl Target {
    /// The external cluster when [`KUBECONFIG_ENV`] is set, else a new node.
    pub async fn from_env_or_start(opts: NodeOptions) -> Result<Self, HarnessError> {
        match External::from_env() {
            Some(ext) => Ok(Target::External(ext?)),
            None => Ok(Target::Node(Box::new(Node::start_with(opts).await?))),
        }
    }

    /// Whether Remora, its images and the samples were installed by whoever made the
    /// cluster.
    pub fn is_external(&self) -> bool {
        matches!(self, Target::External(_))
    }

    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        match self {
            Target::Node(n) => n.client().await,
            Target::External(e) => e.client().await,
        }
    }

    pub fn kubeconfig(&self) -> Result<&Path, HarnessError> {
        match self {
            Target::Node(n) => n.kubeconfig(),
            Target::External(e) => Ok(e.kubeconfig()),
        }
    }

    /// `kubectl <args>`; its stdout, or an error with its stderr.
    pub fn kubectl<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String, HarnessError> {
        match self {
            Target::Node(n) => n.kubectl(args),
            Target::External(e) => e.kubectl(args),
        }
    }
}

fn run(cmd: &mut Command) -> Result<String, HarnessError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| HarnessError::Io {
        context: format!("running {command}"),
        source,
    })?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kubeconfig_is_an_error_naming_the_variable() {
        let err = External::new(PathBuf::from("/nonexistent/kubeconfig")).expect_err("missing");
        let msg = err.to_string();
        assert!(
            msg.contains(KUBECONFIG_ENV) && msg.contains("make kind-e2e"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn an_external_kubeconfig_gives_a_client_and_kubectl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kubeconfig");
        // A cluster address nobody listens on: building the client and kubectl's
        // config view need no server.
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\n\
             users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
        )
        .expect("write kubeconfig");
        let ext = External::new(path).expect("external");
        ext.client().await.expect("client");
        let view = ext
            .kubectl(&[
                "config",
                "view",
                "-o",
                "jsonpath={.clusters[0].cluster.server}",
            ])
            .expect("kubectl config view");
        assert_eq!(view, "https://127.0.0.1:1");
    }
}
