//! VolumeRemap: one live mapping change under a cluster-wide quiesce (seed 004: the console
//! request, §6 failure matrix, §7 state machines).

use super::common::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a VolumeRemap. The whole spec is immutable: a remap is one operation.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.io",
    version = "v1alpha1",
    kind = "VolumeRemap",
    plural = "volumeremaps",
    shortname = "vremap",
    category = "tessera",
    status = "VolumeRemapStatus",
    doc = "A live change of a VirtualVolume's mapping, applied under a cluster-wide quiesce.",
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.volumeName"),
    printcolumn(
        name = "Operation",
        type_ = "string",
        json_path = ".spec.operation.type"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Attempt", type_ = "integer", json_path = ".status.attempt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a VolumeRemap spec is immutable; create a new VolumeRemap"))]
#[x_kube(validation = Rule::new("self.operation.type == 'ReleaseRanges' ? self.copy.mode == 'None' : self.copy.mode != 'None'").message("Move and EvacuateArea must copy data (copy.mode: Online); ReleaseRanges copies nothing (copy.mode: None)"))]
#[serde(rename_all = "camelCase")]
pub struct VolumeRemapSpec {
    /// The VirtualVolume to remap.
    #[schemars(length(min = 1, max = 253))]
    pub volume_name: String,
    pub operation: RemapOperation,
    /// Data copy while held (seed 004 fourth embodiment, online migration).
    #[serde(default)]
    pub copy: CopyPolicy,
    #[serde(default)]
    pub policy: RemapPolicy,
}

/// What to change. `type` selects which member must be set (a discriminated union).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("(self.type == 'Move') == has(self.move)").message("move must be set exactly when type is Move"))]
#[x_kube(validation = Rule::new("(self.type == 'EvacuateArea') == has(self.evacuateArea)").message("evacuateArea must be set exactly when type is EvacuateArea"))]
#[x_kube(validation = Rule::new("(self.type == 'ReleaseRanges') == has(self.releaseRanges)").message("releaseRanges must be set exactly when type is ReleaseRanges"))]
#[serde(rename_all = "camelCase")]
pub struct RemapOperation {
    #[serde(rename = "type")]
    pub type_: RemapOperationType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#move: Option<MoveRanges>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuate_area: Option<EvacuateArea>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_ranges: Option<ReleaseRanges>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RemapOperationType {
    Move,
    EvacuateArea,
    ReleaseRanges,
}

/// Move ranges of the volume to other areas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoveRanges {
    #[schemars(length(min = 1, max = 1024))]
    pub ranges: Vec<VolumeRange>,
    /// Areas the data may move to; empty lets placement choose.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub target_areas: Vec<String>,
}

/// Move every extent of the volume off one area.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvacuateArea {
    #[schemars(length(min = 1, max = 253))]
    pub area: String,
    /// Place the extents only on areas of other nodes than the evacuated area's: a rebuild
    /// after that node failed, whose other areas may still show Online until their heartbeats
    /// expire (docs/mirror.md §8).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other_nodes_only: bool,
}

/// Unmap ranges and return their extents to the pool (reclaim, seed 000 Fig. 7 and Fig. 9).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRanges {
    #[schemars(length(min = 1, max = 1024))]
    pub ranges: Vec<VolumeRange>,
    /// Unused: release only blocks still unused when re-checked under the hold.
    /// LowPriority: release low-priority data too (the data is lost).
    pub tier: super::ReclaimTier,
    /// Release every named mapped extent whatever it holds, without the re-check (its data is
    /// discarded): a mirror secondary returning its excess (ResizeToMatch, JP S2203). Not for
    /// reclaim.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discard: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CopyPolicy {
    #[serde(default)]
    pub mode: CopyMode,
    /// Bytes copied per hold cycle in Online mode.
    #[serde(default = "default_chunk")]
    #[x_kube(validation = Rule::new(SIZE_RULE).message(SIZE_MESSAGE))]
    pub chunk_bytes: i64,
}

