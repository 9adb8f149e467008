//! The controller's typed errors and their one mapping to gRPC codes (CSI spec v1.12 error
//! tables).

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is missing or a value is malformed or unsupported.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume (or node) the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A volume of this name exists but is incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request conflicts with the volume's state (published elsewhere, still published).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The operator rejected the claim (seed 000 602, [0046]): `reason` is the claim's
    /// machine-readable `status.reason`.
    #[error("{reason}: {message}")]
    Rejected { reason: String, message: String },
    /// The requested size is outside what the request's own limits allow.
    #[error("{0}")]
    OutOfRange(String),
    /// The operator did not finish in time; the CO retries with the same request (the call is
    /// idempotent, so the retry picks up where this one stopped).
    #[error("{0}")]
    Timeout(String),
    /// A concurrent change or an unusable pagination token; the caller retries.
    #[error("{0}")]
    Aborted(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Rejected { .. } => Code::ResourceExhausted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Aborted(_) => Code::Aborted,
            // A write lost a resourceVersion race: the caller's retry reads again.
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => Code::Aborted,
            Error::Kube(kube::Error::Api(_)) => Code::Internal,
            // Transport, TLS, auth discovery: the API server is not reachable right now.
            Error::Kube(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::warn!(%error, "CSI controller call failed");
        } else {
            tracing::debug!(%error, ?code, "CSI controller call refused");
        }
        Status::new(code, error.to_string())
    }
}

/// A 404 from the API as `None`.
pub fn not_found_as_none<T>(result: Result<T, kube::Error>) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}
