//! The usage channel from node agents to the operator (seed 000 Fig. 8 write accounting,
//! [0059]–[0067]; decision in docs/operator.md "Usage channel").
//!
//! A node agent reports, per virtual volume it serves, which virtual extents hold data (usage
//! bitmap 332) and which of those hold high-priority data (data priority bitmap 334, [0028]).
//! The report is the node's *whole* current view, not a delta, so a repeated or re-ordered report
//! never double-counts (seed 000 §8.3: "make it idempotent: count only bit transitions").
//!
//! The report itself (the annotation `tessera.io/usage-report` and its wire format) is defined
//! once in `tessera_api::v1alpha1::usage_report`, shared with the node agent that writes it. The
//! operator derives `status.usage` from the report and the committed mapping: extents that are
//! holes in the mapping (released by reclaim) do not count, whatever the report says.

use tessera_api::v1alpha1::VolumeMapping;

// The wire format lives in the API crate, shared with the node agent that writes it.
use crate::planners::ExtentRange;
use crate::planners::accounting::{ExtentState, VolumeLedger, VolumeUsage};
pub use tessera_api::v1alpha1::usage_report::{UsageReport, UsageReportError};

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
