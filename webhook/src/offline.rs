//! Offline injection for GitOps pipelines (`remora-webhook inject -f FILE|-`): reads a
//! multi-document YAML stream, injects the pod templates of Pods, Deployments,
//! StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs (also inside a `v1 List`, as
//! `kubectl get -o yaml` prints) through the same builder as the webhook, and writes the
//! stream back. Documents that are not injected — other kinds, skipped pods, comments — are
//! copied byte for byte; injected ones keep their key order, with the patch applied in
//! place (comments inside an injected document are not kept: the YAML library drops them).

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};

use crate::inject::{self, InjectConfig, InjectError, Outcome, SkipReason};
use crate::patch::{self, PatchError};

/// A document that cannot be processed. Nothing is written when any document fails.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// Not valid YAML.
    #[error("document {index}: invalid YAML: {source}")]
    Yaml {
        /// 1-based document number.
        index: usize,
        /// Parser error.
        source: serde_yaml::Error,
    },
    /// The pod template does not deserialise.
    #[error("document {index} ({what}): invalid pod template: {source}")]
    Template {
        /// 1-based document number.
        index: usize,
        /// `kind/name`.
        what: String,
        /// Deserialisation error.
        source: serde_yaml::Error,
    },
    /// The builder refused the pod (invalid annotation, port conflict, ...).
    #[error("document {index} ({what}): {source}")]
    Inject {
        /// 1-based document number.
        index: usize,
        /// `kind/name`.
        what: String,
        /// Builder error.
        source: InjectError,
    },
    /// The patch did not fit the document.
    #[error("document {index} ({what}): {source}")]
    Patch {
        /// 1-based document number.
        index: usize,
        /// `kind/name`.
        what: String,
        /// Patch error.
        source: PatchError,
    },
    /// The injected document could not be written.
    #[error("document {index}: cannot write YAML: {source}")]
    Write {
        /// 1-based document number.
        index: usize,
        /// Serialiser error.
        source: serde_yaml::Error,
    },
}

/// What happened to one document, for the report on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocReport {
    /// `kind/name`.
    pub what: String,
    /// `injected`, `skipped (<reason>)`, or `unchanged` for kinds without pods.
    pub result: String,
}

/// The rewritten stream and a line per workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// The YAML to print.
    pub output: String,
    /// One entry per document with a pod template.
    pub reports: Vec<DocReport>,
}

/// Where the pod template sits in a document of this kind, if it has one.
fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(&[]),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some(&["spec", "template"])
        }
        ("batch/v1", "Job") => Some(&["spec", "template"]),
        ("batch/v1", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Splits a YAML stream into (separator line, body) pairs; the first has no separator.
fn split_documents(input: &str) -> Vec<(&str, &str)> {
    let mut docs = Vec::new();
    let mut sep = "";
    let mut start = 0;
    let mut pos = 0;
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_sep = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_sep {
            docs.push((sep, &input[start..pos]));
            sep = line;
            start = pos + line.len();
        }
        pos += line.len();
    }
    docs.push((sep, &input[start..]));
    docs
}

fn str_at<'a>(v: &'a serde_yaml::Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default()
}

/// Injects every pod template of a YAML stream.
pub fn inject_stream(input: &str, cfg: &InjectConfig) -> Result<Injected, OfflineError> {
    let mut output = String::with_capacity(input.len() * 2);
    let mut reports = Vec::new();
    for (i, (sep, body)) in split_documents(input).into_iter().enumerate() {
        output.push_str(sep);
        match inject_document(i + 1, body, cfg, &mut reports)? {
            Some(text) => output.push_str(&text),
            None => output.push_str(body),
        }
    }
    Ok(Injected { output, reports })
}

/// Injects one document; returns the new text if anything changed.
fn inject_document(
    index: usize,
    body: &str,
    cfg: &InjectConfig,
    reports: &mut Vec<DocReport>,
) -> Result<Option<String>, OfflineError> {
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(body).map_err(|source| OfflineError::Yaml { index, source })?;
    if !inject_object(index, &mut doc, cfg, reports)? {
        return Ok(None);
    }
    serde_yaml::to_string(&doc)
        .map(Some)
        .map_err(|source| OfflineError::Write { index, source })
}

