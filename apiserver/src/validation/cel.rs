//! Runtime evaluation of `x-kubernetes-validations`, walking the object like
//! `apiextensions-apiserver/pkg/apiserver/schema/cel.Validator`: rules of a node see that
//! node as `self`; `oldSelf` is the correlated old value (object fields by name, map
//! entries by key, `x-kubernetes-list-type: map` items by their keys — nothing else
//! correlates); transition rules only run when an old value exists (or
//! `optionalOldSelf`); `null` values are not validated; failures of non-transition rules on
//! unchanged values are ratcheted (dropped).
//!
//! Evaluation itself is kube-cel's (`kube::core::cel`); each schema node carries its own
//! rules compiled once (see `schema.rs`).

use kube::core::cel::{ErrorKind, ValidationError};
use serde_json::Value;

use super::FieldError;
use super::errors::{self, BadValue, ErrorType};
use super::openapi::{correlate_item, path_child, path_index, path_key};
use super::schema::{AdditionalProperties, MAX_DEPTH, RuleSpec, Schema};

/// Walk `value` (at field path `path`, `""` for the root) and evaluate every rule.
pub(crate) fn validate(
    s: &Schema,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    if depth > MAX_DEPTH || value.is_null() {
        return;
    }
    if let Some(compiled) = &s.cel {
        let unchanged = old.is_some_and(|o| o == value);
        if let Err(errs) = kube::core::cel::validate_compiled(compiled, value, old) {
            let mut cursor = 0usize;
            for e in errs.iter() {
                let rule = match_rule(&s.rules, &e.rule, &mut cursor);
                // CRDValidationRatcheting: an unchanged value does not fail rules that do
                // not look at oldSelf.
                if unchanged && !uses_old_self(&rule.rule) {
                    continue;
                }
                out.push(to_field_error(s, rule, e, path));
            }
        }
    }
    match value {
        Value::Object(map) => {
            // `x-kubernetes-map-type: atomic` maps are not correlatable.
            let old_map = if s.map_type.as_deref() == Some("atomic") {
                None
            } else {
                old.and_then(Value::as_object)
            };
            for (k, v) in map {
                let old_v = old_map.and_then(|o| o.get(k));
                if let Some(p) = s.properties.get(k) {
                    validate(p, v, old_v, &path_child(path, k), depth + 1, out);
                } else if let Some(AdditionalProperties::Schema(ap)) = &s.additional_properties {
                    validate(ap, v, old_v, &path_key(path, k), depth + 1, out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = &s.items {
                for (i, item) in items.iter().enumerate() {
                    let old_item = if s.list_type.as_deref() == Some("map") {
                        correlate_item(s, item, old)
                    } else {
                        None
                    };
                    validate(is, item, old_item, &path_index(path, i), depth + 1, out);
                }
            }
        }
        _ => {}
    }
}

/// Whether a rule references `oldSelf` (a transition rule).
pub(crate) fn uses_old_self(rule: &str) -> bool {
    kube::core::cel::cel::Program::compile(rule)
        .map(|p| p.references().has_variable("oldSelf"))
        .unwrap_or(false)
}

/// kube-cel reports failures in rule order; pair each with its rule definition.
fn match_rule<'a>(rules: &'a [RuleSpec], text: &str, cursor: &mut usize) -> &'a RuleSpec {
    static EMPTY: RuleSpec = RuleSpec {
        rule: String::new(),
        message: None,
        message_expression: None,
        reason: None,
        field_path: None,
        optional_old_self: None,
    };
    if let Some(off) = rules[(*cursor).min(rules.len())..]
        .iter()
        .position(|r| r.rule == text)
    {
        let idx = *cursor + off;
        *cursor = idx + 1;
        return &rules[idx];
    }
    rules.iter().find(|r| r.rule == text).unwrap_or(&EMPTY)
}

/// `ruleMessageOrDefault`.
fn default_message(rule: &RuleSpec) -> String {
    match rule.message.as_deref().map(str::trim) {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => format!("failed rule: {}", rule.rule.trim()),
    }
}

/// `ruleErrorString`.
fn rule_error_string(rule: &RuleSpec) -> String {
    match rule.message.as_deref().map(str::trim) {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => rule.rule.trim().to_string(),
    }
}

/// The path an error is reported at: the node's path, extended by `fieldPath`
/// (normalized like `ValidFieldPath`, appended as one child).
fn error_path(path: &str, rule: &RuleSpec) -> String {
    match rule.field_path.as_deref().and_then(normalize_field_path) {
        Some(fp) => path_child(path, &fp),
        None if path.is_empty() => "<nil>".to_string(),
        None => path.to_string(),
    }
}

/// `.a.b['c'][0]` → `a.b[c][0]`.
pub(crate) fn normalize_field_path(fp: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = fp.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '.' => {
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    if n == '.' || n == '[' {
                        break;
                    }
                    name.push(n);
                    chars.next();
                }
                if name.is_empty() {
                    return None;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&name);
            }
            '[' => {
                let mut inner = String::new();
                let mut closed = false;
                for n in chars.by_ref() {
                    if n == ']' {
                        closed = true;
                        break;
                    }
                    inner.push(n);
                }
                if !closed {
                    return None;
                }
                let key = inner.trim_matches(|q| q == '\'' || q == '"');
                out.push('[');
                out.push_str(key);
                out.push(']');
            }
            _ => return None,
        }
    }
    (!out.is_empty()).then_some(out)
}

fn to_field_error(s: &Schema, rule: &RuleSpec, e: &ValidationError, path: &str) -> FieldError {
    let field = error_path(path, rule);
    let ty = s.ty.as_str();
    match e.kind {
        ErrorKind::ValidationFailure => {
            let message = if rule.message_expression.is_some() && !e.message.trim().is_empty() {
                e.message.trim().to_string()
            } else {
                default_message(rule)
            };
            // fieldErrorForReason: the value is the schema type of the node.
            match rule.reason.as_deref() {
                Some("FieldValueForbidden") => errors::forbidden(&field, &message),
                Some("FieldValueRequired") => errors::required(&field, &message),
                Some("FieldValueDuplicate") => errors::duplicate(&field, BadValue::Str(ty)),
                _ => errors::invalid(&field, BadValue::Str(ty), &message),
            }
        }
        ErrorKind::EvaluationError => {
            let cause = std::error::Error::source(e)
                .map(|c| c.to_string())
                .unwrap_or_else(|| e.message.clone());
            let detail = if cause.starts_with("no such overload") {
                format!(
                    "'{cause}': call arguments did not match a supported operator, function or macro signature for rule: {}",
                    rule_error_string(rule)
                )
            } else {
                format!("{cause} evaluating rule: {}", rule_error_string(rule))
            };
            errors::invalid(&field, BadValue::Str(ty), &detail)
        }
        ErrorKind::SchemaTooDeep => {
            errors::make(&field, ErrorType::Internal, BadValue::Omit, &e.message)
        }
        _ => errors::invalid(&field, BadValue::Str(ty), &e.message),
    }
}
