//! RFC 6902 JSON patches: a structure-aware diff between the pod before and after
//! injection (lists of named things — containers, volumes, env — are aligned by `name`, so
//! inserting a container is one `add`, not a rewrite of the list), and an applier for
//! YAML documents used by the offline `inject` command so untouched fields keep their order.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One JSON-patch operation. The injector only ever needs these three.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    /// Adds a member or inserts into an array at an index.
    Add {
        /// JSON pointer.
        path: String,
        /// New value.
        value: Value,
    },
    /// Removes a member or array element.
    Remove {
        /// JSON pointer.
        path: String,
    },
    /// Replaces an existing value.
    Replace {
        /// JSON pointer.
        path: String,
        /// New value.
        value: Value,
    },
}

impl PatchOp {
    /// The JSON pointer the operation targets.
    pub fn path(&self) -> &str {
        match self {
            PatchOp::Add { path, .. }
            | PatchOp::Remove { path }
            | PatchOp::Replace { path, .. } => path,
        }
    }
}

/// Escapes one reference token of a JSON pointer (`~` → `~0`, `/` → `~1`), e.g. the
/// annotation key `remora.dev/injected` becomes `remora.dev~1injected`.
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// The operations that turn `before` into `after`, applied in order.
pub fn diff(before: &Value, after: &Value) -> Vec<PatchOp> {
    let mut ops = Vec::new();
    diff_at("", before, after, &mut ops);
    ops
}

fn diff_at(path: &str, a: &Value, b: &Value, ops: &mut Vec<PatchOp>) {
    if a == b {
        return;
    }
    match (a, b) {
        (Value::Object(am), Value::Object(bm)) => {
            for key in am.keys().filter(|k| !bm.contains_key(*k)) {
                ops.push(PatchOp::Remove {
                    path: format!("{path}/{}", escape(key)),
                });
            }
            for (key, bv) in bm {
                let p = format!("{path}/{}", escape(key));
                match am.get(key) {
                    Some(av) => diff_at(&p, av, bv, ops),
                    None => ops.push(PatchOp::Add {
                        path: p,
                        value: bv.clone(),
                    }),
                }
            }
        }
        (Value::Array(aa), Value::Array(ba)) => diff_array(path, aa, ba, ops),
        _ => ops.push(PatchOp::Replace {
            path: path.to_owned(),
            value: b.clone(),
        }),
    }
}

/// The `name` of every element, if all are objects with a unique string name.
fn names(items: &[Value]) -> Option<Vec<&str>> {
    let names: Option<Vec<&str>> = items
        .iter()
        .map(|v| v.get("name").and_then(Value::as_str))
        .collect();
    let names = names?;
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    (sorted.len() == names.len()).then_some(names)
}

fn diff_array(path: &str, a: &[Value], b: &[Value], ops: &mut Vec<PatchOp>) {
    if let (Some(an), Some(bn)) = (names(a), names(b)) {
        // `b` keeps every element of `a`, in order, with new ones inserted: diff the kept
        // ones in place and insert the new ones. Indices are those of the array as patched
        // so far, which equals b[..k] followed by the rest of a.
        let mut next = 0;
        let mut plan = Vec::with_capacity(b.len());
        for name in &bn {
            if next < an.len() && an[next] == *name {
                plan.push(Some(next));
                next += 1;
            } else if an.contains(name) {
                plan.clear();
                break;
            } else {
                plan.push(None);
            }
        }
        if next == an.len() && plan.len() == b.len() {
            for (k, (slot, bv)) in plan.into_iter().zip(b).enumerate() {
                let p = format!("{path}/{k}");
                match slot {
                    Some(i) => diff_at(&p, &a[i], bv, ops),
                    None => ops.push(PatchOp::Add {
                        path: p,
                        value: bv.clone(),
                    }),
                }
            }
            return;
        }
    }
    if a.len() == b.len() {
        for (k, (av, bv)) in a.iter().zip(b).enumerate() {
            diff_at(&format!("{path}/{k}"), av, bv, ops);
        }
    } else {
        ops.push(PatchOp::Replace {
            path: path.to_owned(),
            value: Value::Array(b.to_vec()),
        });
    }
}

/// Checks, with an independent RFC 6902 implementation (the `json-patch` crate), that the
/// operations apply to `raw` — the object exactly as the API server will patch it.
pub fn verify(raw: &Value, ops: &[PatchOp]) -> Result<(), String> {
    let value = serde_json::to_value(ops).map_err(|e| e.to_string())?;
    let patch: json_patch::Patch = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let mut doc = raw.clone();
    json_patch::patch(&mut doc, &patch).map_err(|e| e.to_string())
}

/// A patch that does not fit the document it is applied to.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// A path segment does not exist.
    #[error("patch path {0} does not exist in the document")]
    Missing(String),
    /// An array index is not a number or is out of range.
    #[error("patch path {0} has an invalid array index")]
    BadIndex(String),
    /// The value could not be converted to YAML.
    #[error("patch value for {path} is not representable in YAML: {source}")]
    Yaml {
        /// The op's path.
        path: String,
        /// Conversion error.
        source: serde_yaml::Error,
    },
}

/// Applies operations to a YAML value in place, preserving the order of existing keys
/// (added keys go last). Same semantics as RFC 6902 for `add`, `remove` and `replace`.
pub fn apply_yaml(doc: &mut serde_yaml::Value, ops: &[PatchOp]) -> Result<(), PatchError> {
    for op in ops {
        apply_one(doc, op)?;
    }
    Ok(())
}

