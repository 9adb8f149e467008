//! StorageClaim: a request for a virtual volume (seed 000 area allocation command 400,
//! [0030]–[0031]; seed 002 construction conditions, [0101], [0120]; seed 001 usage forms,
//! [0017]–[0020]).

use super::common::*;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a StorageClaim.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.io",
    version = "v1alpha1",
    kind = "StorageClaim",
    plural = "storageclaims",
    shortname = "sclaim",
    category = "tessera",
    namespaced,
    status = "StorageClaimStatus",
    doc = "A request for a virtual volume from a StoragePool.",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.poolName"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".spec.sizeBytes"),
    printcolumn(
        name = "Class",
        type_ = "string",
        json_path = ".spec.priorityClassName"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Volume", type_ = "string", json_path = ".status.volumeName"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StorageClaimSpec {
    /// Pool to allocate from. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("poolName is immutable"))]
    pub pool_name: String,
    /// Requested size in bytes (rounded up to whole extents). May grow, never shrink.
    #[x_kube(validation = Rule::new(SIZE_RULE).message(SIZE_MESSAGE))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("sizeBytes may grow but not shrink"))]
    pub size_bytes: i64,
    /// StoragePriorityClass of the volume; decides its data priority and who may reclaim it.
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: String,
    /// Only areas of this media type are used (seed 002 [0120]). Empty: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub media_type: Option<String>,
    /// Number of replicas; 2 is seed 001's duplexed form ([0019]). Immutable.
    #[serde(default = "default_copies")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3").message("copies must be 1, 2 or 3"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("copies is immutable"))]
    pub copies: i32,
    /// Whether the volume must fit in one area or may span areas and nodes.
    #[serde(default)]
    pub layout: VolumeLayout,
    /// Node placement tries first (usually where the consuming pod runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub preferred_node: Option<String>,
}

fn default_copies() -> i32 {
    1
}

/// Usage forms of seed 001 [0017]–[0020]. A volume smaller than an area is seed 001's "split" form
/// automatically; duplexed is `copies: 2`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum VolumeLayout {
    /// Every replica lies in one area.
    Single,
    /// Replicas may be concatenated from extents of several areas and nodes (integrated form).
    #[default]
    Concatenated,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum ClaimPhase {
    /// Waiting for admission and placement.
    #[default]
    Pending,
    /// Admitted; other volumes are giving space back (seed 000 Fig. 7).
    Reclaiming,
    /// A VirtualVolume was allocated.
    Bound,
    /// Cannot be satisfied; `reason` says why. Nothing was allocated.
    Rejected,
}

/// Observed state of a StorageClaim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct StorageClaimStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClaimPhase>,
    /// The bound VirtualVolume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    /// Machine-readable reason for Rejected (e.g. InsufficientCapacity, NoMatchingArea).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Bytes actually allocated (whole extents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Admitted, Bound.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
}
