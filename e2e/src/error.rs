//! What can go wrong in a scenario. A failed expectation is [`E2eError::Check`]; everything else
//! says which call or file failed, so a red line names the component to look at.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    /// The environment description is incomplete or malformed.
    #[error("environment: {0}")]
    Config(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON for its contract: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("connecting to the CSI socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// A CSI call answered with an error status.
    #[error("{call} on {target}: {} ({})", status.code(), status.message())]
    Csi {
        call: &'static str,
        target: String,
        status: tonic::Status,
    },
    #[error("Kubernetes API: {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("NBD I/O on {target}: {source}")]
    Nbd {
        target: String,
        #[source]
        source: tessera_nbd::ClientError,
    },
    #[error("I/O on {target}: {source}")]
    Io {
        target: String,
        #[source]
        source: std::io::Error,
    },
    /// Something the scenario expected did not happen within its time limit.
    #[error("timed out after {seconds}s waiting for {what}; last seen: {last}")]
    Timeout {
        what: String,
        seconds: u64,
        last: String,
    },
    /// An expectation of the scenario does not hold.
    #[error("{0}")]
    Check(String),
    /// The scenario cannot run in this environment (e.g. it needs a kernel frontend); not a
    /// failure.
    #[error("skipped: {0}")]
    Skipped(String),
    /// Several failures (a scenario's own error plus cleanup errors).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; then "))]
    Many(Vec<E2eError>),
}

impl E2eError {
    /// The gRPC status of a failed CSI call.
    pub fn csi_status(&self) -> Option<&tonic::Status> {
        match self {
            E2eError::Csi { status, .. } => Some(status),
            _ => None,
        }
    }

    pub(crate) fn kube(what: impl Into<String>, source: kube::Error) -> Self {
        E2eError::Kube {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn io(target: impl Into<String>, source: std::io::Error) -> Self {
        E2eError::Io {
            target: target.into(),
            source,
        }
    }
}

pub type Result<T, E = E2eError> = std::result::Result<T, E>;

/// Fails the scenario with a formatted message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::E2eError::Check(format!($($arg)+)));
        }
    };
}
