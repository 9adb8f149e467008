//! Byte arithmetic: sectors, byte ranges and the extent (allocation unit).
//!
//! All offsets in the model are byte offsets (volume offsets or area offsets). Seed 004 gives no
//! units for addresses and sizes (§4, §11.8 "units and alignment" is left to the project); seed 002
//! counts in sectors of unspecified size ([0072]). We use bytes everywhere and sectors only as the
//! alignment of volume sizes, because the kernel frontends (ublk, nbd, loop) expose 512-byte
//! logical sectors.

use std::fmt;
use std::num::NonZeroU64;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::error::MapError;

/// The logical sector size of every tessera block device, in bytes.
pub const SECTOR_SIZE: u64 = 512;

/// A half-open range of bytes `[offset, offset + length)`.
///
/// The constructor guarantees that the end fits in a `u64`, so [`ByteRange::end`] never
/// overflows. Empty ranges are allowed (a zero-length request is valid at any offset up to the
/// end of a volume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawByteRange", into = "RawByteRange")]
pub struct ByteRange {
    offset: u64,
    length: u64,
}

#[derive(Serialize, Deserialize)]
struct RawByteRange {
    offset: u64,
    length: u64,
}

impl TryFrom<RawByteRange> for ByteRange {
    type Error = MapError;
    fn try_from(raw: RawByteRange) -> Result<Self, MapError> {
        ByteRange::new(raw.offset, raw.length)
    }
}

impl From<ByteRange> for RawByteRange {
    fn from(range: ByteRange) -> Self {
        RawByteRange {
            offset: range.offset,
            length: range.length,
        }
    }
}

impl ByteRange {
    /// The range `[offset, offset + length)`; fails when the end does not fit in a `u64`.
    pub const fn new(offset: u64, length: u64) -> Result<Self, MapError> {
        match offset.checked_add(length) {
            Some(_) => Ok(ByteRange { offset, length }),
            None => Err(MapError::RangeOverflow { offset, length }),
        }
    }

    /// The range `[start, end)`, or `None` when `end < start`.
    pub const fn from_bounds(start: u64, end: u64) -> Option<Self> {
        match end.checked_sub(start) {
            Some(length) => Some(ByteRange {
                offset: start,
                length,
            }),
            None => None,
        }
    }

    pub const fn offset(&self) -> u64 {
        self.offset
    }

    pub const fn length(&self) -> u64 {
        self.length
    }

    /// One past the last byte. Cannot overflow (checked at construction).
    pub const fn end(&self) -> u64 {
        self.offset + self.length
    }

    pub const fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Whether byte `offset` lies inside the range.
    pub const fn contains(&self, offset: u64) -> bool {
        self.offset <= offset && offset < self.end()
    }

    /// Whether `other` lies entirely inside this range (an empty `other` must start inside or at
    /// the end).
    pub const fn contains_range(&self, other: &ByteRange) -> bool {
        self.offset <= other.offset && other.end() <= self.end()
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &ByteRange) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }

    /// The bytes both ranges share, or `None` when they share none.
    pub fn intersect(&self, other: &ByteRange) -> Option<ByteRange> {
        let start = self.offset.max(other.offset);
        let end = self.end().min(other.end());
        (start < end).then_some(ByteRange {
            offset: start,
            length: end - start,
        })
    }

    /// Splits into `[offset, at)` and `[at, end)`; `None` when `at` is outside `[offset, end]`.
    /// Either half may be empty.
    pub fn split_at(&self, at: u64) -> Option<(ByteRange, ByteRange)> {
        if at < self.offset || at > self.end() {
            return None;
        }
        Some((
            ByteRange {
                offset: self.offset,
                length: at - self.offset,
            },
            ByteRange {
                offset: at,
                length: self.end() - at,
            },
        ))
    }

    /// Splits the range at every multiple of `unit` (absolute offsets, not relative to the
    /// start): the pieces tile the range and none crosses a `unit` boundary. This is how a
    /// request is cut at extent boundaries (ARCHITECTURE §4 "Translation").
    pub fn split_at_multiples(&self, unit: NonZeroU64) -> SplitAtMultiples {
        SplitAtMultiples {
            cursor: self.offset,
            end: self.end(),
            unit: unit.get(),
        }
    }

    /// Whether both ends are multiples of `align` (`align` 0 is treated as "no alignment").
    pub const fn is_aligned(&self, align: u64) -> bool {
        align == 0 || (self.offset.is_multiple_of(align) && self.length.is_multiple_of(align))
    }

    /// Whether both ends fall on sector boundaries (what O_DIRECT needs).
    pub const fn is_sector_aligned(&self) -> bool {
        self.is_aligned(SECTOR_SIZE)
    }

    /// Indices of the extents this range touches (empty for an empty range).
    pub const fn extent_indices(&self, extent_size: ExtentSize) -> Range<u64> {
        if self.length == 0 {
            let i = extent_size.index_of(self.offset);
            return i..i;
        }
        extent_size.index_of(self.offset)..extent_size.index_of(self.end() - 1) + 1
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.offset, self.end())
    }
}

