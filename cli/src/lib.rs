//! The `tessera` command line and the embedded default (ARCHITECTURE §9).
//!
//! - [`local`]: `tessera local`, the whole system on one machine as child processes of this
//!   executable ([`local::LocalCluster`] is also what the end-to-end tests start).
//! - [`component`]: `tessera component <apiserver|operator|csi>`, how those children run.
//! - [`tables`]: the status tables of `tessera get` and of the demo.
//! - [`endpoints`]: `<data-dir>/endpoints.json` and the nodes' `node.json`.
//! - [`csi_client`]: CSI over a unix socket, the way kubelet and the sidecars call it.

pub mod attach;
pub mod commands;
pub mod component;
pub mod csi_client;
pub mod demo;
pub mod endpoints;
pub mod local;
pub mod tables;
pub mod units;
