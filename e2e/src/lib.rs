//! End-to-end scenarios of tessera (issue 5; seed 001 §4 and §8: allocate → mount → access
//! through the lender's agent → unmount; one borrower at a time; seed 000: reclaim and
//! rejection).
//!
//! The harness plays the container orchestrator over the real CSI sockets — csi-provisioner,
//! csi-attacher, csi-resizer and kubelet ([`co`]) — reads the outcome from the API ([`cluster`])
//! and the data through the published device or the volume's NBD export ([`io`]). An
//! [`Environment`] says where the sockets and the kubeconfig are: `tessera local`'s
//! `endpoints.json`, or any cluster whose CSI sockets the harness can reach.

pub mod cluster;
pub mod co;
pub mod csi;
pub mod env;
pub mod error;
pub mod io;
pub mod scenarios;

pub use env::{Environment, IoPath, NodeEndpoint, Options};
pub use error::{E2eError, Result};
