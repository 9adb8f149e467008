//! StoragePool: the virtual pool areas are carved from (seed 000 mapping information 112 and
//! pool management information 114, [0017]–[0026]; seed 002 placement, Fig. 7).

use super::common::*;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default allocation unit: 4 MiB.
pub const DEFAULT_EXTENT_SIZE: i64 = 4 << 20;

/// CEL for the extent size: a power of two from 64 KiB to 1 GiB. CEL has no bit operations, so
/// the 15 allowed values are listed.
const EXTENT_SIZE_RULE: &str = "self in [65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456, 536870912, 1073741824]";

/// Desired state of a StoragePool.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.io",
    version = "v1alpha1",
    kind = "StoragePool",
    plural = "storagepools",
    shortname = "spool",
    category = "tessera",
    status = "StoragePoolStatus",
    doc = "A cluster-wide pool of extents carved from StorageAreas.",
    printcolumn(
        name = "Extent",
        type_ = "integer",
        json_path = ".spec.extentSizeBytes"
    ),
    printcolumn(name = "Total", type_ = "integer", json_path = ".status.totalBytes"),
    printcolumn(
        name = "Allocated",
        type_ = "integer",
        json_path = ".status.allocatedBytes"
    ),
    printcolumn(name = "InUse", type_ = "integer", json_path = ".status.inUseBytes"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolSpec {
    /// Allocation and accounting unit (the patent's "block", seed 000 [0017]). A power of two
    /// from 64 KiB to 1 GiB; immutable, because every mapping is expressed in it.
    #[serde(default = "default_extent_size")]
    #[x_kube(validation = Rule::new(EXTENT_SIZE_RULE).message("extentSizeBytes must be a power of two from 65536 (64 KiB) to 1073741824 (1 GiB)"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("extentSizeBytes is immutable"))]
    pub extent_size_bytes: i64,
    /// Where new extents go.
    #[serde(default)]
    pub placement: PlacementPolicy,
    /// What happens when a claim is larger than the unallocated space.
    #[serde(default)]
    pub reclaim: ReclaimPolicy,
    /// Periodic charging of stored data (seed 000 Fig. 10; unused space is free, [0076]). Absent:
    /// no charging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charging: Option<ChargingPolicy>,
}

fn default_extent_size() -> i64 {
    DEFAULT_EXTENT_SIZE
}

/// Placement over failure domains (seed 002 Fig. 7, [0119]–[0127]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementPolicy {
    /// Domains in the order placement tries them (seed 002 priority order, [0121]). Areas in
    /// domains not listed are tried after these, in name order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub domain_order: Vec<String>,
    /// How to choose among the areas of one domain.
    #[serde(default)]
    pub strategy: PlacementStrategy,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum PlacementStrategy {
    /// Fill one area before using the next (fewer areas per volume).
    #[default]
    Pack,
    /// Balance free space across areas.
    Spread,
}

/// Reclaim of other volumes' space (seed 000 Fig. 6 and Fig. 7).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReclaimPolicy {
    /// Tiers reclaim may use, in order. Empty: never reclaim; a claim that does not fit in the
    /// unallocated space is rejected.
    #[serde(default = "default_tiers")]
    #[schemars(length(max = 2))]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u == t))").message("tiers must not repeat"))]
    #[x_kube(validation = Rule::new("size(self) < 2 || self[0] == 'Unused'").message("Unused must come before LowPriority: data is released only when no unused space is left"))]
    pub tiers: Vec<ReclaimTier>,
    /// How victims are chosen.
    #[serde(default)]
    pub victim_policy: VictimPolicy,
    /// How long a victim has to give blocks back before it is skipped and reported.
    #[serde(default = "default_return_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub return_timeout_seconds: i32,
    /// Admission comparison of seed 000 [0045].
    #[serde(default)]
    pub admission: AdmissionRule,
}

impl Default for ReclaimPolicy {
    fn default() -> Self {
        Self {
            tiers: default_tiers(),
            victim_policy: VictimPolicy::default(),
            return_timeout_seconds: default_return_timeout(),
            admission: AdmissionRule::default(),
        }
    }
}

fn default_tiers() -> Vec<ReclaimTier> {
    vec![ReclaimTier::Unused, ReclaimTier::LowPriority]
}

fn default_return_timeout() -> i32 {
    60
}

/// A tier of reclaimable space (seed 000 [0053]–[0058]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ReclaimTier {
    /// Allocated blocks that hold no data.
    Unused,
    /// Blocks holding low-priority data.
    LowPriority,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum VictimPolicy {
    /// The volume with the most reclaimable blocks of the current tier first (seed 000 Fig. 7).
    #[default]
    LargestFirst,
    /// Only volumes whose priority class value is lower than the claim's, lowest first.
    LowerPriorityFirst,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum AdmissionRule {
    /// Admit when U + F + L > N: the patent's strict "more than" (seed 000 [0045]).
    #[default]
    Strict,
    /// Admit when U + F + L ≥ N.
    Inclusive,
}

/// Charging (seed 000 Fig. 10, [0075]–[0077]). Rates are decimal strings (up to 6 fractional
/// digits) so accrued charges are exact; unused blocks are free.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChargingPolicy {
    /// Length of one charging interval.
    #[serde(default = "default_charging_interval")]
    #[schemars(range(min = 1))]
    pub interval_seconds: i64,
    /// Charge per GiB-hour of high-priority data, e.g. "0.10".
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    #[serde(rename = "highPriorityRatePerGiBHour")]
    pub high_priority_rate_per_gib_hour: String,
    /// Charge per GiB-hour of low-priority data.
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    #[serde(rename = "lowPriorityRatePerGiBHour")]
    pub low_priority_rate_per_gib_hour: String,
}

fn default_charging_interval() -> i64 {
    3600
}

/// Observed state of a StoragePool. Byte counters follow seed 000 pool management information
/// 114 (counters 316–324, [0021], [0026]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolStatus {
    /// Capacity of all Online areas.
    #[serde(default)]
    pub total_bytes: i64,
    /// Allocated to virtual volumes.
    #[serde(default)]
    pub allocated_bytes: i64,
    /// total − allocated.
    #[serde(default)]
    pub unallocated_bytes: i64,
    /// Allocated and holding data.
    #[serde(default)]
    pub in_use_bytes: i64,
    /// Holding high-priority data.
    #[serde(default)]
    pub high_priority_bytes: i64,
    /// allocated − inUse: reclaimable without losing data.
    #[serde(default)]
    pub unused_bytes: i64,
    /// inUse − highPriority.
    #[serde(default)]
    pub low_priority_bytes: i64,
    /// Areas in the pool, and how many are Online.
    #[serde(default)]
    pub areas: i32,
    #[serde(default)]
    pub online_areas: i32,
    /// Virtual volumes in the pool.
    #[serde(default)]
    pub volumes: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, CapacityExhausted, Reclaiming.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
}
