//! The REST semantics of the generic registry and the per-kind strategies: create, update,
//! patch, delete (finalizers, preconditions, namespace and CRD cleanup), list and get.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::crd;
use crate::errors::{ApiError, ApiResult, field, quote};
use crate::meta;
use crate::patch::{self, PatchType};
use crate::resources::{Builtin, ResourceInfo};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{CRD_TABLE, NAMESPACE_TABLE, Obj, ObjectKey, Store, Txn};
use crate::validation::{self, FieldError};

/// Namespaces that cannot be deleted.
const PROTECTED_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

/// What a request addresses.
#[derive(Debug, Clone)]
pub struct Scope {
    pub res: Arc<ResourceInfo>,
    pub version: String,
    /// `""` for cluster-scoped resources and cluster-wide collection requests.
    pub namespace: String,
    /// The `/status` subresource.
    pub status: bool,
}

impl Scope {
    pub fn key(&self, name: &str) -> ObjectKey {
        ObjectKey::new(self.res.key(), &self.namespace, name)
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError::not_found(&self.res.group, &self.res.plural, name)
    }

    fn api_version(&self) -> String {
        self.res.api_version(&self.version)
    }

    fn status_subresource(&self) -> bool {
        self.res
            .version(&self.version)
            .is_some_and(|v| v.status_subresource)
    }

    fn invalid(&self, name: &str, errs: &[FieldError]) -> ApiError {
        ApiError::invalid(&self.res.group, &self.res.kind, name, errs)
    }
}

/// Query options of writes.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_manager: Option<String>,
    pub force: bool,
    pub field_validation: FieldValidation,
    /// Warnings collected while serving the request (sent as `Warning` headers).
    pub warnings: std::cell::RefCell<Vec<String>>,
}

/// The `fieldValidation` directive (the server default is `Warn`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

/// Paths (`spec.foo`, `spec.list[0].x`) present in `before` but pruned from `after`.
fn pruned_paths(before: &Value, after: &Value, path: &str, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, bv) in b {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match a.get(k) {
                    None if !bv.is_null() => out.push(p),
                    None => {}
                    Some(av) => pruned_paths(bv, av, &p, out),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) if a.len() == b.len() => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                pruned_paths(bv, av, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// `DeleteOptions` we honour.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub dry_run: bool,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

/// Renders a stored object for the requested version (`None` conversion: only `apiVersion`).
pub fn render(scope: &Scope, obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.insert("apiVersion".into(), json!(scope.api_version()));
        m.insert("kind".into(), json!(scope.res.kind));
    }
    o
}

fn as_object_or_400(v: &Value) -> ApiResult<()> {
    if v.is_object() {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "Object 'Kind' is missing in the request body: the body must be a JSON object",
        ))
    }
}

/// Checks and sets `apiVersion`/`kind`.
fn check_type(scope: &Scope, obj: &mut Value) -> ApiResult<()> {
    as_object_or_400(obj)?;
    let want_av = scope.api_version();
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if !av.is_empty() && av != want_av {
        // Another served version of the same group is fine (stored as is, no conversion).
        let same_group = match av.split_once('/') {
            Some((g, v)) => g == scope.res.group && scope.res.version(v).is_some(),
            None => scope.res.group.is_empty() && scope.res.version(av).is_some(),
        };
        if !same_group {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({want_av})"
            )));
        }
    }
    if obj
        .get("metadata")
        .is_some_and(|m| !m.is_object() && !m.is_null())
    {
        return Err(ApiError::bad_request(
            "metadata: the object's metadata must be a JSON object",
        ));
    }
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if !kind.is_empty() && kind != scope.res.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            scope.res.kind
        )));
    }
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(want_av));
        m.insert("kind".into(), json!(scope.res.kind));
    }
    Ok(())
}

/// Reconciles `metadata.namespace` with the request's namespace.
fn check_namespace(scope: &Scope, obj: &mut Value) -> ApiResult<()> {
    if scope.res.namespaced {
        let ns = meta::namespace(obj);
        if !ns.is_empty() && ns != scope.namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        meta::set_meta(obj, "namespace", json!(scope.namespace));
    } else {
        meta::remove_meta(obj, "namespace");
    }
    Ok(())
}

