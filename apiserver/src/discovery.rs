//! Discovery documents: `/version`, `/api`, `/apis`, `/apis/<group>`, `/api/v1`,
//! `/apis/<group>/<version>` (legacy), the aggregated `apidiscovery.k8s.io/v2`
//! `APIGroupDiscoveryList` for `/api` and `/apis`, and OpenAPI v3 documents (one per group
//! version, with each kind's schema tagged with `x-kubernetes-group-version-kind`, which is what
//! `kubectl` checks to use server-side field validation).

use serde_json::{Map, Value, json};

use crate::resources::{ALL_VERBS, Builtin, Registry, ResourceInfo};

pub const KUBE_MAJOR: &str = "1";
pub const KUBE_MINOR: &str = "33";
pub const GIT_VERSION: &str = "v1.33.0";

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "emulationMajor": KUBE_MAJOR,
        "emulationMinor": KUBE_MINOR,
        "minCompatibilityMajor": KUBE_MAJOR,
        "minCompatibilityMinor": "32",
        "gitVersion": GIT_VERSION,
        "gitCommit": "tessera-apiserver",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": format!("{}/{}", std::env::consts::OS, go_arch()),
    })
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `/api`.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

/// `/apis`.
pub fn api_group_list(reg: &Registry) -> Value {
    let groups: Vec<Value> = reg
        .groups()
        .iter()
        .map(|g| group_json(&g.name, &g.versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`.
pub fn api_group(reg: &Registry, group: &str) -> Option<Value> {
    let g = reg.groups().into_iter().find(|g| g.name == group)?;
    let mut v = group_json(&g.name, &g.versions);
    let m = v.as_object_mut()?;
    m.insert("kind".into(), json!("APIGroup"));
    m.insert("apiVersion".into(), json!("v1"));
    Some(v)
}

fn verbs(r: &ResourceInfo) -> Vec<&'static str> {
    match r.builtin {
        Some(Builtin::Namespace) => ALL_VERBS
            .iter()
            .copied()
            .filter(|v| *v != "deletecollection")
            .collect(),
        _ => ALL_VERBS.to_vec(),
    }
}

fn storage_version_hash(r: &ResourceInfo) -> String {
    use base64::Engine as _;
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&r.group, r.preferred_version(), &r.kind).hash(&mut h);
    base64::engine::general_purpose::STANDARD.encode(h.finish().to_be_bytes())[..11].to_string()
}

/// `/api/v1`, `/apis/<group>/<version>`.
pub fn api_resource_list(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    if !reg.serves(group, version) {
        return None;
    }
    let mut resources = Vec::new();
    for r in reg.resources_in(group, version) {
        let mut e = Map::new();
        e.insert("name".into(), json!(r.plural));
        e.insert("singularName".into(), json!(r.singular));
        e.insert("namespaced".into(), json!(r.namespaced));
        e.insert("kind".into(), json!(r.kind));
        e.insert("verbs".into(), json!(verbs(&r)));
        if !r.short_names.is_empty() {
            e.insert("shortNames".into(), json!(r.short_names));
        }
        if !r.categories.is_empty() {
            e.insert("categories".into(), json!(r.categories));
        }
        e.insert("storageVersionHash".into(), json!(storage_version_hash(&r)));
        resources.push(Value::Object(e));
        if r.version(version).is_some_and(|v| v.status_subresource) {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}

fn gvk(group: &str, version: &str, kind: &str) -> Value {
    json!({"group": group, "version": version, "kind": kind})
}

fn discovery_group(reg: &Registry, group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| {
            let resources: Vec<Value> = reg
                .resources_in(group, v)
                .iter()
                .map(|r| {
                    let mut e = Map::new();
                    e.insert("resource".into(), json!(r.plural));
                    e.insert("responseKind".into(), gvk(group, v, &r.kind));
                    e.insert(
                        "scope".into(),
                        json!(if r.namespaced {
                            "Namespaced"
                        } else {
                            "Cluster"
                        }),
                    );
                    e.insert("singularResource".into(), json!(r.singular));
                    e.insert("verbs".into(), json!(verbs(r)));
                    if !r.short_names.is_empty() {
                        e.insert("shortNames".into(), json!(r.short_names));
                    }
                    if !r.categories.is_empty() {
                        e.insert("categories".into(), json!(r.categories));
                    }
                    if r.version(v).is_some_and(|sv| sv.status_subresource) {
                        e.insert(
                            "subresources".into(),
                            json!([{
                                "subresource": "status",
                                "responseKind": gvk(group, v, &r.kind),
                                "verbs": ["get", "patch", "update"],
                            }]),
                        );
                    }
                    Value::Object(e)
                })
                .collect();
            json!({"version": v, "resources": resources, "freshness": "Current"})
        })
        .collect();
    let metadata = if group.is_empty() {
        json!({"creationTimestamp": null})
    } else {
        json!({"name": group, "creationTimestamp": null})
    };
    json!({"metadata": metadata, "versions": vs})
}

/// Aggregated discovery (`apidiscovery.k8s.io/<api_version>`) for `/api` (`core`) or `/apis`.
pub fn aggregated(reg: &Registry, core: bool, api_version: &str) -> Value {
    let items: Vec<Value> = if core {
        vec![discovery_group(reg, "", &["v1".to_string()])]
    } else {
        reg.groups()
            .iter()
            .map(|g| discovery_group(reg, &g.name, &g.versions))
            .collect()
    };
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{api_version}"),
        "metadata": {},
        "items": items,
    })
}

/// `/openapi/v3`: the index of group-version documents.
pub fn openapi_v3_index(reg: &Registry) -> Value {
    let mut paths = Map::new();
    let hash = |s: &str| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        s.hash(&mut h);
        format!("{:016X}", h.finish())
    };
    let mut add = |gv_path: String, doc: &Value| {
        let url = format!("/openapi/v3/{gv_path}?hash={}", hash(&doc.to_string()));
        paths.insert(gv_path, json!({"serverRelativeURL": url}));
    };
    if let Some(doc) = openapi_v3_gv(reg, "", "v1") {
        add("api/v1".into(), &doc);
    }
    for g in reg.groups() {
        for v in &g.versions {
            if let Some(doc) = openapi_v3_gv(reg, &g.name, v) {
                add(format!("apis/{}/{v}", g.name), &doc);
            }
        }
    }
    json!({"paths": paths})
}

fn schema_name(group: &str, version: &str, kind: &str) -> String {
    let mut g: Vec<&str> = group.split('.').filter(|s| !s.is_empty()).collect();
    g.reverse();
    let prefix = if group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        g.join(".")
    };
    format!("{prefix}.{version}.{kind}")
}

/// `/openapi/v3/<api|apis/group>/<version>`: schemas (custom resources: the CRD schema;
/// built-ins: an open object) and the operations with the query parameters they accept.
pub fn openapi_v3_gv(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    if !reg.serves(group, version) {
        return None;
    }
    let mut schemas = Map::new();
    let mut paths = Map::new();
    let gv_prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string"}});
    for r in reg.resources_in(group, version) {
        let name = schema_name(group, version, &r.kind);
        let mut schema = r
            .version(version)
            .and_then(|v| v.schema.clone())
            .unwrap_or_else(
                || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            );
        if let Some(m) = schema.as_object_mut() {
            let props = m
                .entry("properties")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            if let Some(props) = props {
                props.insert("apiVersion".into(), json!({"type": "string"}));
                props.insert("kind".into(), json!({"type": "string"}));
                props.insert("metadata".into(), json!({"type": "object"}));
            }
            m.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([gvk(group, version, &r.kind)]),
            );
        }
        let reference = json!({"$ref": format!("#/components/schemas/{name}")});
        schemas.insert(name, schema);
        let body = json!({"content": {"application/json": {"schema": reference}}});
        let ext = gvk(group, version, &r.kind);
        let op = |action: &str, params: Vec<Value>, with_body: bool| {
            let mut o = json!({
                "parameters": params,
                "responses": {"200": body},
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": ext,
            });
            if with_body {
                o["requestBody"] = body.clone();
            }
            o
        };
        let write_params = || {
            vec![
                param("dryRun"),
                param("fieldManager"),
                param("fieldValidation"),
            ]
        };
        let mut patch_params = write_params();
        patch_params.push(param("force"));
        let item = json!({
            "get": op("get", Vec::new(), false),
            "put": op("put", write_params(), true),
            "patch": op("patch", patch_params, true),
            "delete": op("delete", vec![param("dryRun")], false),
        });
        let coll = json!({
            "get": op("list", Vec::new(), false),
            "post": op("post", write_params(), true),
        });
        let base = if r.namespaced {
            format!("{gv_prefix}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("{gv_prefix}/{}", r.plural)
        };
        paths.insert(format!("{base}/{{name}}"), item);
        paths.insert(base, coll);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
