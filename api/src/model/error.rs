//! The one error type of the domain model.

use super::extent_map::AreaId;
use super::generation::Generation;
use super::units::SECTOR_SIZE;

/// Why a byte range, an extent map, an edit or a diff was refused.
///
/// Offsets are volume byte offsets unless the field says `area_offset`. Every variant carries
/// enough of the offending input to write a useful condition message or gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// `offset + length` does not fit in a `u64`.
    #[error("range at offset {offset} with length {length} overflows a 64-bit byte offset")]
    RangeOverflow { offset: u64, length: u64 },

    /// The extent size is not a power of two of at least one sector.
    #[error("extent size {bytes} is not a power of two of at least {SECTOR_SIZE} bytes")]
    InvalidExtentSize { bytes: u64 },

    /// A block device cannot end inside a sector.
    #[error("volume size {size_bytes} is not a multiple of the {SECTOR_SIZE}-byte sector")]
    UnalignedVolumeSize { size_bytes: u64 },

    /// A run of length zero.
    #[error("run at offset {offset} has length 0")]
    EmptyRun { offset: u64 },

    /// The runs leave bytes of the volume unmapped between two runs (or before the first).
    #[error("gap in the mapping: the previous run ends at {expected}, the next starts at {found}")]
    RunGap { expected: u64, found: u64 },

    /// A run starts before the previous one ended: runs are unsorted or overlap.
    #[error(
        "run at offset {found} overlaps or precedes the previous run, which ends at {expected}"
    )]
    RunOverlap { expected: u64, found: u64 },

    /// The last run ends beyond the volume.
    #[error("runs reach offset {end}, past the end of the {size_bytes}-byte volume")]
    RunsPastEnd { end: u64, size_bytes: u64 },

    /// The runs stop before the end of the volume.
    #[error("runs cover only {covered} of {size_bytes} bytes")]
    RunsShort { covered: u64, size_bytes: u64 },

    /// A run boundary that is not an extent boundary (only the volume's tail may be partial).
    #[error(
        "run at offset {offset} with length {length} is not aligned to the {extent_size}-byte extent"
    )]
    MisalignedRun {
        offset: u64,
        length: u64,
        extent_size: u64,
    },

    /// Mapped runs of one volume must all have the volume's number of copies.
    #[error("run at offset {offset} has {found} replicas, other runs have {expected}")]
    ReplicaCountMismatch {
        offset: u64,
        expected: usize,
        found: usize,
    },

    /// A replica without an area name.
    #[error("run at offset {offset} has a replica with an empty area name")]
    EmptyAreaId { offset: u64 },

    /// Area space is handed out in whole extents, so a replica must start on an extent boundary.
    #[error(
        "run at offset {offset}: replica on area {area} starts at area offset {area_offset}, \
         not a multiple of the {extent_size}-byte extent"
    )]
    MisalignedAreaOffset {
        offset: u64,
        area: AreaId,
        area_offset: u64,
        extent_size: u64,
    },

    /// Two copies of the same bytes on one area protect against nothing.
    #[error("run at offset {offset} has two replicas on area {area}")]
    DuplicateArea { offset: u64, area: AreaId },

    /// `area_offset + length` of a replica does not fit in a `u64`.
    #[error("run at offset {offset}: replica on area {area} at {area_offset} overflows")]
    AreaOffsetOverflow {
        offset: u64,
        area: AreaId,
        area_offset: u64,
    },

    /// One physical byte of an area would hold two different volume bytes.
    #[error(
        "area {area} byte {area_offset} is mapped twice: by the run at volume offset \
         {first_run} and by the run at volume offset {second_run}"
    )]
    PhysicalOverlap {
        area: AreaId,
        area_offset: u64,
        first_run: u64,
        second_run: u64,
    },

    /// A lookup or edit beyond the end of the volume.
    #[error(
        "range at offset {offset} with length {length} is outside the {size_bytes}-byte volume"
    )]
    OutOfRange {
        offset: u64,
        length: u64,
        size_bytes: u64,
    },

    /// Edits work on whole extents (the allocation unit); only the volume tail may be partial.
    #[error(
        "edit at offset {offset} with length {length} is not aligned to the {extent_size}-byte extent"
    )]
    UnalignedEdit {
        offset: u64,
        length: u64,
        extent_size: u64,
    },

    /// `assign` needs at least one replica; use `punch_hole` to unmap.
    #[error("assigning a range needs at least one replica (use punch_hole to unmap)")]
    EmptyReplicaSet,

    /// Volumes only grow (CSI has no shrink).
    #[error("cannot shrink a volume from {size_bytes} to {new_size} bytes")]
    Shrink { size_bytes: u64, new_size: u64 },

    /// Maps of different pools (extent sizes) cannot be compared or combined.
    #[error("extent sizes differ: {left} and {right}")]
    ExtentSizeMismatch { left: u64, right: u64 },

    /// The generation counter is exhausted.
    #[error("mapping generation {0} cannot be incremented")]
    GenerationOverflow(Generation),

    /// A diff was computed against another generation than the map it is applied to.
    #[error("diff expects generation {expected}, the map has generation {found}")]
    GenerationMismatch {
        expected: Generation,
        found: Generation,
    },

    /// A diff does not describe a change of this map (its old side does not match).
    #[error("diff does not match the map at volume offset {offset}")]
    DiffMismatch { offset: u64 },
}