/// Injects one object (or every item of a `v1 List`); returns whether it changed.
fn inject_object(
    index: usize,
    obj: &mut serde_yaml::Value,
    cfg: &InjectConfig,
    reports: &mut Vec<DocReport>,
) -> Result<bool, OfflineError> {
    if !obj.is_mapping() {
        return Ok(false);
    }
    let kind = str_at(obj, "kind").to_owned();
    if str_at(obj, "apiVersion") == "v1" && kind == "List" {
        let mut changed = false;
        if let Some(serde_yaml::Value::Sequence(items)) = obj.get_mut("items") {
            for item in items {
                changed |= inject_object(index, item, cfg, reports)?;
            }
        }
        return Ok(changed);
    }
    let Some(path) = template_path(str_at(obj, "apiVersion"), &kind) else {
        return Ok(false);
    };
    let name = obj
        .get("metadata")
        .map(|m| str_at(m, "name"))
        .unwrap_or_default();
    let what = format!("{}/{}", kind.to_ascii_lowercase(), name);

    let mut node = obj;
    for key in path {
        match node.get_mut(*key) {
            Some(n) => node = n,
            None => {
                return Err(OfflineError::Template {
                    index,
                    what,
                    source: serde::de::Error::custom(format!("missing field {}", path.join("."))),
                });
            }
        }
    }
    let pod = if path.is_empty() {
        serde_yaml::from_value::<Pod>(node.clone())
    } else {
        serde_yaml::from_value::<PodTemplateSpec>(node.clone()).map(|t| Pod {
            metadata: t.metadata.unwrap_or_default(),
            spec: t.spec,
            status: None,
        })
    }
    .map_err(|source| OfflineError::Template {
        index,
        what: what.clone(),
        source,
    })?;

    let outcome = inject::inject(&pod, None, cfg).map_err(|source| OfflineError::Inject {
        index,
        what: what.clone(),
        source,
    })?;
    let injection = match outcome {
        Outcome::Skipped(reason) => {
            reports.push(skipped(what, reason));
            return Ok(false);
        }
        Outcome::Injected(inj) => inj,
    };
    if let serde_yaml::Value::Mapping(m) = node
        && !m.contains_key("metadata")
    {
        m.insert(
            "metadata".into(),
            serde_yaml::Value::Mapping(Default::default()),
        );
    }
    patch::apply_yaml(node, &injection.patch).map_err(|source| OfflineError::Patch {
        index,
        what: what.clone(),
        source,
    })?;
    reports.push(DocReport {
        what,
        result: "injected".to_owned(),
    });
    Ok(true)
}

fn skipped(what: String, reason: SkipReason) -> DocReport {
    DocReport {
        what,
        result: format!("skipped ({reason})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_separator_lines_only() {
        let docs = split_documents("a: 1\n---\nb: '---'\n--- # c\nc: 3\n");
        assert_eq!(
            docs,
            vec![
                ("", "a: 1\n"),
                ("---\n", "b: '---'\n"),
                ("--- # c\n", "c: 3\n")
            ]
        );
    }

    #[test]
    fn other_documents_are_byte_identical() {
        let input = "# leading comment\napiVersion: v1\nkind: Service\nmetadata: {name: web}  # odd style\nspec:\n  ports: [{port: 80}]\n---\n\n---\napiVersion: v1\nkind: ConfigMap\ndata:\n    x:   \"1\"\n";
        let out = inject_stream(input, &InjectConfig::default()).expect("valid");
        assert_eq!(out.output, input);
        assert!(out.reports.is_empty());
    }

    #[test]
    fn invalid_annotations_fail_the_whole_stream() {
        let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    config.remora.dev/log-level: loud\nspec:\n  containers: [{name: a, image: a}]\n";
        let err = inject_stream(input, &InjectConfig::default()).expect_err("invalid");
        let msg = err.to_string();
        assert!(
            msg.contains("document 1 (pod/p)") && msg.contains("config.remora.dev/log-level"),
            "{msg}"
        );
    }

    #[test]
    fn lists_from_kubectl_get_are_injected_item_by_item() {
        let input = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s}\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n  spec:\n    template:\n      spec:\n        containers: [{name: a, image: a}]\n";
        let out = inject_stream(input, &InjectConfig::default()).expect("valid");
        assert_eq!(
            out.reports,
            vec![DocReport {
                what: "deployment/d".into(),
                result: "injected".into()
            }]
        );
        let doc: serde_yaml::Value = serde_yaml::from_str(&out.output).expect("yaml");
        let containers = &doc["items"][1]["spec"]["template"]["spec"]["initContainers"];
        assert_eq!(containers[1]["name"], "remora-proxy");
        assert_eq!(doc["items"][0]["metadata"]["name"], "s");
    }

    #[test]
    fn broken_yaml_is_an_error() {
        assert!(inject_stream("a: [1\n", &InjectConfig::default()).is_err());
        let err = inject_stream(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
            &InjectConfig::default(),
        )
        .expect_err("no template");
        assert!(err.to_string().contains("spec.template"), "{err}");
    }
}
