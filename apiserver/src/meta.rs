//! Object metadata helpers (objects are kept as JSON) and the generic `ObjectMeta` validation
//! of `k8s.io/apimachinery/pkg/api/validation` (names, labels, annotations, finalizers).

use serde_json::{Map, Value};

use crate::errors::field;
use crate::validation::FieldError;

/// RFC 3339 with seconds, as `metav1.Time` serialises.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn metadata(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

/// `metadata`, created if missing (or replaced when it is not an object).
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    let root = ensure_object(obj);
    let entry = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    ensure_object(entry)
}

fn ensure_object(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

pub fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    metadata(obj)?.get(key)?.as_str()
}

pub fn name(obj: &Value) -> &str {
    meta_str(obj, "name").unwrap_or_default()
}

pub fn namespace(obj: &Value) -> &str {
    meta_str(obj, "namespace").unwrap_or_default()
}

pub fn uid(obj: &Value) -> &str {
    meta_str(obj, "uid").unwrap_or_default()
}

pub fn resource_version(obj: &Value) -> &str {
    meta_str(obj, "resourceVersion").unwrap_or_default()
}

pub fn generation(obj: &Value) -> i64 {
    metadata(obj)
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

pub fn deletion_timestamp(obj: &Value) -> Option<&str> {
    meta_str(obj, "deletionTimestamp")
}

pub fn finalizers(obj: &Value) -> Vec<String> {
    string_list(metadata(obj).and_then(|m| m.get("finalizers")))
}

pub fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `metadata.labels` as pairs (non-string values are ignored; validation rejects them).
pub fn labels(obj: &Value) -> Vec<(&str, &str)> {
    string_map(obj, "labels")
}

pub fn string_map<'a>(obj: &'a Value, key: &str) -> Vec<(&'a str, &'a str)> {
    metadata(obj)
        .and_then(|m| m.get(key))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.as_str(), v)))
                .collect()
        })
        .unwrap_or_default()
}

pub fn set_meta(obj: &mut Value, key: &str, value: Value) {
    metadata_mut(obj).insert(key.to_string(), value);
}

pub fn remove_meta(obj: &mut Value, key: &str) -> Option<Value> {
    metadata_mut(obj).remove(key)
}

/// Drop what `ObjectMeta`'s `omitempty` drops, as the real server's metadata round trip does
/// (so `finalizers: []` disappears, which `kube::runtime::finalizer`'s `test` relies on).
pub fn normalize_metadata(obj: &mut Value) {
    let m = metadata_mut(obj);
    m.retain(|k, v| match v {
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty() || k == "fieldsV1",
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => !(k == "generation" && n.as_i64() == Some(0)),
        _ => true,
    });
}

// ---------------------------------------------------------------------------------------------
// Name validation (k8s.io/apimachinery/pkg/util/validation)

const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_SUBDOMAIN_FMT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";

fn is_alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn is_dns1123_label_shape(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| is_alnum_lower(c) || c == '-')
        && s.starts_with(is_alnum_lower)
        && s.ends_with(is_alnum_lower)
}

fn is_dns1123_subdomain_shape(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_dns1123_label_shape)
}

/// `validation.IsDNS1123Label`.
pub fn dns1123_label_errors(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 63 {
        errs.push("must be no more than 63 characters".to_string());
    }
    if !is_dns1123_label_shape(s) {
        errs.push(format!(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '{DNS1123_LABEL_FMT}')"
        ));
    }
    errs
}

/// `validation.IsDNS1123Subdomain`.
pub fn dns1123_subdomain_errors(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 253 {
        errs.push("must be no more than 253 characters".to_string());
    }
    if !is_dns1123_subdomain_shape(s) {
        errs.push(format!(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '{DNS1123_SUBDOMAIN_FMT}')"
        ));
    }
    errs
}

/// `path.IsValidPathSegmentName`.
fn path_segment_errors(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s == "." || s == ".." {
        errs.push(format!("may not be '{s}'"));
    }
    for bad in ["/", "%"] {
        if s.contains(bad) {
            errs.push(format!("may not contain '{bad}'"));
        }
    }
    errs
}

/// How a kind's `metadata.name` is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    Dns1123Subdomain,
    Dns1123Label,
    /// Only the path-segment rules (events, leases are subdomains too, but kept for flexibility).
    PathSegment,
}

impl NameRule {
    /// `ValidateNameFunc(name, prefix)`: with `prefix`, a trailing '-' is allowed (generateName).
    pub fn errors(self, name: &str, prefix: bool) -> Vec<String> {
        let masked;
        let n = if prefix && name.ends_with('-') {
            masked = format!("{}a", &name[..name.len() - 1]);
            masked.as_str()
        } else {
            name
        };
        match self {
            NameRule::Dns1123Subdomain => dns1123_subdomain_errors(n),
            NameRule::Dns1123Label => dns1123_label_errors(n),
            NameRule::PathSegment => path_segment_errors(n),
        }
    }
}

fn is_qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// `validation.IsQualifiedName`.
pub fn qualified_name_errors(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let parts: Vec<&str> = s.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_string());
            } else {
                for m in dns1123_subdomain_errors(prefix) {
                    errs.push(format!("prefix part {m}"));
                }
            }
            name
        }
        _ => {
            errs.push(format!(
                "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '{QUALIFIED_NAME_FMT}') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
            ));
            return errs;
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".to_string());
    } else if name.len() > 63 {
        errs.push("name part must be no more than 63 characters".to_string());
    }
    if !name.is_empty() && !is_qualified_name_part(name) {
        errs.push(format!(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '{QUALIFIED_NAME_FMT}')"
        ));
    }
    errs
}