/// NamespaceLifecycle: the namespace must exist and not be terminating.
fn check_namespace_lifecycle(txn: &Txn<'_>, scope: &Scope, name: &str) -> ApiResult<()> {
    if !scope.res.namespaced {
        return Ok(());
    }
    match txn.get(&ObjectKey::new(NAMESPACE_TABLE, "", &scope.namespace)) {
        None => Err(ApiError::not_found("", "namespaces", &scope.namespace)),
        Some(ns) if meta::deletion_timestamp(&ns).is_some() => {
            let mut e = ApiError::forbidden(
                &scope.res.group,
                &scope.res.plural,
                name,
                &format!(
                    "unable to create new content in namespace {} because it is being terminated",
                    scope.namespace
                ),
            );
            if let Some(d) = e.details.as_mut() {
                d.causes.push(crate::errors::Cause {
                    reason: "NamespaceTerminating".into(),
                    message: format!("namespace {} is being terminated", scope.namespace),
                    field: "metadata.namespace".into(),
                });
            }
            Err(e)
        }
        Some(_) => Ok(()),
    }
}

/// The resource must still be served by the registry this transaction sees.
fn current_resource(txn: &Txn<'_>, scope: &Scope) -> ApiResult<Arc<ResourceInfo>> {
    txn.registry()
        .by_key(&scope.res.key())
        .ok_or_else(ApiError::path_not_found)
}

/// Schema (custom resources) and kind-specific validation. `old` is set on updates.
fn validate(
    scope: &Scope,
    obj: &mut Value,
    old: Option<&Value>,
    creating: bool,
    opts: &WriteOptions,
) -> ApiResult<()> {
    let mut errs = Vec::new();
    if creating {
        errs.extend(meta::validate_name(obj, scope.res.name_rule()));
    }
    errs.extend(meta::validate_meta_fields(obj));
    if let Some(old) = old {
        if meta::deletion_timestamp(old).is_some() {
            let old_f = meta::finalizers(old);
            let mut extra: Vec<String> = meta::finalizers(obj)
                .into_iter()
                .filter(|f| !old_f.contains(f))
                .collect();
            extra.sort();
            extra.dedup();
            if !extra.is_empty() {
                let list = extra
                    .iter()
                    .map(|s| quote(s))
                    .collect::<Vec<_>>()
                    .join(", ");
                errs.push(field::forbidden(
                    "metadata.finalizers",
                    &format!(
                        "no new finalizers can be added if the object is being deleted, found new finalizers []string{{{list}}}"
                    ),
                ));
            }
        }
        if meta::uid(obj) != meta::uid(old) {
            errs.push(field::invalid(
                "metadata.uid",
                meta::uid(obj),
                "field is immutable",
            ));
        }
    }
    match scope.res.builtin {
        None => {
            if let Some(schema) = scope
                .res
                .version(&scope.version)
                .and_then(|v| v.schema.as_ref())
            {
                let before = obj.clone();
                let result = validation::validate_object(schema, obj, old);
                let mut unknown = Vec::new();
                pruned_paths(&before, obj, "", &mut unknown);
                if let Some(old) = old {
                    // Only what this request brought in counts, not what storage already had.
                    let mut old_unknown = Vec::new();
                    let mut pruned_old = old.clone();
                    let _ = validation::validate_object(schema, &mut pruned_old, None);
                    pruned_paths(old, &pruned_old, "", &mut old_unknown);
                    unknown.retain(|p| !old_unknown.contains(p));
                }
                if !unknown.is_empty() {
                    let list: Vec<String> = unknown
                        .iter()
                        .map(|p| format!("unknown field {}", quote(p)))
                        .collect();
                    match opts.field_validation {
                        FieldValidation::Strict => {
                            return Err(ApiError::bad_request(format!(
                                "{kind} in version {v} cannot be handled as a {kind}: strict decoding error: {}",
                                list.join(", "),
                                kind = scope.res.kind,
                                v = quote(&scope.version),
                            )));
                        }
                        FieldValidation::Warn => opts.warnings.borrow_mut().extend(list),
                        FieldValidation::Ignore => {}
                    }
                }
                if let Err(schema_errs) = result {
                    errs.extend(schema_errs);
                }
            }
        }
        Some(Builtin::Crd) => errs.extend(crd::validate(obj, old)),
        _ => {}
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(scope.invalid(meta::name(obj), &errs))
    }
}

