//! The engine's error type.

use std::io;

use tessera_api::model::{AreaId, ByteRange, Generation, MapError, SECTOR_SIZE};

/// Why a volume request or a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Offset or length is not a multiple of the 512-byte sector.
    #[error(
        "request at offset {offset} with length {length} is not aligned to {SECTOR_SIZE} bytes"
    )]
    Unaligned { offset: u64, length: u64 },

    /// The request reaches past the end of the volume.
    #[error(
        "request at offset {offset} with length {length} is outside the {size_bytes}-byte volume"
    )]
    OutOfRange {
        offset: u64,
        length: u64,
        size_bytes: u64,
    },

    /// A write touches unallocated extents (holes). Nothing was written. `range` is the smallest
    /// extent-aligned range (clamped to the volume) that covers every hole the write touches.
    /// The frontend answers ENOSPC until the operator can allocate on demand (ARCHITECTURE §4).
    #[error("write needs allocation of {range}")]
    NeedsAllocation { range: ByteRange },

    /// The only healthy replica of a piece failed.
    #[error("I/O error on area {area}: {source}")]
    Io {
        area: AreaId,
        #[source]
        source: io::Error,
    },

    /// Every healthy replica of a piece failed, or none is healthy any more.
    #[error("every replica of {range} failed (tried {tried:?})")]
    AllReplicasFailed {
        range: ByteRange,
        tried: Vec<AreaId>,
    },

    /// A backend serves another mapping generation than the request was translated with
    /// (seed 004 §11.4). The request may be retried: it is translated again with the active map.
    #[error("area {area} refused generation {sent}: it serves generation {current}")]
    StaleGeneration {
        area: AreaId,
        sent: Generation,
        current: Generation,
    },

    /// The map names an area that no backend serves on this node.
    #[error("area {area} is not registered on this node")]
    UnknownArea { area: AreaId },

    /// `swap_map` with a generation that is not newer than the active one.
    #[error("map generation {offered} is not newer than the active generation {active}")]
    GenerationNotNewer {
        active: Generation,
        offered: Generation,
    },

    /// `swap_map` with another extent size (another pool) or a smaller volume.
    #[error("incompatible map: {reason}")]
    IncompatibleMap { reason: String },

    /// The volume has more extents than a usage report can index (2^32).
    #[error("volume has {extents} extents; at most 2^32 are supported")]
    TooManyExtents { extents: u64 },

    /// The volume's I/O gate refused the request: this node was fenced (excluded from a remap,
    /// seed 004 611/617) and must restage the volume to serve it again.
    #[error("volume {volume} is fenced on this node: {reason}")]
    Fenced { volume: String, reason: String },

    /// A remap step of the I/O gate was refused (the refusal's text, seed 004 713/819).
    #[error("{0}")]
    Gate(#[from] super::gate::Refusal),

    /// The domain model refused a range or a map.
    #[error(transparent)]
    Map(#[from] MapError),
}

impl EngineError {
    /// The errno a block frontend (ublk, nbd) returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::NeedsAllocation { .. } => libc::ENOSPC,
            EngineError::Unaligned { .. } | EngineError::OutOfRange { .. } => libc::EINVAL,
            // A full area file system is worth telling apart; anything else is a media error.
            EngineError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                libc::ENOSPC
            }
            _ => libc::EIO,
        }
    }
}
