//! CRD-registration checks of an `openAPIV3Schema`, mirroring
//! `apiextensions-apiserver/pkg/apis/apiextensions/validation` (`validateCustomResource\
//! DefinitionValidation` → `ValidateCustomResourceDefinitionOpenAPISchema`) and
//! `.../apiserver/schema` (`ValidateStructural`, `ValidateDefaults`), with CEL compilation
//! and the static cost budget. Paths are rooted at `openAPIV3Schema` (the server prefixes
//! them with `spec.versions[i].schema.`).

use kube::core::cel::cel::Program;
use serde_json::{Map, Value};

use super::FieldError;
use super::cost;
use super::errors::{self, BadValue, go_quote};
use super::mutate;
use super::openapi::{self, path_child, path_index, path_key};
use super::schema::{MAX_DEPTH, RuleSpec, Schema, parse_rules};

const ROOT: &str = "openAPIV3Schema";
const OPENAPI_V3_TYPES: [&str; 6] = ["array", "boolean", "integer", "number", "object", "string"];
const SUPPORTED_REASONS: [&str; 4] = [
    "FieldValueDuplicate",
    "FieldValueForbidden",
    "FieldValueInvalid",
    "FieldValueRequired",
];
const META_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

fn s_type(raw: &Map<String, Value>) -> &str {
    raw.get("type").and_then(Value::as_str).unwrap_or("")
}

fn flag(raw: &Map<String, Value>, key: &str) -> bool {
    raw.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn props(raw: &Map<String, Value>) -> Option<&Map<String, Value>> {
    raw.get("properties").and_then(Value::as_object)
}

fn sub_list<'a>(raw: &'a Map<String, Value>, key: &str) -> Vec<&'a Value> {
    raw.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

/// Run every registration check; see [`super::check_structural`].
pub(crate) fn check(schema: &Value) -> Vec<FieldError> {
    let Some(root) = schema.as_object() else {
        return vec![errors::invalid(
            ROOT,
            BadValue::Json(schema),
            "must be an object (a JSONSchemaProps)",
        )];
    };
    let mut all = Vec::new();
    if flag(root, "nullable") {
        all.push(errors::forbidden(
            &format!("{ROOT}.nullable"),
            "nullable cannot be true at the root",
        ));
    }

    // Structural schema (ValidateStructural), then defaults, then the CEL context.
    let mut structural = Vec::new();
    invariants(root, Level::Root, ROOT, 0, &mut structural);
    completeness(root, ROOT, &mut structural);
    structural.sort_by_key(|e| format!("{}: {}", e.field, e.message));
    let mut cel_enabled = false;
    if structural.is_empty() {
        let mut defaults = Vec::new();
        validate_defaults(schema, ROOT, 0, &mut defaults);
        if defaults.is_empty() {
            cel_enabled = true;
        }
        all.extend(defaults);
    } else {
        all.extend(structural);
    }

    let mut total = TotalCost::default();
    let ctx = Ctx {
        allow_defaults: true,
        disallow_reason: String::new(),
        inside_meta: false,
        uncorrelatable: None,
        cardinality: Some(1),
        cel: cel_enabled,
        resource_root: true,
    };
    let (schema_errs, cel_errs) = openapi_schema(schema, ROOT, &ctx, true, 0, &mut total);
    all.extend(schema_errs);
    all.extend(cel_errs);

    if cel_enabled && total.total > cost::CRD_LIMIT {
        for (path, _) in &total.most_expensive {
            all.push(errors::forbidden(
                path,
                "contributed to estimated rule cost total exceeding cost limit for entire OpenAPIv3 schema",
            ));
        }
        all.push(errors::forbidden(
            ROOT,
            &cost::cost_error_message(
                "x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema",
                total.total,
                cost::CRD_LIMIT,
            ),
        ));
    }
    all
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Root,
    Item,
    Field,
}

