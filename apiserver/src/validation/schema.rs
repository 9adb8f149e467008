//! A typed, lenient view of an `openAPIV3Schema` (`JSONSchemaProps`) used by pruning,
//! defaulting, value validation and CEL. Malformed keywords are ignored here (never
//! panicking); `check_structural` is what reports them.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::core::cel::CompiledSchema;
use regex::Regex;
use serde_json::Value;

/// Nesting deeper than this is treated as "no schema" (Kubernetes bounds request size and
/// JSON depth; this keeps recursion bounded for hostile schemas).
pub(crate) const MAX_DEPTH: usize = 128;

/// `additionalProperties`: a boolean or a schema.
#[derive(Debug)]
pub(crate) enum AdditionalProperties {
    Bool(bool),
    Schema(Box<Schema>),
}

/// One `x-kubernetes-validations` entry.
#[derive(Debug, Clone, Default)]
pub(crate) struct RuleSpec {
    pub rule: String,
    pub message: Option<String>,
    pub message_expression: Option<String>,
    pub reason: Option<String>,
    pub field_path: Option<String>,
    pub optional_old_self: Option<bool>,
}

/// A compiled `pattern` (RE2 syntax; Rust's `regex` implements the same dialect).
#[derive(Debug)]
pub(crate) struct Pattern {
    pub source: String,
    pub regex: Option<Regex>,
}

#[derive(Debug, Default)]
pub(crate) struct Schema {
    /// `type`, empty when absent.
    pub ty: String,
    pub format: String,
    pub nullable: bool,
    pub properties: BTreeMap<String, Schema>,
    pub required: Vec<String>,
    pub items: Option<Box<Schema>>,
    pub additional_properties: Option<AdditionalProperties>,
    pub enum_values: Option<Vec<Value>>,
    pub maximum: Option<f64>,
    pub exclusive_maximum: bool,
    pub minimum: Option<f64>,
    pub exclusive_minimum: bool,
    pub multiple_of: Option<f64>,
    pub max_length: Option<i64>,
    pub min_length: Option<i64>,
    pub max_items: Option<i64>,
    pub min_items: Option<i64>,
    pub max_properties: Option<i64>,
    pub min_properties: Option<i64>,
    pub pattern: Option<Pattern>,
    pub unique_items: bool,
    pub preserve_unknown_fields: bool,
    pub int_or_string: bool,
    pub embedded_resource: bool,
    pub list_type: Option<String>,
    pub list_map_keys: Vec<String>,
    pub map_type: Option<String>,
    pub default: Option<Value>,
    pub all_of: Vec<Schema>,
    pub any_of: Vec<Schema>,
    pub one_of: Vec<Schema>,
    pub not: Option<Box<Schema>>,
    pub rules: Vec<RuleSpec>,
    /// The node's own rules compiled by kube-cel (descendants' rules stripped), when it
    /// has any.
    pub cel: Option<Arc<CompiledSchema>>,
}

