//! Errors, and their one mapping to Kubernetes `Status` objects at the HTTP edge.
//!
//! Every failure a client can see is an [`ApiError`]: an HTTP code, a `reason`, a message and
//! optional `details`, built by constructors that mirror `k8s.io/apimachinery/pkg/api/errors`
//! (same messages, same codes). Internal failures ([`StoreError`]) convert into a 500.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::validation::FieldError;

/// Failures of the store and of its persistence.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {0} is corrupt: {1}")]
    Corrupt(String, String),
    #[error("data directory {0} is locked by another process")]
    Locked(String),
    #[error("the store has been shut down")]
    Closed,
    #[error("a previous write failed and could not be rolled back; restart the server")]
    Poisoned,
}

impl StoreError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// A Kubernetes `StatusCause`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub reason: String,
    pub message: String,
    pub field: String,
}

/// A Kubernetes `Status` failure, as returned by the API.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub details: Option<Box<Details>>,
}

/// `StatusDetails`.
#[derive(Debug, Clone, Default)]
pub struct Details {
    pub name: String,
    pub group: String,
    pub kind: String,
    pub uid: String,
    pub causes: Vec<Cause>,
    pub retry_after_seconds: i64,
}

/// `schema.GroupResource.String()`: `plural.group`, or `plural` for the core group.
pub fn group_resource(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

/// `schema.GroupKind.String()`: `Kind.group`, or `Kind` for the core group.
pub fn group_kind(group: &str, kind: &str) -> String {
    if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    }
}

/// Go's `%q` for the strings we print (names, values).
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// The human text of a `field.ErrorType` (what `field.Error.ErrorBody()` starts with).
fn reason_text(reason: &str) -> &str {
    match reason {
        "FieldValueNotFound" => "Not found",
        "FieldValueRequired" => "Required value",
        "FieldValueDuplicate" => "Duplicate value",
        "FieldValueInvalid" => "Invalid value",
        "FieldValueNotSupported" => "Unsupported value",
        "FieldValueForbidden" => "Forbidden",
        "FieldValueTooLong" => "Too long",
        "FieldValueTooMany" => "Too many",
        "FieldValueTypeInvalid" => "Invalid value",
        "InternalError" => "Internal error",
        other => other,
    }
}

/// Constructors and formatting for [`FieldError`] (kept as free functions: the type belongs to
/// `validation`).
pub mod field {
    use super::{quote, reason_text};
    use crate::validation::FieldError;

    /// `field.Error.ErrorBody()`. `FieldError.message` carries the whole body (as
    /// `validation::validate_object` produces it); a bare detail gets the reason text prefixed.
    pub fn body(e: &FieldError) -> String {
        let text = reason_text(&e.reason);
        if e.message.starts_with(text) {
            e.message.clone()
        } else if e.message.is_empty() {
            text.to_string()
        } else {
            format!("{text}: {}", e.message)
        }
    }

    /// `field.Invalid(path, value, message)`.
    pub fn invalid(path: &str, value: &str, message: &str) -> FieldError {
        FieldError {
            field: path.into(),
            reason: "FieldValueInvalid".into(),
            message: format!("Invalid value: {}: {message}", quote(value)),
        }
    }

    /// `field.Required(path, message)`.
    pub fn required(path: &str, message: &str) -> FieldError {
        FieldError {
            field: path.into(),
            reason: "FieldValueRequired".into(),
            message: if message.is_empty() {
                "Required value".into()
            } else {
                format!("Required value: {message}")
            },
        }
    }

    /// `field.Forbidden(path, message)`.
    pub fn forbidden(path: &str, message: &str) -> FieldError {
        FieldError {
            field: path.into(),
            reason: "FieldValueForbidden".into(),
            message: format!("Forbidden: {message}"),
        }
    }
}

impl ApiError {
    fn new(code: u16, reason: &str, message: String) -> Self {
        ApiError {
            code,
            reason: reason.into(),
            message,
            details: None,
        }
    }

    fn with_details(mut self, group: &str, kind: &str, name: &str) -> Self {
        self.details = Some(Box::new(Details {
            name: name.into(),
            group: group.into(),
            kind: kind.into(),
            ..Details::default()
        }));
        self
    }

