//! The CustomResourceDefinition strategy: defaulting, the validation subset we enforce, and the
//! status the real server's controllers would write (`NamesAccepted`, `Established`,
//! `acceptedNames`, `storedVersions`), computed synchronously on every write.

use serde_json::{Map, Value, json};

use crate::errors::field;
use crate::meta;
use crate::validation::FieldError;

/// `status.conditions[type=Established].status == "True"`.
pub fn is_established(crd: &Value) -> bool {
    condition_status(crd, "Established") == Some("True")
}

fn condition_status<'a>(crd: &'a Value, type_: &str) -> Option<&'a str> {
    crd.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))?
        .get("status")?
        .as_str()
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

/// `SetDefaults_CustomResourceDefinitionSpec`.
pub fn default(crd: &mut Value) {
    let Some(spec) = crd.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(names) = spec.get_mut("names").and_then(Value::as_object_mut) {
        let kind = names
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if names
            .get("singular")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            names.insert("singular".into(), json!(kind.to_lowercase()));
        }
        if !kind.is_empty()
            && names
                .get("listKind")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            names.insert("listKind".into(), json!(format!("{kind}List")));
        }
    }
    if spec.get("conversion").is_none_or(Value::is_null) {
        spec.insert("conversion".into(), json!({"strategy": "None"}));
    }
}

/// The subset of `ValidateCustomResourceDefinition(Update)` this server enforces.
pub fn validate(crd: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let group = str_at(crd, "/spec/group");
    let plural = str_at(crd, "/spec/names/plural");
    let kind = str_at(crd, "/spec/names/kind");
    let scope = str_at(crd, "/spec/scope");
    let name = meta::name(crd);
    if !name.is_empty() && name != format!("{plural}.{group}") {
        errs.push(field::invalid(
            "metadata.name",
            name,
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    if group.is_empty() {
        errs.push(field::required("spec.group", ""));
    } else if !group.contains('.') {
        errs.push(field::invalid(
            "spec.group",
            group,
            "should be a domain with at least one dot",
        ));
    } else {
        for m in meta::dns1123_subdomain_errors(group) {
            errs.push(field::invalid("spec.group", group, &m));
        }
    }
    if plural.is_empty() {
        errs.push(field::required("spec.names.plural", ""));
    } else {
        for m in meta::dns1123_label_errors(plural) {
            errs.push(field::invalid("spec.names.plural", plural, &m));
        }
    }
    if kind.is_empty() {
        errs.push(field::required("spec.names.kind", ""));
    }
    if scope != "Cluster" && scope != "Namespaced" {
        errs.push(FieldError {
            field: "spec.scope".into(),
            reason: "FieldValueNotSupported".into(),
            message: format!(
                "Unsupported value: {}: supported values: \"Cluster\", \"Namespaced\"",
                crate::errors::quote(scope)
            ),
        });
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        errs.push(field::invalid(
            "spec.versions",
            "null",
            "must have exactly one version marked as storage version",
        ));
    }
    let mut storage = 0;
    for (i, v) in versions.iter().enumerate() {
        let vname = str_at(v, "/name");
        for m in meta::dns1123_label_errors(vname) {
            errs.push(field::invalid(
                &format!("spec.versions[{i}].name"),
                vname,
                &m,
            ));
        }
        if v.get("storage").and_then(Value::as_bool) == Some(true) {
            storage += 1;
        }
        if v.pointer("/schema/openAPIV3Schema").is_none() {
            errs.push(field::required(
                &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                "schemas are required",
            ));
        }
    }
    if !versions.is_empty() && storage != 1 {
        errs.push(field::invalid(
            "spec.versions",
            &format!("{storage}"),
            "must have exactly one version marked as storage version",
        ));
    }
    if let Some(old) = old {
        for (path, ptr) in [("spec.group", "/spec/group"), ("spec.scope", "/spec/scope")] {
            let (n, o) = (str_at(crd, ptr), str_at(old, ptr));
            if n != o {
                errs.push(field::invalid(path, n, "field is immutable"));
            }
        }
    }
    errs
}

fn condition(type_: &str, status: bool, reason: &str, message: &str, old: Option<&Value>) -> Value {
    let status = if status { "True" } else { "False" };
    let since = old
        .and_then(|o| o.pointer("/status/conditions"))
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter().find(|c| {
                c.get("type").and_then(Value::as_str) == Some(type_)
                    && c.get("status").and_then(Value::as_str) == Some(status)
            })
        })
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(meta::now_rfc3339()));
    json!({
        "type": type_,
        "status": status,
        "lastTransitionTime": since,
        "reason": reason,
        "message": message,
    })
}

