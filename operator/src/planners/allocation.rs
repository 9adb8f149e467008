//! Admission and reclaim: seed 000 Fig. 6 (area allocation processing 502, [0043]–[0052]) and
//! Fig. 7 (area return processing 606, [0053]–[0058]).
//!
//! With U unallocated extents, F unused extents and L low-priority extents of the volumes that
//! may be reclaimed, and a request for N extents:
//!
//! 1. **Admission (600, [0045])**: admit when U + F + L > N ([`AdmissionRule::Strict`], the
//!    patent's "more than") or ≥ N ([`AdmissionRule::Inclusive`]). C1 and C2 of [0045] are
//!    implied by C3 because F, L ≥ 0. A request that is not admitted is rejected and nothing
//!    changes (602, [0046]).
//! 2. **Shortage test (604, [0047]–[0048]; 708, [0058])**: reclaim only while U < N. With U = N
//!    the request is allocated directly: N extents are exactly what it needs.
//! 3. **Victims (700–706, [0054]–[0057])**: tier `Unused` first — the volume with the most unused
//!    extents, repeatedly; only when no eligible volume has unused extents left, tier
//!    `LowPriority` — the volume with the most low-priority extents. No tier ever takes
//!    high-priority data.
//!
//! The plan lists the whole predicted sequence of returns. The controller issues them (each is a
//! `releaseRanges` VolumeRemap, docs/decisions.md D-17) and re-plans from the fresh state after
//! each one completes or times out — that re-plan is the 708 re-check. The plan is stable under
//! execution: re-planning after the first return completes as planned yields the rest of the
//! same plan (property-tested in `operator/tests/planner_allocation.rs`).
//!
//! Choices the seed leaves open (docs/planners.md):
//! - **One return names exactly what is still needed**: `min(victim's extents in the tier,
//!   N − U)`, not all of the victim's unused extents. The claims say "at least part of" the
//!   other servers' areas (claims 1–4); releasing more than the shortfall takes space a
//!   volume reserved for its future (the very reason it holds unused space, [0005]) or discards
//!   more low-priority data than the claim needs.
//! - **Ties** break by volume name (byte order): names are unique and stable across restarts.
//! - **Non-compliant victims**: skipped after `returnTimeoutSeconds` (D-18); the controller calls
//!   [`replan_excluding`] with the skipped names, which can end in a rejection that names them.
//! - **The requester's own volumes** are never victims (the claims and [0007] speak of *other*
//!   servers' areas); [`AllocationRequest::own_volumes`] lists them.
//! - **Eligibility**: a volume counts toward F (L) only when the pool's tiers include `Unused`
//!   (`LowPriority`), its class allows that tier (`reclaimable`), and — under
//!   `LowerPriorityFirst` — its class value is lower than the claim's. "No volume has unused
//!   blocks" (702) means no *eligible* volume, otherwise reclaim could never reach tier 2 while a
//!   protected volume holds unused space.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::fmt;

use tessera_api::v1alpha1::{
    AdmissionRule, ReclaimPolicy, ReclaimTier, StoragePriorityClassSpec, VictimPolicy,
};

use super::ExtentRange;
use super::accounting::{ExtentState, VolumeUsage};

/// Which reclaim tiers the pool enables (`StoragePool.spec.reclaim.tiers`, D-26).
///
/// Tiers are always used in Fig. 7 order — `Unused` before `LowPriority` ([0055]) — whatever
/// order the list has; the list only says which are enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TierSet {
    pub unused: bool,
    pub low_priority: bool,
}

impl TierSet {
    pub const BOTH: TierSet = TierSet {
        unused: true,
        low_priority: true,
    };
    pub const NONE: TierSet = TierSet {
        unused: false,
        low_priority: false,
    };

    pub const fn contains(&self, tier: ReclaimTier) -> bool {
        match tier {
            ReclaimTier::Unused => self.unused,
            ReclaimTier::LowPriority => self.low_priority,
        }
    }
}

impl From<&[ReclaimTier]> for TierSet {
    fn from(tiers: &[ReclaimTier]) -> Self {
        TierSet {
            unused: tiers.contains(&ReclaimTier::Unused),
            low_priority: tiers.contains(&ReclaimTier::LowPriority),
        }
    }
}

/// The pool's reclaim rules (`StoragePool.spec.reclaim` without the timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReclaimRules {
    pub tiers: TierSet,
    pub victim_policy: VictimPolicy,
    pub admission: AdmissionRule,
}

