//! Wire types, kept apart from the persisted API types (`tessera-api`) and from the code that
//! implements them (`tessera-csi`, `tessera-operator`).
//!
//! - [`csi::v1`]: the CSI v1 Identity, Controller and Node services (a subset of the CSI
//!   specification v1.12 — see `proto/csi.proto` for what is included and why).
//! - [`node_control::v1`]: the operator ↔ node-plugin protocol (ARCHITECTURE §2, §6).

pub mod csi {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("csi.v1");
    }
}

pub mod node_control {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("tessera.nodecontrol.v1");
    }
}