/// Iterator returned by [`ByteRange::split_at_multiples`].
#[derive(Debug, Clone)]
pub struct SplitAtMultiples {
    cursor: u64,
    end: u64,
    unit: u64,
}

impl Iterator for SplitAtMultiples {
    type Item = ByteRange;

    fn next(&mut self) -> Option<ByteRange> {
        if self.cursor >= self.end {
            return None;
        }
        let boundary = (self.cursor - self.cursor % self.unit).saturating_add(self.unit);
        let piece_end = boundary.min(self.end);
        let piece = ByteRange {
            offset: self.cursor,
            length: piece_end - self.cursor,
        };
        self.cursor = piece_end;
        Some(piece)
    }
}

impl std::iter::FusedIterator for SplitAtMultiples {}

/// The pool's allocation unit in bytes (seed 000's "block", `StoragePool.spec.extentSizeBytes`):
/// a power of two of at least one sector, so that extent arithmetic is shifts and masks and every
/// extent boundary is a sector boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ExtentSize(NonZeroU64);

impl ExtentSize {
    /// 4 MiB, the default of `StoragePool.spec.extentSizeBytes` (ARCHITECTURE §3).
    pub const DEFAULT: ExtentSize = match NonZeroU64::new(4 << 20) {
        Some(bytes) => ExtentSize(bytes),
        None => unreachable!(),
    };

    pub const fn new(bytes: u64) -> Result<Self, MapError> {
        match NonZeroU64::new(bytes) {
            Some(nz) if bytes.is_power_of_two() && bytes >= SECTOR_SIZE => Ok(ExtentSize(nz)),
            _ => Err(MapError::InvalidExtentSize { bytes }),
        }
    }

    pub const fn get(self) -> u64 {
        self.0.get()
    }

    pub const fn get_nonzero(self) -> NonZeroU64 {
        self.0
    }

    /// Index of the extent containing byte `offset`.
    pub const fn index_of(self, offset: u64) -> u64 {
        offset >> self.0.get().trailing_zeros()
    }

    /// First byte of extent `index`, or `None` when it does not fit in a `u64`.
    pub const fn start_of(self, index: u64) -> Option<u64> {
        index.checked_mul(self.0.get())
    }

    pub const fn is_aligned(self, offset: u64) -> bool {
        offset & (self.0.get() - 1) == 0
    }

    /// The start of the extent containing `offset`.
    pub const fn align_down(self, offset: u64) -> u64 {
        offset & !(self.0.get() - 1)
    }

    /// The first extent boundary at or after `offset`, or `None` on overflow.
    pub const fn align_up(self, offset: u64) -> Option<u64> {
        match offset.checked_add(self.0.get() - 1) {
            Some(v) => Some(self.align_down(v)),
            None => None,
        }
    }

    /// Number of extents needed to hold `bytes` (a partial last extent counts as one).
    pub const fn extents_for(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.0.get())
    }
}