impl Default for ReclaimRules {
    fn default() -> Self {
        ReclaimRules::from(&ReclaimPolicy::default())
    }
}

impl From<&ReclaimPolicy> for ReclaimRules {
    fn from(policy: &ReclaimPolicy) -> Self {
        ReclaimRules {
            tiers: TierSet::from(policy.tiers.as_slice()),
            victim_policy: policy.victim_policy,
            admission: policy.admission,
        }
    }
}

/// What a volume's priority class says about reclaiming it (`StoragePriorityClass.spec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VictimClass {
    /// Class value; higher wins (D-19).
    pub value: i32,
    /// `reclaimable.unused`.
    pub unused: bool,
    /// `reclaimable.lowPriorityData`.
    pub low_priority_data: bool,
}

impl VictimClass {
    /// A class of value 0 whose space may be reclaimed in both tiers (the API defaults).
    pub const DEFAULT: VictimClass = VictimClass {
        value: 0,
        unused: true,
        low_priority_data: true,
    };

    pub const fn allows(&self, tier: ReclaimTier) -> bool {
        match tier {
            ReclaimTier::Unused => self.unused,
            ReclaimTier::LowPriority => self.low_priority_data,
        }
    }
}

impl From<&StoragePriorityClassSpec> for VictimClass {
    fn from(spec: &StoragePriorityClassSpec) -> Self {
        VictimClass {
            value: spec.value,
            unused: spec.reclaimable.unused,
            low_priority_data: spec.reclaimable.low_priority_data,
        }
    }
}

/// One existing volume of the pool, as reclaim sees it (entry 300, [0023]).
///
/// `usage` is the volume's own counters in virtual extents (`VirtualVolume.status.usage`, counted
/// once whatever the copies); each virtual extent occupies `copies` pool extents.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeCandidate {
    /// `VirtualVolume` name; unique in the pool; the tie-breaker.
    pub name: String,
    pub usage: VolumeUsage,
    /// Replicas per extent (`spec.copies`); 0 is read as 1.
    pub copies: u8,
    pub class: VictimClass,
}

impl VolumeCandidate {
    /// Virtual extents this volume holds in `tier`, whether or not it may give them.
    pub const fn extents_in(&self, tier: ReclaimTier) -> u64 {
        match tier {
            ReclaimTier::Unused => self.usage.unused(),
            ReclaimTier::LowPriority => self.usage.low_priority(),
        }
    }

    /// Pool extents per virtual extent.
    pub const fn pool_extents_per_extent(&self) -> u64 {
        if self.copies == 0 {
            1
        } else {
            self.copies as u64
        }
    }

    /// Pool extents releasing all of `tier` would free.
    pub const fn pool_extents_in(&self, tier: ReclaimTier) -> u64 {
        self.extents_in(tier)
            .saturating_mul(self.pool_extents_per_extent())
    }
}

/// The area allocation command 400 ([0030]–[0031]): a volume of `extents` virtual extents with
/// `copies` replicas for a claim of a given class. N = `extents × copies` pool extents.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct AllocationRequest {
    /// Virtual extents of the volume (size rounded up to whole extents).
    pub extents: u64,
    /// Replicas (`spec.copies`, 1–3); each needs its own pool extents.
    pub copies: u8,
    /// The claim's class value (only `LowerPriorityFirst` uses it).
    pub priority_value: i32,
    /// The requester's own volumes (for example the volume a growing claim is bound to); never
    /// victims.
    pub own_volumes: Vec<String>,
}

impl AllocationRequest {
    /// N: pool extents the request needs.
    pub const fn pool_extents(&self) -> u64 {
        self.extents.saturating_mul(self.copies as u64)
    }
}

/// The pool as allocation sees it: U and the volumes. All counts in pool extents except each
/// volume's own `usage` (see [`VolumeCandidate`]).
#[derive(Debug, Clone, Copy)]
pub struct PoolSnapshot<'a> {
    /// U: unallocated pool extents (320).
    pub unallocated: u64,
    pub volumes: &'a [VolumeCandidate],
}

/// The numbers of the admission test 600 ([0045]), in pool extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// N.
    pub requested: u64,
    /// U.
    pub unallocated: u64,
    /// F: unused extents of eligible volumes.
    pub reclaimable_unused: u64,
    /// L: low-priority extents of eligible volumes.
    pub reclaimable_low_priority: u64,
    pub rule: AdmissionRule,
}