/// `validateStructuralInvariants`.
fn invariants(
    s: &Map<String, Value>,
    lvl: Level,
    path: &str,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    if depth > MAX_DEPTH {
        return;
    }
    let ty = s_type(s);
    let items = s.get("items").and_then(Value::as_object);
    if ty == "array" && items.is_none() {
        out.push(errors::required(
            &path_child(path, "items"),
            "must be specified",
        ));
    }
    if let Some(items) = items {
        invariants(
            items,
            Level::Item,
            &path_child(path, "items"),
            depth + 1,
            out,
        );
    }
    if let Some(p) = props(s) {
        for (k, v) in p {
            if let Some(v) = v.as_object() {
                invariants(
                    v,
                    Level::Field,
                    &path_key(&path_child(path, "properties"), k),
                    depth + 1,
                    out,
                );
            }
        }
    }
    if let Some(ap) = s.get("additionalProperties") {
        if lvl == Level::Root {
            out.push(errors::forbidden(
                &path_child(path, "additionalProperties"),
                "must not be used at the root",
            ));
        }
        if let Some(ap) = ap.as_object() {
            invariants(
                ap,
                Level::Field,
                &path_child(path, "additionalProperties"),
                depth + 1,
                out,
            );
        }
    }
    let int_or_string = flag(s, "x-kubernetes-int-or-string");
    let preserve = flag(s, "x-kubernetes-preserve-unknown-fields");
    let embedded = flag(s, "x-kubernetes-embedded-resource");
    if int_or_string && preserve {
        out.push(errors::invalid(
            &path_child(path, "x-kubernetes-preserve-unknown-fields"),
            BadValue::Json(&Value::Bool(true)),
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }
    if int_or_string && embedded {
        out.push(errors::invalid(
            &path_child(path, "x-kubernetes-embedded-resource"),
            BadValue::Json(&Value::Bool(true)),
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }

    let skip_any_of = is_int_or_string_any_of(s.get("anyOf"));
    let skip_first_all_of_any_of = s
        .get("allOf")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .is_some_and(|first| is_int_or_string_any_of(first.get("anyOf")));
    value_validation(
        s,
        skip_any_of,
        skip_first_all_of_any_of,
        lvl,
        path,
        depth,
        out,
    );

    let check_metadata = lvl == Level::Root || embedded;
    let type_path = path_child(path, "type");
    if embedded && ty != "object" {
        let msg = "must be object if x-kubernetes-embedded-resource is true";
        if ty.is_empty() {
            out.push(errors::required(&type_path, msg));
        } else {
            out.push(errors::invalid(&type_path, BadValue::Str(ty), msg));
        }
    } else if ty.is_empty() && !int_or_string && !preserve {
        let msg = match lvl {
            Level::Root => "must not be empty at the root",
            Level::Item => "must not be empty for specified array items",
            Level::Field => "must not be empty for specified object fields",
        };
        out.push(errors::required(&type_path, msg));
    }
    if embedded && s.contains_key("additionalProperties") {
        out.push(errors::forbidden(
            &path_child(path, "additionalProperties"),
            "must not be used if x-kubernetes-embedded-resource is set",
        ));
    }
    if lvl == Level::Root && !ty.is_empty() && ty != "object" {
        out.push(errors::invalid(
            &type_path,
            BadValue::Str(ty),
            "must be object at the root",
        ));
    }
    if let Some(p) = props(s) {
        for meta in ["kind", "apiVersion"] {
            if let Some(m) = p.get(meta).and_then(Value::as_object)
                && check_metadata
                && s_type(m) != "string"
            {
                let field = path_child(&path_key(&path_child(path, "properties"), meta), "type");
                out.push(errors::invalid(
                    &field,
                    BadValue::Str(s_type(m)),
                    "must be string",
                ));
            }
        }
        if let Some(m) = p.get("metadata").and_then(Value::as_object) {
            let mpath = path_key(&path_child(path, "properties"), "metadata");
            if check_metadata && s_type(m) != "object" {
                out.push(errors::invalid(
                    &path_child(&mpath, "type"),
                    BadValue::Str(s_type(m)),
                    "must be object",
                ));
            }
            if lvl == Level::Root && !root_metadata_ok(m) {
                out.push(errors::forbidden(
                    &mpath,
                    "must not specify anything other than name and generateName, but metadata is implicitly specified",
                ));
            }
        }
    }
    if embedded && !preserve && props(s).is_none_or(Map::is_empty) {
        out.push(errors::required(
            &path_child(path, "properties"),
            "must not be empty if x-kubernetes-embedded-resource is true without x-kubernetes-preserve-unknown-fields",
        ));
    }
}

/// `validateStructuralMetadataInvariants` at the root: only `type`, `default` and
/// `properties` limited to `name` / `generateName`.
fn root_metadata_ok(m: &Map<String, Value>) -> bool {
    m.iter().all(|(k, v)| match k.as_str() {
        "type" | "default" => true,
        "properties" => v
            .as_object()
            .is_some_and(|p| !p.is_empty() && p.keys().all(|k| k == "name" || k == "generateName")),
        _ => false,
    })
}

/// `anyOf: [{type: integer}, {type: string}]`.
fn is_int_or_string_any_of(any_of: Option<&Value>) -> bool {
    let Some(Value::Array(a)) = any_of else {
        return false;
    };
    let only_type = |v: &Value, t: &str| {
        v.as_object()
            .is_some_and(|o| o.len() == 1 && o.get("type").and_then(Value::as_str) == Some(t))
    };
    a.len() == 2 && only_type(&a[0], "integer") && only_type(&a[1], "string")
}

/// `validateValueValidation`: junctors of a node (and its `pattern`).
fn value_validation(
    s: &Map<String, Value>,
    skip_any_of: bool,
    skip_first_all_of_any_of: bool,
    lvl: Level,
    path: &str,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    if depth > MAX_DEPTH {
        return;
    }
    if !skip_any_of {
        for (i, v) in sub_list(s, "anyOf").into_iter().enumerate() {
            nested(
                v,
                false,
                lvl,
                &path_index(&path_child(path, "anyOf"), i),
                depth + 1,
                out,
            );
        }
    }
    for (i, v) in sub_list(s, "allOf").into_iter().enumerate() {
        let skip = skip_first_all_of_any_of && i == 0;
        nested(
            v,
            skip,
            lvl,
            &path_index(&path_child(path, "allOf"), i),
            depth + 1,
            out,
        );
    }
    for (i, v) in sub_list(s, "oneOf").into_iter().enumerate() {
        nested(
            v,
            false,
            lvl,
            &path_index(&path_child(path, "oneOf"), i),
            depth + 1,
            out,
        );
    }
    if let Some(not) = s.get("not") {
        nested(not, false, lvl, &path_child(path, "not"), depth + 1, out);
    }
    if let Some(p) = s.get("pattern").and_then(Value::as_str)
        && let Err(e) = regex::Regex::new(p)
    {
        let detail = format!("must be a valid regular expression, but isn't: {e}");
        out.push(errors::invalid(
            &path_child(path, "pattern"),
            BadValue::Str(p),
            &detail,
        ));
    }
}

/// `validateNestedValueValidation`: inside anyOf/allOf/oneOf/not only value validations.
fn nested(
    v: &Value,
    skip_any_of: bool,
    lvl: Level,
    path: &str,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    let Some(v) = v.as_object() else {
        return;
    };
    if depth > MAX_DEPTH {
        return;
    }
    value_validation(v, skip_any_of, false, lvl, path, depth, out);
    if let Some(items) = v.get("items") {
        nested(
            items,
            false,
            lvl,
            &path_child(path, "items"),
            depth + 1,
            out,
        );
    }
    if let Some(p) = props(v) {
        for (k, fld) in p {
            nested(
                fld,
                false,
                Level::Field,
                &path_key(&path_child(path, "properties"), k),
                depth + 1,
                out,
            );
        }
    }
    let forbid = |out: &mut Vec<FieldError>, key: &str, msg: &str| {
        out.push(errors::forbidden(&path_child(path, key), msg))
    };
    if !s_type(v).is_empty() {
        forbid(out, "type", "must be empty to be structural");
    }
    if v.contains_key("additionalProperties") {
        forbid(
            out,
            "additionalProperties",
            "must be undefined to be structural",
        );
    }
    if v.contains_key("default") {
        forbid(out, "default", "must be undefined to be structural");
    }
    if v.get("title")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty())
    {
        forbid(out, "title", "must be empty to be structural");
    }
    if v.get("description")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty())
    {
        forbid(out, "description", "must be empty to be structural");
    }
    if flag(v, "nullable") {
        forbid(out, "nullable", "must be false to be structural");
    }
    if v.contains_key("externalDocs") {
        forbid(out, "externalDocs", "must be undefined to be structural");
    }
    if flag(v, "x-kubernetes-preserve-unknown-fields") {
        forbid(
            out,
            "x-kubernetes-preserve-unknown-fields",
            "must be false to be structural",
        );
    }
    if flag(v, "x-kubernetes-embedded-resource") {
        forbid(
            out,
            "x-kubernetes-embedded-resource",
            "must be false to be structural",
        );
    }
    if flag(v, "x-kubernetes-int-or-string") {
        forbid(
            out,
            "x-kubernetes-int-or-string",
            "must be false to be structural",
        );
    }
    if v.get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        forbid(
            out,
            "x-kubernetes-list-map-keys",
            "must be empty to be structural",
        );
    }
    if v.contains_key("x-kubernetes-list-type") {
        forbid(
            out,
            "x-kubernetes-list-type",
            "must be undefined to be structural",
        );
    }
    if v.contains_key("x-kubernetes-map-type") {
        forbid(
            out,
            "x-kubernetes-map-type",
            "must be undefined to be structural",
        );
    }
    if v.get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        forbid(
            out,
            "x-kubernetes-validations",
            "must be empty to be structural",
        );
    }
    if props(v).is_some_and(|p| p.contains_key("metadata")) {
        out.push(errors::forbidden(
            &path_key(&path_child(path, "properties"), "metadata"),
            "must not be specified in a nested context",
        ));
    }
}