fn as_i64(v: Option<&Value>) -> Option<i64> {
    let v = v?;
    v.as_i64()
        .or_else(|| v.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
}

fn as_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

fn as_bool(v: Option<&Value>) -> bool {
    v.and_then(Value::as_bool).unwrap_or(false)
}

pub(crate) fn parse_rules(raw: Option<&Value>) -> Vec<RuleSpec> {
    let Some(Value::Array(items)) = raw else {
        return Vec::new();
    };
    items
        .iter()
        .map(|r| RuleSpec {
            rule: as_str(r.get("rule")).unwrap_or_default(),
            message: as_str(r.get("message")),
            message_expression: as_str(r.get("messageExpression")),
            reason: as_str(r.get("reason")),
            field_path: as_str(r.get("fieldPath")),
            optional_old_self: r.get("optionalOldSelf").and_then(Value::as_bool),
        })
        .collect()
}

impl Schema {
    /// Parse leniently; `with_cel` compiles `x-kubernetes-validations` per node.
    pub(crate) fn parse(raw: &Value, with_cel: bool) -> Schema {
        Self::parse_at(raw, with_cel, 0)
    }

    fn parse_at(raw: &Value, with_cel: bool, depth: usize) -> Schema {
        let Some(obj) = raw.as_object() else {
            return Schema::default();
        };
        if depth > MAX_DEPTH {
            return Schema::default();
        }
        let sub = |v: &Value| Self::parse_at(v, with_cel, depth + 1);
        let subs = |k: &str| -> Vec<Schema> {
            match obj.get(k) {
                Some(Value::Array(a)) => a.iter().map(sub).collect(),
                _ => Vec::new(),
            }
        };
        let properties = match obj.get("properties") {
            Some(Value::Object(p)) => p.iter().map(|(k, v)| (k.clone(), sub(v))).collect(),
            _ => BTreeMap::new(),
        };
        let additional_properties = match obj.get("additionalProperties") {
            Some(Value::Bool(b)) => Some(AdditionalProperties::Bool(*b)),
            Some(v @ Value::Object(_)) => Some(AdditionalProperties::Schema(Box::new(sub(v)))),
            _ => None,
        };
        let items = match obj.get("items") {
            Some(v @ Value::Object(_)) => Some(Box::new(sub(v))),
            _ => None,
        };
        let pattern = as_str(obj.get("pattern")).map(|source| Pattern {
            regex: Regex::new(&source).ok(),
            source,
        });
        let rules = if with_cel {
            parse_rules(obj.get("x-kubernetes-validations"))
        } else {
            Vec::new()
        };
        let cel = (with_cel && !rules.is_empty())
            .then(|| Arc::new(kube::core::cel::compile_schema(&strip_nested_rules(raw))));
        Schema {
            ty: as_str(obj.get("type")).unwrap_or_default(),
            format: as_str(obj.get("format")).unwrap_or_default(),
            nullable: as_bool(obj.get("nullable")),
            properties,
            required: match obj.get("required") {
                Some(Value::Array(a)) => a.iter().filter_map(|v| as_str(Some(v))).collect(),
                _ => Vec::new(),
            },
            items,
            additional_properties,
            enum_values: obj.get("enum").and_then(Value::as_array).cloned(),
            maximum: obj.get("maximum").and_then(Value::as_f64),
            exclusive_maximum: as_bool(obj.get("exclusiveMaximum")),
            minimum: obj.get("minimum").and_then(Value::as_f64),
            exclusive_minimum: as_bool(obj.get("exclusiveMinimum")),
            multiple_of: obj.get("multipleOf").and_then(Value::as_f64),
            max_length: as_i64(obj.get("maxLength")),
            min_length: as_i64(obj.get("minLength")),
            max_items: as_i64(obj.get("maxItems")),
            min_items: as_i64(obj.get("minItems")),
            max_properties: as_i64(obj.get("maxProperties")),
            min_properties: as_i64(obj.get("minProperties")),
            pattern,
            unique_items: as_bool(obj.get("uniqueItems")),
            preserve_unknown_fields: as_bool(obj.get("x-kubernetes-preserve-unknown-fields")),
            int_or_string: as_bool(obj.get("x-kubernetes-int-or-string")),
            embedded_resource: as_bool(obj.get("x-kubernetes-embedded-resource")),
            list_type: as_str(obj.get("x-kubernetes-list-type")),
            list_map_keys: match obj.get("x-kubernetes-list-map-keys") {
                Some(Value::Array(a)) => a.iter().filter_map(|v| as_str(Some(v))).collect(),
                _ => Vec::new(),
            },
            map_type: as_str(obj.get("x-kubernetes-map-type")),
            default: obj.get("default").cloned(),
            all_of: subs("allOf"),
            any_of: subs("anyOf"),
            one_of: subs("oneOf"),
            not: match obj.get("not") {
                Some(v @ Value::Object(_)) => Some(Box::new(sub(v))),
                _ => None,
            },
            rules,
            cel,
        }
    }

    /// The schema applying to `key` of an object: `properties[key]`, else
    /// `additionalProperties` (as a schema, `None` for `true`/absent).
    pub(crate) fn field_schema(&self, key: &str) -> FieldSchema<'_> {
        if let Some(p) = self.properties.get(key) {
            return FieldSchema::Property(p);
        }
        match &self.additional_properties {
            Some(AdditionalProperties::Schema(s)) => FieldSchema::Additional(Some(s)),
            Some(AdditionalProperties::Bool(_)) => FieldSchema::Additional(None),
            None => FieldSchema::Unknown,
        }
    }
}

pub(crate) enum FieldSchema<'a> {
    Property(&'a Schema),
    /// Covered by `additionalProperties`, with its schema when it is one.
    Additional(Option<&'a Schema>),
    Unknown,
}

/// A copy of a schema node with `x-kubernetes-validations` removed from every descendant
/// (kept on the node itself), so kube-cel evaluates exactly this node's rules while still
/// seeing the full type information for converting the value.
fn strip_nested_rules(raw: &Value) -> Value {
    fn strip(v: &mut Value, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        if let Value::Object(map) = v {
            if depth > 0 {
                map.remove("x-kubernetes-validations");
            }
            for (k, child) in map.iter_mut() {
                match k.as_str() {
                    "properties" => {
                        if let Value::Object(props) = child {
                            for p in props.values_mut() {
                                strip(p, depth + 1);
                            }
                        }
                    }
                    "items" | "additionalProperties" | "not" => strip(child, depth + 1),
                    "allOf" | "anyOf" | "oneOf" => {
                        if let Value::Array(a) = child {
                            for s in a {
                                strip(s, depth + 1);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let mut copy = raw.clone();
    strip(&mut copy, 0);
    // The node's own rules are evaluated on allOf branches by kube-cel too; those are
    // stripped above, so only the node's list remains.
    copy
}
