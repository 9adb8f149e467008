//! CSI over a unix socket, the way kubelet and the external sidecars call a driver.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tessera_proto::csi::v1 as csi;

pub use csi::controller_client::ControllerClient;
pub use csi::identity_client::IdentityClient;
pub use csi::node_client::NodeClient;

/// A channel to the CSI endpoint listening on `socket`.
pub use tessera_csi::csi::connect_unix as connect;

/// Whether the plugin on `socket` answers Probe with ready (an unset `ready` means ready, as
/// the CSI spec says).
pub async fn probe(socket: &Path) -> bool {
    let Ok(channel) = connect(socket).await else {
        return false;
    };
    match IdentityClient::new(channel)
        .probe(csi::ProbeRequest {})
        .await
    {
        Ok(resp) => resp.into_inner().ready.unwrap_or(true),
        Err(_) => false,
    }
}

/// A raw block volume capability with a single-node writer access mode.
pub fn block_single_writer() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// A published and staged volume.
#[derive(Debug, Clone)]
pub struct Staged {
    pub publish_context: HashMap<String, String>,
    pub staging_path: PathBuf,
}

/// ControllerPublish on the controller, then NodeStage as a Block volume on the node: what the
/// attacher and kubelet do before a pod can use the volume.
pub async fn publish_and_stage(
    controller: &Path,
    node_socket: &Path,
    node_id: &str,
    volume_id: &str,
    volume_context: HashMap<String, String>,
    staging_path: &Path,
) -> anyhow::Result<Staged> {
    use anyhow::Context;
    let mut ctl = ControllerClient::new(connect(controller).await.with_context(|| {
        format!(
            "connecting to the CSI controller at {}",
            controller.display()
        )
    })?);
    let publish = ctl
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: volume_id.to_string(),
            node_id: node_id.to_string(),
            volume_capability: Some(block_single_writer()),
            readonly: false,
            secrets: Default::default(),
            volume_context: volume_context.clone(),
        })
        .await
        .map_err(|s| {
            status_error(
                s,
                &format!("ControllerPublishVolume({volume_id}, {node_id})"),
            )
        })?
        .into_inner();
    // The CO creates the staging directory before NodeStage (CSI spec, NodeStageVolume).
    std::fs::create_dir_all(staging_path)
        .with_context(|| format!("creating {}", staging_path.display()))?;
    let mut node = NodeClient::new(
        connect(node_socket)
            .await
            .with_context(|| format!("connecting to the CSI node at {}", node_socket.display()))?,
    );
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: volume_id.to_string(),
        publish_context: publish.publish_context.clone(),
        staging_target_path: staging_path.display().to_string(),
        volume_capability: Some(block_single_writer()),
        secrets: Default::default(),
        volume_context,
    })
    .await
    .map_err(|s| status_error(s, &format!("NodeStageVolume({volume_id}) on {node_id}")))?;
    Ok(Staged {
        publish_context: publish.publish_context,
        staging_path: staging_path.to_path_buf(),
    })
}

/// A gRPC status as an error that names the call, the code and the driver's message.
pub fn status_error(status: tonic::Status, call: &str) -> anyhow::Error {
    anyhow::anyhow!("{call} failed: {:?}: {}", status.code(), status.message())
}