/// `validateStructuralCompleteness`: fields and items named in the root's value
/// validations must be specified structurally.
fn completeness(s: &Map<String, Value>, path: &str, out: &mut Vec<FieldError>) {
    junctor_completeness(s, Some(s), path, path, 0, out);
}

fn junctor_completeness(
    v: &Map<String, Value>,
    s: Option<&Map<String, Value>>,
    s_path: &str,
    v_path: &str,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    if depth > MAX_DEPTH {
        return;
    }
    if let Some(not) = v.get("not").and_then(Value::as_object) {
        nested_completeness(not, s, s_path, &path_child(v_path, "not"), depth + 1, out);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for (i, sub) in sub_list(v, key).into_iter().enumerate() {
            if let Some(sub) = sub.as_object() {
                let vp = path_index(&path_child(v_path, key), i);
                nested_completeness(sub, s, s_path, &vp, depth + 1, out);
            }
        }
    }
}

fn nested_completeness(
    v: &Map<String, Value>,
    s: Option<&Map<String, Value>>,
    s_path: &str,
    v_path: &str,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    let Some(s) = s else {
        out.push(errors::required(
            s_path,
            &format!("because it is defined in {v_path}"),
        ));
        return;
    };
    junctor_completeness(v, Some(s), s_path, v_path, depth, out);
    if let Some(items) = v.get("items").and_then(Value::as_object) {
        let s_items = s.get("items").and_then(Value::as_object);
        nested_completeness(
            items,
            s_items,
            &path_child(s_path, "items"),
            &path_child(v_path, "items"),
            depth + 1,
            out,
        );
    }
    if let Some(p) = props(v) {
        for (k, fld) in p {
            let Some(fld) = fld.as_object() else { continue };
            let sp = path_key(&path_child(s_path, "properties"), k);
            let vp = path_key(&path_child(v_path, "properties"), k);
            match props(s).and_then(|sp| sp.get(k)).and_then(Value::as_object) {
                Some(sf) => nested_completeness(fld, Some(sf), &sp, &vp, depth + 1, out),
                None => out.push(errors::required(
                    &sp,
                    &format!("because it is defined in {vp}"),
                )),
            }
        }
    }
}

