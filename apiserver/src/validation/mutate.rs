//! Pruning and defaulting, mirroring `apiextensions-apiserver/pkg/apiserver/schema/pruning`
//! and `.../schema/defaulting` (applied in that order by the CR decoder: `Prune`, then
//! `PruneNonNullableNullsWithoutDefaults`, then `Default`).

use serde_json::Value;

use super::schema::{AdditionalProperties, FieldSchema, MAX_DEPTH, Schema};

const META_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// `pruning.Prune(obj, s, root=true)`: the root is treated like an embedded resource, so
/// `apiVersion`, `kind` and `metadata` are never touched (the server owns metadata).
pub(crate) fn prune_root(obj: &mut Value, s: &Schema) {
    prune_node(obj, Some(s), true, 0);
}

/// Prune a value that is not a resource root (e.g. a `default`) against its node.
pub(crate) fn prune_value(x: &mut Value, s: &Schema) {
    prune(x, Some(s), 0);
}

fn prune(x: &mut Value, s: Option<&Schema>, depth: usize) {
    let embedded = s.is_some_and(|s| s.embedded_resource);
    prune_node(x, s, embedded, depth);
}

fn prune_node(x: &mut Value, s: Option<&Schema>, embedded: bool, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    if let Some(s) = s
        && s.preserve_unknown_fields
    {
        skip_prune(x, s, embedded, depth);
        return;
    }
    match x {
        Value::Object(map) => {
            let Some(s) = s else {
                map.clear();
                return;
            };
            map.retain(|k, v| {
                if embedded && META_FIELDS.contains(&k.as_str()) {
                    return true;
                }
                match s.field_schema(k) {
                    FieldSchema::Property(p) => {
                        prune(v, Some(p), depth + 1);
                        true
                    }
                    FieldSchema::Additional(a) => {
                        prune(v, a, depth + 1);
                        true
                    }
                    FieldSchema::Unknown => false,
                }
            });
        }
        Value::Array(items) => {
            let item_schema = s.and_then(|s| s.items.as_deref());
            for v in items {
                prune(v, item_schema, depth + 1);
            }
        }
        _ => {}
    }
}

/// `skipPrune`: under `x-kubernetes-preserve-unknown-fields` unknown fields stay, but
/// specified ones are still pruned below.
fn skip_prune(x: &mut Value, s: &Schema, embedded: bool, depth: usize) {
    match x {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if embedded && META_FIELDS.contains(&k.as_str()) {
                    continue;
                }
                match s.field_schema(k) {
                    FieldSchema::Property(p) => prune(v, Some(p), depth + 1),
                    FieldSchema::Additional(a) => prune(v, a, depth + 1),
                    FieldSchema::Unknown => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = s.items.as_deref() {
                for v in items {
                    skip_prune(v, item, item.embedded_resource, depth + 1);
                }
            }
        }
        _ => {}
    }
}

fn schema_for_field<'a>(s: Option<&'a Schema>, key: &str) -> Option<&'a Schema> {
    match s?.field_schema(key) {
        FieldSchema::Property(p) => Some(p),
        FieldSchema::Additional(a) => a,
        FieldSchema::Unknown => None,
    }
}

/// `PruneNonNullableNullsWithoutDefaults`: a `null` for a non-nullable field without a
/// default is dropped (one with a default is defaulted next).
pub(crate) fn prune_non_nullable_nulls(x: &mut Value, s: Option<&Schema>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    match x {
        Value::Object(map) => {
            map.retain(|k, v| {
                let fs = schema_for_field(s, k);
                if v.is_null() && fs.is_some_and(|fs| !fs.nullable && fs.default.is_none()) {
                    return false;
                }
                prune_non_nullable_nulls(v, fs, depth + 1);
                true
            });
        }
        Value::Array(items) => {
            let is = s.and_then(|s| s.items.as_deref());
            for v in items {
                prune_non_nullable_nulls(v, is, depth + 1);
            }
        }
        _ => {}
    }
}

fn is_non_nullable_null(x: &Value, s: Option<&Schema>) -> bool {
    x.is_null() && s.is_some_and(|s| !s.nullable)
}

/// `defaulting.Default`: fill missing (or non-nullable `null`) properties from `default`,
/// then recurse (so defaults inside a default value apply too).
pub(crate) fn apply_defaults(x: &mut Value, s: &Schema, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    match x {
        Value::Object(map) => {
            for (k, prop) in &s.properties {
                let Some(default) = &prop.default else {
                    continue;
                };
                let missing = match map.get(k) {
                    None => true,
                    Some(v) => is_non_nullable_null(v, Some(prop)),
                };
                if missing {
                    map.insert(k.clone(), default.clone());
                }
            }
            for (k, v) in map.iter_mut() {
                if let Some(prop) = s.properties.get(k) {
                    apply_defaults(v, prop, depth + 1);
                } else if let Some(ap) = &s.additional_properties {
                    let ap = match ap {
                        AdditionalProperties::Schema(a) => Some(a.as_ref()),
                        AdditionalProperties::Bool(_) => None,
                    };
                    if let Some(ap) = ap {
                        if is_non_nullable_null(v, Some(ap))
                            && let Some(d) = &ap.default
                        {
                            *v = d.clone();
                        }
                        apply_defaults(v, ap, depth + 1);
                    }
                }
            }
        }
        Value::Array(items) => {
            let Some(is) = s.items.as_deref() else {
                return;
            };
            for v in items {
                if is_non_nullable_null(v, Some(is))
                    && let Some(d) = &is.default
                {
                    *v = d.clone();
                }
                apply_defaults(v, is, depth + 1);
            }
        }
        _ => {}
    }
}
