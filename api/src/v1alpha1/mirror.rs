//! MirrorPair: a primary volume mirrored to a secondary, split and resynced, with the
//! secondary mount check (seed 003; seed 001 [0019] duplexed form).

use super::common::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label of a VirtualVolume that may be chosen automatically as a secondary
/// (`secondarySelection`): value `SecondaryCandidate` (JP 2001-318833 attribute "secondary",
/// docs/mirror.md M-19). Volumes without it hold user data and are never chosen.
pub const MIRROR_ROLE_LABEL: &str = "tessera.io/mirror-role";

/// Desired state of a MirrorPair.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.io",
    version = "v1alpha1",
    kind = "MirrorPair",
    plural = "mirrorpairs",
    shortname = "mpair",
    category = "tessera",
    status = "MirrorPairStatus",
    doc = "A primary VirtualVolume mirrored to a secondary (seed 003).",
    printcolumn(name = "Primary", type_ = "string", json_path = ".spec.primary"),
    printcolumn(
        name = "Secondary",
        type_ = "string",
        json_path = ".status.secondaryName"
    ),
    printcolumn(name = "Desired", type_ = "string", json_path = ".spec.desiredState"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.copyProgressPercent"
    ),
    printcolumn(name = "Dirty", type_ = "integer", json_path = ".status.dirtyBytes"),
    printcolumn(name = "LastSync", type_ = "date", json_path = ".status.lastSyncTime"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.secondary) != has(self.secondarySelection)").message("exactly one of secondary or secondarySelection must be set"))]
#[x_kube(validation = Rule::new("(has(self.secondary) ? has(oldSelf.secondary) && self.secondary == oldSelf.secondary : !has(oldSelf.secondary)) && (has(self.secondarySelection) ? has(oldSelf.secondarySelection) && self.secondarySelection == oldSelf.secondarySelection : !has(oldSelf.secondarySelection))").message("secondary and secondarySelection are immutable"))]
#[serde(rename_all = "camelCase")]
pub struct MirrorPairSpec {
    /// Primary VirtualVolume (the main volume). Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("primary is immutable"))]
    pub primary: String,
    /// Existing VirtualVolume to use as the secondary (sub volume). Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secondary: Option<String>,
    /// How to choose or create a secondary when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_selection: Option<SecondarySelection>,
    /// Paired: mirror every write. Split: freeze the secondary at one instant.
    #[serde(default)]
    pub desired_state: MirrorState,
    /// What the mount check does when the secondary is in use somewhere (seed 003 claim 1).
    #[serde(default)]
    pub mount_check: MountCheckPolicy,
    /// Proceed with pairing or resync even though the secondary is reported mounted. Only
    /// meaningful with `mountCheck: Block`.
    #[serde(default)]
    pub override_mount_check: bool,
}

/// Secondary selection embodiments of the referenced JP 2001-318833 (seed 003).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SecondarySelection {
    /// A volume of exactly the primary's size.
    SameSize,
    /// The smallest volume at least the primary's size.
    SameOrLarger,
    /// Any volume; extents are returned or added so the sizes match.
    ResizeToMatch,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum MirrorState {
    #[default]
    Paired,
    Split,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum MountCheckPolicy {
    /// Emit a Warning event and set the SecondaryMounted condition, then continue.
    #[default]
    Warn,
    /// Warn and wait until no node has the secondary mounted (or the override is set).
    Block,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum MirrorPhase {
    /// Not paired yet.
    #[default]
    Simplex,
    /// Formation copy in progress.
    Copying,
    /// Writes are mirrored synchronously.
    Paired,
    /// The secondary is a frozen point-in-time image; primary writes are tracked as dirty.
    Split,
    /// Copying dirty extents back into the secondary.
    Resyncing,
    Failed,
}

/// Observed state of a MirrorPair.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct MirrorPairStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MirrorPhase>,
    /// The secondary in use (named or selected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_name: Option<String>,
    /// Progress of the current formation copy or resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_progress_percent: Option<i32>,
    /// Bytes changed on the primary since the split (dirty bitmap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<i64>,
    /// When the secondary was last identical to the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Answers of the last mount inquiry (seed 003).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secondary_accessors: Vec<SecondaryAccessor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Synchronized, SecondaryMounted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
}

/// One node's answer to the mount inquiry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecondaryAccessor {
    pub node: String,
    pub mounted: MountAnswer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
}

/// `Unknown` (no answer) warns like `True`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MountAnswer {
    True,
    False,
    Unknown,
}
