//! The block engine of the node plugin (ARCHITECTURE §4): volumes, translation through the
//! active extent map, replicas, usage tracking and dirty tracking.
//!
//! # Requests
//!
//! [`Volume::read`], [`Volume::write`], [`Volume::flush`], [`Volume::trim`] and
//! [`Volume::write_zeroes`] take byte offsets and lengths that are **multiples of 512** (the
//! sector of every tessera block device, [`tessera_api::model::SECTOR_SIZE`]) and of any length up
//! to the end of the volume; anything else is refused with [`EngineError::Unaligned`] or
//! [`EngineError::OutOfRange`] before any I/O. A zero-length request succeeds and does nothing.
//!
//! A request pins the active map once ([`arc_swap::ArcSwap::load_full`]; the I/O gate of the hold
//! issue will sit exactly there) and is translated with it
//! ([`tessera_api::model::ExtentMap::translate`]): split at extent boundaries, each piece sent to
//! its replicas' areas (seed 004 step 803 [0056]; seed 002 §4.4 S603–S604 [0113], and S606–S615
//! for remote areas through the backend). Pieces and replicas are issued concurrently. Every
//! backend call carries the pinned map's generation (seed 004 §11.4).
//!
//! - **Holes** read as zeros; a write touching a hole fails with
//!   [`EngineError::NeedsAllocation`] and writes nothing; write-zeroes and trim skip holes.
//! - **Replicas** (`copies` ≥ 2): a data-changing piece goes to every healthy replica and succeeds
//!   when all of them acknowledged it, or when at least one did — the others are then marked
//!   unhealthy and the volume is degraded ([`Volume::health`]). Reads come from the first healthy
//!   replica in map order (seed 002 [0075]) and fall back to the next on an error, marking the
//!   failed one unhealthy. When every healthy replica of a piece fails (or none is healthy), the
//!   request fails with [`EngineError::Io`] (one replica tried) or
//!   [`EngineError::AllReplicasFailed`] — EIO for the frontend — and nothing is marked; see
//!   [`health`] for why.
//!
//! # Ordering and durability
//!
//! - A request returns only after **every** piece on every replica completed (there is no
//!   partial acknowledgement and no write-back cache in the engine). So a request issued after
//!   another one was acknowledged can never be overtaken by it: an acknowledged write is neither
//!   lost nor reordered against a later overlapping request, on any replica.
//! - **Concurrent overlapping requests are the client's business**, as with any block device:
//!   pieces of two in-flight writes to the same bytes may land in either order, and replicas may
//!   then differ until the range is rewritten. File systems and databases never rely on that.
//! - A request future must be driven to completion. Dropping it does not recall pieces already
//!   handed to a backend (they still land), so a frontend that gives up on a request must treat
//!   its range as undefined — the same contract as a cancelled disk command.
//! - Without FUA, an acknowledged write is durable after the next successful [`Volume::flush`];
//!   with FUA it is durable on every replica that took it when the write returns.
//! - Trim is advisory: afterwards a trimmed byte reads as its old value or as zero (the local
//!   backend punches a hole, so zeros). Write-zeroes always reads back as zeros.
//!
//! # Usage and dirty tracking
//!
//! [`usage`] implements seed 000's bitmaps 332/334 and counters with transition-only counting
//! and idempotent deltas ([`UsageDelta`]).
//!
//! Dirty tracking (mirror pairs and resync, ARCHITECTURE §7): [`Volume::enable_dirty_tracking`],
//! [`Volume::snapshot_and_clear_dirty`], [`Volume::disable_dirty_tracking`]. Every data-changing
//! request marks its extents before it is issued and again after it completed, and a snapshot swaps
//! each bitmap word with zero. Hence a request that completed before a snapshot is in it, one that
//! starts after it is in the next one, and one in flight during the snapshot is in both — so a
//! resync that copied an extent before a racing write landed copies it again.

mod bitmap;
mod dirty;
pub mod error;
pub mod gate;
pub mod health;
pub mod mirror;
pub mod usage;
mod volume;

pub use error::EngineError;
pub use health::{HealthState, VolumeHealth};
pub use mirror::{LegMode, LegView, MirrorLegSpec};
pub use usage::{ApplyOutcome, UsageDecodeError, UsageDelta, UsageMirror};
pub use volume::{
    DEFAULT_HOLD_TIMEOUT_MS, GateView, MAX_EXTENTS, UsageInit, Volume, VolumeOptions,
};
