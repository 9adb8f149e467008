//! StorageArea: one disk, partition or file a node contributes to a pool (seed 001 registration
//! [0022]–[0023]; seed 002 real-volume information, Fig. 3, [0058]–[0062]).

use super::common::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a StorageArea.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.io",
    version = "v1alpha1",
    kind = "StorageArea",
    plural = "storageareas",
    shortname = "sarea",
    category = "tessera",
    status = "StorageAreaStatus",
    doc = "A disk, partition or file on one node, contributed to a StoragePool.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.poolName"),
    printcolumn(name = "Media", type_ = "string", json_path = ".spec.mediaType"),
    printcolumn(
        name = "Capacity",
        type_ = "integer",
        json_path = ".status.capacityBytes"
    ),
    printcolumn(
        name = "Allocated",
        type_ = "integer",
        json_path = ".status.allocatedBytes"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StorageAreaSpec {
    /// Node that owns the storage; its node plugin opens the area and serves it to peers.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeName is immutable"))]
    pub node_name: String,
    /// Absolute path of the block device or file on that node.
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("path must be absolute"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("path is immutable"))]
    pub path: String,
    /// Usable size in bytes. Files are created sparse at this size; for a block device, omit it
    /// to use the whole device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(SIZE_RULE).message(SIZE_MESSAGE))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("sizeBytes may grow but not shrink"))]
    pub size_bytes: Option<i64>,
    /// Media type used by placement (seed 002 real volume type, [0062], [0120]); a free string such
    /// as nvme, ssd or hdd.
    #[serde(default = "default_media_type")]
    #[schemars(length(min = 1, max = 63))]
    pub media_type: String,
    /// Failure domain (seed 002's per-SAN domain, [0036], [0049]–[0050]). Defaults to the node's
    /// `topology.kubernetes.io/zone` label when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub domain: Option<String>,
    /// Pool this area belongs to. Immutable: moving an area would orphan its extents.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("poolName is immutable"))]
    pub pool_name: String,
}

fn default_media_type() -> String {
    "ssd".to_string()
}

/// Lifecycle of an area.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum AreaPhase {
    /// Registered, not yet opened by its node.
    #[default]
    Pending,
    /// Opened by its node, heartbeating, serving extents.
    Online,
    /// Heartbeats stopped for longer than the configured timeout.
    Offline,
    /// The node could not open or validate the area.
    Failed,
}

/// Observed state of a StorageArea.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct StorageAreaStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AreaPhase>,
    /// Bytes usable for extents, as measured by the node (whole extents only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<i64>,
    /// Bytes of this area allocated to virtual volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<i64>,
    /// Identity written into the area header by the node plugin, so a device that moved or was
    /// replaced is not mistaken for this area.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_uid: Option<String>,
    /// `host:port` of the owning node's extent server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extent_server: Option<String>,
    /// Last heartbeat from the owning node (seed 002 liveness exchange, [0108]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Validated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
}
