//! Usage accounting: write accounting (seed 000 Fig. 8, [0059]–[0067]), release (Fig. 9,
//! [0068]–[0074]) and the per-volume and pool counters (allocation information 300 and pool
//! management information 114, [0021]–[0027]).
//!
//! The seed keeps three bitmaps per pool block: allocation 330, usage 332 and data priority 334
//! ([0028]). Here one extent has one [`ExtentState`], whose four values are exactly the legal bit
//! combinations (priority ⊆ usage ⊆ allocation, seed 000 §8.6 scenario 15), so an impossible
//! combination cannot be represented.
//!
//! Every operation counts **transitions** only (seed 000 §4.4 observation, §8.3 "make it
//! idempotent"): writing an extent that is already in use with the same priority changes no
//! counter, and releasing an extent that is already unallocated changes nothing. A node that
//! re-sends a usage report, or an operator that retries a release after a restart, therefore
//! never double-counts.
//!
//! Counters are in extents. A volume's own counters (307/308/310) count its *virtual* extents
//! once, whatever its copies (as `VirtualVolume.status.usage` and `ExtentMap::allocated_extents`
//! do); the pool counters (316–324) count *pool* extents, so a volume with `copies` replicas
//! contributes `copies ×` its counters. With one copy — the seed's case — the two are equal.
//! `unused` and `lowPriority` are derived as 318 − 322 and 322 − 324 (seed 000 §3.2).

use std::collections::BTreeMap;

use tessera_api::v1alpha1::DataPriority;

use super::ExtentRange;

/// The state of one extent of a volume: bits 330/332/334 of seed 000 [0028] in one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum ExtentState {
    /// Not allocated (a hole in the volume's mapping). Bits 0/0/0.
    #[default]
    Unallocated,
    /// Allocated, holds no data. Bits 1/0/0. Reclaim tier `Unused` ([0054]).
    Unused,
    /// Holds low-priority data. Bits 1/1/0. Reclaim tier `LowPriority` ([0056]).
    LowPriority,
    /// Holds high-priority data. Bits 1/1/1. Never reclaimed.
    HighPriority,
}

impl ExtentState {
    /// Allocation bit 330.
    pub const fn is_allocated(self) -> bool {
        !matches!(self, ExtentState::Unallocated)
    }

    /// Usage bit 332.
    pub const fn is_in_use(self) -> bool {
        matches!(self, ExtentState::LowPriority | ExtentState::HighPriority)
    }

    /// Data priority bit 334.
    pub const fn is_high_priority(self) -> bool {
        matches!(self, ExtentState::HighPriority)
    }

    /// The state after a write with `priority` (Fig. 8), or `None` for an unallocated extent,
    /// which cannot be written.
    ///
    /// - unused → in use with the write's priority (804–812);
    /// - in use, same priority → unchanged (a rewrite is not a new block, §4.4 observation);
    /// - in use, other priority → the new priority: the block now stores what the write's flag
    ///   424 describes (last write wins; the seed is silent, §5.6 item 7 — see docs/planners.md).
    pub const fn after_write(self, priority: DataPriority) -> Option<ExtentState> {
        match self {
            ExtentState::Unallocated => None,
            _ => Some(match priority {
                DataPriority::High => ExtentState::HighPriority,
                DataPriority::Low => ExtentState::LowPriority,
            }),
        }
    }
}

/// Why an accounting operation was refused. Nothing changes when an operation fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountingError {
    #[error("volume {0} is not in the pool")]
    UnknownVolume(String),

    #[error("volume {0} is already in the pool")]
    VolumeExists(String),

    #[error("{range} is outside volume {volume}, which has {extents} extents")]
    OutOfRange {
        volume: String,
        range: ExtentRange,
        extents: u64,
    },

    /// A usage report names an extent the volume does not own (released or never allocated).
    #[error("write to extent {extent} of volume {volume}, which is not allocated")]
    WriteToUnallocated { volume: String, extent: u64 },

    #[error(
        "allocating {requested} extents needs that many unallocated extents; the pool has {unallocated}"
    )]
    InsufficientUnallocated { requested: u64, unallocated: u64 },

    /// Counters that break allocated ≥ inUse ≥ highPriority.
    #[error(
        "inconsistent usage: allocated {allocated}, in use {in_use}, high priority {high_priority} \
         (need allocated ≥ in use ≥ high priority)"
    )]
    InconsistentUsage {
        allocated: u64,
        in_use: u64,
        high_priority: u64,
    },

    /// The volumes of a pool hold more extents than the pool has.
    #[error("the volumes hold {allocated} extents, more than the pool's {total}")]
    OverCommitted { allocated: u64, total: u64 },
}

