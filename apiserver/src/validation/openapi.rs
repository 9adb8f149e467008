//! OpenAPI v3 value validation as done by `k8s.io/kube-openapi/pkg/validation/validate`
//! (`SchemaValidator`), converted to field errors like apiextensions'
//! `kubeOpenAPIResultToFieldErrors`, plus the two structural checks the CR strategy runs
//! after it: embedded resources (`schemaobjectmeta.Validate`) and list-type set/map
//! uniqueness (`structurallisttype.ValidateListSetsAndMaps`).

use std::collections::HashMap;

use serde_json::Value;

use super::FieldError;
use super::errors::{self, BadValue, ErrorType, go_float, go_quote};
use super::formats;
use super::schema::{AdditionalProperties, MAX_DEPTH, Schema};

/// Field path of a kube-openapi error name: `""` → `<nil>` (the nil `*field.Path`).
fn field_of(name: &str) -> &str {
    let trimmed = name.strip_prefix('.').unwrap_or(name);
    if trimmed.is_empty() { "<nil>" } else { trimmed }
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// JSON type name kube-openapi infers for decoded data (`schemaInfoForType`).
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `swag.IsFloat64AJSONInteger`.
fn is_json_integer(f: f64) -> bool {
    if !f.is_finite() || !(-9_007_199_254_740_991.0..=9_007_199_254_740_991.0).contains(&f) {
        return false;
    }
    let g = f.trunc();
    if f == g {
        return true;
    }
    let diff = (f - g).abs();
    diff / (f.abs() + g.abs()).min(f64::MAX) < 1e-9
}

fn type_list(s: &Schema) -> Vec<&str> {
    if s.int_or_string {
        // ConvertJSONSchemaProps: x-kubernetes-int-or-string → type [integer, string].
        vec!["integer", "string"]
    } else if s.ty.is_empty() {
        Vec::new()
    } else {
        vec![s.ty.as_str()]
    }
}

/// kube-openapi `typeValidator`.
fn check_type(s: &Schema, data: &Value, name: &str, out: &mut Vec<FieldError>) {
    let types = type_list(s);
    let format = formats::supported_format(&s.format);
    if types.is_empty() && format.is_none() {
        return;
    }
    let type_desc = types.join(",");
    let fail = |out: &mut Vec<FieldError>, got: &str| {
        let msg = format!(
            "{name} in body must be of type {type_desc}: {}",
            go_quote(got)
        );
        out.push(errors::make(
            field_of(name),
            ErrorType::TypeInvalid,
            BadValue::Str(got),
            &msg,
        ));
    };
    if data.is_null() {
        if !types.is_empty() && !s.nullable {
            fail(out, "null");
        }
        return;
    }
    let got = json_type(data);
    let is_float_int =
        got == "number" && data.as_f64().is_some_and(is_json_integer) && types.contains(&"integer");
    let is_int_float = got == "integer" && types.contains(&"number");
    // A string format on a non-numeric type skips the type check for strings/arrays.
    if !(types.contains(&"number") || types.contains(&"integer"))
        && format.is_some()
        && matches!(data, Value::String(_) | Value::Array(_))
    {
        return;
    }
    if !(types.contains(&got) || is_float_int || is_int_float) {
        fail(out, got);
    }
}

/// Validate `data` against `s` at kube-openapi name `name`. `old` is the correlated old
/// value on update: an unchanged value has its errors ratcheted away
/// (`CRDValidationRatcheting`, on by default since 1.30, GA in 1.33).
pub(crate) fn validate(
    s: &Schema,
    data: &Value,
    name: &str,
    old: Option<&Value>,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    if depth > MAX_DEPTH {
        return;
    }
    if old.is_some_and(|o| o == data) {
        return;
    }
    let mut errs = Vec::new();
    if data.is_null() {
        check_type(s, data, name, &mut errs);
        check_enum(s, data, name, &mut errs);
        out.extend(errs);
        return;
    }
    check_type(s, data, name, &mut errs);
    check_junctors(s, data, name, old, depth, &mut errs);
    if let Value::String(str_data) = data {
        check_string(s, str_data, name, &mut errs);
        if let Some(f) = formats::supported_format(&s.format)
            && !formats::validates(f, str_data)
        {
            let msg = format!(
                "{name} in body must be of type {}: {}",
                s.format,
                go_quote(str_data)
            );
            errs.push(errors::make(
                field_of(name),
                ErrorType::TypeInvalid,
                BadValue::Str(str_data),
                &msg,
            ));
        }
    }
    if data.is_number() {
        check_number(s, data, name, &mut errs);
    }
    if let Value::Array(items) = data {
        check_slice(s, items, name, old, depth, &mut errs);
    }
    check_enum(s, data, name, &mut errs);
    if let Value::Object(map) = data {
        check_object(s, map, name, old, depth, &mut errs);
    }
    out.extend(errs);
}

fn check_string(s: &Schema, data: &str, name: &str, out: &mut Vec<FieldError>) {
    let len = data.chars().count() as i64;
    // The string validator stops at its first failure.
    if let Some(max) = s.max_length
        && len > max
    {
        out.push(errors::too_long(field_of(name), max));
        return;
    }
    if let Some(min) = s.min_length
        && len < min
    {
        let msg = format!("{name} in body should be at least {min} chars long");
        out.push(errors::invalid(field_of(name), BadValue::Str(data), &msg));
        return;
    }
    if let Some(p) = &s.pattern {
        let matches = p.regex.as_ref().is_some_and(|r| r.is_match(data));
        if !matches {
            let msg = format!("{name} in body should match '{}'", p.source);
            out.push(errors::invalid(field_of(name), BadValue::Str(data), &msg));
        }
    }
}

fn check_number(s: &Schema, data: &Value, name: &str, out: &mut Vec<FieldError>) {
    let Some(f) = data.as_f64() else {
        return;
    };
    if let Some(factor) = s.multiple_of {
        if factor <= 0.0 {
            let msg = format!(
                "factor MultipleOf declared for {name} must be positive: {}",
                go_float(factor)
            );
            out.push(errors::invalid(field_of(name), BadValue::Json(data), &msg));
        } else {
            let mult = if factor < 1.0 {
                1.0 / factor * f
            } else {
                f / factor
            };
            if !is_json_integer(mult) {
                let msg = format!(
                    "{name} in body should be a multiple of {}",
                    go_float(factor)
                );
                out.push(errors::invalid(field_of(name), BadValue::Json(data), &msg));
            }
        }
    }
    if let Some(max) = s.maximum {
        let bad = if s.exclusive_maximum {
            f >= max
        } else {
            f > max
        };
        if bad {
            let op = if s.exclusive_maximum {
                "less than"
            } else {
                "less than or equal to"
            };
            let msg = format!("{name} in body should be {op} {}", go_float(max));
            out.push(errors::invalid(field_of(name), BadValue::Json(data), &msg));
        }
    }
    if let Some(min) = s.minimum {
        let bad = if s.exclusive_minimum {
            f <= min
        } else {
            f < min
        };
        if bad {
            let op = if s.exclusive_minimum {
                "greater than"
            } else {
                "greater than or equal to"
            };
            let msg = format!("{name} in body should be {op} {}", go_float(min));
            out.push(errors::invalid(field_of(name), BadValue::Json(data), &msg));
        }
    }
}

fn check_slice(
    s: &Schema,
    items: &[Value],
    name: &str,
    old: Option<&Value>,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    if let Some(is) = &s.items {
        for (i, item) in items.iter().enumerate() {
            let old_item = correlate_item(s, item, old);
            validate(is, item, &format!("{name}[{i}]"), old_item, depth + 1, out);
        }
    }
    let size = items.len() as i64;
    if let Some(min) = s.min_items
        && size < min
    {
        let msg = format!("{name} in body should have at least {min} items");
        out.push(errors::make(
            field_of(name),
            ErrorType::Invalid,
            BadValue::Int(size),
            &msg,
        ));
    }
    if let Some(max) = s.max_items
        && size > max
    {
        out.push(errors::too_many(field_of(name), size, max));
    }
    if s.unique_items && has_duplicates(items) {
        let msg = format!("{name} in body shouldn't contain duplicates");
        out.push(errors::make(
            field_of(name),
            ErrorType::Invalid,
            BadValue::Str(""),
            &msg,
        ));
    }
}

fn has_duplicates(items: &[Value]) -> bool {
    items
        .iter()
        .enumerate()
        .any(|(i, a)| items[..i].iter().any(|b| a == b))
}

/// The old list element correlated with a new one: only `x-kubernetes-list-type: map`
/// (by key fields) and `set` (by value) lists correlate; atomic lists do not.
pub(crate) fn correlate_item<'a>(
    s: &Schema,
    item: &Value,
    old: Option<&'a Value>,
) -> Option<&'a Value> {
    let old_items = old?.as_array()?;
    match s.list_type.as_deref() {
        Some("map") if !s.list_map_keys.is_empty() => {
            let key = map_key(s, item)?;
            old_items
                .iter()
                .find(|o| map_key(s, o).as_ref() == Some(&key))
        }
        Some("set") => old_items.iter().find(|o| *o == item),
        _ => None,
    }
}