fn apply_one(doc: &mut serde_yaml::Value, op: &PatchOp) -> Result<(), PatchError> {
    let path = op.path();
    let tokens: Vec<String> = path.split('/').skip(1).map(unescape).collect();
    let Some((last, parents)) = tokens.split_last() else {
        return Err(PatchError::Missing(path.to_owned()));
    };
    let mut node = doc;
    for t in parents {
        node = match node {
            serde_yaml::Value::Mapping(m) => m
                .get_mut(t.as_str())
                .ok_or_else(|| PatchError::Missing(path.to_owned()))?,
            serde_yaml::Value::Sequence(s) => {
                let i: usize = t
                    .parse()
                    .map_err(|_| PatchError::BadIndex(path.to_owned()))?;
                s.get_mut(i)
                    .ok_or_else(|| PatchError::BadIndex(path.to_owned()))?
            }
            _ => return Err(PatchError::Missing(path.to_owned())),
        };
    }
    let value = match op {
        PatchOp::Add { value, .. } | PatchOp::Replace { value, .. } => Some(
            serde_yaml::to_value(value).map_err(|source| PatchError::Yaml {
                path: path.to_owned(),
                source,
            })?,
        ),
        PatchOp::Remove { .. } => None,
    };
    match (node, op, value) {
        (serde_yaml::Value::Mapping(m), PatchOp::Add { .. }, Some(v)) => {
            m.insert(serde_yaml::Value::String(last.clone()), v);
        }
        (serde_yaml::Value::Mapping(m), PatchOp::Replace { .. }, Some(v)) => {
            let slot = m
                .get_mut(last.as_str())
                .ok_or_else(|| PatchError::Missing(path.to_owned()))?;
            *slot = v;
        }
        (serde_yaml::Value::Mapping(m), PatchOp::Remove { .. }, _) => {
            m.remove(last.as_str())
                .ok_or_else(|| PatchError::Missing(path.to_owned()))?;
        }
        (serde_yaml::Value::Sequence(s), op, v) => {
            let index = if last == "-" {
                s.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| PatchError::BadIndex(path.to_owned()))?
            };
            match (op, v) {
                (PatchOp::Add { .. }, Some(v)) if index <= s.len() => s.insert(index, v),
                (PatchOp::Replace { .. }, Some(v)) if index < s.len() => s[index] = v,
                (PatchOp::Remove { .. }, _) if index < s.len() => {
                    s.remove(index);
                }
                _ => return Err(PatchError::BadIndex(path.to_owned())),
            }
        }
        _ => return Err(PatchError::Missing(path.to_owned())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(before: Value, after: Value) -> Vec<PatchOp> {
        let ops = diff(&before, &after);
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::to_value(&ops).expect("ops serialise"))
                .expect("valid RFC 6902");
        let mut applied = before.clone();
        json_patch::patch(&mut applied, &patch).expect("patch applies");
        assert_eq!(applied, after, "json-patch result");
        let mut yaml: serde_yaml::Value = serde_yaml::to_value(&before).expect("yaml");
        apply_yaml(&mut yaml, &ops).expect("yaml patch applies");
        let yaml_json: Value = serde_yaml::from_value(yaml).expect("json");
        assert_eq!(yaml_json, after, "yaml applier result");
        ops
    }

    #[test]
    fn named_lists_get_inserts_not_rewrites() {
        let ops = check(
            json!({"spec": {"containers": [{"name": "app", "image": "a"}, {"name": "b", "image": "b"}]}}),
            json!({"spec": {"containers": [
                {"name": "remora-proxy"}, {"name": "app", "image": "a2"}, {"name": "b", "image": "b"}, {"name": "z"}
            ]}}),
        );
        assert_eq!(
            ops,
            vec![
                PatchOp::Add {
                    path: "/spec/containers/0".into(),
                    value: json!({"name": "remora-proxy"})
                },
                PatchOp::Replace {
                    path: "/spec/containers/1/image".into(),
                    value: json!("a2")
                },
                PatchOp::Add {
                    path: "/spec/containers/3".into(),
                    value: json!({"name": "z"})
                },
            ]
        );
    }

    #[test]
    fn keys_with_slashes_are_escaped() {
        let ops = check(
            json!({"metadata": {"annotations": {"a": "b"}}}),
            json!({"metadata": {"annotations": {"a": "b", "remora.dev/injected": "v", "x~y": "z"}}}),
        );
        let paths: Vec<&str> = ops.iter().map(PatchOp::path).collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations/remora.dev~1injected",
                "/metadata/annotations/x~0y"
            ]
        );
    }

    #[test]
    fn reordered_or_unnamed_lists_fall_back_safely() {
        check(
            json!({"l": [{"name": "a"}, {"name": "b"}]}),
            json!({"l": [{"name": "b"}, {"name": "a"}, {"name": "c"}]}),
        );
        check(json!({"args": ["a", "b"]}), json!({"args": ["a", "c"]}));
        check(json!({"args": ["a", "b"]}), json!({"args": ["a"]}));
        check(json!({"x": 1, "y": {"z": 2}}), json!({"y": {"z": 3}}));
    }

    #[test]
    fn yaml_apply_reports_bad_paths() {
        let mut doc: serde_yaml::Value = serde_yaml::from_str("a: [1]").expect("yaml");
        let bad = [
            PatchOp::Add {
                path: "/b/c".into(),
                value: json!(1),
            },
            PatchOp::Replace {
                path: "/a/5".into(),
                value: json!(1),
            },
            PatchOp::Remove {
                path: "/a/x".into(),
            },
        ];
        for op in bad {
            assert!(
                apply_yaml(&mut doc, std::slice::from_ref(&op)).is_err(),
                "{op:?}"
            );
        }
    }
}
