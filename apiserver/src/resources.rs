//! The catalogue of served resources: the built-in kinds and one entry per established
//! CustomResourceDefinition (rebuilt whenever a CRD changes).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::meta::NameRule;

/// The built-in kinds this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Namespace,
    Node,
    CoreEvent,
    Event,
    Lease,
    Crd,
}

/// One `additionalPrinterColumns` entry (built-ins have hand-written ones).
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

impl PrinterColumn {
    fn new(name: &str, type_: &str, json_path: &str, description: &str) -> Self {
        PrinterColumn {
            name: name.into(),
            type_: type_.into(),
            format: String::new(),
            description: description.into(),
            priority: 0,
            json_path: json_path.into(),
        }
    }
}

/// A served version of a resource.
#[derive(Debug, Clone)]
pub struct ServedVersion {
    pub name: String,
    /// `openAPIV3Schema` (custom resources only).
    pub schema: Option<Value>,
    pub columns: Vec<PrinterColumn>,
    /// `selectableFields[].jsonPath` without the leading dot.
    pub selectable_fields: Vec<String>,
    pub status_subresource: bool,
    pub storage: bool,
    pub deprecation_warning: Option<String>,
}

/// The description of a built-in kind (all are served as `v1` of their group).
struct BuiltinSpec {
    builtin: Builtin,
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
    columns: Vec<PrinterColumn>,
}

/// Everything the server needs to serve one resource.
#[derive(Debug, Clone)]
pub struct ResourceInfo {
    pub group: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Served versions, most preferred first.
    pub versions: Vec<ServedVersion>,
    pub builtin: Option<Builtin>,
    /// The defining CRD is being deleted: no more creates.
    pub terminating: bool,
}

pub const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

impl ResourceInfo {
    /// The storage table key: `group/plural` (core group: `/plural`).
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    pub fn version(&self, v: &str) -> Option<&ServedVersion> {
        self.versions.iter().find(|sv| sv.name == v)
    }

    pub fn api_version(&self, v: &str) -> String {
        if self.group.is_empty() {
            v.to_string()
        } else {
            format!("{}/{v}", self.group)
        }
    }

    pub fn preferred_version(&self) -> &str {
        self.versions.first().map_or("v1", |v| v.name.as_str())
    }

    /// Kinds whose strategy maintains `metadata.generation`.
    pub fn has_generation(&self) -> bool {
        matches!(self.builtin, None | Some(Builtin::Crd))
    }

    pub fn name_rule(&self) -> NameRule {
        match self.builtin {
            Some(Builtin::Namespace) => NameRule::Dns1123Label,
            _ => NameRule::Dns1123Subdomain,
        }
    }

    /// Events allow PUT to create (`AllowCreateOnUpdate`).
    pub fn allow_create_on_update(&self) -> bool {
        matches!(self.builtin, Some(Builtin::CoreEvent | Builtin::Event))
    }

    /// Whether DELETE answers with the object (`ReturnDeletedObject`) or a success `Status`.
    pub fn returns_deleted_object(&self) -> bool {
        matches!(
            self.builtin,
            None | Some(Builtin::Crd | Builtin::Namespace | Builtin::Node)
        )
    }

    pub fn group_resource(&self) -> String {
        crate::errors::group_resource(&self.group, &self.plural)
    }

    fn builtin(spec: BuiltinSpec) -> Self {
        let b = spec.builtin;
        ResourceInfo {
            group: spec.group.into(),
            plural: spec.plural.into(),
            singular: spec.kind.to_lowercase(),
            kind: spec.kind.into(),
            list_kind: format!("{}List", spec.kind),
            namespaced: spec.namespaced,
            short_names: spec.short_names.iter().map(|s| s.to_string()).collect(),
            categories: if b == Builtin::Crd {
                vec!["api-extensions".into()]
            } else {
                Vec::new()
            },
            versions: vec![ServedVersion {
                name: "v1".into(),
                schema: None,
                columns: spec.columns,
                selectable_fields: Vec::new(),
                status_subresource: spec.status,
                storage: true,
                deprecation_warning: None,
            }],
            builtin: Some(b),
            terminating: false,
        }
    }