/// `structuraldefaulting.ValidateDefaults`: every default must be pruned and valid against
/// its own schema.
fn validate_defaults(raw: &Value, path: &str, depth: usize, out: &mut Vec<FieldError>) {
    let Some(s) = raw.as_object() else {
        return;
    };
    if depth > MAX_DEPTH {
        return;
    }
    if let Some(default) = s.get("default") {
        let node = Schema::parse(raw, false);
        let default_path = path_child(path, "default");
        let mut pruned = default.clone();
        mutate::prune_value(&mut pruned, &node);
        if &pruned != default {
            out.push(errors::invalid(
                &default_path,
                BadValue::Json(default),
                "must not have unknown fields",
            ));
        } else {
            let mut errs = Vec::new();
            openapi::validate(&node, default, "", None, 0, &mut errs);
            for mut e in errs {
                e.field = if e.field == "<nil>" {
                    default_path.clone()
                } else {
                    path_child(&default_path, &e.field)
                };
                out.push(e);
            }
        }
    }
    if let Some(items) = s.get("items") {
        validate_defaults(items, &path_child(path, "items"), depth + 1, out);
    }
    if let Some(p) = props(s) {
        for (k, v) in p {
            validate_defaults(
                v,
                &path_key(&path_child(path, "properties"), k),
                depth + 1,
                out,
            );
        }
    }
    if let Some(ap @ Value::Object(_)) = s.get("additionalProperties") {
        validate_defaults(
            ap,
            &path_child(path, "additionalProperties"),
            depth + 1,
            out,
        );
    }
}

#[derive(Default)]
struct TotalCost {
    total: u64,
    /// Up to four most expensive rules, by path.
    most_expensive: Vec<(String, u64)>,
}

impl TotalCost {
    fn observe(&mut self, path: String, cost: u64) {
        self.total = self.total.saturating_add(cost);
        self.most_expensive.push((path, cost));
        self.most_expensive.sort_by_key(|e| std::cmp::Reverse(e.1));
        self.most_expensive.truncate(4);
    }
}

#[derive(Clone)]
struct Ctx {
    allow_defaults: bool,
    disallow_reason: String,
    inside_meta: bool,
    /// Highest path under which `oldSelf` cannot be correlated.
    uncorrelatable: Option<String>,
    /// Max number of times this node can occur (`None` = unbounded).
    cardinality: Option<u64>,
    /// Structural checks passed: compile and cost rules.
    cel: bool,
    resource_root: bool,
}

impl Ctx {
    fn forbid_defaults(&self, reason: &str) -> Ctx {
        Ctx {
            allow_defaults: false,
            disallow_reason: reason.to_string(),
            ..self.clone()
        }
    }
    fn forbid_old_self(&self, path: &str) -> Ctx {
        Ctx {
            uncorrelatable: self
                .uncorrelatable
                .clone()
                .or_else(|| Some(path.to_string())),
            ..self.clone()
        }
    }
    fn child(&self, multiplier: Option<i64>, resource_root: bool, cel: bool) -> Ctx {
        let cardinality = match (self.cardinality, multiplier) {
            (Some(c), Some(m)) => Some(c.saturating_mul(u64::try_from(m).unwrap_or(0))),
            _ => None,
        };
        Ctx {
            cardinality,
            resource_root,
            cel,
            ..self.clone()
        }
    }
}

/// The Go `%#v` of an `apiextensions.ValidationRule`, as printed in rule errors.
fn go_rule(r: &RuleSpec) -> String {
    let ptr_str = |t: &str, v: &Option<String>| match v {
        Some(v) => format!("(*{t})({})", go_quote(v)),
        None => format!("(*{t})(nil)"),
    };
    let old_self = match r.optional_old_self {
        Some(b) => format!("(*bool)({b})"),
        None => "(*bool)(nil)".to_string(),
    };
    format!(
        "apiextensions.ValidationRule{{Rule:{}, Message:{}, MessageExpression:{}, Reason:{}, FieldPath:{}, OptionalOldSelf:{}}}",
        go_quote(&r.rule),
        go_quote(r.message.as_deref().unwrap_or("")),
        go_quote(r.message_expression.as_deref().unwrap_or("")),
        ptr_str("apiextensions.FieldValueErrorReason", &r.reason),
        go_quote(r.field_path.as_deref().unwrap_or("")),
        old_self
    )
}

fn has_newlines(s: &str) -> bool {
    s.contains('\n') || s.contains('\r')
}

type Errs = (Vec<FieldError>, Vec<FieldError>);

