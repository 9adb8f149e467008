//! The shared domain model: byte and extent arithmetic, mapping generations, the run-length
//! extent map of a virtual volume and the diff between two maps. No I/O, no Kubernetes types:
//! the operator's planners, the node engine and the API conversions all build on it.
//!
//! - [`units`] — [`SECTOR_SIZE`], [`ByteRange`], [`ExtentSize`].
//! - [`generation`] — [`Generation`].
//! - [`extent_map`] — [`ExtentMap`] and its parts ([`Run`], [`ReplicaLocation`], [`AreaId`]),
//!   lookup ([`ExtentMap::translate`] → [`Segment`]s) and immutable edits.
//! - [`diff`](mod@diff) — [`MapDiff`], seed 004's configuration diff that scopes the
//!   range-limited hold.
//! - [`error`] — [`MapError`], the one error type of the model.

pub mod diff;
pub mod error;
pub mod extent_map;
pub mod generation;
pub mod units;

pub use diff::{MapDiff, Placement, RangeChange, diff};
pub use error::MapError;
pub use extent_map::{
    AreaId, AreaUsage, Edit, ExtentMap, PhysicalLocation, ReplicaLocation, Run, Segment, Segments,
};
pub use generation::Generation;
pub use units::{ByteRange, ExtentSize, SECTOR_SIZE, SplitAtMultiples};

#[cfg(test)]
mod tests;
