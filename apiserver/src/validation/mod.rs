//! Validation of custom resources against a CRD version's `openAPIV3Schema`, in the order
//! and with the error shapes of the real kube-apiserver (apiextensions-apiserver):
//!
//! 1. **Pruning** of fields the schema does not specify (`pruning.Prune`), keeping
//!    `apiVersion`/`kind`/`metadata` at the root and in embedded resources, and unknown
//!    fields under `x-kubernetes-preserve-unknown-fields`; then removal of `null`s of
//!    non-nullable fields without a default (`PruneNonNullableNullsWithoutDefaults`).
//! 2. **Defaulting** (`defaulting.Default`): missing properties, and `null`s of
//!    non-nullable fields, get their `default`.
//! 3. **Schema validation** (kube-openapi `SchemaValidator` → `kubeOpenAPIResultToField\
//!    Errors`), embedded-resource checks, and `x-kubernetes-list-type` set/map uniqueness.
//!    On update, errors on values unchanged from the old object are ratcheted away
//!    (`CRDValidationRatcheting`, default since 1.30).
//! 4. **CEL** `x-kubernetes-validations`, skipped entirely when a blocking error exists
//!    (`hasBlockingErr`: NotSupported, Required, TooLong, TooMany, TypeInvalid), in which
//!    case one extra `<nil>` error says so, like the real server.
//!
//! [`check_structural`] runs the CRD-registration checks of a schema (structural schema,
//! defaults, extensions, CEL compilation and the static cost budget).

mod cel;
mod cost;
mod errors;
mod formats;
mod mutate;
mod openapi;
mod schema;
mod structural;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::Value;

use self::schema::Schema;

/// One field error, shaped like Kubernetes' `field.Error` so the server can build a 422
/// `Status` with `details.causes[]` (`{reason, message, field}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field path in `field.Path` syntax: `spec.sizeBytes`, `spec.items[2].name`,
    /// `spec.labels[foo]` (CEL and structural checks) or `spec.labels.foo` (OpenAPI checks
    /// on `additionalProperties` values, as kube-openapi names them). `<nil>` when the
    /// error has no path (root-level CEL rules, `anyOf`/`oneOf`/`allOf`/`not` failures,
    /// the "rules were not checked" notice), exactly as the real server reports it.
    pub field: String,
    /// The `metav1.CauseType`: `FieldValueInvalid`, `FieldValueRequired`,
    /// `FieldValueNotSupported`, `FieldValueTypeInvalid`, `FieldValueDuplicate`,
    /// `FieldValueForbidden`, `FieldValueTooLong`, `FieldValueTooMany`, `InternalError`.
    pub reason: String,
    /// The cause message without the field, i.e. `field.Error.ErrorBody()`, e.g.
    /// `Unsupported value: "Foo": supported values: "A", "B"` or `Required value`.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    /// `field.Error.Error()`: `<field>: <message>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// `hasBlockingErr`'s extra error (`field.Invalid(nil, nil, ...)`).
const CEL_SKIPPED: &str = "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation";

/// Prune unknown fields, apply defaults, then validate `object` (the whole custom resource)
/// against `schema` (the `openAPIV3Schema` of the served version). `old` is the stored
/// object on update: it enables transition rules (`oldSelf`) and ratcheting.
///
/// `object` is mutated (pruned and defaulted) even when validation fails, as the real
/// server does before validating. Never panics, whatever the schema or object.
pub fn validate_object(
    schema: &Value,
    object: &mut Value,
    old: Option<&Value>,
) -> Result<(), Vec<FieldError>> {
    let s = compiled(schema);
    normalize(object, &s);
    // The stored object is read back pruned and defaulted by the server as well.
    let old = old.map(|o| {
        let mut o = o.clone();
        normalize(&mut o, &s);
        o
    });
    let old = old.as_ref();

    let mut errs = Vec::new();
    openapi::validate(&s, object, "", old, 0, &mut errs);
    openapi::validate_embedded(object, &s, "", 0, &mut errs);
    // List-type uniqueness is ratcheted as a whole: skipped if the old object violated it.
    let old_lists_ok = old.is_none_or(|o| {
        let mut e = Vec::new();
        openapi::validate_list_types(o, &s, "", 0, &mut e);
        e.is_empty()
    });
    if old_lists_ok {
        openapi::validate_list_types(object, &s, "", 0, &mut errs);
    }
    if errs
        .iter()
        .any(|e| errors::ErrorType::blocks_cel(&e.reason))
    {
        errs.push(errors::invalid(
            "<nil>",
            errors::BadValue::Json(&Value::Null),
            CEL_SKIPPED,
        ));
    } else {
        cel::validate(&s, object, old, "", 0, &mut errs);
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// Check an `openAPIV3Schema` the way the apiserver does when a CRD is created or updated:
/// structural-schema rules (a `type` on every node unless `x-kubernetes-int-or-string` or
/// `x-kubernetes-preserve-unknown-fields`; only value validations inside `anyOf`/`allOf`/
/// `oneOf`/`not`; no `additionalProperties` with `properties` or at the root; root
/// `metadata` limited to `name`/`generateName`; ...), pruned and valid `default`s, list/map
/// type extensions, `x-kubernetes-validations` shape, compilation (syntax, undefined fields,
/// undeclared variables, bool result), `oldSelf` only where values correlate, and the
/// static cost budget (10M per rule × cardinality, 100M for the schema).
///
/// Field paths are rooted at `openAPIV3Schema` (e.g.
/// `openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule`).
pub fn check_structural(schema: &Value) -> Result<(), Vec<FieldError>> {
    let errs = structural::check(schema);
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

fn normalize(object: &mut Value, s: &Schema) {
    mutate::prune_root(object, s);
    mutate::prune_non_nullable_nulls(object, Some(s), 0);
    mutate::apply_defaults(object, s, 0);
}

/// Parsed schemas with their compiled rules, keyed by the schema's JSON text (validation
/// runs on every write; compiling CEL each time would dominate).
/// Schema JSON text → parsed schema, bucketed by the text's hash.
type SchemaCache = HashMap<u64, Vec<(String, Arc<Schema>)>>;
static CACHE: LazyLock<Mutex<SchemaCache>> = LazyLock::new(Default::default);
const CACHE_CAPACITY: usize = 64;

fn compiled(schema: &Value) -> Arc<Schema> {
    let text = schema.to_string();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    let key = hasher.finish();
    {
        let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = cache
            .get(&key)
            .and_then(|b| b.iter().find(|(t, _)| *t == text))
        {
            return Arc::clone(&hit.1);
        }
    }
    let parsed = Arc::new(Schema::parse(schema, true));
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= CACHE_CAPACITY {
        cache.clear();
    }
    cache
        .entry(key)
        .or_default()
        .push((text, Arc::clone(&parsed)));
    parsed
}