impl Admission {
    /// U + F + L, without overflow.
    pub const fn obtainable(&self) -> u128 {
        self.unallocated as u128
            + self.reclaimable_unused as u128
            + self.reclaimable_low_priority as u128
    }

    /// The test of 600: C3 of [0045] (C1 and C2 imply it).
    pub const fn admits(&self) -> bool {
        let n = self.requested as u128;
        match self.rule {
            AdmissionRule::Strict => self.obtainable() > n,
            AdmissionRule::Inclusive => self.obtainable() >= n,
        }
    }

    /// Which of the conditions of [0045] holds first: C1 (no reclaim), C2 (unused suffices),
    /// C3 (low-priority data needed), or none.
    pub fn condition(&self) -> Option<AdmissionCondition> {
        let n = self.requested as u128;
        let u = self.unallocated as u128;
        let uf = u + self.reclaimable_unused as u128;
        let ufl = self.obtainable();
        let holds = |sum: u128| match self.rule {
            AdmissionRule::Strict => sum > n,
            AdmissionRule::Inclusive => sum >= n,
        };
        if holds(u) {
            Some(AdmissionCondition::C1Unallocated)
        } else if holds(uf) {
            Some(AdmissionCondition::C2Unused)
        } else if holds(ufl) {
            Some(AdmissionCondition::C3LowPriority)
        } else {
            None
        }
    }
}

/// The three conditions of seed 000 [0045].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdmissionCondition {
    /// C1: U alone.
    C1Unallocated,
    /// C2: U + F.
    C2Unused,
    /// C3: U + F + L.
    C3LowPriority,
}

/// One area return command 450 ([0036]–[0037], [0057]): ask `volume` to give back `extents`
/// of its virtual extents of `tier`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AreaReturn {
    pub volume: String,
    pub tier: ReclaimTier,
    /// Virtual extents this return names: exactly what is still needed (rounded up to whole
    /// virtual extents), at most what the volume holds in the tier. [`select_return_ranges`]
    /// turns it into ranges.
    pub extents: u64,
    /// Pool extents the return frees: `extents × copies`.
    pub pool_extents: u64,
}

impl AreaReturn {
    /// Whether the return discards data (tier `LowPriority`): the controller emits the
    /// `LowPriorityDataReclaimed` warning (seed 000 §8.5).
    pub const fn discards_data(&self) -> bool {
        matches!(self.tier, ReclaimTier::LowPriority)
    }
}

/// An admitted request: the admission numbers and the ordered returns to issue. No returns means
/// direct allocation from the unallocated extents (604 → 608).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationPlan {
    pub admission: Admission,
    pub returns: Vec<AreaReturn>,
}

impl AllocationPlan {
    /// Whether the request is allocated without reclaim.
    pub fn is_direct(&self) -> bool {
        self.returns.is_empty()
    }

    /// Pool extents the returns free in total.
    pub fn reclaimed(&self) -> u64 {
        self.returns.iter().map(|r| r.pool_extents).sum()
    }
}

/// A rejected request (602, [0046]) with the numbers that explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub admission: Admission,
    /// Victims excluded because they did not give space back in time (D-18), in name order.
    pub skipped_victims: Vec<String>,
}