/// `ValidateCustomResourceDefinitionOpenAPISchema`: returns (schema errors, CEL errors).
fn openapi_schema(
    raw: &Value,
    path: &str,
    ctx: &Ctx,
    is_root: bool,
    depth: usize,
    total: &mut TotalCost,
) -> Errs {
    let mut se = Vec::new();
    let mut ce = Vec::new();
    let Some(s) = raw.as_object() else {
        return (se, ce);
    };
    if depth > MAX_DEPTH {
        return (se, ce);
    }
    standard_checks(s, path, ctx, &mut se);
    let ty = s_type(s);
    if flag(s, "uniqueItems") {
        se.push(errors::forbidden(
            &path_child(path, "uniqueItems"),
            "uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
        ));
    }
    let merge = |(a, b): Errs, se: &mut Vec<FieldError>, ce: &mut Vec<FieldError>| {
        se.extend(a);
        ce.extend(b);
    };
    if let Some(ap) = s.get("additionalProperties") {
        let has_props = props(s).is_some_and(|p| !p.is_empty());
        if has_props && (ap.as_bool() == Some(false) || ap.is_object()) {
            se.push(errors::forbidden(
                &path_child(path, "additionalProperties"),
                "additionalProperties and properties are mutual exclusive",
            ));
        }
        let mut sub = ctx.child(
            s.get("maxProperties").and_then(Value::as_i64),
            ap.get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            ctx.cel,
        );
        if ctx.inside_meta {
            sub = sub.forbid_defaults("inside additionalProperties applying to object metadata");
        }
        merge(
            openapi_schema(
                ap,
                &path_child(path, "additionalProperties"),
                &sub,
                false,
                depth + 1,
                total,
            ),
            &mut se,
            &mut ce,
        );
    }
    if let Some(p) = props(s) {
        let map_correlatable = matches!(
            s.get("x-kubernetes-map-type").and_then(Value::as_str),
            None | Some("granular") | Some("")
        );
        let embedded = flag(s, "x-kubernetes-embedded-resource");
        for (name, prop) in p {
            let child_embedded = prop
                .get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let mut sub = ctx.child(Some(1), child_embedded, ctx.cel);
            if !map_correlatable {
                sub = sub.forbid_old_self(path);
            }
            if (is_root || embedded) && META_FIELDS.contains(&name.as_str()) {
                sub.inside_meta = true;
                if is_root {
                    sub = sub.forbid_defaults(&format!("in top-level {name}"));
                }
            }
            let ppath = path_key(&path_child(path, "properties"), name);
            merge(
                openapi_schema(prop, &ppath, &sub, false, depth + 1, total),
                &mut se,
                &mut ce,
            );
        }
    }
    let no_cel = Ctx {
        cel: false,
        ..ctx.clone()
    };
    if let Some(not) = s.get("not") {
        merge(
            openapi_schema(
                not,
                &path_child(path, "not"),
                &no_cel,
                false,
                depth + 1,
                total,
            ),
            &mut se,
            &mut ce,
        );
    }
    for key in ["allOf", "oneOf", "anyOf"] {
        for (i, sub) in sub_list(s, key).into_iter().enumerate() {
            let p = path_index(&path_child(path, key), i);
            merge(
                openapi_schema(sub, &p, &no_cel, false, depth + 1, total),
                &mut se,
                &mut ce,
            );
        }
    }
    let list_type = s.get("x-kubernetes-list-type").and_then(Value::as_str);
    if let Some(items @ Value::Object(_)) = s.get("items") {
        let mut sub = ctx.child(
            s.get("maxItems").and_then(Value::as_i64),
            items
                .get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            ctx.cel,
        );
        if list_type != Some("map") {
            sub = sub.forbid_old_self(path);
        }
        merge(
            openapi_schema(
                items,
                &path_child(path, "items"),
                &sub,
                false,
                depth + 1,
                total,
            ),
            &mut se,
            &mut ce,
        );
    }
    if s.get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(false)
    {
        se.push(errors::invalid(
            &path_child(path, "x-kubernetes-preserve-unknown-fields"),
            BadValue::Json(&Value::Bool(false)),
            "must be true or undefined",
        ));
    }
    list_and_map_type_checks(s, ty, list_type, path, &mut se);

    let rules = parse_rules(s.get("x-kubernetes-validations"));
    for (i, rule) in rules.iter().enumerate() {
        rule_shape_checks(
            s,
            rule,
            &path_index(&path_child(path, "x-kubernetes-validations"), i),
            &mut se,
        );
    }
    if !rules.is_empty() && se.is_empty() && ctx.cel {
        cel_checks(raw, &rules, path, ctx, total, &mut ce);
    }
    (se, ce)
}

