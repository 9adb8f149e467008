//! Dirty tracking for mirror pairs and resync (ARCHITECTURE §4 "Mirrored writes", §7; seed 003's
//! resync copies what changed while the pair was split).
//!
//! Every request that changes data (write, write-zeroes, trim) marks its extents **twice**: before
//! it is issued and again after it completed (whatever the outcome). With
//! [`DirtyTracker::snapshot_and_clear`] swapping each word with zero:
//! - a write that completed before a snapshot is in it (its second mark precedes the swap);
//! - a write that started after a snapshot is in the next one;
//! - a write in flight during a snapshot is in that snapshot (first mark) **and** in the next one
//!   (second mark), so a resync that copied the extent before the write landed copies it again.
//!
//! Marks are skipped while tracking is disabled; a write that completes after tracking was
//! enabled is recorded even if it started before. Map swaps do not mark extents: moving data keeps
//! its contents.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use roaring::RoaringBitmap;

use super::bitmap::AtomicBitmap;

pub(crate) struct DirtyTracker {
    enabled: AtomicBool,
    bits: AtomicBitmap,
}

impl DirtyTracker {
    pub(crate) fn new(extents: u64) -> Self {
        DirtyTracker {
            enabled: AtomicBool::new(false),
            bits: AtomicBitmap::new(extents),
        }
    }

    pub(crate) fn grow(&self, extents: u64) {
        self.bits.grow(extents);
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Starts tracking from an empty bitmap.
    pub(crate) fn enable(&self) {
        if !self.enabled.load(Ordering::SeqCst) {
            self.bits.clear_all();
            self.enabled.store(true, Ordering::SeqCst);
        }
    }

    /// Stops tracking and forgets the bits.
    pub(crate) fn disable(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        self.bits.clear_all();
    }

    pub(crate) fn mark(&self, extents: Range<u64>) {
        if !self.is_enabled() {
            return;
        }
        let view = self.bits.view();
        for extent in extents {
            view.set(extent);
        }
    }

    pub(crate) fn snapshot_and_clear(&self) -> RoaringBitmap {
        self.bits.take()
    }

    pub(crate) fn peek(&self) -> RoaringBitmap {
        self.bits.to_roaring()
    }
}