/// Everything but `metadata` (and `status`, when the subresource is on).
fn spec_part(obj: &Value, drop_status: bool) -> Map<String, Value> {
    obj.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| {
                    *k != "metadata"
                        && *k != "apiVersion"
                        && *k != "kind"
                        && !(drop_status && *k == "status")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The object without volatile bits, for no-op detection.
fn comparable(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        if let Some(Value::Array(mf)) = m.get_mut("managedFields") {
            for e in mf {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
        }
    }
    o
}

fn set_status(obj: &mut Value, status: Option<Value>) {
    if let Some(m) = obj.as_object_mut() {
        match status {
            Some(s) => {
                m.insert("status".into(), s);
            }
            None => {
                m.remove("status");
            }
        }
    }
}

/// Namespaces always carry `kubernetes.io/metadata.name: <name>` (set on create and update).
fn set_namespace_name_label(obj: &mut Value) {
    let name = meta::name(obj).to_string();
    if name.is_empty() {
        return;
    }
    let m = meta::metadata_mut(obj);
    let labels = m.entry("labels").or_insert_with(|| json!({}));
    if !labels.is_object() {
        *labels = json!({});
    }
    if let Some(l) = labels.as_object_mut() {
        l.insert("kubernetes.io/metadata.name".into(), json!(name));
    }
}

/// Strategy `PrepareForCreate`.
fn prepare_for_create(scope: &Scope, obj: &mut Value) {
    if scope.status_subresource() && scope.res.builtin != Some(Builtin::Node) {
        set_status(obj, None);
    }
    if scope.res.has_generation() {
        meta::set_meta(obj, "generation", json!(1));
    }
    match scope.res.builtin {
        Some(Builtin::Namespace) => {
            if let Some(m) = obj.as_object_mut() {
                m.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
                m.insert("status".into(), json!({"phase": "Active"}));
            }
        }
        Some(Builtin::Crd) => crd::default(obj),
        _ => {}
    }
}

/// Creates `obj` (already type-checked, named) in `txn`.
fn create_in(
    txn: &mut Txn<'_>,
    scope: &Scope,
    mut obj: Value,
    opts: &WriteOptions,
) -> ApiResult<Obj> {
    let res = current_resource(txn, scope)?;
    if res.terminating {
        return Err(ApiError::method_not_supported(
            &res.group,
            &res.plural,
            "create",
        ));
    }
    check_namespace(scope, &mut obj)?;
    if !meta::resource_version(&obj).is_empty() {
        return Err(ApiError::internal_plain(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    for k in [
        "uid",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    ] {
        meta::remove_meta(&mut obj, k);
    }
    prepare_for_create(scope, &mut obj);
    let generate = meta::name(&obj).is_empty()
        && meta::meta_str(&obj, "generateName").is_some_and(|g| !g.is_empty());
    if generate {
        let prefix = meta::meta_str(&obj, "generateName")
            .unwrap_or_default()
            .to_string();
        // Like the real server (RetryGenerateName), retry a few collisions.
        for _ in 0..8 {
            let candidate = meta::generate_name(&prefix);
            if !txn.exists(&scope.key(&candidate)) {
                meta::set_meta(&mut obj, "name", json!(candidate));
                break;
            }
        }
        if meta::name(&obj).is_empty() {
            meta::set_meta(&mut obj, "name", json!(meta::generate_name(&prefix)));
        }
    }
    if res.builtin == Some(Builtin::Namespace) {
        set_namespace_name_label(&mut obj);
    }
    validate(scope, &mut obj, None, true, opts)?;
    let name = meta::name(&obj).to_string();
    check_namespace_lifecycle(txn, scope, &name)?;
    let key = scope.key(&name);
    if txn.exists(&key) {
        return Err(ApiError::already_exists(&res.group, &res.plural, &name));
    }
    meta::set_meta(&mut obj, "uid", json!(uuid::Uuid::new_v4().to_string()));
    meta::set_meta(&mut obj, "creationTimestamp", json!(meta::now_rfc3339()));
    let applied_by_manager = |obj: &Value, mgr: &str| {
        meta::metadata(obj)
            .and_then(|m| m.get("managedFields"))
            .and_then(Value::as_array)
            .is_some_and(|l| {
                l.iter()
                    .any(|e| e.get("manager").and_then(Value::as_str) == Some(mgr))
            })
    };
    if let Some(mgr) = &opts.field_manager
        && !applied_by_manager(&obj, mgr)
    {
        record_managed(&mut obj, mgr, "Update", &scope.api_version(), None, false);
    }
    if res.builtin == Some(Builtin::Crd) {
        let others: Vec<Obj> = txn
            .objects(CRD_TABLE, None)
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        crd::compute_status(&mut obj, None, others.iter().map(|o| o.as_ref()));
    }
    Ok(txn.put(key, obj))
}

/// Records a `managedFields` entry (replacing the manager's previous one for the same
/// operation and subresource). `fields` defaults to the whole object's field set.
fn record_managed(
    obj: &mut Value,
    manager: &str,
    operation: &str,
    api_version: &str,
    fields: Option<Value>,
    status: bool,
) {
    let fields = fields.unwrap_or_else(|| patch::fields_v1(obj));
    let mut entry = Map::new();
    entry.insert("manager".into(), json!(manager));
    entry.insert("operation".into(), json!(operation));
    entry.insert("apiVersion".into(), json!(api_version));
    entry.insert("time".into(), json!(meta::now_rfc3339()));
    entry.insert("fieldsType".into(), json!("FieldsV1"));
    entry.insert("fieldsV1".into(), fields);
    if status {
        entry.insert("subresource".into(), json!("status"));
    }
    let m = meta::metadata_mut(obj);
    let list = m
        .entry("managedFields")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !list.is_array() {
        *list = Value::Array(Vec::new());
    }
    if let Value::Array(list) = list {
        let sub = if status { "status" } else { "" };
        list.retain(|e| {
            !(e.get("manager").and_then(Value::as_str) == Some(manager)
                && e.get("operation").and_then(Value::as_str) == Some(operation)
                && e.get("subresource").and_then(Value::as_str).unwrap_or("") == sub)
        });
        list.push(Value::Object(entry));
    }
}

/// POST.
pub fn create(
    store: &Store,
    scope: &Scope,
    mut body: Value,
    opts: &WriteOptions,
) -> ApiResult<Obj> {
    check_type(scope, &mut body)?;
    store.write(opts.dry_run, |txn| create_in(txn, scope, body, opts))
}

/// GET of one object.
pub fn get(store: &Store, scope: &Scope, name: &str) -> ApiResult<Obj> {
    store
        .get(&scope.key(name))
        .ok_or_else(|| scope.not_found(name))
}

/// The update pipeline shared by PUT and every patch: `proposed` is the full new object.
fn update_in(
    txn: &mut Txn<'_>,
    scope: &Scope,
    name: &str,
    old: &Obj,
    mut proposed: Value,
    opts: &WriteOptions,
    managed: Option<(&str, Value)>,
) -> ApiResult<Obj> {
    let res = current_resource(txn, scope)?;
    check_type(scope, &mut proposed)?;
    let body_name = meta::name(&proposed).to_string();
    if body_name.is_empty() {
        meta::set_meta(&mut proposed, "name", json!(name));
    } else if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    check_namespace(scope, &mut proposed)?;
    let body_rv = meta::resource_version(&proposed).to_string();
    if !body_rv.is_empty() {
        let Ok(_) = body_rv.parse::<u64>() else {
            return Err(ApiError::bad_request(format!(
                "invalid resourceVersion: {}",
                quote(&body_rv)
            )));
        };
        if body_rv != meta::resource_version(old) {
            return Err(ApiError::stale(&res.group, &res.plural, name));
        }
    }
    let status_sub = scope.status_subresource();
    let mut new = if scope.status {
        // Only status changes apply through /status (plus managedFields bookkeeping).
        let mut base = (**old).clone();
        set_status(&mut base, proposed.get("status").cloned());
        if let Some(mf) = meta::metadata(&proposed).and_then(|m| m.get("managedFields")) {
            meta::set_meta(&mut base, "managedFields", mf.clone());
        }
        base
    } else {
        if status_sub {
            set_status(&mut proposed, old.get("status").cloned());
        }
        proposed
    };
    // Fields an update can never change.
    if meta::uid(&new).is_empty() {
        meta::set_meta(&mut new, "uid", json!(meta::uid(old)));
    }
    for k in [
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match meta::metadata(old).and_then(|m| m.get(k)).cloned() {
            Some(v) => meta::set_meta(&mut new, k, v),
            None => {
                meta::remove_meta(&mut new, k);
            }
        }
    }
    if meta::metadata(&new).is_some_and(|m| !m.contains_key("managedFields"))
        && let Some(mf) = meta::metadata(old).and_then(|m| m.get("managedFields"))
    {
        meta::set_meta(&mut new, "managedFields", mf.clone());
    }
    if let Some((mgr, fields)) = managed {
        record_managed(
            &mut new,
            mgr,
            "Apply",
            &scope.api_version(),
            Some(fields),
            scope.status,
        );
    } else if let Some(mgr) = &opts.field_manager {
        record_managed(
            &mut new,
            mgr,
            "Update",
            &scope.api_version(),
            None,
            scope.status,
        );
    }
    match res.builtin {
        Some(Builtin::Crd) => crd::default(&mut new),
        Some(Builtin::Namespace) => set_namespace_name_label(&mut new),
        _ => {}
    }
    validate(scope, &mut new, Some(old), false, opts)?;
    if res.has_generation() {
        let changed = if res.builtin == Some(Builtin::Crd) {
            new.get("spec") != old.get("spec")
        } else {
            spec_part(&new, status_sub) != spec_part(old, status_sub)
        };
        if changed {
            meta::set_meta(&mut new, "generation", json!(meta::generation(old) + 1));
        }
    }
    if res.builtin == Some(Builtin::Crd) {
        let others: Vec<Obj> = txn
            .objects(CRD_TABLE, None)
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        crd::compute_status(&mut new, Some(old), others.iter().map(|o| o.as_ref()));
    }
    let mut normalized = new.clone();
    meta::normalize_metadata(&mut normalized);
    if comparable(&normalized) == comparable(old) {
        // No-op: the real storage layer skips the write (no new resourceVersion, no event).
        return Ok(old.clone());
    }
    let key = scope.key(name);
    if meta::deletion_timestamp(&new).is_some() && meta::finalizers(&new).is_empty() {
        // Like the real store (`errEmptiedFinalizers`): no update is written, the object is
        // deleted; the DELETED event carries the last stored state.
        let last = txn.delete(key.clone()).unwrap_or_else(|| Arc::new(new));
        after_remove(txn, &key);
        return Ok(last);
    }
    Ok(txn.put(key, new))
}

/// PUT (main resource or `/status`). Returns the object and whether it was created.
pub fn update(
    store: &Store,
    scope: &Scope,
    name: &str,
    body: Value,
    opts: &WriteOptions,
) -> ApiResult<(Obj, bool)> {
    as_object_or_400(&body)?;
    store.write(opts.dry_run, |txn| match txn.get(&scope.key(name)) {
        Some(old) => Ok((update_in(txn, scope, name, &old, body, opts, None)?, false)),
        None if scope.res.allow_create_on_update() && !scope.status => {
            let mut body = body;
            check_type(scope, &mut body)?;
            if meta::name(&body).is_empty() {
                meta::set_meta(&mut body, "name", json!(name));
            }
            meta::remove_meta(&mut body, "resourceVersion");
            Ok((create_in(txn, scope, body, opts)?, true))
        }
        None => Err(scope.not_found(name)),
    })
}

/// PATCH (main resource or `/status`). Returns the object and whether it was created (apply).
pub fn patch(
    store: &Store,
    scope: &Scope,
    name: &str,
    ptype: PatchType,
    body: &[u8],
    opts: &WriteOptions,
) -> ApiResult<(Obj, bool)> {
    enum Parsed {
        Merge(Value),
        Json(Vec<patch::JsonPatchOp>),
        Apply(Value),
    }
    let parsed = match ptype {
        PatchType::Merge => Parsed::Merge(patch::parse_merge(body)?),
        PatchType::Strategic => {
            let mut p = patch::parse_merge(body)?;
            patch::strip_directives(&mut p);
            Parsed::Merge(p)
        }
        PatchType::Json => Parsed::Json(patch::parse_json_patch(body)?),
        PatchType::Apply => {
            if opts.field_manager.as_deref().is_none_or(str::is_empty) {
                return Err(ApiError::invalid(
                    "meta.k8s.io",
                    "PatchOptions",
                    "",
                    &[field::required(
                        "fieldManager",
                        "is required for apply patch",
                    )],
                ));
            }
            Parsed::Apply(patch::parse_apply(body)?)
        }
    };
    if opts.force && ptype != PatchType::Apply {
        return Err(ApiError::invalid(
            "meta.k8s.io",
            "PatchOptions",
            "",
            &[field::forbidden(
                "force",
                "may not be specified for non-apply patch",
            )],
        ));
    }
    store.write(opts.dry_run, |txn| {
        let old = match txn.get(&scope.key(name)) {
            Some(old) => old,
            None => {
                if let (Parsed::Apply(applied), false) = (&parsed, scope.status) {
                    let mut obj = applied.clone();
                    check_type(scope, &mut obj)?;
                    let body_name = meta::name(&obj).to_string();
                    if body_name.is_empty() {
                        meta::set_meta(&mut obj, "name", json!(name));
                    } else if body_name != name {
                        return Err(ApiError::bad_request(format!(
                            "the name of the object ({body_name}) does not match the name on the URL ({name})"
                        )));
                    }
                    let mgr = opts.field_manager.clone().unwrap_or_default();
                    record_managed(
                        &mut obj,
                        &mgr,
                        "Apply",
                        &scope.api_version(),
                        Some(patch::fields_v1(applied)),
                        false,
                    );
                    return Ok((create_in(txn, scope, obj, opts)?, true));
                }
                return Err(scope.not_found(name));
            }
        };
        let current = render(scope, &old);
        let (patched, managed) = match &parsed {
            Parsed::Merge(p) => {
                let mut doc = current;
                patch::merge(&mut doc, p);
                (doc, None)
            }
            Parsed::Json(ops) => match patch::apply_json_patch(&current, ops) {
                Ok(doc) => (doc, None),
                Err(e) => {
                    tracing::debug!(error = %e, name, "json patch failed");
                    return Err(ApiError::unprocessable_generic());
                }
            },
            Parsed::Apply(applied) => {
                let mut doc = current;
                patch::merge(&mut doc, applied);
                (doc, Some(patch::fields_v1(applied)))
            }
        };
        if !patched.is_object() {
            return Err(ApiError::bad_request("the patched object must be a JSON object"));
        }
        let mgr = opts.field_manager.clone().unwrap_or_default();
        let managed = managed.map(|f| (mgr.as_str(), f));
        let obj = update_in(txn, scope, name, &old, patched, opts, managed)?;
        Ok((obj, false))
    })
}

/// After an object really left the store: finish a terminating namespace or CRD it was the last
/// dependent of.
fn after_remove(txn: &mut Txn<'_>, key: &ObjectKey) {
    if !key.namespace.is_empty() {
        let ns_key = ObjectKey::new(NAMESPACE_TABLE, "", &key.namespace);
        if let Some(ns) = txn.get(&ns_key)
            && meta::deletion_timestamp(&ns).is_some()
            && meta::finalizers(&ns).is_empty()
            && txn.tables_with_namespace(&key.namespace).is_empty()
        {
            txn.delete(ns_key);
        }
    }
    if let Some(res) = txn.registry().by_key(&key.resource)
        && res.builtin.is_none()
    {
        let crd_key = ObjectKey::new(CRD_TABLE, "", &format!("{}.{}", res.plural, res.group));
        if let Some(c) = txn.get(&crd_key)
            && meta::deletion_timestamp(&c).is_some()
            && meta::finalizers(&c).is_empty()
            && txn.objects(&key.resource, None).is_empty()
        {
            txn.delete(crd_key);
        }
    }
}

fn mark_deleting(obj: &Value) -> Value {
    let mut o = obj.clone();
    meta::set_meta(&mut o, "deletionTimestamp", json!(meta::now_rfc3339()));
    meta::set_meta(&mut o, "deletionGracePeriodSeconds", json!(0));
    let g = meta::generation(&o);
    if g > 0 {
        meta::set_meta(&mut o, "generation", json!(g + 1));
    }
    o
}

/// Deletes (or starts deleting) every object in `keys`; returns how many remain (finalizing).
fn delete_dependents(txn: &mut Txn<'_>, keys: Vec<(ObjectKey, Obj)>) -> usize {
    let mut remaining = 0;
    for (k, o) in keys {
        if meta::finalizers(&o).is_empty() {
            txn.delete(k);
        } else {
            remaining += 1;
            if meta::deletion_timestamp(&o).is_none() {
                txn.put(k, mark_deleting(&o));
            }
        }
    }
    remaining
}

/// The outcome of a DELETE.
pub struct Deleted {
    pub object: Obj,
    /// Whether the object is gone (vs. waiting for finalizers).
    pub removed: bool,
}

/// DELETE of one object.
pub fn delete(
    store: &Store,
    scope: &Scope,
    name: &str,
    opts: &DeleteOptions,
) -> ApiResult<Deleted> {
    store.write(opts.dry_run, |txn| {
        let key = scope.key(name);
        let old = txn.get(&key).ok_or_else(|| scope.not_found(name))?;
        let res = &scope.res;
        if let Some(uid) = &opts.precondition_uid
            && uid != meta::uid(&old)
        {
            return Err(ApiError::conflict(
                &res.group,
                &res.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta::uid(&old)
                ),
            ));
        }
        if let Some(rv) = &opts.precondition_rv
            && rv != meta::resource_version(&old)
        {
            return Err(ApiError::conflict(
                &res.group,
                &res.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta::resource_version(&old)
                ),
            ));
        }
        let dependents = match res.builtin {
            Some(Builtin::Namespace) => {
                if PROTECTED_NAMESPACES.contains(&name) {
                    return Err(ApiError::forbidden(
                        "",
                        "namespaces",
                        name,
                        "this namespace may not be deleted",
                    ));
                }
                let mut all = Vec::new();
                for table in txn.tables_with_namespace(name) {
                    all.extend(txn.objects(&table, Some(name)));
                }
                Some(all)
            }
            Some(Builtin::Crd) => {
                let plural = old.pointer("/spec/names/plural").and_then(Value::as_str);
                let group = old.pointer("/spec/group").and_then(Value::as_str);
                match (plural, group) {
                    (Some(p), Some(g)) => Some(txn.objects(&format!("{g}/{p}"), None)),
                    _ => Some(Vec::new()),
                }
            }
            _ => None,
        };
        let remaining = dependents.map_or(0, |d| delete_dependents(txn, d));
        if remaining > 0 || !meta::finalizers(&old).is_empty() {
            if meta::deletion_timestamp(&old).is_some() {
                return Ok(Deleted {
                    object: old,
                    removed: false,
                });
            }
            let mut marked = mark_deleting(&old);
            match res.builtin {
                Some(Builtin::Namespace) => {
                    if let Some(m) = marked.as_object_mut() {
                        m.insert("status".into(), json!({"phase": "Terminating"}));
                    }
                }
                Some(Builtin::Crd) => {
                    let others: Vec<Obj> = txn
                        .objects(CRD_TABLE, None)
                        .into_iter()
                        .map(|(_, o)| o)
                        .collect();
                    crd::compute_status(&mut marked, Some(&old), others.iter().map(|o| o.as_ref()));
                }
                _ => {}
            }
            let object = txn.put(key, marked);
            return Ok(Deleted {
                object,
                removed: false,
            });
        }
        let object = txn.delete(key.clone()).unwrap_or(old);
        after_remove(txn, &key);
        Ok(Deleted {
            object,
            removed: true,
        })
    })
}

/// `deletecollection`: deletes every matching object; returns what was deleted or marked.
pub fn delete_collection(
    store: &Store,
    scope: &Scope,
    labels: &LabelSelector,
    fields: &FieldSelector,
    opts: &DeleteOptions,
) -> ApiResult<Vec<Obj>> {
    let ns = (!scope.namespace.is_empty()).then_some(scope.namespace.as_str());
    let (_, objs) = store
        .list_at(&scope.res.key(), ns, None)
        .map_err(|e| ApiError::too_old(e.requested, e.oldest))?;
    let mut out = Vec::new();
    for o in objs {
        if !labels.matches(&o) || !fields.matches(&o) {
            continue;
        }
        let item_scope = Scope {
            namespace: meta::namespace(&o).to_string(),
            ..scope.clone()
        };
        match delete(store, &item_scope, meta::name(&o), opts) {
            Ok(d) => out.push(d.object),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// List options.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

/// A list result.
pub struct ListResult {
    pub items: Vec<Obj>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let v = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": [ns, name]});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn decode_continue(token: &str) -> ApiResult<(u64, String, String)> {
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad("incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("not a continue token"))?;
    let rv = v
        .get("rv")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("missing rv"))?;
    let start = v
        .get("start")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing start"))?;
    let s = |i: usize| start.get(i).and_then(Value::as_str).map(str::to_string);
    match (s(0), s(1)) {
        (Some(ns), Some(name)) => Ok((rv, ns, name)),
        _ => Err(bad("malformed start")),
    }
}

/// Parses a resourceVersion parameter.
pub fn parse_rv(rv: &str) -> ApiResult<u64> {
    rv.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version {}", quote(rv))))
}

/// LIST with selectors, pagination and resourceVersion semantics.
pub fn list(store: &Store, scope: &Scope, opts: &ListOptions) -> ApiResult<ListResult> {
    let ns = (!scope.namespace.is_empty()).then_some(scope.namespace.as_str());
    let (at, start_after) = match &opts.continue_token {
        Some(token) if !token.is_empty() => {
            let (rv, ns, name) = decode_continue(token)?;
            (Some(rv), Some((ns, name)))
        }
        _ => {
            let rv = opts.resource_version.as_deref().unwrap_or("");
            let exact = opts.resource_version_match.as_deref() == Some("Exact");
            match rv {
                "" | "0" => (None, None),
                _ => {
                    let n = parse_rv(rv)?;
                    let current = store.current_rv();
                    if n > current {
                        return Err(ApiError::too_large(n, current));
                    }
                    (exact.then_some(n), None)
                }
            }
        }
    };
    let (rv, objs) = store.list_at(&scope.res.key(), ns, at).map_err(|e| {
        if start_after.is_some() {
            ApiError::expired(CONTINUE_EXPIRED)
        } else {
            ApiError::too_old(e.requested, e.oldest)
        }
    })?;
    let selecting = !opts.labels.is_empty() || !opts.fields.is_empty();
    let matching: Vec<Obj> = objs
        .into_iter()
        .filter(|o| {
            start_after.as_ref().is_none_or(|(sns, sname)| {
                (meta::namespace(o), meta::name(o)) > (sns.as_str(), sname.as_str())
            })
        })
        .filter(|o| opts.labels.matches(o) && opts.fields.matches(o))
        .collect();
    let limit = opts.limit.filter(|l| *l > 0);
    match limit {
        Some(l) if matching.len() > l => {
            let rest = (matching.len() - l) as u64;
            let mut items = matching;
            items.truncate(l);
            let last = items
                .last()
                .map(|o| (meta::namespace(o).to_string(), meta::name(o).to_string()));
            let token = last.map(|(ns, name)| encode_continue(rv, &ns, &name));
            Ok(ListResult {
                items,
                resource_version: rv,
                continue_token: token,
                remaining: (!selecting).then_some(rest),
            })
        }
        _ => Ok(ListResult {
            items: matching,
            resource_version: rv,
            continue_token: None,
            remaining: None,
        }),
    }
}

/// Startup housekeeping: the default namespaces exist, and namespaces/CRDs whose deletion was
/// interrupted by a restart finish it.
pub fn bootstrap(store: &Store) -> ApiResult<()> {
    store.write(false, |txn| {
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let key = ObjectKey::new(NAMESPACE_TABLE, "", ns);
            if !txn.exists(&key) {
                txn.put(
                    key,
                    json!({
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {
                            "name": ns,
                            "uid": uuid::Uuid::new_v4().to_string(),
                            "creationTimestamp": meta::now_rfc3339(),
                            "labels": {"kubernetes.io/metadata.name": ns},
                        },
                        "spec": {"finalizers": ["kubernetes"]},
                        "status": {"phase": "Active"},
                    }),
                );
            }
        }
        for (key, ns) in txn.objects(NAMESPACE_TABLE, None) {
            if meta::deletion_timestamp(&ns).is_some()
                && meta::finalizers(&ns).is_empty()
                && txn.tables_with_namespace(&key.name).is_empty()
            {
                txn.delete(key);
            }
        }
        for (key, c) in txn.objects(CRD_TABLE, None) {
            let table = format!(
                "{}/{}",
                c.pointer("/spec/group")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                c.pointer("/spec/names/plural")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            );
            if meta::deletion_timestamp(&c).is_some()
                && meta::finalizers(&c).is_empty()
                && txn.objects(&table, None).is_empty()
            {
                txn.delete(key);
            }
        }
        Ok(())
    })
}