/// `specStandardValidatorV3.validate`.
fn standard_checks(s: &Map<String, Value>, path: &str, ctx: &Ctx, out: &mut Vec<FieldError>) {
    let ty = s_type(s);
    if let Some(t) = s.get("type")
        && !t.is_string()
    {
        out.push(errors::invalid(
            &path_child(path, "type"),
            BadValue::Json(t),
            "must be a string",
        ));
    }
    if !ty.is_empty() && ty != "null" && !OPENAPI_V3_TYPES.contains(&ty) {
        let valid: Vec<String> = OPENAPI_V3_TYPES.iter().map(|t| t.to_string()).collect();
        out.push(errors::not_supported(
            &path_child(path, "type"),
            BadValue::Str(ty),
            &valid,
        ));
    }
    if s.contains_key("default") && !ctx.allow_defaults {
        let mut detail = "must not be set".to_string();
        if !ctx.disallow_reason.is_empty() {
            detail.push(' ');
            detail.push_str(&ctx.disallow_reason);
        }
        out.push(errors::forbidden(&path_child(path, "default"), &detail));
    }
    let forbidden = [
        ("id", "id is not supported"),
        ("additionalItems", "additionalItems is not supported"),
        ("patternProperties", "patternProperties is not supported"),
        ("definitions", "definitions is not supported"),
        ("dependencies", "dependencies is not supported"),
        ("$ref", "$ref is not supported"),
    ];
    for (key, msg) in forbidden {
        let present = match s.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::String(v)) => !v.is_empty(),
            Some(Value::Object(o)) => key == "additionalItems" || !o.is_empty(),
            Some(_) => true,
        };
        if present {
            out.push(errors::forbidden(&path_child(path, key), msg));
        }
    }
    if ty == "null" {
        out.push(errors::forbidden(
            &path_child(path, "type"),
            "type cannot be set to null, use nullable as an alternative",
        ));
    }
    if s.get("items").is_some_and(Value::is_array) {
        out.push(errors::forbidden(
            &path_child(path, "items"),
            "items must be a schema object and not an array",
        ));
    }
    if ctx.inside_meta && flag(s, "x-kubernetes-embedded-resource") {
        out.push(errors::forbidden(
            &path_child(path, "x-kubernetes-embedded-resource"),
            "must not be used inside of resource meta",
        ));
    }
}

fn list_and_map_type_checks(
    s: &Map<String, Value>,
    ty: &str,
    list_type: Option<&str>,
    path: &str,
    se: &mut Vec<FieldError>,
) {
    let type_path = path_child(path, "type");
    let map_type = s.get("x-kubernetes-map-type").and_then(Value::as_str);
    if map_type.is_some() && ty != "object" {
        let msg = "must be object if x-kubernetes-map-type is specified";
        se.push(if ty.is_empty() {
            errors::required(&type_path, msg)
        } else {
            errors::invalid(&type_path, BadValue::Str(ty), msg)
        });
    }
    if let Some(mt) = map_type
        && mt != "atomic"
        && mt != "granular"
    {
        se.push(errors::not_supported(
            &path_child(path, "x-kubernetes-map-type"),
            BadValue::Str(mt),
            &["atomic".into(), "granular".into()],
        ));
    }
    let items = s.get("items").and_then(Value::as_object);
    if list_type.is_some() && ty != "array" {
        let msg = "must be array if x-kubernetes-list-type is specified";
        se.push(if ty.is_empty() {
            errors::required(&type_path, msg)
        } else {
            errors::invalid(&type_path, BadValue::Str(ty), msg)
        });
    } else if list_type == Some("set")
        && let Some(is) = items
    {
        let is_list_type = is.get("x-kubernetes-list-type").and_then(Value::as_str);
        let is_map_type = is.get("x-kubernetes-map-type").and_then(Value::as_str);
        match s_type(is) {
            "array" if is_list_type.is_some_and(|t| t != "atomic") => se.push(errors::invalid(
                &path_child(&path_child(path, "items"), "x-kubernetes-list-type"),
                BadValue::Str(is_list_type.unwrap_or("")),
                "must be atomic as item of a list with x-kubernetes-list-type=set",
            )),
            "object" if is_map_type != Some("atomic") => se.push(errors::invalid(
                &path_child(&path_child(path, "items"), "x-kubernetes-map-type"),
                BadValue::Json(&Value::Null),
                "must be atomic as item of a list with x-kubernetes-list-type=set",
            )),
            _ => {}
        }
    }
    if let Some(lt) = list_type
        && !["atomic", "set", "map"].contains(&lt)
    {
        se.push(errors::not_supported(
            &path_child(path, "x-kubernetes-list-type"),
            BadValue::Str(lt),
            &["atomic".into(), "set".into(), "map".into()],
        ));
    }
    let keys: Vec<String> = s
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let keys_value = Value::Array(keys.iter().map(|k| Value::String(k.clone())).collect());
    let keys_path = path_child(path, "x-kubernetes-list-map-keys");
    if !keys.is_empty() {
        let msg = "must be map if x-kubernetes-list-map-keys is non-empty";
        match list_type {
            None => se.push(errors::required(
                &path_child(path, "x-kubernetes-list-type"),
                msg,
            )),
            Some(lt) if lt != "map" => {
                se.push(errors::invalid(
                    &path_child(path, "x-kubernetes-list-type"),
                    BadValue::Str(lt),
                    msg,
                ));
            }
            _ => {}
        }
    }
    if list_type == Some("map") {
        if keys.is_empty() {
            se.push(errors::required(
                &keys_path,
                "must not be empty if x-kubernetes-list-type is map",
            ));
        }
        match items {
            None => se.push(errors::required(
                &path_child(path, "items"),
                "must have a schema if x-kubernetes-list-type is map",
            )),
            Some(is) if s_type(is) != "object" => se.push(errors::invalid(
                &path_child(&path_child(path, "items"), "type"),
                BadValue::Str(s_type(is)),
                "must be object if parent array's x-kubernetes-list-type is map",
            )),
            Some(is) => {
                let mut seen = Vec::new();
                for k in &keys {
                    match props(is).and_then(|p| p.get(k)).and_then(Value::as_object) {
                        Some(kp) if matches!(s_type(kp), "array" | "object") => se.push(errors::invalid(
                            &path_child(&path_key(&path_child(&path_child(path, "items"), "properties"), k), "type"),
                            BadValue::Str(s_type(is)),
                            "must be a scalar type if parent array's x-kubernetes-list-type is map",
                        )),
                        Some(_) => {}
                        None => se.push(errors::invalid(
                            &keys_path,
                            BadValue::Json(&keys_value),
                            "entries must all be names of item properties",
                        )),
                    }
                    if seen.contains(&k) {
                        se.push(errors::invalid(
                            &keys_path,
                            BadValue::Json(&keys_value),
                            "must not contain duplicate entries",
                        ));
                    }
                    seen.push(k);
                }
            }
        }
    }
    // validateMapListKeysMapSet
    if let (Some(lt @ ("set" | "map")), Some(is)) = (list_type, items) {
        if flag(is, "nullable") {
            se.push(errors::forbidden(
                &path_child(&path_child(path, "items"), "nullable"),
                &format!("cannot be nullable when x-kubernetes-list-type is {lt}"),
            ));
        }
        if lt == "map" {
            let required: Vec<&str> = is
                .get("required")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for k in &keys {
                let Some(kp) = props(is).and_then(|p| p.get(k)).and_then(Value::as_object) else {
                    continue;
                };
                let kpath = path_key(&path_child(&path_child(path, "items"), "properties"), k);
                if !required.contains(&k.as_str()) && !kp.contains_key("default") {
                    se.push(errors::required(
                        &path_child(&kpath, "default"),
                        "this property is in x-kubernetes-list-map-keys, so it must have a default or be a required property",
                    ));
                }
                if flag(kp, "nullable") {
                    se.push(errors::forbidden(
                        &path_child(&kpath, "nullable"),
                        "this property is in x-kubernetes-list-map-keys, so it cannot be nullable",
                    ));
                }
            }
        }
    }
}

