//! VirtualVolume: one allocated volume and its mapping (seed 000 virtual area entry 300,
//! [0022]–[0025]; seed 002 mapping table, Fig. 4; seed 004 configuration information 221,
//! [0036]–[0037]). Mapping generations are tessera's own (docs/decisions.md).

use super::common::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a VirtualVolume. Created by the operator when it binds a claim.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.io",
    version = "v1alpha1",
    kind = "VirtualVolume",
    plural = "virtualvolumes",
    shortname = "vvol",
    category = "tessera",
    status = "VirtualVolumeStatus",
    doc = "A virtual volume built from extents of a StoragePool.",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.poolName"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".spec.sizeBytes"),
    printcolumn(name = "Copies", type_ = "integer", json_path = ".spec.copies"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.accessNode"),
    printcolumn(
        name = "Generation",
        type_ = "integer",
        json_path = ".status.mapping.generation"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.accessNode) || !has(self.sharedAccessNodes) || size(self.sharedAccessNodes) == 0").message("accessNode and sharedAccessNodes are exclusive"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualVolumeSpec {
    /// Logical size in bytes.
    #[x_kube(validation = Rule::new(SIZE_RULE).message(SIZE_MESSAGE))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("sizeBytes may grow but not shrink"))]
    pub size_bytes: i64,
    /// Pool the extents come from. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("poolName is immutable"))]
    pub pool_name: String,
    /// Priority class (data priority and reclaimability).
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: String,
    /// Replicas per extent (1–3).
    #[serde(default = "default_copies")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3").message("copies must be 1, 2 or 3"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("copies is immutable"))]
    pub copies: i32,
    /// Layout the claim asked for.
    #[serde(default)]
    pub layout: super::VolumeLayout,
    /// The claim this volume was allocated for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_ref: Option<ObjectRef>,
    /// The one node allowed to use the volume (the borrower, seed 001 [0028]). Set by
    /// ControllerPublish for single-node access modes; empty when not published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub access_node: Option<String>,
    /// The nodes a MULTI_NODE_MULTI_WRITER Block volume is published to (several nodes translate
    /// the same volume; every remap must quiesce all of them, seed 004). Exclusive with
    /// `accessNode`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub shared_access_nodes: Vec<String>,
}

impl VirtualVolumeSpec {
    /// Every node the volume is published to (the borrower or the shared writers).
    pub fn access_nodes(&self) -> Vec<&str> {
        self.access_node
            .iter()
            .chain(self.shared_access_nodes.iter())
            .map(String::as_str)
            .collect()
    }
}

fn default_copies() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum VolumePhase {
    /// Extents are being allocated.
    #[default]
    Pending,
    /// Mapped, not attached to any node.
    Available,
    /// Attached to at least one node.
    Attached,
    /// Being deleted; extents are returned to the pool.
    Releasing,
    /// Unusable; see conditions.
    Failed,
}

/// Observed state of a VirtualVolume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct VirtualVolumeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VolumePhase>,
    /// The committed mapping. Nodes translate I/O with exactly this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<VolumeMapping>,
    /// Usage counters from node reports (seed 000 [0023]–[0025]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<VolumeUsage>,
    /// Accrued charges (seed 000 Fig. 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge: Option<VolumeCharge>,
    /// Nodes that have the volume staged and the generation each applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<VolumeAttachment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Degraded, Remapping, ReturnRequested.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
    /// Area ranges an unfinished remap copies this volume into before it commits them (seed
    /// 004 fourth embodiment). Their lenders hand them to the volume (zeroed first) and grant
    /// them to its access nodes ahead of the commit, so the copy and the staged map can write
    /// them. Written by the remap coordinator before its first copy, removed when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<IncomingExtents>,
    /// The mirror pair this volume belongs to (seed 003), written by the mirror controller.
    /// Nodes that stage a primary set up its mirror leg from it; the lenders of a secondary
    /// grant its ranges to `writers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorLink>,
}

/// A volume's place in a mirror pair (`status.mirror`; docs/mirror.md §7).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorLink {
    /// The MirrorPair.
    pub pair: String,
    pub role: MirrorRole,
    /// The other volume of the pair.
    pub peer: String,
    /// Primary: what a node staging it does with writes. Secondary: unused.
    pub leg: MirrorLegMode,
    /// Secondary: nodes that write it as the primary's mirror leg (or copy into it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub writers: Vec<String>,
    /// Primary: a formation copy or resync is running. A node stages the primary only once it
    /// ends, so the copy's final pass holds every node that can write it (like NodeStage waits
    /// for an in-flight VolumeRemap, seed 004 AS-19).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copying: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MirrorRole {
    Primary,
    Secondary,
}

/// The primary's data path towards its secondary (seed 003 claim 1).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MirrorLegMode {
    /// Nothing goes to the secondary and nothing is tracked (before the formation, or after a
    /// failed one).
    Unpaired,
    /// Every write goes to both volumes (Copying, Paired, Resyncing).
    Mirror,
    /// Writes are only recorded as dirty (Split, or after the secondary failed).
    Track,
}

/// The destinations of the volume's unfinished remap (`status.incoming`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct IncomingExtents {
    /// The VolumeRemap that reserved them.
    pub remap: String,
    /// The node that copies when no node uses the volume: the lenders grant it the volume's
    /// committed and incoming ranges for the duration of the move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copier: Option<String>,
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub ranges: Vec<AreaRange>,
}

/// A byte range of one StorageArea.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AreaRange {
    pub area: String,
    #[schemars(range(min = 0))]
    pub area_offset: i64,
    #[schemars(range(min = 1))]
    pub length: i64,
}

/// Run-length encoded mapping from volume bytes to area bytes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMapping {
    /// Increases on every change of the mapping; nodes refuse stale generations (tessera design,
    /// seed 004 §11.3; the patent keeps nodes consistent by changing them together, [0041]).
    pub generation: i64,
    /// The pool's extent size when the mapping was made.
    pub extent_size_bytes: i64,
    /// Runs in volume order, covering the whole volume.
    #[serde(default)]
    pub extents: Vec<MappedRun>,
}

/// One run of the mapping: a volume range and where each replica of it lives. A run with no
/// replicas is a hole (reads as zeros; writing it needs allocation).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct MappedRun {
    pub offset: i64,
    pub length: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaLocation>,
}

/// Where one replica of a run lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaLocation {
    /// StorageArea name.
    pub area: String,
    /// Byte offset inside the area.
    pub area_offset: i64,
}

/// Usage counters in bytes (whole extents).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeUsage {
    pub allocated_bytes: i64,
    /// Extents that hold data (usage bitmap 332).
    pub in_use_bytes: i64,
    /// Extents that hold high-priority data (priority bitmap 334).
    pub high_priority_bytes: i64,
    /// When the last node report was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_time: Option<Time>,
}

/// Charges accrued by this volume. Decimal strings keep the sum exact.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeCharge {
    pub accrued: String,
    /// End of the last charged interval; a restart resumes from here, never charging twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_charged_time: Option<Time>,
}

/// A node that has the volume staged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachment {
    pub node: String,
    /// Mapping generation the node translates with.
    pub applied_generation: i64,
    pub state: AttachmentState,
    /// Areas whose replicas of this volume this node stopped writing after a failure (the
    /// volume is degraded there until the replicas are rebuilt).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub unhealthy_areas: Vec<String>,
}

/// I/O state of a node's view of the volume (seed 004 §7).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum AttachmentState {
    /// Serving I/O.
    #[default]
    Running,
    /// I/O held for a remap.
    Held,
    /// Excluded by the coordinator; never resumes by itself.
    Fenced,
}