impl Default for CopyPolicy {
    fn default() -> Self {
        Self {
            mode: CopyMode::default(),
            chunk_bytes: default_chunk(),
        }
    }
}

fn default_chunk() -> i64 {
    4 << 20
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum CopyMode {
    /// No data moves (release, or ranges that are holes).
    #[default]
    None,
    /// Copy in chunked cycles while I/O continues (seed 004 fourth embodiment).
    Online,
}

/// Failure handling of seed 004 §6.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemapPolicy {
    /// Continue without failed participants only if at least this many succeeded (seed 004
    /// [0046]: "two or more").
    #[serde(default = "default_min_succeeded")]
    #[schemars(range(min = 1))]
    pub min_succeeded_to_continue: i32,
    /// Retries after quiesce timeouts.
    #[serde(default = "default_max_retries")]
    #[schemars(range(min = 0, max = 100))]
    pub max_retries: i32,
    #[serde(default = "default_quiesce_timeout")]
    #[schemars(range(min = 1))]
    pub quiesce_timeout_ms: i64,
    /// A node reports HoldTimeout if held longer than this; it never resumes by itself.
    #[serde(default = "default_hold_timeout")]
    #[schemars(range(min = 1))]
    pub hold_timeout_ms: i64,
    #[serde(default = "default_commit_timeout")]
    #[schemars(range(min = 1))]
    pub commit_timeout_ms: i64,
}

impl Default for RemapPolicy {
    fn default() -> Self {
        Self {
            min_succeeded_to_continue: default_min_succeeded(),
            max_retries: default_max_retries(),
            quiesce_timeout_ms: default_quiesce_timeout(),
            hold_timeout_ms: default_hold_timeout(),
            commit_timeout_ms: default_commit_timeout(),
        }
    }
}

fn default_min_succeeded() -> i32 {
    2
}
fn default_max_retries() -> i32 {
    3
}
fn default_quiesce_timeout() -> i64 {
    5_000
}
fn default_hold_timeout() -> i64 {
    30_000
}
fn default_commit_timeout() -> i64 {
    5_000
}

/// Coordinator phases (seed 004 §7). Written to status before each step.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum RemapPhase {
    /// Accepted, not started.
    #[default]
    Pending,
    /// The new mapping is being staged beside the active one on every participant.
    Staging,
    /// Hold and drain on every participant.
    Quiescing,
    /// Online copy of the held chunk.
    Copying,
    /// Switching every participant to the staged mapping.
    Committing,
    /// Releasing the hold everywhere.
    Resuming,
    /// Committed and resumed everywhere.
    Succeeded,
    /// A commit failed; restoring the previous mapping while held.
    RollingBack,
    /// Ended without changing the mapping.
    Failed,
    /// Rollback or resume failed; the failed nodes are fenced.
    FailedRecovery,
}

impl RemapPhase {
    /// Ended (Succeeded, Failed, FailedRecovery): the mapping no longer changes.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RemapPhase::Succeeded | RemapPhase::Failed | RemapPhase::FailedRecovery
        )
    }

    /// Started and not ended: the participants were fixed and the mapping may change under a
    /// hold. A node that was not a participant must not stage the volume now (seed 004 AS-19).
    pub fn in_flight(self) -> bool {
        self != RemapPhase::Pending && !self.is_final()
    }
}

/// Observed state of a VolumeRemap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRemapStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RemapPhase>,
    /// Current attempt, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// Mapping generation the remap commits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<RemapParticipant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldDurations>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_progress: Option<CopyProgress>,
    /// Console message of seed 004 §4.14 for the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
}

/// A node taking part in the remap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemapParticipant {
    pub node: String,
    /// Last step the node completed: Staged, Held, Committed, Resumed, RolledBack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Excluded (and fenced) after a failure.
    #[serde(default)]
    pub excluded: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

/// How long I/O was held.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct HoldDurations {
    pub last_ms: i64,
    pub max_ms: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct CopyProgress {
    pub copied_bytes: i64,
    pub total_bytes: i64,
    pub percent: i32,
}
