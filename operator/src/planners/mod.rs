//! Pure planners: plain input structs in, decisions out. No I/O, no clock, no Kubernetes types.
//!
//! Controllers fill the inputs from `StoragePool`, `StorageArea`, `StoragePriorityClass`,
//! `StorageClaim` and `VirtualVolume` objects, call a planner, and apply the decision. Every
//! planner is deterministic: the same input gives the same output, so a restarted operator makes
//! the same choice again and tests can pin exact results.
//!
//! - [`allocation`] — admission and reclaim (seed 000 Fig. 6 and Fig. 7, [0043]–[0058]).
//! - [`accounting`] — write accounting (Fig. 8, [0059]–[0067]), release (Fig. 9, [0068]–[0074])
//!   and the pool counters 316–324 ([0021]–[0027]).
//! - [`charging`] — periodic charging (Fig. 10, [0075]–[0077]) in exact fixed-point decimal.
//! - [`placement`] — where a volume's extents go (seed 002 Fig. 7, [0119]–[0127]; seed 001 usage
//!   forms, [0017]–[0020]).
//! - [`remap`] — the VolumeRemap coordinator (seed 004 §6/§7.3), `step(state, event)`.
//! - [`migration`] — online migration copy states and routing (seed 004 Figs. 22–26).
//! - [`mirror`] — mirror pairs: pair states, the secondary mount check, secondary selection and
//!   the resync extent set (seed 003; docs/mirror.md), `step(state, event)`.
//!
//! **Unit.** All planners count in *extents*, the pool's allocation unit
//! (`StoragePool.spec.extentSizeBytes`), which is seed 000's "block" ([0017], [0031]). Only
//! [`charging`] works in bytes, because its rates are per GiB-hour (docs/decisions.md D-4).
//!
//! The decisions the patents leave open are recorded in `docs/planners.md`.

// Seed paragraph citations such as [0045] are references to the patents, not doc links.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod accounting;
pub mod allocation;
pub mod charging;
pub mod migration;
pub mod mirror;
pub mod placement;
pub mod remap;

use std::fmt;

use tessera_api::model::{ByteRange, ExtentSize, MapError};

/// A half-open range of extents `[start, start + len)`: virtual extents of a volume (reclaim,
/// accounting) or physical extents of an area (placement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentRange {
    /// First extent.
    pub start: u64,
    /// Number of extents.
    pub len: u64,
}

impl ExtentRange {
    pub const fn new(start: u64, len: u64) -> Self {
        ExtentRange { start, len }
    }

    /// One past the last extent (saturating, so a hostile input cannot overflow).
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the two ranges share at least one extent.
    pub const fn overlaps(&self, other: &ExtentRange) -> bool {
        self.start < other.end() && other.start < self.end()
    }

    /// The byte range these extents cover, for a `VolumeRange` or an area offset.
    pub fn to_byte_range(&self, extent_size: ExtentSize) -> Result<ByteRange, MapError> {
        let overflow = MapError::RangeOverflow {
            offset: self.start,
            length: self.len,
        };
        let offset = self
            .start
            .checked_mul(extent_size.get())
            .ok_or(overflow.clone())?;
        let length = self.len.checked_mul(extent_size.get()).ok_or(overflow)?;
        ByteRange::new(offset, length)
    }
}

impl fmt::Display for ExtentRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "extents [{}, {})", self.start, self.end())
    }
}

/// Merges touching and overlapping ranges into a sorted, minimal list.
pub fn coalesce(mut ranges: Vec<ExtentRange>) -> Vec<ExtentRange> {
    ranges.retain(|r| !r.is_empty());
    ranges.sort_unstable();
    let mut out: Vec<ExtentRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match out.last_mut() {
            Some(last) if range.start <= last.end() => {
                let end = last.end().max(range.end());
                last.len = end - last.start;
            }
            _ => out.push(range),
        }
    }
    out
}

/// Total number of extents in `ranges` (saturating).
pub fn total_len(ranges: &[ExtentRange]) -> u64 {
    ranges.iter().fold(0u64, |sum, r| sum.saturating_add(r.len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_touching_and_overlapping() {
        let merged = coalesce(vec![
            ExtentRange::new(10, 5),
            ExtentRange::new(0, 3),
            ExtentRange::new(3, 2),
            ExtentRange::new(12, 10),
            ExtentRange::new(40, 0),
        ]);
        assert_eq!(
            merged,
            vec![ExtentRange::new(0, 5), ExtentRange::new(10, 12)]
        );
        assert_eq!(total_len(&merged), 17);
    }

    #[test]
    fn byte_range_conversion() {
        let es = ExtentSize::new(4096).expect("valid extent size");
        let r = ExtentRange::new(2, 3).to_byte_range(es).expect("fits");
        assert_eq!((r.offset(), r.length()), (8192, 12288));
        assert!(ExtentRange::new(u64::MAX, 1).to_byte_range(es).is_err());
        assert!(ExtentRange::new(1, 2).overlaps(&ExtentRange::new(2, 1)));
        assert!(!ExtentRange::new(1, 2).overlaps(&ExtentRange::new(3, 1)));
    }
}
