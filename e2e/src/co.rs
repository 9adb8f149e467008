//! The harness as container orchestrator: the calls csi-provisioner (CreateVolume,
//! DeleteVolume), csi-attacher (ControllerPublish/Unpublish), csi-resizer
//! (ControllerExpandVolume) and kubelet (NodeStage/Publish/Unpublish/Unstage,
//! NodeExpandVolume) make, with the parameters they pass. Everything a scenario sets up is
//! recorded, so [`Orchestrator::cleanup`] can take it down again whatever failed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tessera_proto::csi::v1::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerPublishVolumeRequest,
    ControllerUnpublishVolumeRequest, CreateVolumeRequest, DeleteVolumeRequest,
    NodeExpandVolumeRequest, NodeGetInfoRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, Topology, TopologyRequirement,
    VolumeCapability,
    volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode},
};

use crate::csi::CsiConnection;
use crate::env::{Environment, IoPath, NodeFile, parse_nbd_unix_uri};
use crate::error::{E2eError, Result};
use crate::io::{VolumeIo, block_device_at};

/// StorageClass / provisioner parameter keys (contract "Controller ↔ API ↔ node").
pub const PARAM_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PARAM_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PARAM_POOL: &str = "tessera.io/pool";
pub const PARAM_PRIORITY_CLASS: &str = "tessera.io/priorityClass";
/// StorageClass parameter: replicas per extent (seed 001 [0019] duplexed volumes).
pub const PARAM_COPIES: &str = "tessera.io/copies";
/// volume_context key naming the claim as `namespace/name`.
pub const CONTEXT_CLAIM: &str = "tessera.io/claim";
/// publish_context key carrying the committed mapping generation.
pub const PUBLISH_GENERATION: &str = "tessera.io/generation";
/// Topology key of a node.
pub const TOPOLOGY_NODE_KEY: &str = "topology.tessera.io/node";

/// How the volume is consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// volumeMode: Block (the pod gets the device node).
    Block,
    /// volumeMode: Block, ReadWriteMany (MULTI_NODE_MULTI_WRITER): published to several nodes
    /// at once, each translating the volume itself (every remap quiesces all of them).
    SharedBlock,
    /// A filesystem of this type, mounted at the staging path and bind mounted into the pod.
    Mount { fs_type: String },
}

impl Access {
    pub fn capability(&self) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(match self {
                Access::Block | Access::SharedBlock => AccessType::Block(BlockVolume {}),
                Access::Mount { fs_type } => AccessType::Mount(MountVolume {
                    fs_type: fs_type.clone(),
                    ..Default::default()
                }),
            }),
            access_mode: Some(AccessMode {
                mode: match self {
                    Access::SharedBlock => Mode::MultiNodeMultiWriter as i32,
                    // ReadWriteOnce: seed 001's one borrower at a time ([0028]).
                    _ => Mode::SingleNodeWriter as i32,
                },
            }),
        }
    }
}

/// A provisioning request as csi-provisioner makes it for a PVC.
#[derive(Debug, Clone)]
pub struct VolumeRequest {
    /// The CSI volume name: csi-provisioner passes `pvc-<PVC uid>`.
    pub csi_name: String,
    /// The PVC's name (also the CSI name's suffix, `pvc-<uid>` in a real cluster).
    pub pvc: String,
    pub size_bytes: u64,
    pub priority_class: String,
    /// The node the scheduler picked (WaitForFirstConsumer): passed as preferred topology.
    pub preferred_node: Option<String>,
    pub access: Access,
    /// `tessera.io/copies` (absent: the driver's default, 1).
    pub copies: Option<u8>,
}

impl VolumeRequest {
    pub fn block(pvc: impl Into<String>, size_bytes: u64, priority_class: &str) -> Self {
        Self {
            csi_name: format!("pvc-{}", uuid::Uuid::new_v4()),
            pvc: pvc.into(),
            size_bytes,
            priority_class: priority_class.into(),
            preferred_node: None,
            access: Access::Block,
            copies: None,
        }
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.preferred_node = Some(node.into());
        self
    }
}

/// A volume CreateVolume returned.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub id: String,
    /// The CSI name the provisioner used (`pvc-<uid>`).
    pub csi_name: String,
    pub capacity_bytes: i64,
    pub context: HashMap<String, String>,
    pub access: Access,
}