/// Counters of one volume: allocated 307, in use 308, high priority 310 (seed 000 [0023]).
///
/// The constructor enforces allocated ≥ inUse ≥ highPriority, so the derived counters never
/// underflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VolumeUsage {
    allocated: u64,
    in_use: u64,
    high_priority: u64,
}

impl VolumeUsage {
    pub const ZERO: VolumeUsage = VolumeUsage {
        allocated: 0,
        in_use: 0,
        high_priority: 0,
    };

    pub fn new(allocated: u64, in_use: u64, high_priority: u64) -> Result<Self, AccountingError> {
        if in_use > allocated || high_priority > in_use {
            return Err(AccountingError::InconsistentUsage {
                allocated,
                in_use,
                high_priority,
            });
        }
        Ok(VolumeUsage {
            allocated,
            in_use,
            high_priority,
        })
    }

    /// Allocated block count 307.
    pub const fn allocated(&self) -> u64 {
        self.allocated
    }

    /// In-use block count 308.
    pub const fn in_use(&self) -> u64 {
        self.in_use
    }

    /// High-priority data block count 310.
    pub const fn high_priority(&self) -> u64 {
        self.high_priority
    }

    /// Allocated but holding no data: 307 − 308 ([0054]).
    pub const fn unused(&self) -> u64 {
        self.allocated - self.in_use
    }

    /// Holding low-priority data: 308 − 310 ([0076]).
    pub const fn low_priority(&self) -> u64 {
        self.in_use - self.high_priority
    }

    fn add_state(&mut self, state: ExtentState, count: u64) {
        if state.is_allocated() {
            self.allocated += count;
        }
        if state.is_in_use() {
            self.in_use += count;
        }
        if state.is_high_priority() {
            self.high_priority += count;
        }
    }
}

/// The pool counters 316–324 (seed 000 [0021], [0026]), in extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PoolCounters {
    total: u64,
    allocated: u64,
    unallocated: u64,
    in_use: u64,
    high_priority: u64,
}

impl PoolCounters {
    /// An empty pool of `total` extents.
    pub const fn empty(total: u64) -> Self {
        PoolCounters {
            total,
            allocated: 0,
            unallocated: total,
            in_use: 0,
            high_priority: 0,
        }
    }

    /// The pool counters as the sums of the volumes' counters, each weighted by its copies:
    /// what the pool controller writes to `StoragePool.status` (seed 000 §8.6 scenario 15: "the
    /// sums of per-volume counters equal the pool counters"). Copies 0 is read as 1.
    pub fn from_volumes(
        total: u64,
        volumes: impl IntoIterator<Item = (VolumeUsage, u8)>,
    ) -> Result<Self, AccountingError> {
        let mut sum = VolumeUsage::ZERO;
        for (usage, copies) in volumes {
            let copies = u64::from(copies.max(1));
            // Saturating: a sum that saturates is certainly over-committed below.
            let add = |acc: u64, n: u64| acc.saturating_add(n.saturating_mul(copies));
            sum.allocated = add(sum.allocated, usage.allocated);
            sum.in_use = add(sum.in_use, usage.in_use);
            sum.high_priority = add(sum.high_priority, usage.high_priority);
        }
        if sum.allocated > total {
            return Err(AccountingError::OverCommitted {
                allocated: sum.allocated,
                total,
            });
        }
        Ok(PoolCounters {
            total,
            allocated: sum.allocated,
            unallocated: total - sum.allocated,
            in_use: sum.in_use,
            high_priority: sum.high_priority,
        })
    }

    /// Total block count 316.
    pub const fn total(&self) -> u64 {
        self.total
    }

    /// Allocated block count 318.
    pub const fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Unallocated block count 320.
    pub const fn unallocated(&self) -> u64 {
        self.unallocated
    }

