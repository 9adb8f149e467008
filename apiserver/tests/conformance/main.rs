//! Conformance suite of the embedded API server, driven through kube-rs (and kubectl).
//! One test binary (modules below) to keep link time down; every test starts its own server on
//! its own temporary data directory.

mod support;

mod builtins;
mod controller;
mod crud;
mod discovery;
mod finalizers;
mod formats;
mod kubectl;
mod pagination;
mod patches;
mod persistence;
mod selectors;
mod status;
mod validation;
mod watches;