impl Provisioned {
    /// The StorageClaim behind the volume, from the volume context (`namespace/name`).
    pub fn claim(&self) -> Result<(String, String)> {
        let value = self.context.get(CONTEXT_CLAIM).ok_or_else(|| {
            E2eError::Check(format!(
                "CreateVolume's volume_context of {} has no {CONTEXT_CLAIM}",
                self.id
            ))
        })?;
        let (ns, name) = value.split_once('/').ok_or_else(|| {
            E2eError::Check(format!("{CONTEXT_CLAIM}={value:?} is not namespace/name"))
        })?;
        Ok((ns.to_string(), name.to_string()))
    }
}

/// A volume published to a node and mounted for a pod: the state kubelet keeps.
#[derive(Debug, Clone)]
pub struct Attached {
    pub volume_id: String,
    pub node: String,
    pub publish_context: HashMap<String, String>,
    pub staging_path: PathBuf,
    /// The pod's path; `None` when the node has no kernel frontend and the volume was only
    /// staged (reached through its NBD export).
    pub target_path: Option<PathBuf>,
    pub access: Access,
}

impl Attached {
    /// Where the pod sees the volume (a Mount volume's directory, a Block volume's device).
    pub fn pod_path(&self) -> Result<&Path> {
        self.target_path.as_deref().ok_or_else(|| {
            E2eError::Check(format!(
                "{} is only staged on {} (no kernel frontend), not published",
                self.volume_id, self.node
            ))
        })
    }

    /// `volume_path` for NodeExpandVolume: the published path, else the staging path.
    fn volume_path(&self) -> &Path {
        self.target_path.as_deref().unwrap_or(&self.staging_path)
    }
}

#[derive(Debug, Clone)]
enum Step {
    Created(String),
    ControllerPublished {
        volume: String,
        node: String,
    },
    Staged {
        volume: String,
        node: String,
        path: PathBuf,
    },
    Published {
        volume: String,
        node: String,
        path: PathBuf,
    },
}

/// The orchestrator of one scenario.
pub struct Orchestrator<'e> {
    env: &'e Environment,
    controller: Option<CsiConnection>,
    nodes: HashMap<String, CsiConnection>,
    ledger: Vec<Step>,
}

impl<'e> Orchestrator<'e> {
    pub fn new(env: &'e Environment) -> Self {
        Self {
            env,
            controller: None,
            nodes: HashMap::new(),
            ledger: Vec::new(),
        }
    }