    /// `errors.NewNotFound`.
    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!(
                "{} {} not found",
                group_resource(group, resource),
                quote(name)
            ),
        )
        .with_details(group, resource, name)
    }

    /// The 404 for a path the server does not serve.
    pub fn path_not_found() -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
        e.details = Some(Box::default());
        e
    }

    /// `errors.NewAlreadyExists`.
    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!(
                "{} {} already exists",
                group_resource(group, resource),
                quote(name)
            ),
        )
        .with_details(group, resource, name)
    }

    /// `errors.NewConflict`.
    pub fn conflict(group: &str, resource: &str, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {}: {why}",
                group_resource(group, resource),
                quote(name)
            ),
        )
        .with_details(group, resource, name)
    }

    /// The optimistic-concurrency conflict (`storage.NewResourceVersionConflictsError`).
    pub fn stale(group: &str, resource: &str, name: &str) -> Self {
        Self::conflict(
            group,
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// `errors.NewInvalid`.
    pub fn invalid(group: &str, kind: &str, name: &str, errs: &[FieldError]) -> Self {
        let mut bodies: Vec<String> = Vec::new();
        for e in errs {
            let s = format!("{}: {}", e.field, field::body(e));
            if !bodies.contains(&s) {
                bodies.push(s);
            }
        }
        let agg = if bodies.len() == 1 {
            bodies.remove(0)
        } else {
            format!("[{}]", bodies.join(", "))
        };
        let mut e = Self::new(
            422,
            "Invalid",
            format!(
                "{} {} is invalid: {agg}",
                group_kind(group, kind),
                quote(name)
            ),
        )
        .with_details(group, kind, name);
        if let Some(d) = e.details.as_mut() {
            d.causes = errs
                .iter()
                .map(|fe| Cause {
                    reason: fe.reason.clone(),
                    message: field::body(fe),
                    field: fe.field.clone(),
                })
                .collect();
        }
        e
    }

    /// `errors.NewBadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into())
    }

    /// `errors.NewForbidden`.
    pub fn forbidden(group: &str, resource: &str, name: &str, why: &str) -> Self {
        Self::new(
            403,
            "Forbidden",
            format!(
                "{} {} is forbidden: {why}",
                group_resource(group, resource),
                quote(name)
            ),
        )
        .with_details(group, resource, name)
    }

    /// `errors.NewMethodNotSupported`.
    pub fn method_not_supported(group: &str, resource: &str, action: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!(
                "{action} is not supported on resources of kind {}",
                quote(&group_resource(group, resource))
            ),
        )
        .with_details(group, resource, "")
    }

    /// `errors.NewResourceExpired` (410, reason `Expired`).
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message.into())
    }

    /// The watch/list error for a resourceVersion that left the history window.
    pub fn too_old(requested: u64, oldest: u64) -> Self {
        Self::expired(format!("too old resource version: {requested} ({oldest})"))
    }

    /// `storage.NewTooLargeResourceVersionError`, as the cacher returns it.
    pub fn too_large(requested: u64, current: u64) -> Self {
        let mut e = Self::new(
            504,
            "Timeout",
            format!("Timeout: Too large resource version: {requested}, current: {current}"),
        );
        e.details = Some(Box::new(Details {
            causes: vec![Cause {
                reason: "ResourceVersionTooLarge".into(),
                message: "Too large resource version".into(),
                field: String::new(),
            }],
            retry_after_seconds: 1,
            ..Details::default()
        }));
        e
    }

    /// 415, as the real server answers a body in an unknown format.
    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
        .with_details("", content_type, "")
    }

    /// 406 for an `Accept` header we cannot satisfy.
    pub fn not_acceptable() -> Self {
        Self::new(
            406,
            "NotAcceptable",
            "only the following media types are accepted: application/json, application/yaml"
                .into(),
        )
    }

    /// 413 for an oversized body.
    pub fn too_large_body(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    /// `errors.NewInternalError`.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {err}"),
        );
        e.details = Some(Box::new(Details {
            causes: vec![Cause {
                reason: String::new(),
                message: err.to_string(),
                field: String::new(),
            }],
            ..Details::default()
        }));
        e
    }

    /// A plain 500 with the message as is (as etcd3's storage errors surface).
    pub fn internal_plain(message: impl Into<String>) -> Self {
        let mut e = Self::new(500, "InternalError", message.into());
        e.reason = String::new();
        e
    }

    /// 503 once the server is shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", message.into())
    }

    /// `errors.NewGenericServerResponse(422, ...)`: what a failed JSON patch `test` gets.
    pub fn unprocessable_generic() -> Self {
        let mut e = Self::new(
            422,
            "Invalid",
            "the server rejected our request due to an error in our request".into(),
        );
        e.details = Some(Box::default());
        e
    }

    /// The `metav1.Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = Map::new();
        status.insert("kind".into(), json!("Status"));
        status.insert("apiVersion".into(), json!("v1"));
        status.insert("metadata".into(), json!({}));
        status.insert("status".into(), json!("Failure"));
        status.insert("message".into(), json!(self.message));
        if !self.reason.is_empty() {
            status.insert("reason".into(), json!(self.reason));
        }
        if let Some(d) = &self.details {
            let mut det = Map::new();
            if !d.name.is_empty() {
                det.insert("name".into(), json!(d.name));
            }
            if !d.group.is_empty() {
                det.insert("group".into(), json!(d.group));
            }
            if !d.kind.is_empty() {
                det.insert("kind".into(), json!(d.kind));
            }
            if !d.uid.is_empty() {
                det.insert("uid".into(), json!(d.uid));
            }
            if !d.causes.is_empty() {
                let causes: Vec<Value> = d
                    .causes
                    .iter()
                    .map(|c| {
                        let mut m = Map::new();
                        if !c.reason.is_empty() {
                            m.insert("reason".into(), json!(c.reason));
                        }
                        if !c.message.is_empty() {
                            m.insert("message".into(), json!(c.message));
                        }
                        if !c.field.is_empty() {
                            m.insert("field".into(), json!(c.field));
                        }
                        Value::Object(m)
                    })
                    .collect();
                det.insert("causes".into(), Value::Array(causes));
            }
            if d.retry_after_seconds != 0 {
                det.insert("retryAfterSeconds".into(), json!(d.retry_after_seconds));
            }
            status.insert("details".into(), Value::Object(det));
        }
        status.insert("code".into(), json!(self.code));
        Value::Object(status)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => ApiError::unavailable("the server is shutting down"),
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self.to_status()).unwrap_or_default();
        let mut resp = (code, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.code == 504
            && let Some(d) = &self.details
            && d.retry_after_seconds > 0
            && let Ok(v) = HeaderValue::from_str(&d.retry_after_seconds.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
