//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902, with the semantics of the
//! `evanphx/json-patch` v4 library the real server uses, e.g. `test` of `null` against a missing
//! member succeeds), strategic merge patch (treated as a merge patch once its `$`-directives are
//! stripped), and server-side apply (a merge of the applied configuration, plus the `fieldsV1`
//! set that is recorded in `managedFields`).

use serde_json::{Map, Value};

use crate::errors::ApiError;

/// The patch types of the `Content-Type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

/// RFC 7386 merge of `patch` into `target`.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Parses a merge-patch body (must be a JSON object, as `jsonpatch.MergePatch` requires).
pub fn parse_merge(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("Invalid JSON Patch"));
    }
    Ok(v)
}

/// Removes strategic-merge-patch directives (`$patch`, `$setElementOrder/...`, `$retainKeys`,
/// `$deleteFromPrimitiveList/...`) so the rest can be applied as a merge patch.
pub fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            for x in m.values_mut() {
                strip_directives(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

/// One RFC 6902 operation.
#[derive(Debug, Clone)]
pub struct JsonPatchOp {
    op: String,
    path: Option<String>,
    from: Option<String>,
    value: Option<Value>,
}

/// Decodes a JSON patch document; a malformed one is a 400 (`jsonpatch.DecodePatch` failing).
pub fn parse_json_patch(body: &[u8]) -> Result<Vec<JsonPatchOp>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let Value::Array(ops) = v else {
        return Err(ApiError::bad_request(
            "json: cannot unmarshal object into Go value of type jsonpatch.Patch",
        ));
    };
    if ops.len() > 10_000 {
        return Err(ApiError::too_large_body(10_000));
    }
    ops.into_iter()
        .map(|op| {
            let Value::Object(mut m) = op else {
                return Err(ApiError::bad_request(
                    "json: cannot unmarshal into Go value of type jsonpatch.Operation",
                ));
            };
            let s = |m: &mut Map<String, Value>, k: &str| match m.remove(k) {
                Some(Value::String(s)) => Some(s),
                _ => None,
            };
            Ok(JsonPatchOp {
                op: s(&mut m, "op").unwrap_or_default(),
                path: s(&mut m, "path"),
                from: s(&mut m, "from"),
                value: m.remove("value"),
            })
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum JsonPatchError {
    #[error("{op} operation does not apply: doc is missing path: \"{path}\"")]
    MissingPath { op: String, path: String },
    #[error("testing value {0} failed: test failed")]
    TestFailed(String),
    #[error("Unexpected kind: {0}")]
    UnknownOp(String),
    #[error("operation {0} is missing a required member")]
    Malformed(String),
    #[error("Unable to access invalid index: {0}")]
    BadIndex(String),
}

fn split_pointer(path: &str) -> Result<Vec<String>, JsonPatchError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(JsonPatchError::MissingPath {
            op: "pointer".into(),
            path: path.into(),
        });
    };
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn get<'a>(doc: &'a Value, segs: &[String]) -> Option<&'a Value> {
    let mut cur = doc;
    for s in segs {
        cur = match cur {
            Value::Object(m) => m.get(s)?,
            Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn get_mut<'a>(doc: &'a mut Value, segs: &[String]) -> Option<&'a mut Value> {
    let mut cur = doc;
    for s in segs {
        cur = match cur {
            Value::Object(m) => m.get_mut(s)?,
            Value::Array(a) => a.get_mut(s.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn missing(op: &str, path: &str) -> JsonPatchError {
    JsonPatchError::MissingPath {
        op: op.into(),
        path: path.into(),
    }
}

fn add(doc: &mut Value, path: &str, value: Value, op: &str) -> Result<(), JsonPatchError> {
    let segs = split_pointer(path)?;
    let Some((last, parent)) = segs.split_last() else {
        *doc = value;
        return Ok(());
    };
    match get_mut(doc, parent).ok_or_else(|| missing(op, path))? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let idx: i64 = last
                .parse()
                .map_err(|_| JsonPatchError::BadIndex(last.clone()))?;
            let len = a.len() as i64;
            let idx = if idx < 0 { idx + len } else { idx };
            if idx < 0 || idx > len {
                return Err(JsonPatchError::BadIndex(last.clone()));
            }
            a.insert(idx as usize, value);
            Ok(())
        }
        _ => Err(missing(op, path)),
    }
}

fn remove(doc: &mut Value, path: &str, op: &str) -> Result<Value, JsonPatchError> {
    let segs = split_pointer(path)?;
    let Some((last, parent)) = segs.split_last() else {
        return Err(missing(op, path));
    };
    match get_mut(doc, parent).ok_or_else(|| missing(op, path))? {
        Value::Object(m) => m.remove(last).ok_or_else(|| missing(op, path)),
        Value::Array(a) => {
            let idx: i64 = last
                .parse()
                .map_err(|_| JsonPatchError::BadIndex(last.clone()))?;
            let len = a.len() as i64;
            let idx = if idx < 0 { idx + len } else { idx };
            if idx < 0 || idx >= len {
                return Err(JsonPatchError::BadIndex(last.clone()));
            }
            Ok(a.remove(idx as usize))
        }
        _ => Err(missing(op, path)),
    }
}

/// Applies `ops` to `doc` (all or nothing).
pub fn apply_json_patch(doc: &Value, ops: &[JsonPatchOp]) -> Result<Value, JsonPatchError> {
    let mut doc = doc.clone();
    for o in ops {
        let path = o
            .path
            .as_deref()
            .ok_or_else(|| JsonPatchError::Malformed(o.op.clone()))?;
        match o.op.as_str() {
            "add" => {
                let v = o
                    .value
                    .clone()
                    .ok_or_else(|| JsonPatchError::Malformed(o.op.clone()))?;
                add(&mut doc, path, v, "add")?;
            }
            "remove" => {
                remove(&mut doc, path, "remove")?;
            }
            "replace" => {
                let v = o
                    .value
                    .clone()
                    .ok_or_else(|| JsonPatchError::Malformed(o.op.clone()))?;
                let segs = split_pointer(path)?;
                let target = get_mut(&mut doc, &segs).ok_or_else(|| missing("replace", path))?;
                *target = v;
            }
            "move" => {
                let from = o
                    .from
                    .as_deref()
                    .ok_or_else(|| JsonPatchError::Malformed(o.op.clone()))?;
                let v = remove(&mut doc, from, "move")?;
                add(&mut doc, path, v, "move")?;
            }
            "copy" => {
                let from = o
                    .from
                    .as_deref()
                    .ok_or_else(|| JsonPatchError::Malformed(o.op.clone()))?;
                let v = get(&doc, &split_pointer(from)?)
                    .cloned()
                    .ok_or_else(|| missing("copy", from))?;
                add(&mut doc, path, v, "copy")?;
            }
            "test" => {
                let segs = split_pointer(path)?;
                let expected = o.value.clone().unwrap_or(Value::Null);
                match segs.split_last() {
                    None => {
                        if doc != expected {
                            return Err(JsonPatchError::TestFailed(path.into()));
                        }
                    }
                    Some((_, parent)) => {
                        if get(&doc, parent).is_none() {
                            return Err(missing("test", path));
                        }
                        match get(&doc, &segs) {
                            // evanphx/json-patch: a missing member tests equal to null.
                            None if expected.is_null() => {}
                            Some(actual) if *actual == expected => {}
                            _ => return Err(JsonPatchError::TestFailed(path.into())),
                        }
                    }
                }
            }
            other => return Err(JsonPatchError::UnknownOp(other.into())),
        }
    }
    Ok(doc)
}

/// Parses an apply configuration (YAML or JSON) into an object.
pub fn parse_apply(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_yaml::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "error decoding YAML: the apply configuration must be an object",
        ));
    }
    Ok(v)
}

const IDENTITY_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "generateName",
    "selfLink",
];