    pub fn env(&self) -> &'e Environment {
        self.env
    }

    async fn controller(&mut self) -> Result<CsiConnection> {
        if let Some(c) = &self.controller {
            return Ok(c.clone());
        }
        let c = CsiConnection::connect(&self.env.controller_socket).await?;
        self.controller = Some(c.clone());
        Ok(c)
    }

    async fn node(&mut self, name: &str) -> Result<CsiConnection> {
        if let Some(c) = self.nodes.get(name) {
            return Ok(c.clone());
        }
        let endpoint = self.env.node(name)?;
        let c = CsiConnection::connect(&endpoint.csi_socket).await?;
        self.nodes.insert(name.to_string(), c.clone());
        Ok(c)
    }

    /// NodeGetInfo's node id of `name` (what ControllerPublish must be given).
    pub async fn node_id(&mut self, name: &str) -> Result<String> {
        let node = self.node(name).await?;
        let info = node
            .node()
            .node_get_info(NodeGetInfoRequest {})
            .await
            .map_err(|status| csi_error("NodeGetInfo", name, status))?
            .into_inner();
        Ok(info.node_id)
    }

    /// CreateVolume as csi-provisioner sends it for a PVC in the environment's namespace
    /// (with `--extra-create-metadata`: the PVC name and namespace parameters).
    pub async fn create_volume(&mut self, req: &VolumeRequest) -> Result<Provisioned> {
        let csi_name = req.csi_name.clone();
        let mut parameters = HashMap::from([
            (PARAM_PVC_NAME.to_string(), req.pvc.clone()),
            (PARAM_PVC_NAMESPACE.to_string(), self.env.namespace.clone()),
            (PARAM_POOL.to_string(), self.env.pool.clone()),
            (PARAM_PRIORITY_CLASS.to_string(), req.priority_class.clone()),
        ]);
        if let Some(copies) = req.copies {
            parameters.insert(PARAM_COPIES.to_string(), copies.to_string());
        }
        // With WaitForFirstConsumer, csi-provisioner sends every node as requisite and the
        // scheduler's pick first among the preferred.
        let accessibility_requirements = req.preferred_node.as_ref().map(|picked| {
            let segment = |node: &str| Topology {
                segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), node.to_string())]),
            };
            let mut names: Vec<&str> = self.env.nodes.iter().map(|n| n.name.as_str()).collect();
            names.sort_by_key(|n| *n != picked.as_str());
            TopologyRequirement {
                requisite: names.iter().map(|n| segment(n)).collect(),
                preferred: names.iter().map(|n| segment(n)).collect(),
            }
        });
        let request = CreateVolumeRequest {
            name: csi_name.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: req.size_bytes as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![req.access.capability()],
            parameters,
            accessibility_requirements,
            ..Default::default()
        };
        let controller = self.controller().await?;
        let response = controller
            .controller()
            .create_volume(request)
            .await
            .map_err(|status| csi_error("CreateVolume", &csi_name, status))?
            .into_inner();
        let volume = response.volume.ok_or_else(|| {
            E2eError::Check(format!("CreateVolume {csi_name} returned no volume"))
        })?;
        self.ledger.push(Step::Created(volume.volume_id.clone()));
        Ok(Provisioned {
            id: volume.volume_id,
            csi_name,
            capacity_bytes: volume.capacity_bytes,
            context: volume.volume_context,
            access: req.access.clone(),
        })
    }

    pub async fn delete_volume(&mut self, volume_id: &str) -> Result<()> {
        let controller = self.controller().await?;
        controller
            .controller()
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume_id.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|status| csi_error("DeleteVolume", volume_id, status))?;
        self.ledger
            .retain(|s| !matches!(s, Step::Created(v) if v == volume_id));
        Ok(())
    }

    /// ControllerPublishVolume (csi-attacher for a VolumeAttachment).
    pub async fn controller_publish(
        &mut self,
        vol: &Provisioned,
        node: &str,
    ) -> Result<HashMap<String, String>> {
        let node_id = self.node_id(node).await?;
        let controller = self.controller().await?;
        let response = controller
            .controller()
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: vol.id.clone(),
                node_id,
                volume_capability: Some(vol.access.capability()),
                readonly: false,
                volume_context: vol.context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|status| {
                csi_error(
                    "ControllerPublishVolume",
                    &format!("{} → {node}", vol.id),
                    status,
                )
            })?
            .into_inner();
        self.ledger.push(Step::ControllerPublished {
            volume: vol.id.clone(),
            node: node.to_string(),
        });
        Ok(response.publish_context)
    }

    pub async fn controller_unpublish(&mut self, volume_id: &str, node: &str) -> Result<()> {
        let node_id = self.node_id(node).await?;
        let controller = self.controller().await?;
        controller
            .controller()
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume_id.to_string(),
                node_id,
                ..Default::default()
            })
            .await
            .map_err(|status| {
                csi_error(
                    "ControllerUnpublishVolume",
                    &format!("{volume_id} ← {node}"),
                    status,
                )
            })?;
        self.ledger.retain(|s| {
            !matches!(s, Step::ControllerPublished { volume, node: n } if volume == volume_id && n == node)
        });
        Ok(())
    }

    /// Staging and target paths the way kubelet lays them out (one pair per volume and node).
    fn paths(&self, volume_id: &str, node: &str) -> (PathBuf, PathBuf) {
        let base = self.env.work_dir.join(node).join(volume_id);
        (base.join("staging"), base.join("pod").join("volume"))
    }

    /// NodeStageVolume on `node` (kubelet, once per node).
    pub async fn node_stage(
        &mut self,
        vol: &Provisioned,
        node: &str,
        publish_context: &HashMap<String, String>,
    ) -> Result<PathBuf> {
        let (staging, _) = self.paths(&vol.id, node);
        // kubelet creates the staging directory before calling the plugin.
        std::fs::create_dir_all(&staging)
            .map_err(|e| E2eError::io(staging.display().to_string(), e))?;
        let conn = self.node(node).await?;
        conn.node()
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: vol.id.clone(),
                publish_context: publish_context.clone(),
                staging_target_path: path_string(&staging),
                volume_capability: Some(vol.access.capability()),
                volume_context: vol.context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|status| {
                csi_error("NodeStageVolume", &format!("{} on {node}", vol.id), status)
            })?;
        self.ledger.push(Step::Staged {
            volume: vol.id.clone(),
            node: node.to_string(),
            path: staging.clone(),
        });
        Ok(staging)
    }

    /// NodePublishVolume on `node` (kubelet, per pod).
    pub async fn node_publish(
        &mut self,
        vol: &Provisioned,
        node: &str,
        publish_context: &HashMap<String, String>,
    ) -> Result<PathBuf> {
        let (staging, target) = self.paths(&vol.id, node);
        // kubelet creates the parent of the target; the plugin creates the target itself (a
        // file for Block, a directory for Mount).
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| E2eError::io(parent.display().to_string(), e))?;
        }
        let conn = self.node(node).await?;
        conn.node()
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: vol.id.clone(),
                publish_context: publish_context.clone(),
                staging_target_path: path_string(&staging),
                target_path: path_string(&target),
                volume_capability: Some(vol.access.capability()),
                readonly: false,
                volume_context: vol.context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|status| {
                csi_error(
                    "NodePublishVolume",
                    &format!("{} on {node}", vol.id),
                    status,
                )
            })?;
        self.ledger.push(Step::Published {
            volume: vol.id.clone(),
            node: node.to_string(),
            path: target.clone(),
        });
        Ok(target)
    }

    pub async fn node_unpublish(
        &mut self,
        volume_id: &str,
        node: &str,
        target: &Path,
    ) -> Result<()> {
        let conn = self.node(node).await?;
        conn.node()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_string(),
                target_path: path_string(target),
            })
            .await
            .map_err(|status| {
                csi_error(
                    "NodeUnpublishVolume",
                    &format!("{volume_id} on {node}"),
                    status,
                )
            })?;
        self.ledger.retain(|s| {
            !matches!(s, Step::Published { volume, node: n, .. } if volume == volume_id && n == node)
        });
        Ok(())
    }

    pub async fn node_unstage(
        &mut self,
        volume_id: &str,
        node: &str,
        staging: &Path,
    ) -> Result<()> {
        let conn = self.node(node).await?;
        conn.node()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume_id.to_string(),
                staging_target_path: path_string(staging),
            })
            .await
            .map_err(|status| {
                csi_error(
                    "NodeUnstageVolume",
                    &format!("{volume_id} on {node}"),
                    status,
                )
            })?;
        self.ledger.retain(|s| {
            !matches!(s, Step::Staged { volume, node: n, .. } if volume == volume_id && n == node)
        });
        Ok(())
    }

    /// What happens when a pod using the volume starts on `node`: ControllerPublish, NodeStage,
    /// NodePublish. Without a kernel frontend a Block volume stops after NodeStage: the node
    /// cannot hand a pod a device, but the staged volume is served over NBD.
    pub async fn attach(&mut self, vol: &Provisioned, node: &str) -> Result<Attached> {
        let publish_context = self.controller_publish(vol, node).await?;
        let staging_path = self.node_stage(vol, node, &publish_context).await?;
        let target_path = if self.env.kernel_frontend {
            Some(self.node_publish(vol, node, &publish_context).await?)
        } else {
            None
        };
        Ok(Attached {
            volume_id: vol.id.clone(),
            node: node.to_string(),
            publish_context,
            staging_path,
            target_path,
            access: vol.access.clone(),
        })
    }

    /// What happens when the pod goes away: NodeUnpublish, NodeUnstage, ControllerUnpublish.
    pub async fn detach(&mut self, att: &Attached) -> Result<()> {
        if let Some(target) = &att.target_path {
            self.node_unpublish(&att.volume_id, &att.node, target)
                .await?;
        }
        self.node_unstage(&att.volume_id, &att.node, &att.staging_path)
            .await?;
        self.controller_unpublish(&att.volume_id, &att.node).await
    }

    /// ControllerExpandVolume (csi-resizer), then NodeExpandVolume on the node that has the
    /// volume staged (kubelet does it for a published volume whose node has EXPAND_VOLUME).
    /// Returns what the controller answered: the capacity and whether node expansion is needed.
    pub async fn expand(
        &mut self,
        vol: &Provisioned,
        new_size: u64,
        attached: Option<&Attached>,
    ) -> Result<(i64, bool)> {
        let controller = self.controller().await?;
        let response = controller
            .controller()
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: vol.id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: new_size as i64,
                    limit_bytes: 0,
                }),
                volume_capability: Some(vol.access.capability()),
                ..Default::default()
            })
            .await
            .map_err(|status| csi_error("ControllerExpandVolume", &vol.id, status))?
            .into_inner();
        if let Some(att) = attached {
            let conn = self.node(&att.node).await?;
            conn.node()
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: vol.id.clone(),
                    volume_path: path_string(att.volume_path()),
                    capacity_range: Some(CapacityRange {
                        required_bytes: new_size as i64,
                        limit_bytes: 0,
                    }),
                    staging_target_path: path_string(&att.staging_path),
                    volume_capability: Some(vol.access.capability()),
                    ..Default::default()
                })
                .await
                .map_err(|status| {
                    csi_error(
                        "NodeExpandVolume",
                        &format!("{} on {}", vol.id, att.node),
                        status,
                    )
                })?;
        }
        Ok((response.capacity_bytes, response.node_expansion_required))
    }

    /// Opens the volume's bytes on its node: the published device node when there is one (and
    /// the environment allows it), else the NBD export of the staged volume.
    pub async fn open_io(&self, att: &Attached) -> Result<VolumeIo> {
        let device = match (&att.access, &att.target_path) {
            (Access::Block, Some(target)) => block_device_at(target),
            _ => None,
        };
        match (self.env.io_path, device) {
            (IoPath::Auto | IoPath::Device, Some(dev)) => VolumeIo::open_device(&dev).await,
            (IoPath::Device, None) => Err(E2eError::Check(format!(
                "TESSERA_E2E_IO=device but {} on {} has no published block device (target {:?})",
                att.volume_id, att.node, att.target_path
            ))),
            (IoPath::Auto | IoPath::Nbd, _) => {
                let (socket, export) = self.nbd_export(&att.volume_id, &att.node)?;
                VolumeIo::open_nbd(&socket, &export).await
            }
        }
    }

    /// The NBD export of a volume staged on `node`: from the node's `node.json`, else the
    /// conventional `<state-dir>/nbd/<id>.sock`.
    pub fn nbd_export(&self, volume_id: &str, node: &str) -> Result<(PathBuf, String)> {
        let state_dir = self.env.node(node)?.state_dir.clone().ok_or_else(|| {
            E2eError::Config(format!(
                "node {node} has no state directory the harness can see, so its NBD exports \
                 are out of reach"
            ))
        })?;
        let node_file = state_dir.join("node.json");
        if node_file.exists() {
            let file = NodeFile::load(&node_file)?;
            if let Some(v) = file.volumes.get(volume_id) {
                return parse_nbd_unix_uri(&v.nbd_uri);
            }
        }
        Ok((
            state_dir.join("nbd").join(format!("{volume_id}.sock")),
            volume_id.to_string(),
        ))
    }

    /// Takes down everything still recorded, newest first, the way a CO would when the pods
    /// and PVCs go away. Errors are collected, not short-circuited.
    pub async fn cleanup(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        while let Some(step) = self.ledger.pop() {
            let result = match &step {
                Step::Published { volume, node, path } => {
                    self.node_unpublish(volume, node, path).await
                }
                Step::Staged { volume, node, path } => self.node_unstage(volume, node, path).await,
                Step::ControllerPublished { volume, node } => {
                    self.controller_unpublish(volume, node).await
                }
                Step::Created(volume) => self.delete_volume(volume).await,
            };
            if let Err(e) = result {
                errors.push(E2eError::Check(format!("cleanup {step:?}: {e}")));
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(E2eError::Many(errors)),
        }
    }
}

fn csi_error(call: &'static str, target: &str, status: tonic::Status) -> E2eError {
    E2eError::Csi {
        call,
        target: target.to_string(),
        status,
    }
}

fn path_string(p: &Path) -> String {
    p.display().to_string()
}