/// The key of a list-type=map element (missing key fields fall back to their defaults).
fn map_key(s: &Schema, item: &Value) -> Option<Vec<Value>> {
    let obj = item.as_object()?;
    Some(
        s.list_map_keys
            .iter()
            .map(|k| {
                obj.get(k).cloned().unwrap_or_else(|| {
                    s.items
                        .as_ref()
                        .and_then(|is| is.properties.get(k))
                        .and_then(|p| p.default.clone())
                        .unwrap_or(Value::Null)
                })
            })
            .collect(),
    )
}

/// Numeric equality across int/float representations (reflect `Convert` + `DeepEqual`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

/// kube-openapi `basicCommonValidator` (enum) → `field.NotSupported`.
fn check_enum(s: &Schema, data: &Value, name: &str, out: &mut Vec<FieldError>) {
    let Some(values) = &s.enum_values else {
        return;
    };
    if values.is_empty() || values.iter().any(|e| json_eq(data, e)) {
        return;
    }
    let supported: Vec<String> = values
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => serde_json::to_string(other).unwrap_or_default(),
        })
        .collect();
    out.push(errors::not_supported(
        field_of(name),
        BadValue::Json(data),
        &supported,
    ));
}

fn check_object(
    s: &Schema,
    map: &serde_json::Map<String, Value>,
    name: &str,
    old: Option<&Value>,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    let num_keys = map.len() as i64;
    // The object validator returns early on min/maxProperties failures.
    if let Some(min) = s.min_properties
        && num_keys < min
    {
        let msg = format!("{name} in body should have at least {min} properties");
        out.push(errors::make(
            field_of(name),
            ErrorType::Invalid,
            BadValue::Int(num_keys),
            &msg,
        ));
        return;
    }
    if let Some(max) = s.max_properties
        && num_keys > max
    {
        out.push(errors::too_many(field_of(name), num_keys, max));
        return;
    }
    let old_map = old.and_then(Value::as_object);
    match &s.additional_properties {
        Some(AdditionalProperties::Bool(false)) => {
            for k in map.keys() {
                if !s.properties.contains_key(k) {
                    let msg = format!("{} in body is a forbidden property", child(name, k));
                    out.push(errors::invalid(field_of(name), BadValue::Str(k), &msg));
                }
            }
        }
        Some(AdditionalProperties::Schema(ap)) => {
            for (k, v) in map {
                if !s.properties.contains_key(k) {
                    let old_v = old_map.and_then(|o| o.get(k));
                    validate(ap, v, &format!("{name}.{k}"), old_v, depth + 1, out);
                }
            }
        }
        _ => {}
    }
    for (p, ps) in &s.properties {
        if let Some(v) = map.get(p) {
            let old_v = old_map.and_then(|o| o.get(p));
            validate(ps, v, &child(name, p), old_v, depth + 1, out);
        }
    }
    for r in &s.required {
        if !map.contains_key(r) {
            out.push(errors::required(field_of(&format!("{name}.{r}")), ""));
        }
    }
}

