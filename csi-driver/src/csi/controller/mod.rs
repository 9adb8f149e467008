//! CSI Controller service (controller mode): turns CSI calls into StorageClaims and
//! VirtualVolume access records; the operator does the allocating (ARCHITECTURE §2; seed 001
//! §8.1: allocation S5/S8 ↔ CreateVolume, mount S4 ↔ ControllerPublish, unmount S3 ↔
//! ControllerUnpublish). It keeps no state of its own: everything it answers is read from the
//! API, so it can restart at any time and several requests for one volume are safe
//! (idempotency by name, optimistic concurrency on every write).
//!
//! - [`service`]: the Controller RPCs.
//! - [`capability`]: the access modes tessera serves.
//! - [`naming`]: claim names from CSI names.
//! - [`error`]: typed errors and their one mapping to gRPC codes.
//!
//! The behaviour and the choices the spec leaves open are in `docs/csi.md` and
//! `docs/decisions.md` (D-28 …).

pub mod capability;
pub mod error;
pub mod naming;
pub mod service;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use kube::api::{Api, ListParams};
use tessera_api::v1alpha1::StoragePool;
use tessera_proto::csi::v1::{
    controller_server::ControllerServer, identity_server::IdentityServer,
};

use super::identity::{IdentityService, Readiness};
pub use service::ControllerService;

/// Controller-mode options.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// How long CreateVolume, DeleteVolume and ControllerExpandVolume wait for the operator
    /// before answering DEADLINE_EXCEEDED (the CO then retries the same, idempotent call).
    #[arg(long, default_value_t = 60)]
    pub create_timeout_seconds: u64,
    /// Pool of volumes whose StorageClass has no `tessera.io/pool` parameter.
    #[arg(long, default_value = "default")]
    pub default_pool: String,
    /// Namespace of claims when the CO sends no `csi.storage.k8s.io/pvc/namespace`.
    #[arg(long, default_value = "default")]
    pub default_claim_namespace: String,
    /// Namespace of the node Leases `tessera-node-<id>` (the node registry).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub node_namespace: String,
    /// StoragePriorityClass of claims when neither the StorageClass parameter nor the PVC
    /// annotation `tessera.io/priorityClass` names one (the claim requires a class).
    #[arg(long, default_value = "high")]
    pub default_priority_class: String,
}

impl Default for ControllerArgs {
    fn default() -> Self {
        ControllerArgs {
            create_timeout_seconds: 60,
            default_pool: "default".into(),
            default_claim_namespace: "default".into(),
            node_namespace: "default".into(),
            default_priority_class: "high".into(),
        }
    }
}

/// Probe is ready when the API server answers a list of StoragePools (which also proves the
/// CRDs are installed and RBAC allows reading them).
pub fn readiness(client: kube::Client) -> Readiness {
    Arc::new(move || {
        let pools: Api<StoragePool> = Api::all(client.clone());
        Box::pin(async move {
            pools
                .list(&ListParams::default().limit(1))
                .await
                .map(|_| ())
                .map_err(|e| format!("listing StoragePools: {e}"))
        })
    })
}

/// Serves Identity + Controller on `socket` until `shutdown`.
pub async fn serve(
    driver_name: &str,
    client: kube::Client,
    args: ControllerArgs,
    socket: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let incoming = super::bind_unix(&socket)?;
    let identity = IdentityService::new(driver_name, true, readiness(client.clone()));
    let controller = ControllerService::new(client, args);
    tracing::info!(socket = %socket.display(), "CSI controller serving");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::new(controller))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .with_context(|| format!("serving CSI on {}", socket.display()))
}
