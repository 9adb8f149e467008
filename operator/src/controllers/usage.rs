//! The usage channel from node agents to the operator (seed 000 Fig. 8 write accounting,
//! [0059]–[0067]; decision in docs/operator.md "Usage channel").
//!
//! A node agent reports, per virtual volume it serves, which virtual extents hold data (usage
//! bitmap 332) and which of those hold high-priority data (data priority bitmap 334, [0028]).
//! The report is the node's *whole* current view, not a delta, so a repeated or re-ordered report
//! never double-counts (seed 000 §8.3: "make it idempotent: count only bit transitions").
//!
//! Until `VirtualVolume.status.usage` has fields for the bitmaps (the API change proposed in
//! docs/operator.md), the node writes the report as the annotation
//! [`USAGE_REPORT_ANNOTATION`](super::support::USAGE_REPORT_ANNOTATION) with one merge patch of
//! the object's metadata:
//!
//! ```json
//! {"sequence": 42, "node": "node-a", "inUse": "<base64 roaring>", "highPriority": "<base64 roaring>"}
//! ```
//!
//! Bitmaps are the portable roaring serialization of the extent indices (u32: up to 2³² extents
//! per volume), base64-encoded. The operator derives `status.usage` from the report and the
//! committed mapping: extents that are holes in the mapping (released by reclaim) do not count,
//! whatever the report says.

use std::ops::Range;

use k8s_openapi::ByteString;
use kube::ResourceExt;
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};
use tessera_api::v1alpha1::{VirtualVolume, VolumeMapping};

use super::support::USAGE_REPORT_ANNOTATION;
use crate::planners::ExtentRange;
use crate::planners::accounting::{ExtentState, VolumeLedger, VolumeUsage};

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

/// The virtual extents a wire mapping backs with storage (allocation bitmap 330), coalesced, in
/// volume order. A run's partial tail extent counts whole.
pub fn allocated_extent_ranges(mapping: &VolumeMapping) -> Vec<ExtentRange> {
    let es = mapping.extent_size_bytes.max(1) as u64;
    let ranges = mapping
        .extents
        .iter()
        .filter(|run| !run.replicas.is_empty() && run.length > 0)
        .map(|run| {
            let start = run.offset.max(0) as u64 / es;
            let end = (run.offset.max(0) as u64 + run.length as u64).div_ceil(es);
            ExtentRange::new(start, end - start)
        })
        .collect();
    crate::planners::coalesce(ranges)
}

/// Pool extents a wire mapping occupies on each area: `(area, area extents)` per replica piece.
pub fn area_pieces(mapping: &VolumeMapping) -> impl Iterator<Item = (&str, ExtentRange)> {
    let es = mapping.extent_size_bytes.max(1) as u64;
    mapping.extents.iter().flat_map(move |run| {
        let len = (run.length.max(0) as u64).div_ceil(es);
        run.replicas.iter().map(move |r| {
            (
                r.area.as_str(),
                ExtentRange::new(r.area_offset.max(0) as u64 / es, len),
            )
        })
    })
}

/// The state of every virtual extent of a volume of `size_bytes`: allocation from the committed
/// mapping, usage and priority from the node's report (seed 000 bitmaps 330/332/334 in one value,
/// see [`ExtentState`]). Without a report every allocated extent is unused.
pub fn extent_states(
    mapping: &VolumeMapping,
    size_bytes: i64,
    report: Option<&UsageReport>,
) -> Vec<ExtentState> {
    let es = mapping.extent_size_bytes.max(1) as u64;
    let extents = (size_bytes.max(0) as u64).div_ceil(es);
    let mut states = vec![ExtentState::Unallocated; extents as usize];
    for range in allocated_extent_ranges(mapping) {
        for i in range.start..range.end().min(extents) {
            let index = u32::try_from(i).ok();
            let in_use = index.is_some_and(|i| report.is_some_and(|r| r.in_use.contains(i)));
            let high = index.is_some_and(|i| report.is_some_and(|r| r.high_priority.contains(i)));
            states[i as usize] = match (in_use, high) {
                (false, _) => ExtentState::Unused,
                (true, false) => ExtentState::LowPriority,
                (true, true) => ExtentState::HighPriority,
            };
        }
    }
    states
}

/// Counters 307/308/310 of the volume (virtual extents) from its extent states (the popcounts of
/// seed 000 §3.4).
pub fn usage_of(states: &[ExtentState]) -> VolumeUsage {
    VolumeLedger::from_states("", 1, states.to_vec()).usage()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::v1alpha1::{MappedRun, ReplicaLocation};

    const ES: i64 = 1 << 20;

    fn mapping() -> VolumeMapping {
        VolumeMapping {
            generation: 2,
            extent_size_bytes: ES,
            extents: vec![
                MappedRun {
                    offset: 0,
                    length: 4 * ES,
                    replicas: vec![ReplicaLocation {
                        area: "a".into(),
                        area_offset: 8 * ES,
                    }],
                },
                MappedRun {
                    offset: 4 * ES,
                    length: 2 * ES,
                    replicas: vec![],
                },
                MappedRun {
                    offset: 6 * ES,
                    length: 2 * ES,
                    replicas: vec![ReplicaLocation {
                        area: "b".into(),
                        area_offset: 0,
                    }],
                },
            ],
        }
    }

    #[test]
    fn report_round_trips_through_the_annotation() {
        let report = UsageReport::new(7, "n1")
            .written(0..3, true)
            .written(2..3, false);
        let back = UsageReport::decode(&report.encode()).expect("decodes");
        assert_eq!(back, report);
        assert_eq!(back.in_use.len(), 3);
        assert_eq!(
            back.high_priority.len(),
            2,
            "a rewrite with low priority clears the bit"
        );
        assert!(UsageReport::decode("{").is_err());
    }

    #[test]
    fn holes_never_count_whatever_the_report_says() {
        // Extents 0..2 high, 2..3 low, 4..5 reported written but a hole now (released).
        let report = UsageReport::new(1, "n1")
            .written(0..2, true)
            .written(2..3, false)
            .written(4..5, false);
        let mapping = mapping();
        let states = extent_states(&mapping, 8 * ES, Some(&report));
        use ExtentState::*;
        assert_eq!(
            states,
            vec![
                HighPriority,
                HighPriority,
                LowPriority,
                Unused,
                Unallocated,
                Unallocated,
                Unused,
                Unused
            ]
        );
        let usage = usage_of(&states);
        assert_eq!(
            (usage.allocated(), usage.in_use(), usage.high_priority()),
            (6, 3, 2)
        );
        assert_eq!(
            allocated_extent_ranges(&mapping),
            vec![ExtentRange::new(0, 4), ExtentRange::new(6, 2)]
        );
        let pieces: Vec<_> = area_pieces(&mapping).collect();
        assert_eq!(
            pieces,
            vec![("a", ExtentRange::new(8, 4)), ("b", ExtentRange::new(0, 2))]
        );
    }
}