/// `validation.IsValidLabelValue`.
fn label_value_errors(v: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if v.len() > 63 {
        errs.push("must be no more than 63 characters".to_string());
    }
    if !v.is_empty() && !is_qualified_name_part(v) {
        errs.push(format!(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(({QUALIFIED_NAME_FMT})?')"
        ));
    }
    errs
}

/// Validates everything in `metadata` that the generic `ValidateObjectMeta` checks, except the
/// name (see [`validate_name`]).
pub fn validate_meta_fields(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let Some(m) = metadata(obj) else {
        return errs;
    };
    if let Some(labels) = m.get("labels") {
        match labels.as_object() {
            Some(l) => {
                for (k, v) in l {
                    for msg in qualified_name_errors(k) {
                        errs.push(field::invalid("metadata.labels", k, &msg));
                    }
                    match v.as_str() {
                        Some(v) => {
                            for msg in label_value_errors(v) {
                                errs.push(field::invalid("metadata.labels", v, &msg));
                            }
                        }
                        None => errs.push(field::invalid(
                            "metadata.labels",
                            &v.to_string(),
                            "label values must be strings",
                        )),
                    }
                }
            }
            None => errs.push(field::invalid(
                "metadata.labels",
                &labels.to_string(),
                "must be a map of strings",
            )),
        }
    }
    if let Some(ann) = m.get("annotations") {
        match ann.as_object() {
            Some(a) => {
                let mut total = 0usize;
                for (k, v) in a {
                    for msg in qualified_name_errors(&k.to_lowercase()) {
                        errs.push(field::invalid("metadata.annotations", k, &msg));
                    }
                    total += k.len() + v.as_str().map_or(0, str::len);
                    if !v.is_string() {
                        errs.push(field::invalid(
                            "metadata.annotations",
                            &v.to_string(),
                            "annotation values must be strings",
                        ));
                    }
                }
                if total > 256 * 1024 {
                    errs.push(FieldError {
                        field: "metadata.annotations".into(),
                        reason: "FieldValueTooLong".into(),
                        message: format!("Too long: may not be more than {} bytes", 256 * 1024),
                    });
                }
            }
            None => errs.push(field::invalid(
                "metadata.annotations",
                &ann.to_string(),
                "must be a map of strings",
            )),
        }
    }
    if let Some(fins) = m.get("finalizers") {
        match fins.as_array() {
            Some(list) => {
                for f in list {
                    match f.as_str() {
                        Some(f) => {
                            for msg in qualified_name_errors(f) {
                                errs.push(field::invalid("metadata.finalizers", f, &msg));
                            }
                        }
                        None => errs.push(field::invalid(
                            "metadata.finalizers",
                            &f.to_string(),
                            "must be a string",
                        )),
                    }
                }
            }
            None => errs.push(field::invalid(
                "metadata.finalizers",
                &fins.to_string(),
                "must be a list of strings",
            )),
        }
    }
    if let Some(g) = m.get("generation")
        && g.as_i64().is_none_or(|g| g < 0)
    {
        errs.push(field::invalid(
            "metadata.generation",
            &g.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    errs
}

/// Name checks of `ValidateObjectMetaAccessor` (name or generateName required, name format).
pub fn validate_name(obj: &Value, rule: NameRule) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(g) = meta_str(obj, "generateName")
        && !g.is_empty()
    {
        for msg in rule.errors(g, true) {
            errs.push(field::invalid("metadata.generateName", g, &msg));
        }
    }
    let n = name(obj);
    if n.is_empty() {
        errs.push(field::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        for msg in rule.errors(n, false) {
            errs.push(field::invalid("metadata.name", n, &msg));
        }
    }
    errs
}

/// Random suffix of `generateName` (`names.SimpleNameGenerator`: 5 chars of this alphabet).
pub fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    // `maxGeneratedNameLength`: keep room for the suffix (on a char boundary: the prefix is only
    // validated afterwards).
    let mut cut = prefix.len().min(58);
    while !prefix.is_char_boundary(cut) {
        cut -= 1;
    }
    let prefix = &prefix[..cut];
    let suffix: String = (0..5)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subdomains_and_labels() {
        assert!(dns1123_subdomain_errors("a.b-c.d").is_empty());
        assert!(!dns1123_subdomain_errors("A").is_empty());
        assert!(!dns1123_subdomain_errors("a..b").is_empty());
        assert!(!dns1123_subdomain_errors("-a").is_empty());
        assert!(dns1123_label_errors("kube-system").is_empty());
        assert!(!dns1123_label_errors("a.b").is_empty());
        assert!(NameRule::Dns1123Subdomain.errors("web-", true).is_empty());
        assert!(!NameRule::Dns1123Subdomain.errors("web-", false).is_empty());
    }

    #[test]
    fn qualified_names() {
        assert!(qualified_name_errors("tessera.io/cleanup").is_empty());
        assert!(qualified_name_errors("app").is_empty());
        assert!(!qualified_name_errors("a/b/c").is_empty());
        assert!(!qualified_name_errors("Bad_/x").is_empty());
    }

    #[test]
    fn normalize_drops_empty() {
        let mut o = json!({"metadata": {"name": "a", "finalizers": [], "labels": {}, "x": null}});
        normalize_metadata(&mut o);
        assert_eq!(o, json!({"metadata": {"name": "a"}}));
    }

    #[test]
    fn generated_names() {
        let n = generate_name("web-");
        assert_eq!(n.len(), 9);
        assert!(n.starts_with("web-"));
        let long = "é".repeat(40);
        assert!(generate_name(&long).len() <= 63);
    }
}