impl Rejection {
    /// `StorageClaim.status.reason`.
    pub const REASON: &'static str = "InsufficientCapacity";
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.admission;
        write!(
            f,
            "the claim needs {} extents but at most {} can be made free: {} unallocated, \
             {} unused and {} low-priority extents of other volumes that may be reclaimed",
            a.requested,
            a.obtainable(),
            a.unallocated,
            a.reclaimable_unused,
            a.reclaimable_low_priority,
        )?;
        match a.rule {
            AdmissionRule::Strict => write!(
                f,
                " (admission is Strict: more than {} are needed)",
                a.requested
            )?,
            AdmissionRule::Inclusive => write!(f, " (admission is Inclusive)")?,
        }
        if !self.skipped_victims.is_empty() {
            write!(
                f,
                "; skipped because they did not give space back in time: {}",
                self.skipped_victims.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Why no plan was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// Not admitted ([0045]–[0046]); nothing may change.
    #[error("{0}")]
    InsufficientCapacity(Rejection),
    /// A request for zero extents or zero copies (the API never sends one).
    #[error("the claim requests {extents} extents with {copies} copies; both must be at least 1")]
    EmptyRequest { extents: u64, copies: u8 },
}

/// Fig. 6 + Fig. 7: admits or rejects the request and plans the returns.
pub fn plan_allocation(
    pool: PoolSnapshot<'_>,
    request: &AllocationRequest,
    rules: &ReclaimRules,
) -> Result<AllocationPlan, AllocationError> {
    replan_excluding(pool, request, rules, &BTreeSet::new())
}

/// [`plan_allocation`] with `skipped` volumes excluded as victims: the re-plan after a victim
/// did not return its extents within `returnTimeoutSeconds` (seed 000 §5.6 item 5, D-18). Call it
/// with the *current* pool state; the loop terminates because every timeout adds a name to
/// `skipped` and a plan only names volumes not in it.
pub fn replan_excluding(
    pool: PoolSnapshot<'_>,
    request: &AllocationRequest,
    rules: &ReclaimRules,
    skipped: &BTreeSet<String>,
) -> Result<AllocationPlan, AllocationError> {
    if request.extents == 0 || request.copies == 0 {
        return Err(AllocationError::EmptyRequest {
            extents: request.extents,
            copies: request.copies,
        });
    }
    let own: BTreeSet<&str> = request.own_volumes.iter().map(String::as_str).collect();
    let policy_allows = |v: &VolumeCandidate| match rules.victim_policy {
        VictimPolicy::LargestFirst => true,
        VictimPolicy::LowerPriorityFirst => v.class.value < request.priority_value,
    };
    let eligible = |v: &VolumeCandidate, tier: ReclaimTier| {
        rules.tiers.contains(tier)
            && v.class.allows(tier)
            && v.extents_in(tier) > 0
            && policy_allows(v)
            && !own.contains(v.name.as_str())
            && !skipped.contains(&v.name)
    };
    // 600: one pass for F and L; the victims are ordered only if reclaim is needed.
    let (mut f, mut l) = (0u64, 0u64);
    for volume in pool.volumes {
        if eligible(volume, ReclaimTier::Unused) {
            f = f.saturating_add(volume.pool_extents_in(ReclaimTier::Unused));
        }
        if eligible(volume, ReclaimTier::LowPriority) {
            l = l.saturating_add(volume.pool_extents_in(ReclaimTier::LowPriority));
        }
    }
    let admission = Admission {
        requested: request.pool_extents(),
        unallocated: pool.unallocated,
        reclaimable_unused: f,
        reclaimable_low_priority: l,
        rule: rules.admission,
    };
    if !admission.admits() {
        return Err(AllocationError::InsufficientCapacity(Rejection {
            admission,
            skipped_victims: skipped.iter().cloned().collect(),
        }));
    }
    // 604/708: reclaim only while U < N.
    let mut shortfall = request.pool_extents().saturating_sub(pool.unallocated);
    let mut returns = Vec::new();
    for (tier, tier_total) in [(ReclaimTier::Unused, f), (ReclaimTier::LowPriority, l)] {
        if shortfall == 0 {
            break;
        }
        // 700/704: the volume with the most extents of the tier by the current counts. Taking
        // all of a victim's extents leaves it with none, so the next pick is the next key.
        let keys: Vec<VictimKey<'_>> = pool
            .volumes
            .iter()
            .enumerate()
            .filter(|(_, v)| eligible(v, tier))
            .map(|(index, v)| {
                VictimKey::new(v, index, v.pool_extents_in(tier), rules.victim_policy)
            })
            .collect();
        let mut take = |key: VictimKey<'_>, shortfall: &mut u64| {
            let volume = &pool.volumes[key.index.0];
            let per_extent = volume.pool_extents_per_extent();
            let extents = volume.extents_in(tier).min(shortfall.div_ceil(per_extent));
            let pool_extents = extents * per_extent;
            *shortfall = shortfall.saturating_sub(pool_extents);
            returns.push(AreaReturn {
                volume: volume.name.clone(),
                tier,
                extents,
                pool_extents,
            });
        };
        if shortfall >= tier_total {
            // Every victim of the tier is taken: one sort beats popping a heap dry.
            let mut keys = keys;
            keys.sort_unstable_by(|a, b| b.cmp(a));
            for key in keys {
                take(key, &mut shortfall);
            }
        } else {
            let mut heap = BinaryHeap::from(keys);
            while shortfall > 0 {
                let Some(key) = heap.pop() else { break };
                take(key, &mut shortfall);
            }
        }
    }
    debug_assert_eq!(
        shortfall, 0,
        "admission guarantees enough reclaimable space"
    );
    Ok(AllocationPlan { admission, returns })
}

/// Heap key: the greatest key is the next victim.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct VictimKey<'a> {
    /// `LowerPriorityFirst`: lowest class value first; `LargestFirst`: unused (always equal).
    lowest_class: Reverse<i32>,
    /// Most pool extents of the tier first ([0054], [0056]).
    count: u64,
    /// Ties: name order.
    name: Reverse<&'a str>,
    /// Duplicate names (invalid input) still order deterministically.
    index: Reverse<usize>,
}