/// Computes `status` for `crd` (replacing whatever the client sent), given the other CRDs.
pub fn compute_status<'a>(
    crd: &mut Value,
    old: Option<&Value>,
    others: impl Iterator<Item = &'a Value>,
) {
    let group = str_at(crd, "/spec/group").to_string();
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let plural = str_at(&names, "/plural").to_string();
    let kind = str_at(&names, "/kind").to_string();
    let my_name = meta::name(crd).to_string();
    let mut conflict = None;
    for other in others {
        if meta::name(other) == my_name || str_at(other, "/spec/group") != group {
            continue;
        }
        if str_at(other, "/status/acceptedNames/plural") == plural {
            conflict = Some(("PluralConflict", format!("{plural:?} is already in use")));
        } else if str_at(other, "/status/acceptedNames/kind") == kind {
            conflict = Some(("KindConflict", format!("{kind:?} is already in use")));
        }
    }
    let mut status = Map::new();
    let mut conditions = Vec::new();
    match &conflict {
        None => {
            let mut accepted = Map::new();
            for k in [
                "kind",
                "listKind",
                "plural",
                "singular",
                "shortNames",
                "categories",
            ] {
                if let Some(v) = names.get(k) {
                    accepted.insert(k.into(), v.clone());
                }
            }
            status.insert("acceptedNames".into(), Value::Object(accepted));
            conditions.push(condition(
                "NamesAccepted",
                true,
                "NoConflicts",
                "no conflicts found",
                old,
            ));
            conditions.push(condition(
                "Established",
                true,
                "InitialNamesAccepted",
                "the initial names have been accepted",
                old,
            ));
        }
        Some((reason, message)) => {
            status.insert("acceptedNames".into(), json!({"kind": "", "plural": ""}));
            conditions.push(condition("NamesAccepted", false, reason, message, old));
            conditions.push(condition(
                "Established",
                false,
                "NotAccepted",
                "not all names are accepted",
                old,
            ));
        }
    }
    if meta::deletion_timestamp(crd).is_some() {
        conditions.push(condition(
            "Terminating",
            true,
            "InstanceDeletionInProgress",
            "CustomResource deletion is in progress",
            old,
        ));
    }
    status.insert("conditions".into(), Value::Array(conditions));
    let mut stored = old
        .map(|o| meta::string_list(o.pointer("/status/storedVersions")))
        .unwrap_or_default();
    if let Some(vs) = crd.pointer("/spec/versions").and_then(Value::as_array) {
        for v in vs {
            if v.get("storage").and_then(Value::as_bool) == Some(true) {
                let n = str_at(v, "/name").to_string();
                if !stored.contains(&n) {
                    stored.push(n);
                }
            }
        }
    }
    status.insert("storedVersions".into(), json!(stored));
    if let Some(root) = crd.as_object_mut() {
        root.insert("status".into(), Value::Object(status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.test.io"},
            "spec": {
                "group": "test.io",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                              "schema": {"openAPIV3Schema": {"type": "object"}}}]
            }
        })
    }

    #[test]
    fn defaults_and_status() {
        let mut c = crd();
        default(&mut c);
        assert!(validate(&c, None).is_empty());
        assert_eq!(
            c.pointer("/spec/names/listKind"),
            Some(&json!("WidgetList"))
        );
        compute_status(&mut c, None, std::iter::empty());
        assert!(is_established(&c));
        assert_eq!(c.pointer("/status/storedVersions"), Some(&json!(["v1"])));
    }

    #[test]
    fn bad_name() {
        let mut c = crd();
        c["metadata"]["name"] = json!("nope.test.io");
        let errs = validate(&c, None);
        assert_eq!(errs[0].field, "metadata.name");
    }
}