/// Per-rule shape checks done before compilation.
fn rule_shape_checks(
    s: &Map<String, Value>,
    rule: &RuleSpec,
    rpath: &str,
    se: &mut Vec<FieldError>,
) {
    let trimmed_rule = rule.rule.trim();
    let message = rule.message.as_deref().unwrap_or("");
    let trimmed_msg = message.trim();
    if trimmed_rule.is_empty() {
        se.push(errors::required(
            &path_child(rpath, "rule"),
            "rule is not specified",
        ));
    } else if !message.is_empty() && trimmed_msg.is_empty() {
        se.push(errors::invalid(
            &path_child(rpath, "message"),
            BadValue::Str(message),
            "message must be non-empty if specified",
        ));
    } else if has_newlines(trimmed_msg) {
        se.push(errors::invalid(
            &path_child(rpath, "message"),
            BadValue::Str(message),
            "message must not contain line breaks",
        ));
    } else if has_newlines(trimmed_rule) && trimmed_msg.is_empty() {
        se.push(errors::required(
            &path_child(rpath, "message"),
            "message must be specified if rule contains line breaks",
        ));
    }
    if let Some(me) = &rule.message_expression
        && !me.is_empty()
        && me.trim().is_empty()
    {
        se.push(errors::required(
            &path_child(rpath, "messageExpression"),
            "messageExpression must be non-empty if specified",
        ));
    }
    if let Some(reason) = &rule.reason
        && !SUPPORTED_REASONS.contains(&reason.as_str())
    {
        let valid: Vec<String> = SUPPORTED_REASONS.iter().map(|r| r.to_string()).collect();
        se.push(errors::not_supported(
            &path_child(rpath, "reason"),
            BadValue::Str(reason),
            &valid,
        ));
    }
    if let Some(fp) = &rule.field_path {
        let fpath = path_child(rpath, "fieldPath");
        if !fp.is_empty() && fp.trim().is_empty() {
            se.push(errors::invalid(
                &fpath,
                BadValue::Str(fp),
                "fieldPath must be non-empty if specified",
            ));
        }
        if has_newlines(fp) {
            se.push(errors::invalid(
                &fpath,
                BadValue::Str(fp),
                "fieldPath must not contain line breaks",
            ));
        }
        if !fp.is_empty() && !field_path_valid(s, fp) {
            se.push(errors::invalid(
                &fpath,
                BadValue::Str(fp),
                "fieldPath must be a valid path",
            ));
        }
    }
}