    /// Builds the resource a CRD defines; `None` if the CRD is not (yet) servable.
    pub fn from_crd(crd: &Value) -> Option<Self> {
        let spec = crd.get("spec")?;
        let names = spec.get("names")?;
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let group = s(spec, "group")?;
        let plural = s(names, "plural")?;
        let kind = s(names, "kind")?;
        let singular = s(names, "singular")
            .filter(|x| !x.is_empty())
            .unwrap_or_else(|| kind.to_lowercase());
        let list_kind = s(names, "listKind")
            .filter(|x| !x.is_empty())
            .unwrap_or_else(|| format!("{kind}List"));
        let namespaced = s(spec, "scope").as_deref() != Some("Cluster");
        let list = |v: Option<&Value>| crate::meta::string_list(v);
        let mut versions: Vec<ServedVersion> = spec
            .get("versions")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(false))
                    .filter_map(|v| {
                        let name = s(v, "name")?;
                        let columns = v
                            .get("additionalPrinterColumns")
                            .and_then(Value::as_array)
                            .map(|cols| {
                                cols.iter()
                                    .filter_map(|c| {
                                        Some(PrinterColumn {
                                            name: s(c, "name")?,
                                            type_: s(c, "type").unwrap_or_else(|| "string".into()),
                                            format: s(c, "format").unwrap_or_default(),
                                            description: s(c, "description").unwrap_or_default(),
                                            priority: c
                                                .get("priority")
                                                .and_then(Value::as_i64)
                                                .unwrap_or(0),
                                            json_path: s(c, "jsonPath")?,
                                        })
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let selectable_fields = v
                            .get("selectableFields")
                            .and_then(Value::as_array)
                            .map(|fs| {
                                fs.iter()
                                    .filter_map(|f| s(f, "jsonPath"))
                                    .map(|p| p.trim_start_matches('.').to_string())
                                    .collect()
                            })
                            .unwrap_or_default();
                        Some(ServedVersion {
                            schema: v
                                .get("schema")
                                .and_then(|sc| sc.get("openAPIV3Schema"))
                                .cloned(),
                            columns,
                            selectable_fields,
                            status_subresource: v
                                .get("subresources")
                                .and_then(|sr| sr.get("status"))
                                .is_some_and(|st| !st.is_null()),
                            storage: v.get("storage").and_then(Value::as_bool).unwrap_or(false),
                            deprecation_warning: if v
                                .get("deprecated")
                                .and_then(Value::as_bool)
                                .unwrap_or(false)
                            {
                                Some(s(v, "deprecationWarning").unwrap_or_else(|| {
                                    format!("{group}/{name} {kind} is deprecated")
                                }))
                            } else {
                                None
                            },
                            name,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        if versions.is_empty() {
            return None;
        }
        versions.sort_by(|a, b| compare_versions(&a.name, &b.name));
        Some(ResourceInfo {
            group,
            plural,
            singular,
            kind,
            list_kind,
            namespaced,
            short_names: list(names.get("shortNames")),
            categories: list(names.get("categories")),
            versions,
            builtin: None,
            terminating: crate::meta::deletion_timestamp(crd).is_some(),
        })
    }
}

/// Kubernetes' "kube-aware" version priority (`version.CompareKubeAwareVersionStrings`):
/// GA before beta before alpha, higher numbers first, non-Kubernetes-looking names last
/// (alphabetically). Returns `Less` when `a` is preferred.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn parse(v: &str) -> Option<(u32, u8, u32)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() || digits.starts_with('0') {
            return None;
        }
        let major: u32 = digits.parse().ok()?;
        let rest = &rest[digits.len()..];
        if rest.is_empty() {
            return Some((major, 2, 0));
        }
        let (stage, rest) = if let Some(r) = rest.strip_prefix("beta") {
            (1, r)
        } else if let Some(r) = rest.strip_prefix("alpha") {
            (0, r)
        } else {
            return None;
        };
        if rest.is_empty() || !rest.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        Some((major, stage, rest.parse().ok()?))
    }
    match (parse(a), parse(b)) {
        (Some((ma, sa, na)), Some((mb, sb, nb))) => sb.cmp(&sa).then(mb.cmp(&ma)).then(nb.cmp(&na)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

/// An API group as discovery shows it.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub name: String,
    /// Most preferred first.
    pub versions: Vec<String>,
}

/// The served resources.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    resources: Vec<Arc<ResourceInfo>>,
}

fn age() -> PrinterColumn {
    PrinterColumn::new(
        "Age",
        "date",
        ".metadata.creationTimestamp",
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    )
}

impl Registry {
    /// The built-in kinds only.
    pub fn builtins() -> Self {
        use Builtin::*;
        let r = vec![
            ResourceInfo::builtin(BuiltinSpec {
                builtin: Namespace,
                group: "",
                plural: "namespaces",
                kind: "Namespace",
                namespaced: false,
                short_names: &["ns"],
                status: true,
                columns: vec![
                    PrinterColumn::new(
                        "Status",
                        "string",
                        ".status.phase",
                        "The status of the namespace",
                    ),
                    age(),
                ],
            }),
            ResourceInfo::builtin(BuiltinSpec {
                builtin: Node,
                group: "",
                plural: "nodes",
                kind: "Node",
                namespaced: false,
                short_names: &["no"],
                status: true,
                columns: vec![
                    PrinterColumn::new(
                        "Ready",
                        "string",
                        ".status.conditions[?(@.type==\"Ready\")].status",
                        "The status of the node's Ready condition",
                    ),
                    age(),
                    PrinterColumn::new(
                        "Version",
                        "string",
                        ".status.nodeInfo.kubeletVersion",
                        "Kubelet Version reported by the node.",
                    ),
                ],
            }),
            ResourceInfo::builtin(BuiltinSpec {
                builtin: CoreEvent,
                group: "",
                plural: "events",
                kind: "Event",
                namespaced: true,
                short_names: &["ev"],
                status: false,
                columns: vec![
                    PrinterColumn::new("Type", "string", ".type", "Type of this event"),
                    PrinterColumn::new("Reason", "string", ".reason", "Reason of this event"),
                    PrinterColumn::new(
                        "Object",
                        "string",
                        ".involvedObject.name",
                        "The object this event is about",
                    ),
                    PrinterColumn::new("Message", "string", ".message", "Message of this event"),
                    age(),
                ],
            }),
            ResourceInfo::builtin(BuiltinSpec {
                builtin: Event,
                group: "events.k8s.io",
                plural: "events",
                kind: "Event",
                namespaced: true,
                short_names: &["ev"],
                status: false,
                columns: vec![
                    PrinterColumn::new("Type", "string", ".type", "Type of this event"),
                    PrinterColumn::new("Reason", "string", ".reason", "Reason of this event"),
                    PrinterColumn::new(
                        "Object",
                        "string",
                        ".regarding.name",
                        "The object this event is about",
                    ),
                    PrinterColumn::new("Note", "string", ".note", "Note of this event"),
                    age(),
                ],
            }),
            ResourceInfo::builtin(BuiltinSpec {
                builtin: Lease,
                group: "coordination.k8s.io",
                plural: "leases",
                kind: "Lease",
                namespaced: true,
                short_names: &[],
                status: false,
                columns: vec![
                    PrinterColumn::new(
                        "Holder",
                        "string",
                        ".spec.holderIdentity",
                        "The holder of the lease",
                    ),
                    age(),
                ],
            }),
            ResourceInfo::builtin(BuiltinSpec {
                builtin: Crd,
                group: "apiextensions.k8s.io",
                plural: "customresourcedefinitions",
                kind: "CustomResourceDefinition",
                namespaced: false,
                short_names: &["crd", "crds"],
                status: true,
                columns: vec![PrinterColumn::new(
                    "Created At",
                    "string",
                    ".metadata.creationTimestamp",
                    "Timestamp of creation",
                )],
            }),
        ];
        Registry {
            resources: r.into_iter().map(Arc::new).collect(),
        }
    }

    /// Built-ins plus the resources of every established CRD.
    pub fn with_crds<'a>(crds: impl Iterator<Item = &'a Value>) -> Self {
        let mut reg = Self::builtins();
        for crd in crds {
            if !crate::crd::is_established(crd) {
                continue;
            }
            if let Some(info) = ResourceInfo::from_crd(crd) {
                if reg.by_key(&info.key()).is_some() {
                    continue;
                }
                reg.resources.push(Arc::new(info));
            }
        }
        reg
    }

    pub fn resources(&self) -> &[Arc<ResourceInfo>] {
        &self.resources
    }

    pub fn by_key(&self, key: &str) -> Option<Arc<ResourceInfo>> {
        self.resources.iter().find(|r| r.key() == key).cloned()
    }

    /// The resource served at `group/version/plural`.
    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceInfo>> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.plural == plural && r.version(version).is_some())
            .cloned()
    }

    /// Whether any resource is served under `group/version`.
    pub fn serves(&self, group: &str, version: &str) -> bool {
        self.resources
            .iter()
            .any(|r| r.group == group && r.version(version).is_some())
    }

    /// Non-core groups, in discovery order (built-in groups first, then CRD groups by name).
    pub fn groups(&self) -> Vec<GroupInfo> {
        let mut order: Vec<String> = Vec::new();
        let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in &self.resources {
            if r.group.is_empty() {
                continue;
            }
            if !order.contains(&r.group) {
                order.push(r.group.clone());
            }
            let vs = versions.entry(r.group.clone()).or_default();
            for v in &r.versions {
                if !vs.contains(&v.name) {
                    vs.push(v.name.clone());
                }
            }
        }
        let builtin_count = order
            .iter()
            .filter(|g| {
                self.resources
                    .iter()
                    .any(|r| &r.group == *g && r.builtin.is_some())
            })
            .count();
        order[builtin_count..].sort();
        order
            .into_iter()
            .map(|g| {
                let mut vs = versions.remove(&g).unwrap_or_default();
                vs.sort_by(|a, b| compare_versions(a, b));
                GroupInfo {
                    name: g,
                    versions: vs,
                }
            })
            .collect()
    }

    /// Resources served under `group/version`.
    pub fn resources_in(&self, group: &str, version: &str) -> Vec<Arc<ResourceInfo>> {
        self.resources
            .iter()
            .filter(|r| r.group == group && r.version(version).is_some())
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_priority() {
        let mut v = vec!["v1alpha1", "foo", "v2", "v1beta2", "v1", "v1beta1", "v10"];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            vec!["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }
}
