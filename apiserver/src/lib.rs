//! An embedded, persisted Kubernetes-compatible API server.

pub mod validation;
