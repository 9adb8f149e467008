//! The node → operator usage report (seed 000 bitmaps 332/334), written by the node agent as the
//! annotation [`USAGE_REPORT_ANNOTATION`] on a VirtualVolume and read by the operator (decision in
//! docs/operator.md "Usage channel"). One definition of the wire format for both sides.
//!
//! ```json
//! {"sequence": 42, "node": "node-a", "inUse": "<base64 roaring>", "highPriority": "<base64 roaring>"}
//! ```
//!
//! Bitmaps are the portable roaring serialization of the virtual extent indices (u32),
//! base64-encoded. A report is the node's whole current view, not a delta, so a repeated or
//! re-ordered report never double-counts (seed 000 §8.3).

use std::ops::Range;

use k8s_openapi::ByteString;
use kube::ResourceExt;
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use super::VirtualVolume;

/// The node's usage report on a VirtualVolume.
pub const USAGE_REPORT_ANNOTATION: &str = "tessera.io/usage-report";

/// Why a usage report was refused.
#[derive(Debug, thiserror::Error)]
pub enum UsageReportError {
    #[error("the usage report is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the usage report's {field} bitmap is not a roaring bitmap: {source}")]
    Bitmap {
        field: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One node's report of a volume's extent states.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageReport {
    /// Increases with every report of the node (for the node's own bookkeeping and logs; a
    /// report is a full view, so the operator always applies the latest one).
    pub sequence: u64,
    /// The reporting node.
    pub node: String,
    /// Virtual extents holding data (bitmap 332).
    pub in_use: RoaringBitmap,
    /// Virtual extents holding high-priority data (bitmap 334); only meaningful where `in_use`.
    pub high_priority: RoaringBitmap,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireReport {
    sequence: u64,
    node: String,
    in_use: ByteString,
    high_priority: ByteString,
}

fn to_bytes(bitmap: &RoaringBitmap) -> ByteString {
    let mut optimized = bitmap.clone();
    optimized.optimize();
    let mut bytes = Vec::with_capacity(optimized.serialized_size());
    // Writing into a Vec cannot fail.
    let _ = optimized.serialize_into(&mut bytes);
    ByteString(bytes)
}

fn from_bytes(field: &'static str, bytes: &ByteString) -> Result<RoaringBitmap, UsageReportError> {
    RoaringBitmap::deserialize_from(bytes.0.as_slice())
        .map_err(|source| UsageReportError::Bitmap { field, source })
}

impl UsageReport {
    pub fn new(sequence: u64, node: impl Into<String>) -> Self {
        UsageReport {
            sequence,
            node: node.into(),
            ..UsageReport::default()
        }
    }

    /// Marks `extents` as written with data of the given priority (a test and node helper).
    pub fn written(mut self, extents: Range<u32>, high_priority: bool) -> Self {
        self.in_use.insert_range(extents.clone());
        if high_priority {
            self.high_priority.insert_range(extents);
        } else {
            self.high_priority.remove_range(extents);
        }
        self
    }

    /// The annotation value.
    pub fn encode(&self) -> String {
        let wire = WireReport {
            sequence: self.sequence,
            node: self.node.clone(),
            in_use: to_bytes(&self.in_use),
            high_priority: to_bytes(&self.high_priority),
        };
        serde_json::to_string(&wire).unwrap_or_default()
    }

    pub fn decode(value: &str) -> Result<Self, UsageReportError> {
        let wire: WireReport = serde_json::from_str(value)?;
        Ok(UsageReport {
            sequence: wire.sequence,
            node: wire.node,
            in_use: from_bytes("inUse", &wire.in_use)?,
            high_priority: from_bytes("highPriority", &wire.high_priority)?,
        })
    }

    /// The report on a volume, if its node has sent one.
    pub fn of_volume(volume: &VirtualVolume) -> Result<Option<Self>, UsageReportError> {
        volume
            .annotations()
            .get(USAGE_REPORT_ANNOTATION)
            .map(|v| Self::decode(v))
            .transpose()
    }
}