/// kube-openapi `schemaPropsValidator`: allOf / anyOf / oneOf / not. Its own failures are
/// composite errors, which apiextensions reports at the nil path with an empty value.
fn check_junctors(
    s: &Schema,
    data: &Value,
    name: &str,
    old: Option<&Value>,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    let run = |sub: &Schema| {
        let mut e = Vec::new();
        validate(sub, data, name, old, depth + 1, &mut e);
        e
    };
    let composite = |msg: String| errors::invalid("<nil>", BadValue::Str(""), &msg);
    let quoted = go_quote(name);

    if !s.any_of.is_empty() {
        let mut best: Option<Vec<FieldError>> = None;
        let mut ok = false;
        for sub in &s.any_of {
            let e = run(sub);
            if e.is_empty() {
                ok = true;
                break;
            }
            // kube-openapi keeps the failures of the "best" branch (highest match count);
            // approximated by the branch with the fewest errors.
            if best.as_ref().is_none_or(|b| e.len() < b.len()) {
                best = Some(e);
            }
        }
        if !ok {
            out.push(composite(format!(
                "{quoted} must validate at least one schema (anyOf)"
            )));
            out.extend(best.unwrap_or_default());
        }
    }
    if !s.one_of.is_empty() {
        let mut best: Option<Vec<FieldError>> = None;
        let mut valid = 0usize;
        for sub in &s.one_of {
            let e = run(sub);
            if e.is_empty() {
                valid += 1;
                best = None;
                continue;
            }
            if valid == 0 && best.as_ref().is_none_or(|b| e.len() < b.len()) {
                best = Some(e);
            }
        }
        if valid != 1 {
            let extra = if valid == 0 {
                "Found none valid".to_string()
            } else {
                format!("Found {valid} valid alternatives")
            };
            out.push(composite(format!(
                "{quoted} must validate one and only one schema (oneOf). {extra}"
            )));
            out.extend(best.unwrap_or_default());
        }
    }
    if !s.all_of.is_empty() {
        let mut validated = 0usize;
        for sub in &s.all_of {
            let e = run(sub);
            if e.is_empty() {
                validated += 1;
            }
            out.extend(e);
        }
        if validated != s.all_of.len() {
            let extra = if validated == 0 {
                ". None validated"
            } else {
                ""
            };
            out.push(composite(format!(
                "{quoted} must validate all the schemas (allOf){extra}"
            )));
        }
    }
    if let Some(not) = &s.not
        && run(not).is_empty()
    {
        out.push(composite(format!(
            "{quoted} must not validate the schema (not)"
        )));
    }
}

