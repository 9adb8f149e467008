//! StoragePriorityClass: the priority of a volume's data and whether others may reclaim it
//! (seed 000 [0033], [0053]–[0058]).

use super::common::*;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a StoragePriorityClass.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.io",
    version = "v1alpha1",
    kind = "StoragePriorityClass",
    plural = "storagepriorityclasses",
    shortname = "spc",
    category = "tessera",
    status = "StoragePriorityClassStatus",
    doc = "Priority of a volume's data and which of its space may be reclaimed for other claims.",
    printcolumn(name = "Value", type_ = "integer", json_path = ".spec.value"),
    printcolumn(name = "Data", type_ = "string", json_path = ".spec.dataPriority"),
    printcolumn(
        name = "Unused",
        type_ = "boolean",
        json_path = ".spec.reclaimable.unused"
    ),
    printcolumn(
        name = "LowData",
        type_ = "boolean",
        json_path = ".spec.reclaimable.lowPriorityData"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StoragePriorityClassSpec {
    /// Higher wins. With the pool's `LowerPriorityFirst` victim policy a claim only reclaims
    /// from volumes whose class value is lower than its own.
    pub value: i32,
    /// Priority of data written to volumes of this class (seed 000 flag 424). High-priority
    /// data is never reclaimed.
    #[x_kube(validation = Rule::new("self == oldSelf").message("dataPriority is immutable: data already written keeps the priority it was written with"))]
    pub data_priority: DataPriority,
    /// Which tiers of these volumes' space other claims may take.
    #[serde(default)]
    pub reclaimable: Reclaimable,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// Tiers of a volume that reclaim may release (seed 000 Fig. 7: unused blocks first, then
/// low-priority data).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reclaimable {
    /// Allocated blocks that hold no data may be taken back.
    #[serde(default = "default_true")]
    pub unused: bool,
    /// Blocks holding low-priority data may be released (the data is lost).
    #[serde(default = "default_true")]
    pub low_priority_data: bool,
}

impl Default for Reclaimable {
    fn default() -> Self {
        Self {
            unused: true,
            low_priority_data: true,
        }
    }
}

/// Observed state of a StoragePriorityClass.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct StoragePriorityClassStatus {
    /// Number of virtual volumes of this class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
}