    /// In-use block count 322.
    pub const fn in_use(&self) -> u64 {
        self.in_use
    }

    /// High-priority data block count 324.
    pub const fn high_priority(&self) -> u64 {
        self.high_priority
    }

    /// 318 − 322.
    pub const fn unused(&self) -> u64 {
        self.allocated - self.in_use
    }

    /// 322 − 324.
    pub const fn low_priority(&self) -> u64 {
        self.in_use - self.high_priority
    }

    fn apply_allocation(&mut self, count: u64, copies: u64) {
        // Fig. 6 step 612 ([0051]).
        self.allocated += count * copies;
        self.unallocated -= count * copies;
    }

    fn apply_write(&mut self, summary: &WriteSummary, copies: u64) {
        // Fig. 8 steps 806 and 812 ([0063], [0066]), transitions only.
        self.in_use += summary.newly_in_use * copies;
        self.high_priority =
            self.high_priority + summary.became_high * copies - summary.became_low * copies;
    }

    fn apply_release(&mut self, summary: &ReleaseSummary, copies: u64) {
        // Fig. 9 step 906 ([0072]).
        self.allocated -= summary.released * copies;
        self.unallocated += summary.released * copies;
        self.in_use -= summary.in_use * copies;
        self.high_priority -= summary.high_priority * copies;
    }
}

/// What one write changed (Fig. 8), counted in transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteSummary {
    /// Extents written for the first time: unused → in use (804/806).
    pub newly_in_use: u64,
    /// Extents whose priority bit went 0 → 1 (810/812): fresh high-priority writes and
    /// low-priority data overwritten with high-priority data.
    pub became_high: u64,
    /// Extents whose priority bit went 1 → 0: high-priority data overwritten with low-priority
    /// data.
    pub became_low: u64,
}

impl WriteSummary {
    /// Whether the write changed no counter (a pure rewrite).
    pub const fn is_noop(&self) -> bool {
        self.newly_in_use == 0 && self.became_high == 0 && self.became_low == 0
    }
}

/// What one release freed (Fig. 9), counted from the extents' states before the release (902).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReleaseSummary {
    /// Allocated extents freed (307 and 318 go down by this, 320 up).
    pub released: u64,
    /// Of those, extents that held data (308, 322).
    pub in_use: u64,
    /// Of those, extents that held high-priority data (310, 324).
    pub high_priority: u64,
    /// The freed extents, coalesced: they go back to the unallocated list 314 (900). Extents of
    /// the request that were already unallocated are not listed.
    pub freed: Vec<ExtentRange>,
}

/// One volume's extents: entry 300 of seed 000 ([0022]–[0025]) with its slice of the three
/// bitmaps. Index `i` is the volume's virtual extent `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLedger {
    name: String,
    copies: u8,
    states: Vec<ExtentState>,
    usage: VolumeUsage,
}

impl VolumeLedger {
    /// A volume of `extents` extents with `copies` replicas (0 is read as 1), all unallocated
    /// (holes).
    pub fn new(name: impl Into<String>, extents: u64, copies: u8) -> Self {
        VolumeLedger {
            name: name.into(),
            copies: copies.max(1),
            states: vec![ExtentState::Unallocated; to_index(extents)],
            usage: VolumeUsage::ZERO,
        }
    }