/// Field path builder in `field.Path` syntax (`a.b[0][key]`), used by the structural walks
/// and CEL.
pub(crate) fn path_child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

pub(crate) fn path_index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

pub(crate) fn path_key(path: &str, key: &str) -> String {
    format!("{path}[{key}]")
}

/// `schemaobjectmeta.Validate` for `x-kubernetes-embedded-resource` objects: `apiVersion`
/// and `kind` are required and well-formed (embedded `metadata` is only type-checked).
pub(crate) fn validate_embedded(
    x: &Value,
    s: &Schema,
    path: &str,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    if depth > MAX_DEPTH {
        return;
    }
    match x {
        Value::Object(map) => {
            if s.embedded_resource {
                embedded_resource_checks(map, path, out);
            }
            for (k, v) in map {
                if let Some(p) = s.properties.get(k) {
                    validate_embedded(v, p, &path_child(path, k), depth + 1, out);
                } else if let Some(AdditionalProperties::Schema(ap)) = &s.additional_properties {
                    validate_embedded(v, ap, &path_key(path, k), depth + 1, out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = &s.items {
                for (i, v) in items.iter().enumerate() {
                    validate_embedded(v, is, &path_index(path, i), depth + 1, out);
                }
            }
        }
        _ => {}
    }
}

fn embedded_resource_checks(
    map: &serde_json::Map<String, Value>,
    path: &str,
    out: &mut Vec<FieldError>,
) {
    let api_version_path = path_child(path, "apiVersion");
    let kind_path = path_child(path, "kind");
    match map.get("apiVersion") {
        None => out.push(errors::required(&api_version_path, "must not be empty")),
        Some(Value::String(v)) if v.is_empty() => {
            out.push(errors::invalid(
                &api_version_path,
                BadValue::Str(v),
                "must not be empty",
            ));
        }
        Some(Value::String(v)) => {
            // schema.ParseGroupVersion: at most one '/', both halves non-empty.
            let parts: Vec<&str> = v.split('/').collect();
            let ok = match parts.as_slice() {
                [_] => true,
                [g, ver] => !g.is_empty() && !ver.is_empty(),
                _ => false,
            };
            if !ok {
                let detail = format!("unexpected GroupVersion string: {v}");
                out.push(errors::invalid(
                    &api_version_path,
                    BadValue::Str(v),
                    &detail,
                ));
            }
        }
        Some(other) => out.push(errors::invalid(
            &api_version_path,
            BadValue::Json(other),
            "must be a string",
        )),
    }
    match map.get("kind") {
        None => out.push(errors::required(&kind_path, "must not be empty")),
        Some(Value::String(v)) if v.is_empty() => {
            out.push(errors::invalid(
                &kind_path,
                BadValue::Str(v),
                "must not be empty",
            ));
        }
        Some(Value::String(v)) => {
            if let Some(e) = formats::dns1035_label_error(&v.to_lowercase()) {
                let detail = format!("may have mixed case, but should otherwise match: {e}");
                out.push(errors::invalid(&kind_path, BadValue::Str(v), &detail));
            }
        }
        Some(other) => out.push(errors::invalid(
            &kind_path,
            BadValue::Json(other),
            "must be a string",
        )),
    }
    if let Some(meta) = map.get("metadata")
        && !meta.is_object()
    {
        let meta_path = path_child(path, "metadata");
        out.push(errors::invalid(
            &meta_path,
            BadValue::Json(meta),
            "must be an object",
        ));
    }
}

/// `structurallisttype.ValidateListSetsAndMaps`: duplicates in `set` lists and duplicate
/// keys in `map` lists.
pub(crate) fn validate_list_types(
    x: &Value,
    s: &Schema,
    path: &str,
    depth: usize,
    out: &mut Vec<FieldError>,
) {
    if depth > MAX_DEPTH {
        return;
    }
    match x {
        Value::Object(map) => {
            for (k, v) in map {
                if let Some(p) = s.properties.get(k) {
                    validate_list_types(v, p, &path_child(path, k), depth + 1, out);
                } else if let Some(AdditionalProperties::Schema(ap)) = &s.additional_properties {
                    validate_list_types(v, ap, &path_key(path, k), depth + 1, out);
                }
            }
        }
        Value::Array(items) => {
            match s.list_type.as_deref() {
                Some("set") => list_set_duplicates(items, path, out),
                Some("map") => list_map_duplicates(items, s, path, out),
                _ => {}
            }
            if let Some(is) = &s.items {
                for (i, v) in items.iter().enumerate() {
                    validate_list_types(v, is, &path_index(path, i), depth + 1, out);
                }
            }
        }
        _ => {}
    }
}

/// `validateListSet`: only the second occurrence of a value is reported.
fn list_set_duplicates(items: &[Value], path: &str, out: &mut Vec<FieldError>) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, x) in items.iter().enumerate() {
        let key = serde_json::to_string(x).unwrap_or_default();
        let times = seen.entry(key).or_insert(0);
        *times += 1;
        if *times == 2 {
            out.push(errors::duplicate(&path_index(path, i), BadValue::Json(x)));
        }
    }
}

/// `validateListMap`: elements must be objects; each duplicate key tuple is reported with
/// the key fields as value.
fn list_map_duplicates(items: &[Value], s: &Schema, path: &str, out: &mut Vec<FieldError>) {
    for (i, x) in items.iter().enumerate() {
        if !x.is_null() && !x.is_object() {
            out.push(errors::invalid(
                &path_index(path, i),
                BadValue::Json(x),
                "must be an object for an array of list-type map",
            ));
            return;
        }
    }
    if items.len() <= 1 || s.list_map_keys.is_empty() {
        return;
    }
    let mut seen: HashMap<String, ()> = HashMap::new();
    for (i, x) in items.iter().enumerate() {
        let Some(obj) = x.as_object() else {
            continue;
        };
        let mut key_obj = serde_json::Map::new();
        for k in &s.list_map_keys {
            if let Some(v) = obj.get(k) {
                key_obj.insert(k.clone(), v.clone());
            }
        }
        let key = Value::Object(key_obj);
        let fingerprint = serde_json::to_string(&key).unwrap_or_default();
        if seen.insert(fingerprint, ()).is_some() {
            out.push(errors::duplicate(
                &path_index(path, i),
                BadValue::Json(&key),
            ));
        }
    }
}
