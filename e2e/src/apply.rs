//! Applying manifests the way `kubectl apply --server-side` does: multi-document YAML,
//! each object's resource found by discovery, sent as a server-side apply patch.

use std::{path::Path, process::Command, time::Duration};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::{self, Scope},
    runtime::wait::{await_condition, conditions},
};
use serde::Deserialize;

use crate::{HarnessError, io_err, prereqs};

/// The field manager the harness applies with.
pub const FIELD_MANAGER: &str = "remora-e2e";

/// Splits multi-document YAML into objects, dropping empty documents.
pub fn parse_documents(yaml: &str, source_name: &str) -> Result<Vec<DynamicObject>, HarnessError> {
    let mut objects = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| HarnessError::Yaml {
            source_name: source_name.to_owned(),
            index,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_yaml::from_value(value).map_err(|e| HarnessError::Yaml {
            source_name: source_name.to_owned(),
            index,
            message: e.to_string(),
        })?;
        objects.push(obj);
    }
    Ok(objects)
}

/// Reads every `*.yaml` file of `dir` (sorted by name) as documents.
pub fn read_dir_documents(dir: &Path) -> Result<Vec<DynamicObject>, HarnessError> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_err(format!("reading {}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    paths.sort();
    let mut objects = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .map_err(io_err(format!("reading {}", path.display())))?;
        objects.extend(parse_documents(&text, &path.display().to_string())?);
    }
    Ok(objects)
}

/// Renders a kustomization with `kubectl kustomize`.
pub fn kustomize(dir: &Path) -> Result<String, HarnessError> {
    let out = Command::new(prereqs::kubectl()?)
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(io_err("running kubectl kustomize"))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: format!("kubectl kustomize {}", dir.display()),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    String::from_utf8(out.stdout).map_err(|e| HarnessError::Command {
        command: format!("kubectl kustomize {}", dir.display()),
        stderr: format!("output is not UTF-8: {e}"),
    })
}

/// Server-side applies `obj`; namespaced objects without a namespace go to `default`.
pub async fn apply(
    client: &Client,
    obj: &DynamicObject,
    dry_run: bool,
) -> Result<DynamicObject, HarnessError> {
    let types = obj.types.as_ref().ok_or_else(|| HarnessError::Yaml {
        source_name: obj.name_any(),
        index: 0,
        message: "object has no apiVersion/kind".to_owned(),
    })?;
    let gvk = GroupVersionKind::try_from(types).map_err(|e| HarnessError::Yaml {
        source_name: obj.name_any(),
        index: 0,
        message: e.to_string(),
    })?;
    let (resource, caps) = discovery::pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            let ns = obj.namespace().unwrap_or_else(|| "default".to_owned());
            Api::namespaced_with(client.clone(), &ns, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply(FIELD_MANAGER).force();
    params.dry_run = dry_run;
    Ok(api
        .patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await?)
}

/// Applies every object in order.
pub async fn apply_all(
    client: &Client,
    objects: &[DynamicObject],
    dry_run: bool,
) -> Result<Vec<DynamicObject>, HarnessError> {
    let mut applied = Vec::with_capacity(objects.len());
    for obj in objects {
        applied.push(apply(client, obj, dry_run).await?);
    }
    Ok(applied)
}

/// Waits until the CRD `name` reports `Established=True`.
pub async fn wait_crd_established(
    client: &Client,
    name: &str,
    timeout: Duration,
) -> Result<(), HarnessError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match tokio::time::timeout(
        timeout,
        await_condition(crds, name, conditions::is_crd_established()),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(HarnessError::Timeout {
            what: format!("CRD {name} Established"),
            secs: timeout.as_secs(),
            last: e.to_string(),
        }),
        Err(_) => Err(HarnessError::Timeout {
            what: format!("CRD {name} Established"),
            secs: timeout.as_secs(),
            last: "condition not reached".to_owned(),
        }),
    }
}

/// The repository root (for `config/…`), from this crate's manifest directory.
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Applies `config/crd` and waits until both CRDs are established.
pub async fn install_crds(client: &Client) -> Result<Vec<String>, HarnessError> {
    let objects = read_dir_documents(&repo_root().join("config/crd"))?;
    apply_all(client, &objects, false).await?;
    let names: Vec<String> = objects.iter().map(|o| o.name_any()).collect();
    for name in &names {
        wait_crd_established(client, name, Duration::from_secs(30)).await?;
    }
    Ok(names)
}
