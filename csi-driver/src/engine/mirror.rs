//! The mirror leg of a primary volume (seed 003 claim 1 first and second process; ARCHITECTURE
//! §7; docs/mirror.md §7).
//!
//! A primary of a mirror pair keeps the secondary's committed map beside its own. In
//! [`LegMode::Mirror`] every data-changing request is issued to the secondary's areas at the
//! same volume offsets as well, and acknowledged only when both have it (Paired, and the copies
//! of Copying/Resyncing). In [`LegMode::Track`] (Split) only the dirty bits are kept. Dirty
//! tracking is on whenever a leg is set, so a formation or resync copy that raced with a write
//! is repeated (`engine::dirty`).
//!
//! A secondary that fails a mirrored piece **suspends** the leg (M-18): it falls back to
//! `Track`, the request is acknowledged on the primary's outcome, its extents are dirty, and the
//! failure is reported until the leg is set again (a resync). Failing the primary's writes
//! because its backup broke would turn a lost copy into an outage.

use std::sync::Arc;

use roaring::RoaringBitmap;
use tessera_api::model::{ExtentMap, Generation};

/// What the leg does with the primary's data-changing requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegMode {
    /// Write to the secondary too; acknowledge when both have it.
    Mirror,
    /// Only record dirty extents (the pair is split, or the leg was suspended).
    Track,
}

impl std::fmt::Display for LegMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LegMode::Mirror => "Mirror",
            LegMode::Track => "Track",
        })
    }
}

/// The secondary as this node sees it: its name and committed map.
#[derive(Debug, Clone)]
pub struct MirrorLegSpec {
    pub secondary: String,
    pub map: Arc<ExtentMap>,
    pub mode: LegMode,
}

/// A snapshot of the leg for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegView {
    pub secondary: String,
    pub mode: LegMode,
    /// The secondary's map generation the leg writes with.
    pub secondary_generation: Generation,
    /// Why the leg was suspended, until it is set again.
    pub failure: Option<String>,
}

/// Dirty extents handed to the operator, kept until it acknowledges them: an answer lost on the
/// way (or an operator that crashed before persisting it) loses no bit, because the next
/// collection without that acknowledgement returns the same bits again, plus newer ones.
#[derive(Debug, Default)]
pub(crate) struct DirtyReports {
    /// Sequence of the last answer; an acknowledgement names it.
    sequence: u64,
    /// Bits handed out and not acknowledged yet.
    pending: RoaringBitmap,
}

impl DirtyReports {
    /// Drops the pending bits when `acknowledge` names the last answer, adds `fresh`, and
    /// answers (sequence, every unacknowledged bit).
    pub(crate) fn collect(
        &mut self,
        acknowledge: u64,
        fresh: RoaringBitmap,
    ) -> (u64, RoaringBitmap) {
        if acknowledge == self.sequence && acknowledge != 0 {
            self.pending.clear();
        }
        self.pending |= fresh;
        self.sequence += 1;
        (self.sequence, self.pending.clone())
    }

    pub(crate) fn clear(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[u32]) -> RoaringBitmap {
        v.iter().copied().collect()
    }

    #[test]
    fn an_unacknowledged_answer_is_repeated_with_newer_bits() {
        let mut reports = DirtyReports::default();
        let (first, a) = reports.collect(0, bits(&[1, 2]));
        assert_eq!(a, bits(&[1, 2]));
        // The answer was lost: the operator asks again with its old acknowledgement.
        let (second, b) = reports.collect(0, bits(&[7]));
        assert_eq!(b, bits(&[1, 2, 7]));
        assert!(second > first);
        // Acknowledging a superseded answer drops nothing.
        let (third, c) = reports.collect(first, bits(&[]));
        assert_eq!(c, bits(&[1, 2, 7]));
        // Acknowledging the last answer drops exactly what it carried.
        let (_, d) = reports.collect(third, bits(&[9]));
        assert_eq!(d, bits(&[9]));
    }

    #[test]
    fn clear_forgets_pending_bits() {
        let mut reports = DirtyReports::default();
        let (seq, _) = reports.collect(0, bits(&[3]));
        reports.clear();
        let (_, after) = reports.collect(seq + 5, bits(&[]));
        assert!(after.is_empty());
    }
}