impl<'a> VictimKey<'a> {
    fn new(volume: &'a VolumeCandidate, index: usize, count: u64, policy: VictimPolicy) -> Self {
        VictimKey {
            lowest_class: Reverse(match policy {
                VictimPolicy::LargestFirst => 0,
                VictimPolicy::LowerPriorityFirst => volume.class.value,
            }),
            count,
            name: Reverse(volume.name.as_str()),
            index: Reverse(index),
        }
    }
}

/// The extent state a tier takes.
pub const fn tier_state(tier: ReclaimTier) -> ExtentState {
    match tier {
        ReclaimTier::Unused => ExtentState::Unused,
        ReclaimTier::LowPriority => ExtentState::LowPriority,
    }
}

/// Which virtual extents one return names (field 460 of command 450, [0057]): up to `extents`
/// extents in the tier's state, taken from the end of the volume backwards, as coalesced ranges
/// in volume order.
///
/// From the end because file systems place their metadata and first data at low offsets, so
/// the tail is the least likely to be written while the return is in flight, and taking a
/// contiguous tail yields few ranges. If the volume holds fewer such extents than asked (its
/// counters were stale), the result is shorter; the controller re-plans after the return.
pub fn select_return_ranges(
    states: &[ExtentState],
    tier: ReclaimTier,
    extents: u64,
) -> Vec<ExtentRange> {
    let wanted = tier_state(tier);
    let mut remaining = extents;
    let mut picked: Vec<ExtentRange> = Vec::new();
    for (i, state) in states.iter().enumerate().rev() {
        if remaining == 0 {
            break;
        }
        if *state != wanted {
            continue;
        }
        remaining -= 1;
        let i = i as u64;
        match picked.last_mut() {
            Some(last) if last.start == i + 1 => {
                last.start = i;
                last.len += 1;
            }
            _ => picked.push(ExtentRange::new(i, 1)),
        }
    }
    picked.reverse();
    picked
}

/// The re-check under the hold (D-17): of the ranges a return named, the extents still in the
/// tier's state. Only these are released; an extent written since the plan (unused → in use, or
/// low → high priority) is kept, so reclaim never frees data the tier does not cover.
/// The named extents that are mapped (any state but unallocated): what a `discard` release
/// returns without looking at the usage.
pub fn mapped_named(states: &[ExtentState], named: &[ExtentRange]) -> Vec<ExtentRange> {
    let mut kept = Vec::new();
    for range in super::coalesce(named.to_vec()) {
        let end = range.end().min(states.len() as u64);
        for i in range.start..end {
            if states[i as usize] != ExtentState::Unallocated {
                kept.push(ExtentRange::new(i, 1));
            }
        }
    }
    super::coalesce(kept)
}

pub fn recheck_under_hold(
    states: &[ExtentState],
    named: &[ExtentRange],
    tier: ReclaimTier,
) -> Vec<ExtentRange> {
    let wanted = tier_state(tier);
    let mut kept = Vec::new();
    for range in super::coalesce(named.to_vec()) {
        let end = range.end().min(states.len() as u64);
        for i in range.start..end {
            if states[i as usize] == wanted {
                kept.push(ExtentRange::new(i, 1));
            }
        }
    }
    super::coalesce(kept)
}

/// Whether a return requested at `requested_at` (Unix seconds) is overdue at `now` under
/// `returnTimeoutSeconds`. A clock that went backwards never makes a return overdue.
pub const fn is_return_overdue(requested_at: i64, now: i64, timeout_seconds: i32) -> bool {
    match now.checked_sub(requested_at) {
        Some(elapsed) => elapsed >= timeout_seconds as i64,
        None => false,
    }
}