    /// Rebuilds a ledger from reported states (a node's usage bitmap).
    pub fn from_states(name: impl Into<String>, copies: u8, states: Vec<ExtentState>) -> Self {
        let usage = count_states(&states);
        VolumeLedger {
            name: name.into(),
            copies: copies.max(1),
            states,
            usage,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replicas per extent (at least 1).
    pub fn copies(&self) -> u8 {
        self.copies
    }

    /// Size of the volume in extents.
    pub fn extents(&self) -> u64 {
        self.states.len() as u64
    }

    /// The counters 307/308/310, kept incrementally.
    pub fn usage(&self) -> VolumeUsage {
        self.usage
    }

    /// The counters recomputed from the states (the popcounts of seed 000 §3.4).
    pub fn recount(&self) -> VolumeUsage {
        count_states(&self.states)
    }

    pub fn states(&self) -> &[ExtentState] {
        &self.states
    }

    pub fn state(&self, extent: u64) -> Option<ExtentState> {
        usize::try_from(extent)
            .ok()
            .and_then(|i| self.states.get(i).copied())
    }

    /// The extents in `state`, as coalesced ranges in volume order.
    pub fn ranges_in_state(&self, state: ExtentState) -> Vec<ExtentRange> {
        let mut out: Vec<ExtentRange> = Vec::new();
        for (i, s) in self.states.iter().enumerate() {
            if *s != state {
                continue;
            }
            let i = i as u64;
            match out.last_mut() {
                Some(last) if last.end() == i => last.len += 1,
                _ => out.push(ExtentRange::new(i, 1)),
            }
        }
        out
    }

    fn check_range(&self, range: ExtentRange) -> Result<std::ops::Range<usize>, AccountingError> {
        let extents = self.extents();
        if range
            .start
            .checked_add(range.len)
            .is_none_or(|end| end > extents)
        {
            return Err(AccountingError::OutOfRange {
                volume: self.name.clone(),
                range,
                extents,
            });
        }
        Ok(to_index(range.start)..to_index(range.end()))
    }

    /// Allocates the holes in `range` (Fig. 6 step 608 for this volume); returns how many
    /// extents were newly allocated. Extents already allocated are left as they are.
    fn allocate(&mut self, range: ExtentRange) -> Result<u64, AccountingError> {
        let indices = self.check_range(range)?;
        let mut count = 0;
        for state in &mut self.states[indices] {
            if *state == ExtentState::Unallocated {
                *state = ExtentState::Unused;
                count += 1;
            }
        }
        self.usage.allocated += count;
        Ok(count)
    }

    /// Number of holes in `range`.
    fn holes_in(&self, range: ExtentRange) -> Result<u64, AccountingError> {
        let indices = self.check_range(range)?;
        Ok(self.states[indices]
            .iter()
            .filter(|s| !s.is_allocated())
            .count() as u64)
    }

    /// Fig. 8 for this volume (804, 810): records a write of `range` with `priority`. All or
    /// nothing: if any extent of the range is unallocated, nothing changes.
    pub fn write(
        &mut self,
        range: ExtentRange,
        priority: DataPriority,
    ) -> Result<WriteSummary, AccountingError> {
        let indices = self.check_range(range)?;
        if let Some(offset) = self.states[indices.clone()]
            .iter()
            .position(|s| !s.is_allocated())
        {
            return Err(AccountingError::WriteToUnallocated {
                volume: self.name.clone(),
                extent: range.start + offset as u64,
            });
        }
        let mut summary = WriteSummary::default();
        for state in &mut self.states[indices] {
            let before = *state;
            let Some(after) = before.after_write(priority) else {
                unreachable!("checked above: every extent of the range is allocated");
            };
            if !before.is_in_use() {
                summary.newly_in_use += 1;
            }
            match (before.is_high_priority(), after.is_high_priority()) {
                (false, true) => summary.became_high += 1,
                (true, false) => summary.became_low += 1,
                _ => {}
            }
            *state = after;
        }
        self.usage.in_use += summary.newly_in_use;
        self.usage.high_priority =
            self.usage.high_priority + summary.became_high - summary.became_low;
        Ok(summary)
    }

    /// Fig. 9 for this volume (902, 904, 908): frees every allocated extent of `ranges`,
    /// counting them by state first. All or nothing: if a range is out of bounds, nothing
    /// changes. Extents already unallocated are skipped (idempotent).
    pub fn release(&mut self, ranges: &[ExtentRange]) -> Result<ReleaseSummary, AccountingError> {
        let mut checked = Vec::with_capacity(ranges.len());
        for range in super::coalesce(ranges.to_vec()) {
            checked.push((range, self.check_range(range)?));
        }
        let mut summary = ReleaseSummary::default();
        let mut freed = Vec::new();
        for (_, indices) in checked {
            for i in indices {
                let state = self.states[i];
                if !state.is_allocated() {
                    continue;
                }
                summary.released += 1;
                summary.in_use += u64::from(state.is_in_use());
                summary.high_priority += u64::from(state.is_high_priority());
                freed.push(ExtentRange::new(i as u64, 1));
                self.states[i] = ExtentState::Unallocated;
            }
        }
        summary.freed = super::coalesce(freed);
        self.usage.allocated -= summary.released;
        self.usage.in_use -= summary.in_use;
        self.usage.high_priority -= summary.high_priority;
        Ok(summary)
    }
}

/// The whole pool: counters 316–324 plus every volume's ledger (seed 000 storage pool
/// management information 114 and state information 116).
///
/// The counters are maintained incrementally from the transitions each operation reports, as
/// the seed does ([0051], [0062]–[0066], [0071]–[0072]); [`PoolLedger::recount`] recomputes them
/// from the states so the two can be checked against each other.
///
/// Entries are not deleted when their allocation reaches zero (seed 000 §5.6 item 9 is open):
/// a volume whose extents were all reclaimed still exists, as a hole. Only
/// [`PoolLedger::delete_volume`] removes an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLedger {
    counters: PoolCounters,
    volumes: BTreeMap<String, VolumeLedger>,
}

impl PoolLedger {
    /// An empty pool of `total` extents.
    pub fn new(total: u64) -> Self {
        PoolLedger {
            counters: PoolCounters::empty(total),
            volumes: BTreeMap::new(),
        }
    }