/// `cel.ValidFieldPath`: `.a.b['key'][0]` resolvable in the schema.
fn field_path_valid(s: &Map<String, Value>, fp: &str) -> bool {
    if !fp.starts_with('.') {
        return false;
    }
    let Some(normalized) = super::cel::normalize_field_path(fp) else {
        return false;
    };
    let mut node = s;
    // Split `a.b[c][0]` into segments.
    let mut segments: Vec<(bool, String)> = Vec::new();
    let mut cur = String::new();
    let mut chars = normalized.chars();
    while let Some(c) = chars.next() {
        match c {
            '.' => {
                if !cur.is_empty() {
                    segments.push((false, std::mem::take(&mut cur)));
                }
            }
            '[' => {
                if !cur.is_empty() {
                    segments.push((false, std::mem::take(&mut cur)));
                }
                let inner: String = chars.by_ref().take_while(|c| *c != ']').collect();
                segments.push((true, inner));
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        segments.push((false, cur));
    }
    for (bracket, seg) in segments {
        let next = if let Some(p) = props(node).and_then(|p| p.get(&seg)) {
            p.as_object()
        } else if bracket
            && let Some(ap) = node.get("additionalProperties").and_then(Value::as_object)
        {
            Some(ap)
        } else if bracket && seg.parse::<usize>().is_ok() {
            node.get("items").and_then(Value::as_object)
        } else {
            None
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    true
}

/// Compile each rule, type-check it against the schema, estimate its cost.
fn cel_checks(
    raw: &Value,
    rules: &[RuleSpec],
    path: &str,
    ctx: &Ctx,
    total: &mut TotalCost,
    ce: &mut Vec<FieldError>,
) {
    let node = Schema::parse(raw, false);
    let cardinality = ctx
        .cardinality
        .unwrap_or_else(|| cost::unbounded_cardinality(&node));
    for (i, rule) in rules.iter().enumerate() {
        let rpath = path_index(&path_child(path, "x-kubernetes-validations"), i);
        let rule_path = path_child(&rpath, "rule");
        let program = match Program::compile(&rule.rule) {
            Ok(p) => p,
            Err(e) => {
                let detail = format!(
                    "compilation failed: ERROR: <input>: {}",
                    first_line(&e.to_string())
                );
                ce.push(errors::invalid(
                    &rule_path,
                    BadValue::Str(&go_rule(rule)),
                    &detail,
                ));
                continue;
            }
        };
        match cost::estimate(program.expression(), &node, ctx.resource_root) {
            Err(msg) => {
                let detail = format!("compilation failed: ERROR: <input>:1:1: {msg}");
                ce.push(errors::invalid(
                    &rule_path,
                    BadValue::Str(&go_rule(rule)),
                    &detail,
                ));
            }
            Ok((c, is_bool)) => {
                if !is_bool {
                    ce.push(errors::invalid(
                        &rule_path,
                        BadValue::Str(&go_rule(rule)),
                        "cel expression must evaluate to a bool",
                    ));
                }
                let expression_cost = if c.max == 0 {
                    0
                } else {
                    c.max.saturating_mul(cardinality)
                };
                if expression_cost > cost::PER_RULE_LIMIT {
                    ce.push(errors::forbidden(
                        &rule_path,
                        &cost::cost_error_message(
                            "estimated rule cost",
                            expression_cost,
                            cost::PER_RULE_LIMIT,
                        ),
                    ));
                }
                total.observe(rule_path.clone(), expression_cost);
            }
        }
        if let Some(me) = rule
            .message_expression
            .as_deref()
            .filter(|m| !m.trim().is_empty())
        {
            let me_path = path_child(&rpath, "messageExpression");
            match Program::compile(me) {
                Err(e) => {
                    let detail = format!(
                        "messageExpression compilation failed: ERROR: <input>: {}",
                        first_line(&e.to_string())
                    );
                    ce.push(errors::invalid(
                        &me_path,
                        BadValue::Str(&go_rule(rule)),
                        &detail,
                    ));
                }
                Ok(p) => match cost::estimate(p.expression(), &node, ctx.resource_root) {
                    Err(msg) => {
                        let detail = format!(
                            "messageExpression compilation failed: ERROR: <input>:1:1: {msg}"
                        );
                        ce.push(errors::invalid(
                            &me_path,
                            BadValue::Str(&go_rule(rule)),
                            &detail,
                        ));
                    }
                    Ok((c, _)) => {
                        if c.max > cost::PER_RULE_LIMIT {
                            ce.push(errors::forbidden(
                                &me_path,
                                &cost::cost_error_message(
                                    "estimated messageExpression cost",
                                    c.max,
                                    cost::PER_RULE_LIMIT,
                                ),
                            ));
                        }
                        total.observe(me_path.clone(), c.max);
                    }
                },
            }
        }
        let uses_old_self = program.references().has_variable("oldSelf");
        if uses_old_self {
            if let Some(u) = &ctx.uncorrelatable {
                let detail = format!(
                    "oldSelf cannot be used on the uncorrelatable portion of the schema within {u}"
                );
                ce.push(errors::invalid(
                    &rule_path,
                    BadValue::Str(&rule.rule),
                    &detail,
                ));
            }
        } else if let Some(b) = rule.optional_old_self {
            ce.push(errors::invalid(
                &path_child(&rpath, "optionalOldSelf"),
                BadValue::Json(&Value::Bool(b)),
                "may not be set if oldSelf is not used in rule",
            ));
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
