//! Types and defaults shared by several kinds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Conditions are the standard `metav1.Condition` (type, status, reason, message,
/// lastTransitionTime, observedGeneration), as every Kubernetes controller reports them.
pub type Conditions = Vec<Condition>;

/// Every byte size in the API is a positive multiple of this (one filesystem block; areas and
/// extents are addressed in it).
pub const SIZE_ALIGNMENT: i64 = 4096;

/// CEL rule and message for a byte size: positive and a multiple of [`SIZE_ALIGNMENT`].
pub(crate) const SIZE_RULE: &str = "self > 0 && self % 4096 == 0";
pub(crate) const SIZE_MESSAGE: &str = "must be a positive multiple of 4096 bytes";

/// A byte range of a virtual volume. Offsets and lengths are multiples of 4096; the operator
/// further requires them to be aligned to the pool's extent size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.offset % 4096 == 0").message("offset must be a multiple of 4096 bytes"))]
pub struct VolumeRange {
    /// Start of the range, in bytes from the start of the volume.
    #[schemars(range(min = 0))]
    pub offset: i64,
    /// Length of the range in bytes.
    #[x_kube(validation = Rule::new(SIZE_RULE).message(SIZE_MESSAGE))]
    pub length: i64,
}

/// Priority tier of stored data (seed 000 flag 424, [0033]): high-priority data is never
/// reclaimed; low-priority data may be released when the pool is full.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum DataPriority {
    #[default]
    High,
    Low,
}

/// Reference to a namespaced object (the claim behind a volume).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

pub(crate) fn default_true() -> bool {
    true
}
