//! `tessera attach <volume> [--node N]`: publishes a volume to a node and stages it as a Block
//! volume there, which (as root, with FUSE and loop devices) gives a kernel block device
//! (ARCHITECTURE §9: "as root, `tessera attach` turns it into a real block device").

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::ResourceExt;
use kube::api::Api;
use tessera_api::v1alpha1::{StorageClaim, VirtualVolume};

use crate::endpoints::{Endpoints, NodeFile};

/// What `attach` found.
#[derive(Debug, Clone)]
pub struct Attached {
    pub volume_id: String,
    pub node: String,
    pub device: String,
    pub nbd_uri: String,
}

/// Why a kernel device cannot be had here, if it cannot.
pub fn kernel_frontend_problem() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some(
            "tessera attach needs root: the node agent attaches the volume through FUSE and a \
             loop device (without root, use the volume's NBD URI from endpoints.json)"
                .into(),
        );
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!(
                "no kernel frontend: {dev} is missing (load the fuse and loop modules); the \
                 volume stays reachable over its NBD URI from endpoints.json"
            ));
        }
    }
    None
}

/// Resolves `name` as a VirtualVolume, or else as a StorageClaim in `default` bound to one.
pub async fn resolve_volume(client: &kube::Client, name: &str) -> Result<VirtualVolume> {
    let volumes: Api<VirtualVolume> = Api::all(client.clone());
    if let Some(v) = volumes.get_opt(name).await? {
        return Ok(v);
    }
    let claims: Api<StorageClaim> = Api::namespaced(client.clone(), "default");
    if let Some(claim) = claims.get_opt(name).await?
        && let Some(vol) = claim.status.as_ref().and_then(|s| s.volume_name.clone())
        && let Some(v) = volumes.get_opt(&vol).await?
    {
        return Ok(v);
    }
    bail!("no VirtualVolume {name:?} (nor a bound StorageClaim default/{name})")
}

/// The volume_context the controller returns for a volume (CSI contract), rebuilt from the
/// VirtualVolume so NodeStage sees what kubelet would pass.
pub fn volume_context(v: &VirtualVolume) -> HashMap<String, String> {
    let mut ctx = HashMap::from([
        ("tessera.io/pool".to_string(), v.spec.pool_name.clone()),
        (
            "tessera.io/priorityClass".to_string(),
            v.spec.priority_class_name.clone(),
        ),
    ]);
    if let Some(c) = &v.spec.claim_ref {
        ctx.insert(
            "tessera.io/claim".into(),
            format!("{}/{}", c.namespace, c.name),
        );
    }
    ctx
}

/// Publishes `volume` to `node` (default: where it is already attached, else the first node)
/// and stages it there as a Block volume; returns the kernel device the node attached.
pub async fn attach(data_dir: &Path, volume: &str, node: Option<&str>) -> Result<Attached> {
    if let Some(problem) = kernel_frontend_problem() {
        bail!(problem);
    }
    let endpoints_path = data_dir.join("endpoints.json");
    let endpoints = Endpoints::load(&endpoints_path)
        .with_context(|| "is `tessera local` running on this data directory?".to_string())?;
    let client = crate::local::client_from_kubeconfig(&endpoints.kubeconfig).await?;
    let vol = resolve_volume(&client, volume).await?;
    let volume_id = vol.name_any();
    let node = node
        .map(str::to_string)
        .or_else(|| vol.spec.access_node.clone())
        .or_else(|| endpoints.nodes.first().map(|n| n.name.clone()))
        .context("endpoints.json lists no node")?;
    let node_ep = endpoints.node(&node).with_context(|| {
        format!(
            "no node {node} in {} (nodes: {})",
            endpoints_path.display(),
            endpoints
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    crate::csi_client::publish_and_stage(
        &endpoints.controller.csi_socket,
        &node_ep.csi_socket,
        &node,
        &volume_id,
        volume_context(&vol),
        &crate::demo::staging_path(data_dir, &node, &volume_id),
    )
    .await?;
    let node_json = node_ep.state_dir.join("node.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(file) = NodeFile::load(&node_json)
            && let Some(v) = file.volumes.get(&volume_id)
        {
            match &v.device {
                Some(device) => {
                    return Ok(Attached {
                        volume_id,
                        node,
                        device: device.clone(),
                        nbd_uri: v.nbd_uri.clone(),
                    });
                }
                None => bail!(
                    "{node} staged {volume_id} but attached no kernel block device (no kernel \
                     frontend on this node: see {}); it is reachable over {}",
                    data_dir.join("logs").join(format!("{node}.log")).display(),
                    v.nbd_uri
                ),
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} does not list {volume_id} 30 s after NodeStage",
                node_json.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