/// The `fieldsV1` set of an applied configuration: every member it sets (lists are atomic).
pub fn fields_v1(applied: &Value) -> Value {
    fn walk(v: &Value) -> Value {
        match v {
            Value::Object(m) if !m.is_empty() => {
                Value::Object(m.iter().map(|(k, v)| (format!("f:{k}"), walk(v))).collect())
            }
            _ => Value::Object(Map::new()),
        }
    }
    let mut out = Map::new();
    if let Value::Object(m) = applied {
        for (k, v) in m {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            if k == "metadata" {
                if let Value::Object(meta) = v {
                    let kept: Map<String, Value> = meta
                        .iter()
                        .filter(|(k, _)| !IDENTITY_META.contains(&k.as_str()))
                        .map(|(k, v)| (format!("f:{k}"), walk(v)))
                        .collect();
                    if !kept.is_empty() {
                        out.insert("f:metadata".into(), Value::Object(kept));
                    }
                }
                continue;
            }
            out.insert(format!("f:{k}"), walk(v));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jp(doc: Value, ops: Value) -> Result<Value, JsonPatchError> {
        let ops = parse_json_patch(&serde_json::to_vec(&ops).unwrap()).unwrap();
        apply_json_patch(&doc, &ops)
    }

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1, 2]});
        merge(&mut t, &json!({"a": [3]}));
        assert_eq!(t, json!({"a": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let doc = json!({"metadata": {"name": "x"}, "spec": {"list": [1, 2]}});
        let out = jp(
            doc.clone(),
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["a"]},
                {"op": "add", "path": "/metadata/finalizers/-", "value": "b"},
                {"op": "replace", "path": "/spec/list/0", "value": 9},
                {"op": "remove", "path": "/spec/list/1"},
                {"op": "copy", "from": "/metadata/name", "path": "/spec/n"},
                {"op": "move", "from": "/spec/n", "path": "/spec/m"},
                {"op": "test", "path": "/metadata/finalizers/1", "value": "b"},
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"name": "x", "finalizers": ["a", "b"]}, "spec": {"list": [9], "m": "x"}})
        );
    }

    #[test]
    fn json_patch_failures() {
        let doc = json!({"metadata": {"finalizers": ["a"]}});
        assert!(matches!(
            jp(
                doc.clone(),
                json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "b"}])
            ),
            Err(JsonPatchError::TestFailed(_))
        ));
        assert!(
            jp(
                doc.clone(),
                json!([{"op": "test", "path": "/metadata/finalizers", "value": null}])
            )
            .is_err()
        );
        assert!(jp(doc.clone(), json!([{"op": "remove", "path": "/spec/x"}])).is_err());
        assert!(
            jp(
                doc.clone(),
                json!([{"op": "replace", "path": "/spec", "value": 1}])
            )
            .is_err()
        );
        assert!(
            jp(
                doc.clone(),
                json!([{"op": "add", "path": "/a/b", "value": 1}])
            )
            .is_err()
        );
        assert!(jp(doc, json!([{"op": "frob", "path": "/a"}])).is_err());
        assert!(parse_json_patch(b"{}").is_err());
        assert!(parse_json_patch(b"not json").is_err());
    }

    #[test]
    fn fields_of_apply() {
        let f = fields_v1(&json!({
            "apiVersion": "v1", "kind": "X",
            "metadata": {"name": "a", "labels": {"x": "y"}},
            "status": {"phase": "Ready", "conditions": [{"type": "A"}]}
        }));
        assert_eq!(
            f,
            json!({"f:metadata": {"f:labels": {"f:x": {}}}, "f:status": {"f:phase": {}, "f:conditions": {}}})
        );
    }

    #[test]
    fn strategic_directives_stripped() {
        let mut p =
            json!({"$setElementOrder/finalizers": [], "metadata": {"$patch": "merge", "a": 1}});
        strip_directives(&mut p);
        assert_eq!(p, json!({"metadata": {"a": 1}}));
    }
}