    pub fn counters(&self) -> PoolCounters {
        self.counters
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeLedger> {
        self.volumes.get(name)
    }

    /// The volumes, in name order.
    pub fn volumes(&self) -> impl ExactSizeIterator<Item = &VolumeLedger> {
        self.volumes.values()
    }

    /// Counters recomputed from every extent's state and summed over the volumes.
    pub fn recount(&self) -> Result<PoolCounters, AccountingError> {
        PoolCounters::from_volumes(
            self.counters.total,
            self.volumes.values().map(|v| (v.recount(), v.copies)),
        )
    }

    fn volume_mut(&mut self, name: &str) -> Result<&mut VolumeLedger, AccountingError> {
        self.volumes
            .get_mut(name)
            .ok_or_else(|| AccountingError::UnknownVolume(name.to_owned()))
    }

    /// Fig. 6 steps 608–612 ([0049]–[0051]): a new entry with `extents` allocated extents
    /// (times `copies` pool extents), in use 0, high 0. Refused (nothing changes) when the pool
    /// has fewer unallocated extents: the caller must reclaim first (see
    /// [`super::allocation`]).
    pub fn create_volume(
        &mut self,
        name: &str,
        extents: u64,
        copies: u8,
    ) -> Result<(), AccountingError> {
        if self.volumes.contains_key(name) {
            return Err(AccountingError::VolumeExists(name.to_owned()));
        }
        let mut volume = VolumeLedger::new(name, extents, copies);
        let copies = u64::from(volume.copies);
        self.reserve(extents.saturating_mul(copies))?;
        let allocated = volume.allocate(ExtentRange::new(0, extents))?;
        self.counters.apply_allocation(allocated, copies);
        self.volumes.insert(name.to_owned(), volume);
        Ok(())
    }

    /// Allocates the holes in `range` of an existing volume (after growth or to refill
    /// reclaimed ranges). Returns how many extents were newly allocated.
    pub fn allocate(&mut self, name: &str, range: ExtentRange) -> Result<u64, AccountingError> {
        let unallocated = self.counters.unallocated;
        let volume = self.volume_mut(name)?;
        let copies = u64::from(volume.copies);
        let needed = volume.holes_in(range)?.saturating_mul(copies);
        if needed > unallocated {
            return Err(AccountingError::InsufficientUnallocated {
                requested: needed,
                unallocated,
            });
        }
        let allocated = volume.allocate(range)?;
        self.counters.apply_allocation(allocated, copies);
        Ok(allocated)
    }

    /// Grows a volume to `extents` extents; the new extents are holes until allocated.
    pub fn grow_volume(&mut self, name: &str, extents: u64) -> Result<(), AccountingError> {
        let volume = self.volume_mut(name)?;
        if extents > volume.extents() {
            volume
                .states
                .resize(to_index(extents), ExtentState::Unallocated);
        }
        Ok(())
    }

    /// Fig. 8 ([0062]–[0066]): a write of `range` of volume `name` with `priority`.
    pub fn write(
        &mut self,
        name: &str,
        range: ExtentRange,
        priority: DataPriority,
    ) -> Result<WriteSummary, AccountingError> {
        let volume = self.volume_mut(name)?;
        let copies = u64::from(volume.copies);
        let summary = volume.write(range, priority)?;
        self.counters.apply_write(&summary, copies);
        Ok(summary)
    }

    /// Fig. 9 ([0069]–[0073]): releases `ranges` of volume `name` — a voluntary release, or the
    /// completion of a reclaim return.
    pub fn release(
        &mut self,
        name: &str,
        ranges: &[ExtentRange],
    ) -> Result<ReleaseSummary, AccountingError> {
        let volume = self.volume_mut(name)?;
        let copies = u64::from(volume.copies);
        let summary = volume.release(ranges)?;
        self.counters.apply_release(&summary, copies);
        Ok(summary)
    }

    /// Releases every extent of a volume and removes its entry.
    pub fn delete_volume(&mut self, name: &str) -> Result<ReleaseSummary, AccountingError> {
        let extents = self
            .volumes
            .get(name)
            .ok_or_else(|| AccountingError::UnknownVolume(name.to_owned()))?
            .extents();
        let summary = self.release(name, &[ExtentRange::new(0, extents)])?;
        self.volumes.remove(name);
        Ok(summary)
    }

    fn reserve(&self, extents: u64) -> Result<(), AccountingError> {
        if extents > self.counters.unallocated {
            return Err(AccountingError::InsufficientUnallocated {
                requested: extents,
                unallocated: self.counters.unallocated,
            });
        }
        Ok(())
    }
}

fn count_states(states: &[ExtentState]) -> VolumeUsage {
    let mut counts = [0u64; 4];
    for state in states {
        counts[*state as usize] += 1;
    }
    let mut usage = VolumeUsage::ZERO;
    for state in [
        ExtentState::Unused,
        ExtentState::LowPriority,
        ExtentState::HighPriority,
    ] {
        usage.add_state(state, counts[state as usize]);
    }
    usage
}

/// Extent counts index in-memory vectors; a count that does not fit in `usize` cannot be held in
/// memory anyway.
fn to_index(extents: u64) -> usize {
    usize::try_from(extents).expect("extent count fits in memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_transitions_follow_fig8() {
        use DataPriority::{High, Low};
        use ExtentState::*;
        assert_eq!(Unallocated.after_write(High), None);
        assert_eq!(Unused.after_write(High), Some(HighPriority));
        assert_eq!(Unused.after_write(Low), Some(LowPriority));
        assert_eq!(LowPriority.after_write(Low), Some(LowPriority));
        assert_eq!(HighPriority.after_write(High), Some(HighPriority));
        assert_eq!(LowPriority.after_write(High), Some(HighPriority));
        assert_eq!(HighPriority.after_write(Low), Some(LowPriority));
    }

    #[test]
    fn priority_change_on_rewrite_moves_the_high_counter_only() {
        let mut pool = PoolLedger::new(10);
        pool.create_volume("v", 4, 1).expect("fits");
        let w = pool
            .write("v", ExtentRange::new(0, 2), DataPriority::Low)
            .expect("allocated");
        assert_eq!((w.newly_in_use, w.became_high, w.became_low), (2, 0, 0));
        let w = pool
            .write("v", ExtentRange::new(1, 2), DataPriority::High)
            .expect("allocated");
        assert_eq!((w.newly_in_use, w.became_high, w.became_low), (1, 2, 0));
        let w = pool
            .write("v", ExtentRange::new(2, 1), DataPriority::Low)
            .expect("allocated");
        assert_eq!((w.newly_in_use, w.became_high, w.became_low), (0, 0, 1));
        let usage = pool.volume("v").expect("exists").usage();
        assert_eq!(
            (usage.allocated(), usage.in_use(), usage.high_priority()),
            (4, 3, 1)
        );
        assert_eq!(pool.recount(), Ok(pool.counters()));
    }

    #[test]
    fn failed_operations_change_nothing() {
        let mut pool = PoolLedger::new(10);
        pool.create_volume("v", 4, 1).expect("fits");
        pool.release("v", &[ExtentRange::new(1, 1)])
            .expect("in range");
        let before = pool.clone();
        assert_eq!(
            pool.write("v", ExtentRange::new(0, 3), DataPriority::High),
            Err(AccountingError::WriteToUnallocated {
                volume: "v".into(),
                extent: 1
            })
        );
        assert!(matches!(
            pool.release("v", &[ExtentRange::new(0, 1), ExtentRange::new(3, 5)]),
            Err(AccountingError::OutOfRange { .. })
        ));
        assert_eq!(
            pool.create_volume("w", 8, 1),
            Err(AccountingError::InsufficientUnallocated {
                requested: 8,
                unallocated: 7
            })
        );
        assert_eq!(
            pool.create_volume("v", 1, 1),
            Err(AccountingError::VolumeExists("v".into()))
        );
        assert_eq!(
            pool.write("nope", ExtentRange::new(0, 1), DataPriority::Low),
            Err(AccountingError::UnknownVolume("nope".into()))
        );
        assert_eq!(pool, before);
    }

    #[test]
    fn release_is_idempotent_and_volume_survives_empty() {
        let mut pool = PoolLedger::new(10);
        pool.create_volume("v", 4, 1).expect("fits");
        let first = pool.release("v", &[ExtentRange::new(0, 4)]).expect("ok");
        assert_eq!(first.released, 4);
        assert_eq!(first.freed, vec![ExtentRange::new(0, 4)]);
        let again = pool.release("v", &[ExtentRange::new(0, 4)]).expect("ok");
        assert_eq!(again, ReleaseSummary::default());
        assert_eq!(pool.counters().unallocated(), 10);
        assert!(pool.volume("v").is_some(), "an empty entry is kept");
        pool.allocate("v", ExtentRange::new(2, 2)).expect("fits");
        assert_eq!(pool.counters().allocated(), 2);
        pool.grow_volume("v", 6).expect("exists");
        assert_eq!(pool.volume("v").map(VolumeLedger::extents), Some(6));
        let deleted = pool.delete_volume("v").expect("exists");
        assert_eq!(deleted.released, 2);
        assert!(pool.volume("v").is_none());
        assert_eq!(pool.counters(), PoolCounters::empty(10));
    }

    #[test]
    fn copies_weight_the_pool_counters() {
        let mut pool = PoolLedger::new(10);
        pool.create_volume("mirror", 3, 2).expect("fits");
        assert_eq!(pool.counters().allocated(), 6);
        pool.write("mirror", ExtentRange::new(0, 2), DataPriority::High)
            .expect("allocated");
        assert_eq!(
            (pool.counters().in_use(), pool.counters().high_priority()),
            (4, 4)
        );
        let usage = pool.volume("mirror").expect("exists").usage();
        assert_eq!((usage.allocated(), usage.in_use()), (3, 2));
        assert_eq!(
            pool.create_volume("big", 3, 2),
            Err(AccountingError::InsufficientUnallocated {
                requested: 6,
                unallocated: 4
            })
        );
        pool.release("mirror", &[ExtentRange::new(2, 1)])
            .expect("ok");
        assert_eq!(pool.counters().unallocated(), 6);
        assert_eq!(pool.recount(), Ok(pool.counters()));
    }

    #[test]
    fn usage_constructor_and_pool_sums() {
        assert!(VolumeUsage::new(10, 11, 0).is_err());
        assert!(VolumeUsage::new(10, 5, 6).is_err());
        let a = VolumeUsage::new(100_000, 50_000, 40_000).expect("consistent");
        assert_eq!((a.unused(), a.low_priority()), (50_000, 10_000));
        let b = VolumeUsage::new(80_000, 70_000, 0).expect("consistent");
        let pool = PoolCounters::from_volumes(200_000, [(a, 1), (b, 1)]).expect("fits");
        assert_eq!(pool.unallocated(), 20_000);
        assert_eq!(pool.unused(), 60_000);
        assert_eq!(pool.low_priority(), 80_000);
        assert_eq!(
            PoolCounters::from_volumes(100_000, [(a, 1), (b, 1)]),
            Err(AccountingError::OverCommitted {
                allocated: 180_000,
                total: 100_000
            })
        );
    }
}
