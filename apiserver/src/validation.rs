//! Validation of custom resources against a CRD version's `openAPIV3Schema`.
//! (Being written: see the interface below.)

use serde_json::Value;

/// One field error, shaped like Kubernetes' `field.Error` so the server can build a 422 `Status`
/// with `details.causes[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// e.g. `spec.sizeBytes`
    pub field: String,
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, `FieldValueTypeInvalid`, ...
    pub reason: String,
    pub message: String,
}

/// Prune unknown fields, apply defaults, then validate `object` against `schema` (the
/// `openAPIV3Schema` of the served version), with `old` for transition rules on update.
pub fn validate_object(
    schema: &Value,
    object: &mut Value,
    old: Option<&Value>,
) -> Result<(), Vec<FieldError>> {
    let _ = (schema, object, old);
    Err(vec![FieldError {
        field: String::new(),
        reason: "InternalError".into(),
        message: "schema validation is not implemented yet".into(),
    }])
}