impl TryFrom<u64> for ExtentSize {
    type Error = MapError;
    fn try_from(bytes: u64) -> Result<Self, MapError> {
        ExtentSize::new(bytes)
    }
}

impl From<ExtentSize> for u64 {
    fn from(size: ExtentSize) -> u64 {
        size.get()
    }
}

impl Default for ExtentSize {
    fn default() -> Self {
        ExtentSize::DEFAULT
    }
}

impl fmt::Display for ExtentSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, length: u64) -> ByteRange {
        ByteRange::new(offset, length).expect("test range fits")
    }

    #[test]
    fn range_end_is_checked() {
        assert_eq!(r(10, 5).end(), 15);
        assert_eq!(
            ByteRange::new(u64::MAX, 1),
            Err(MapError::RangeOverflow {
                offset: u64::MAX,
                length: 1
            })
        );
        assert_eq!(r(u64::MAX, 0).end(), u64::MAX);
        assert_eq!(ByteRange::from_bounds(5, 3), None);
        assert_eq!(ByteRange::from_bounds(3, 5), Some(r(3, 2)));
    }

    #[test]
    fn intersection_and_overlap() {
        assert_eq!(r(0, 10).intersect(&r(5, 10)), Some(r(5, 5)));
        assert_eq!(r(0, 10).intersect(&r(10, 10)), None);
        assert!(!r(0, 10).overlaps(&r(10, 1)));
        assert!(r(0, 10).overlaps(&r(9, 1)));
        assert!(r(0, 10).contains_range(&r(2, 8)));
        assert!(!r(0, 10).contains_range(&r(2, 9)));
        assert!(r(0, 10).contains(9) && !r(0, 10).contains(10));
    }

    #[test]
    fn split_at_and_multiples() {
        assert_eq!(r(10, 10).split_at(15), Some((r(10, 5), r(15, 5))));
        assert_eq!(r(10, 10).split_at(20), Some((r(10, 10), r(20, 0))));
        assert_eq!(r(10, 10).split_at(21), None);
        let unit = NonZeroU64::new(4096).expect("nonzero");
        let pieces: Vec<_> = r(4000, 5000).split_at_multiples(unit).collect();
        assert_eq!(pieces, vec![r(4000, 96), r(4096, 4096), r(8192, 808)]);
        assert_eq!(r(7, 0).split_at_multiples(unit).count(), 0);
        // No overflow at the top of the address space.
        let top: Vec<_> = r(u64::MAX - 10, 10).split_at_multiples(unit).collect();
        assert_eq!(top, vec![r(u64::MAX - 10, 10)]);
    }

    #[test]
    fn extent_size_validation_and_arithmetic() {
        assert!(ExtentSize::new(0).is_err());
        assert!(ExtentSize::new(256).is_err());
        assert!(ExtentSize::new(3 * 4096).is_err());
        let es = ExtentSize::new(4096).expect("valid");
        assert_eq!(es.index_of(8191), 1);
        assert_eq!(es.align_down(8191), 4096);
        assert_eq!(es.align_up(4097), Some(8192));
        assert_eq!(es.align_up(u64::MAX), None);
        assert_eq!(es.extents_for(4097), 2);
        assert_eq!(r(4095, 2).extent_indices(es), 0..2);
        assert_eq!(r(4096, 0).extent_indices(es), 1..1);
        assert_eq!(ExtentSize::DEFAULT.get(), 4 << 20);
    }

    #[test]
    fn serde_validates() {
        let ok: ByteRange = serde_json::from_str(r#"{"offset":1,"length":2}"#).expect("valid");
        assert_eq!(ok, r(1, 2));
        let overflow = format!(r#"{{"offset":{},"length":2}}"#, u64::MAX);
        assert!(serde_json::from_str::<ByteRange>(&overflow).is_err());
        assert!(serde_json::from_str::<ExtentSize>("1000").is_err());
        assert_eq!(
            serde_json::from_str::<ExtentSize>("4096").ok(),
            ExtentSize::new(4096).ok()
        );
    }
}
