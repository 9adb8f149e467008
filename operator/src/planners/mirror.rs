//! Mirror pairs (seed 003): the pair state machine, the secondary mount check (the claimed
//! invention), secondary selection (its reference JP 2001-318833) and the resync extent set, as
//! pure decisions.
//!
//! [`step`] takes the [`MirrorPairState`] and one [`Event`] (a spec change, a node's answers, a
//! copy or cut result, a dirty-bit report, a reconcile) and returns the next state and the
//! [`Command`]s to carry out, in order. The controller persists the state before it acts, like
//! the remap coordinator. Nothing here reads a clock or talks to a node: time-dependent things
//! (the answer deadline of a mount inquiry, `checkedAt`) stay in the controller, which reports
//! the outcome as an event.
//!
//! Every command that starts asynchronous work (an inquiry round, a copy pass, a split cut)
//! carries an operation number `op`; its result events carry it back, and a result for any other
//! `op` is ignored. So a repeated, late or crossed event changes nothing.
//!
//! Units: extents of the pool (`StoragePool.spec.extentSizeBytes`), as in every planner; bytes
//! only for `dirtyBytes` and the resync size. Decisions the seed leaves open are M-n in
//! `docs/mirror.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use roaring::RoaringTreemap;
use tessera_api::v1alpha1::{
    MirrorPairSpec, MirrorPairStatus, MirrorPhase, MirrorState, MountAnswer, MountCheckPolicy,
    SecondaryAccessor, SecondarySelection,
};

use super::ExtentRange;

/// Warning: the secondary is (or may be) in use on a node that can reach it — seed 003 claims
/// 1, 2, 7: "output that effect from the user interface".
pub const REASON_SECONDARY_MOUNTED: &str = "SecondaryVolumeMounted";
/// Warning: `overrideMountCheck` let a `Block` shift go on although the secondary is in use
/// (D-13: the override is audited).
pub const REASON_MOUNT_CHECK_OVERRIDDEN: &str = "MountCheckOverridden";
/// Warning: a split was asked for while the pair is not Paired (JP [0044]; M-1).
pub const REASON_SPLIT_REJECTED: &str = "SplitRejected";
/// Warning: the quiesce for the split cut failed (M-11).
pub const REASON_SPLIT_FAILED: &str = "SplitFailed";
/// Normal: the formation copy starts (JP S705, [0069]).
pub const REASON_FORMATION_STARTED: &str = "FormationCopyStarted";
/// Normal: the formation copy reached 100 % (JP Duplex, [0039]–[0044]).
pub const REASON_PAIR_FORMED: &str = "PairFormed";
/// Normal: the split point was cut; the secondary is frozen (JP [0007]).
pub const REASON_PAIR_SPLIT: &str = "PairSplit";
/// Normal: the copy of un-reflected data starts (seed 003 §4.1 step 4).
pub const REASON_RESYNC_STARTED: &str = "ResyncStarted";
/// Normal: `desiredState` went back to Split before the resync started (M-12).
pub const REASON_RESYNC_CANCELLED: &str = "ResyncCancelled";
/// Normal: the resync finished; writes are mirrored again.
pub const REASON_PAIR_RESYNCED: &str = "PairResynced";
pub const REASON_FORMATION_FAILED: &str = "FormationCopyFailed";
pub const REASON_RESYNC_FAILED: &str = "ResyncFailed";
/// Warning: no candidate fits the selection (JP S703, [0071]).
pub const REASON_NO_SUITABLE_SECONDARY: &str = "NoSuitableSecondary";
/// Warning: a role change of a paired volume was refused (JP S901 [0082], S1504 [0124]).
pub const REASON_ROLE_CHANGE_REFUSED: &str = "RoleChangeRefused";

/// True while the last inquiry had a node with the secondary in use or unanswered (seed 003
/// claims 1–2; D-9).
pub const CONDITION_SECONDARY_MOUNTED: &str = "SecondaryMounted";
/// True in Paired: the secondary equals the primary (JP Duplex).
pub const CONDITION_SYNCHRONIZED: &str = "Synchronized";
/// True while `mountCheck: Block` holds a formation or resync (seed 003 §8.2 `ShiftBlocked`,
/// an inference).
pub const CONDITION_SHIFT_BLOCKED: &str = "ShiftBlocked";

// ---------------------------------------------------------------------------------------------
// Mount check (seed 003 claims 1–3, 5, 7, 8, 10; §4.2, §4.3)
// ---------------------------------------------------------------------------------------------

/// One node's answer to the mount inquiry (seed 003 claim 1: "inquiring … whether the
/// information processing unit mounts the second logical volume"). It says *how* the node uses
/// the secondary, which the API's [`MountAnswer`] cannot (docs/mirror.md, API gaps); the
/// warning names it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum NodeAnswer {
    /// A file system on the secondary is in the node's mount table.
    Mounted,
    /// Published to a pod (raw block included: a block consumer writes without mounting,
    /// seed 003 §8.4 item 1).
    Published,
    /// Staged only: no pod yet, but the next publish needs nothing from the operator, so a
    /// resync could overwrite it under a starting workload.
    Staged,
    /// None of the above.
    NotInUse,
    /// No answer before the controller's deadline. Counts as in use (D-9: the unreachable node
    /// may be exactly the one using the secondary).
    NoAnswer,
}

impl NodeAnswer {
    /// Whether this answer raises the warning (every answer except `NotInUse`).
    pub const fn possibly_in_use(self) -> bool {
        !matches!(self, NodeAnswer::NotInUse)
    }

    /// `status.secondaryAccessors[].mounted`.
    pub const fn to_api(self) -> MountAnswer {
        match self {
            NodeAnswer::Mounted | NodeAnswer::Published | NodeAnswer::Staged => MountAnswer::True,
            NodeAnswer::NotInUse => MountAnswer::False,
            NodeAnswer::NoAnswer => MountAnswer::Unknown,
        }
    }

    const fn describe(self) -> &'static str {
        match self {
            NodeAnswer::Mounted => "mounted",
            NodeAnswer::Published => "published",
            NodeAnswer::Staged => "staged",
            NodeAnswer::NotInUse => "not in use",
            NodeAnswer::NoAnswer => "no answer",
        }
    }
}

/// What to do with the pending formation or resync after the inquiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MountDecision {
    /// No node that can reach the secondary has it in use: go on, no warning.
    Proceed,
    /// Warn, then go on: `mountCheck: Warn` (the minimum the claims require, D-22), or `Block`
    /// with `overrideMountCheck` (D-13).
    ProceedWithWarning,
    /// Warn and hold the shift: `mountCheck: Block` (seed 003 §4.2 leaves this open; D-22).
    Wait,
}

/// The outcome of one inquiry round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountCheck {
    pub decision: MountDecision,
    /// Every reachable node with its answer, in name order (`status.secondaryAccessors`).
    /// Answers from nodes that cannot reach the secondary are not in it.
    pub answers: Vec<(String, NodeAnswer)>,
    /// The nodes the warning names: every answer except `NotInUse`, in name order.
    pub in_use: Vec<String>,
    /// `overrideMountCheck` turned a `Wait` into `ProceedWithWarning`.
    pub overridden: bool,
}

impl MountCheck {
    /// "node-2 (mounted), node-4 (no answer)".
    pub fn in_use_text(&self) -> String {
        self.answers
            .iter()
            .filter(|(_, a)| a.possibly_in_use())
            .map(|(n, a)| format!("{n} ({})", a.describe()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Decides the inquiry (seed 003 claim 1: "deciding whether the information processing unit
/// mounts the second logical volume"). Only `reachable` nodes count (the claims inquire "an
/// information processing unit which can access the second logical volume"); a reachable node
/// missing from `answers` did not answer and counts as [`NodeAnswer::NoAnswer`]. An empty
/// `reachable` set proceeds: no node can have the secondary.
pub fn decide_mount_check(
    policy: MountCheckPolicy,
    override_mount_check: bool,
    reachable: &BTreeSet<String>,
    answers: &BTreeMap<String, NodeAnswer>,
) -> MountCheck {
    let answers: Vec<(String, NodeAnswer)> = reachable
        .iter()
        .map(|n| (n.clone(), *answers.get(n).unwrap_or(&NodeAnswer::NoAnswer)))
        .collect();
    let in_use: Vec<String> = answers
        .iter()
        .filter(|(_, a)| a.possibly_in_use())
        .map(|(n, _)| n.clone())
        .collect();
    let (decision, overridden) = match (in_use.is_empty(), policy) {
        (true, _) => (MountDecision::Proceed, false),
        (false, MountCheckPolicy::Warn) => (MountDecision::ProceedWithWarning, false),
        (false, MountCheckPolicy::Block) if override_mount_check => {
            (MountDecision::ProceedWithWarning, true)
        }
        (false, MountCheckPolicy::Block) => (MountDecision::Wait, false),
    };
    MountCheck {
        decision,
        answers,
        in_use,
        overridden,
    }
}

// ---------------------------------------------------------------------------------------------
// Resync extent set (seed 003 §4.1 step 4, §8.4 item 3)
// ---------------------------------------------------------------------------------------------

/// What a resync copies: the extents written on the primary since the split (not reflected to
/// the secondary) **and** the extents the secondary itself changed while split (the resync
/// overwrites them: that loss is why the mount check exists, seed 003 §1).
#[derive(Debug, Clone, PartialEq)]
pub struct ResyncSet {
    pub extents: RoaringTreemap,
    /// Dirty on the primary.
    pub primary_dirty: u64,
    /// Changed on the secondary.
    pub secondary_changed: u64,
    /// In both (counted once in `extents`).
    pub both: u64,
    /// Bytes the copy moves.
    pub bytes: u64,
}

impl ResyncSet {
    pub fn len(&self) -> u64 {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// The set as sorted, coalesced extent ranges (what [`Command::StartCopy`] carries).
    pub fn ranges(&self) -> Vec<ExtentRange> {
        extent_ranges(&self.extents)
    }
}

/// `primary_dirty ∪ secondary_changed`, with the bytes to copy.
pub fn resync_set(
    primary_dirty: &RoaringTreemap,
    secondary_changed: &RoaringTreemap,
    extent_size_bytes: u64,
) -> ResyncSet {
    let extents = primary_dirty | secondary_changed;
    ResyncSet {
        primary_dirty: primary_dirty.len(),
        secondary_changed: secondary_changed.len(),
        both: primary_dirty.intersection_len(secondary_changed),
        bytes: extents.len().saturating_mul(extent_size_bytes),
        extents,
    }
}

/// A set of extents as sorted, coalesced ranges.
pub fn extent_ranges(set: &RoaringTreemap) -> Vec<ExtentRange> {
    let mut out: Vec<ExtentRange> = Vec::new();
    for extent in set.iter() {
        match out.last_mut() {
            Some(last) if last.end() == extent => last.len += 1,
            _ => out.push(ExtentRange::new(extent, 1)),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The pair state machine (seed 003 §5.1; JP [0039]–[0044]; ARCHITECTURE §7)
// ---------------------------------------------------------------------------------------------

/// What the node plugins translating the primary do with a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DataPath {
    /// Primary only, nothing recorded (no pair, or a failed formation: it restarts from 0).
    Unpaired,
    /// Primary and secondary; acknowledged after both (seed 003 claim 1 "first process"; also
    /// during a formation copy or resync: JP Duplex-Pending runs the update copy, [0039]).
    Mirror,
    /// Primary only, each written extent marked in the node's dirty bitmap (claim 1 "second
    /// process", suspended; the un-reflected data of §4.1 step 4).
    Track,
}

/// Which copy a pass is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CopyKind {
    /// Every extent, primary → secondary (JP formation copy, S705).
    Formation,
    /// Only the resync set (seed 003 §4.1 step 4).
    Resync,
}

/// What the state machine reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Sent at the start of every reconcile with the nodes that can reach the secondary now
    /// (attached, staged or published there). No mount check starts before the first one: an
    /// unknown set is not an empty set. While a shift is held by `Block`, each one starts a new
    /// inquiry round (seed 003 §8.3 item 7); a changed set restarts an unanswered round.
    Reconcile {
        accessors: BTreeSet<String>,
    },
    /// `spec.desiredState` (seed 003 claim 1: suspend / shift back, on a user request).
    DesiredStateChanged(MirrorState),
    /// `spec.mountCheck`.
    MountCheckPolicyChanged(MountCheckPolicy),
    /// `spec.overrideMountCheck` (D-13).
    OverrideSet(bool),
    /// The answers of inquiry round `op`; a node of the round that is missing did not answer.
    MountCheckResult {
        op: u64,
        answers: BTreeMap<String, NodeAnswer>,
    },
    FormationCopyProgress {
        op: u64,
        percent: u8,
    },
    FormationCopyDone {
        op: u64,
    },
    FormationCopyFailed {
        op: u64,
        cause: String,
    },
    /// Every node translating the primary was held, switched to [`DataPath::Track`] and
    /// released: the secondary is frozen at that instant (JP [0007]).
    SplitCutDone {
        op: u64,
    },
    /// The quiesce failed; no node switched (the controller switches only once all are held).
    SplitCutFailed {
        op: u64,
        cause: String,
    },
    ResyncProgress {
        op: u64,
        percent: u8,
    },
    /// Pass `op` copied its extents, and every node has switched to mirrored writes and
    /// delivered its last dirty bits (so no write made while tracking is still unreported).
    ResyncDone {
        op: u64,
    },
    ResyncFailed {
        op: u64,
        cause: String,
    },
    /// Dirty bits from a node: extents written on the primary while tracking.
    PrimaryWrite {
        extents: Vec<ExtentRange>,
    },
    /// Extents written on the secondary while it was split (used independently, seed 003 §4.1
    /// step 3); a resync overwrites them.
    SecondaryWrite {
        extents: Vec<ExtentRange>,
    },
    /// Re-run the failed formation or resync (a user action; see the API gaps).
    Retry,
}

/// What the controller carries out, in order, after persisting the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Ask each node whether it has the secondary staged, published or mounted (seed 003 claim
    /// 1 "inquiring"); answer with [`Event::MountCheckResult`] for `op`.
    StartMountCheck { op: u64, nodes: Vec<String> },
    /// Switch every node translating the primary to this mode.
    SetDataPath(DataPath),
    /// Copy these extents primary → secondary; report progress and the outcome for `op`.
    StartCopy {
        op: u64,
        kind: CopyKind,
        ranges: Vec<ExtentRange>,
    },
    /// Stop copy `op` (only on release).
    CancelCopy { op: u64 },
    /// Hold the primary's writers on every node, switch them to [`DataPath::Track`] with empty
    /// bitmaps, release them; answer with [`Event::SplitCutDone`] / [`Event::SplitCutFailed`].
    QuiesceAndCut { op: u64 },
    /// Drop the dirty bitmaps (nodes and `status.dirtyBytes`): the secondary has everything.
    ClearDirty,
    /// A Warning event.
    Warn {
        reason: &'static str,
        message: String,
    },
    /// A Normal event.
    Note {
        reason: &'static str,
        message: String,
    },
    /// Set a status condition (issued only when its status or message changes).
    SetCondition {
        kind: &'static str,
        status: bool,
        reason: &'static str,
        message: String,
    },
}

/// Why the pair is `Failed`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub during: CopyKind,
    pub cause: String,
}

/// A pending shift guarded by the mount check: the formation (claim 2) or the resync (claim 1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Gate {
    purpose: CopyKind,
    /// The current inquiry round.
    op: u64,
    /// The nodes asked in this round.
    asked: BTreeSet<String>,
    /// `None` while the round is unanswered; only `Wait` is ever kept (proceeding ends the gate).
    decision: Option<MountDecision>,
    /// The nodes the last warning of this gate named: the warning repeats only when they change.
    warned: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct CopyPass {
    op: u64,
    kind: CopyKind,
    /// A resync pass's extents (kept so a failure puts them back); empty for a formation.
    extents: RoaringTreemap,
}

/// The fixed facts of a pair, and the spec fields the machine starts from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PairSetup {
    pub primary: String,
    pub secondary: String,
    /// The primary's size in extents: what the formation copies and what dirty bits may name.
    pub extents: u64,
    pub extent_size_bytes: u64,
    pub desired: MirrorState,
    pub mount_check: MountCheckPolicy,
    pub override_mount_check: bool,
}

impl PairSetup {
    /// From the spec and the secondary in use (named, or chosen by [`select_secondary`]).
    pub fn from_spec(
        spec: &MirrorPairSpec,
        secondary: impl Into<String>,
        extents: u64,
        extent_size_bytes: u64,
    ) -> Self {
        PairSetup {
            primary: spec.primary.clone(),
            secondary: secondary.into(),
            extents,
            extent_size_bytes,
            desired: spec.desired_state,
            mount_check: spec.mount_check,
            override_mount_check: spec.override_mount_check,
        }
    }
}

/// The state of one MirrorPair.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MirrorPairState {
    setup: PairSetup,
    phase: MirrorPhase,
    data_path: DataPath,
    progress: u8,
    /// A formation copy has completed (JP: Duplex is entered only from a 100 % copy pointer).
    formed: bool,
    /// Primary extents written while tracking, not yet in a copy pass.
    dirty: RoaringTreemap,
    /// Secondary extents written while split, not yet in a copy pass.
    changed: RoaringTreemap,
    copy: Option<CopyPass>,
    /// The outstanding split cut.
    cut: Option<u64>,
    /// A cut failed; the next reconcile retries it.
    cut_retry_wait: bool,
    gate: Option<Gate>,
    /// `None` until the first [`Event::Reconcile`].
    accessors: Option<BTreeSet<String>>,
    /// The last round's answers (`status.secondaryAccessors`).
    answers: Vec<(String, NodeAnswer)>,
    conditions: BTreeMap<String, (bool, String)>,
    failure: Option<Failure>,
    last_op: u64,
}

impl MirrorPairState {
    /// A new pair in `Simplex` (JP: not forming a pair). Nothing happens before the first
    /// [`Event::Reconcile`].
    pub fn new(setup: PairSetup) -> Self {
        MirrorPairState {
            setup,
            phase: MirrorPhase::Simplex,
            data_path: DataPath::Unpaired,
            progress: 0,
            formed: false,
            dirty: RoaringTreemap::new(),
            changed: RoaringTreemap::new(),
            copy: None,
            cut: None,
            cut_retry_wait: false,
            gate: None,
            accessors: None,
            answers: Vec::new(),
            conditions: BTreeMap::new(),
            failure: None,
            last_op: 0,
        }
    }

    pub fn primary(&self) -> &str {
        &self.setup.primary
    }

    pub fn secondary(&self) -> &str {
        &self.setup.secondary
    }

    pub fn extents(&self) -> u64 {
        self.setup.extents
    }

    pub fn phase(&self) -> MirrorPhase {
        self.phase
    }

    pub fn desired(&self) -> MirrorState {
        self.setup.desired
    }

    pub fn mount_check(&self) -> MountCheckPolicy {
        self.setup.mount_check
    }

    pub fn override_mount_check(&self) -> bool {
        self.setup.override_mount_check
    }

    pub fn data_path(&self) -> DataPath {
        self.data_path
    }

    /// `status.copyProgressPercent` of the current (or last) copy.
    pub fn copy_progress_percent(&self) -> u8 {
        self.progress
    }

    /// Whether a formation copy has completed.
    pub fn formation_complete(&self) -> bool {
        self.formed
    }

    /// Primary extents written while tracking that no copy pass holds yet.
    pub fn primary_dirty(&self) -> &RoaringTreemap {
        &self.dirty
    }

    /// Secondary extents written while split that no copy pass holds yet.
    pub fn secondary_changed(&self) -> &RoaringTreemap {
        &self.changed
    }

    /// Every extent the secondary may still lack: dirty, changed, and the running resync pass.
    pub fn pending_extents(&self) -> RoaringTreemap {
        let mut all = &self.dirty | &self.changed;
        if let Some(pass) = &self.copy {
            all |= &pass.extents;
        }
        all
    }

    /// `status.dirtyBytes`.
    pub fn dirty_bytes(&self) -> u64 {
        self.pending_extents()
            .len()
            .saturating_mul(self.setup.extent_size_bytes)
    }

    /// The running copy: its `op` and kind.
    pub fn copy_in_flight(&self) -> Option<(u64, CopyKind)> {
        self.copy.as_ref().map(|c| (c.op, c.kind))
    }

    /// The extents of the running copy pass: every extent for a formation, the pass's set for a
    /// resync. A restarted controller re-runs the pass from these.
    pub fn copy_pass_extents(&self) -> Option<RoaringTreemap> {
        let copy = self.copy.as_ref()?;
        Some(match copy.kind {
            CopyKind::Formation => {
                let mut all = RoaringTreemap::new();
                all.insert_range(0..self.setup.extents);
                all
            }
            CopyKind::Resync => copy.extents.clone(),
        })
    }

    /// The inquiry round waiting for answers and the nodes it asks (a restarted controller asks
    /// them again).
    pub fn mount_check_round(&self) -> Option<(u64, Vec<String>)> {
        self.gate
            .as_ref()
            .filter(|g| g.decision.is_none())
            .map(|g| (g.op, g.asked.iter().cloned().collect()))
    }

    /// The outstanding split cut.
    pub fn cut_in_flight(&self) -> Option<u64> {
        self.cut
    }

    /// The shift a mount check currently guards, if any.
    pub fn awaiting_mount_check(&self) -> Option<CopyKind> {
        self.gate.as_ref().map(|g| g.purpose)
    }

    /// The inquiry round waiting for answers.
    pub fn mount_check_in_flight(&self) -> Option<u64> {
        self.gate
            .as_ref()
            .filter(|g| g.decision.is_none())
            .map(|g| g.op)
    }

    /// `mountCheck: Block` holds the shift.
    pub fn is_blocked(&self) -> bool {
        matches!(&self.gate, Some(g) if g.decision == Some(MountDecision::Wait))
    }

    /// The answers of the last inquiry round.
    pub fn accessor_answers(&self) -> &[(String, NodeAnswer)] {
        &self.answers
    }

    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// The last status a condition was set to.
    pub fn condition(&self, kind: &str) -> Option<bool> {
        self.conditions.get(kind).map(|(s, _)| *s)
    }

    /// The highest operation number issued so far.
    pub fn last_op(&self) -> u64 {
        self.last_op
    }

    /// The operation whose result is awaited: an inquiry round, a copy pass or a cut.
    pub fn outstanding_op(&self) -> Option<u64> {
        self.mount_check_in_flight()
            .or(self.copy.as_ref().map(|c| c.op))
            .or(self.cut)
    }

    /// The status fields the planner owns (conditions come as [`Command::SetCondition`];
    /// `checkedAt`, `lastSyncTime` and `observedGeneration` are the controller's).
    /// JP pair status report, [0084]–[0087]: secondary, copy pointer, pair status.
    pub fn status(&self) -> MirrorPairStatus {
        MirrorPairStatus {
            phase: Some(self.phase),
            secondary_name: Some(self.setup.secondary.clone()),
            copy_progress_percent: Some(i32::from(self.progress)),
            dirty_bytes: Some(i64::try_from(self.dirty_bytes()).unwrap_or(i64::MAX)),
            secondary_accessors: self
                .answers
                .iter()
                .map(|(node, answer)| SecondaryAccessor {
                    node: node.clone(),
                    mounted: answer.to_api(),
                    checked_at: None,
                })
                .collect(),
            message: self.message(),
            ..MirrorPairStatus::default()
        }
    }

    fn message(&self) -> Option<String> {
        if let Some(f) = &self.failure {
            let what = match f.during {
                CopyKind::Formation => "formation copy",
                CopyKind::Resync => "resync",
            };
            return Some(format!("the {what} failed: {}", f.cause));
        }
        if self.is_blocked() {
            return self
                .conditions
                .get(CONDITION_SHIFT_BLOCKED)
                .map(|(_, m)| m.clone());
        }
        None
    }

    fn next_op(&mut self) -> u64 {
        self.last_op += 1;
        self.last_op
    }

    fn copy_is(&self, kind: CopyKind, op: u64) -> bool {
        matches!(&self.copy, Some(c) if c.kind == kind && c.op == op)
    }

    /// Whether node dirty bits can describe real un-mirrored writes now: while split, while a
    /// cut is in flight (nodes may already track), during a resync (late reports of writes made
    /// while tracking) and after a failed resync (the data path tracks again).
    fn tracks_writes(&self) -> bool {
        match self.phase {
            MirrorPhase::Split | MirrorPhase::Resyncing => true,
            MirrorPhase::Paired => self.cut.is_some(),
            MirrorPhase::Failed => {
                matches!(&self.failure, Some(f) if f.during == CopyKind::Resync)
            }
            MirrorPhase::Simplex | MirrorPhase::Copying => false,
        }
    }

    /// The extents of `ranges` inside the volume.
    fn clip(&self, ranges: &[ExtentRange]) -> RoaringTreemap {
        let mut set = RoaringTreemap::new();
        for r in ranges {
            let start = r.start.min(self.setup.extents);
            let end = r.end().min(self.setup.extents);
            if start < end {
                set.insert_range(start..end);
            }
        }
        set
    }

    fn set_path(&mut self, path: DataPath, out: &mut Vec<Command>) {
        if self.data_path != path {
            self.data_path = path;
            out.push(Command::SetDataPath(path));
        }
    }

    fn set_condition(
        &mut self,
        kind: &'static str,
        status: bool,
        reason: &'static str,
        message: String,
        out: &mut Vec<Command>,
    ) {
        let value = (status, message);
        if self.conditions.get(kind) != Some(&value) {
            out.push(Command::SetCondition {
                kind,
                status,
                reason,
                message: value.1.clone(),
            });
            self.conditions.insert(kind.to_string(), value);
        }
    }

    /// Sets `kind` to False only if it is True now (conditions that are absent mean False).
    fn clear_condition(
        &mut self,
        kind: &'static str,
        reason: &'static str,
        message: String,
        out: &mut Vec<Command>,
    ) {
        if self.condition(kind) == Some(true) {
            self.set_condition(kind, false, reason, message, out);
        }
    }

    fn pair_name(&self) -> String {
        format!("{} → {}", self.setup.primary, self.setup.secondary)
    }

    // --- events ------------------------------------------------------------------------------

    fn apply(&mut self, event: Event, out: &mut Vec<Command>) {
        match event {
            Event::Reconcile { accessors } => self.on_reconcile(accessors, out),
            Event::DesiredStateChanged(desired) => self.on_desired(desired, out),
            Event::MountCheckPolicyChanged(policy) => {
                if self.setup.mount_check != policy {
                    self.setup.mount_check = policy;
                    self.redecide(out);
                }
            }
            Event::OverrideSet(flag) => {
                if self.setup.override_mount_check != flag {
                    self.setup.override_mount_check = flag;
                    self.redecide(out);
                }
            }
            Event::MountCheckResult { op, answers } => {
                if self.mount_check_in_flight() == Some(op) {
                    self.decide(&answers, out);
                }
            }
            Event::FormationCopyProgress { op, percent } => {
                self.on_progress(CopyKind::Formation, op, percent)
            }
            Event::ResyncProgress { op, percent } => {
                self.on_progress(CopyKind::Resync, op, percent)
            }
            Event::FormationCopyDone { op } => {
                if self.copy_is(CopyKind::Formation, op) {
                    self.formation_done(out);
                }
            }
            Event::FormationCopyFailed { op, cause } => {
                if self.copy_is(CopyKind::Formation, op) {
                    self.copy_failed(cause, out);
                }
            }
            Event::ResyncDone { op } => {
                if self.copy_is(CopyKind::Resync, op) {
                    self.resync_pass_done(out);
                }
            }
            Event::ResyncFailed { op, cause } => {
                if self.copy_is(CopyKind::Resync, op) {
                    self.copy_failed(cause, out);
                }
            }
            Event::SplitCutDone { op } => {
                if self.cut == Some(op) {
                    self.cut_done(out);
                }
            }
            Event::SplitCutFailed { op, cause } => {
                if self.cut == Some(op) {
                    // M-11: stay Paired (mirroring never stopped); retry at the next reconcile
                    // rather than at once, so a persistent failure does not spin.
                    self.cut = None;
                    self.cut_retry_wait = true;
                    out.push(Command::Warn {
                        reason: REASON_SPLIT_FAILED,
                        message: format!(
                            "the split of {} could not quiesce the primary's writers ({cause}); \
                             the pair stays Paired and the split is retried at the next reconcile",
                            self.pair_name()
                        ),
                    });
                }
            }
            Event::PrimaryWrite { extents } => {
                if self.tracks_writes() {
                    let set = self.clip(&extents);
                    self.dirty |= set;
                }
            }
            Event::SecondaryWrite { extents } => {
                if self.tracks_writes() {
                    let set = self.clip(&extents);
                    self.changed |= set;
                }
            }
            Event::Retry => self.on_retry(out),
        }
    }

    fn on_reconcile(&mut self, accessors: BTreeSet<String>, out: &mut Vec<Command>) {
        let changed = self.accessors.as_ref() != Some(&accessors);
        self.accessors = Some(accessors);
        self.cut_retry_wait = false;
        match self.gate.as_ref().map(|g| g.decision) {
            // The round asked a stale set of nodes: ask the current ones.
            Some(None) if changed => self.start_round(out),
            // Held by Block: check again (seed 003 §8.3 item 7), so an unmount lets it go on.
            Some(Some(MountDecision::Wait)) => self.start_round(out),
            _ => {}
        }
    }

    fn on_desired(&mut self, desired: MirrorState, out: &mut Vec<Command>) {
        if self.setup.desired == desired {
            return;
        }
        self.setup.desired = desired;
        if desired != MirrorState::Split {
            return;
        }
        match self.phase {
            // The cut itself is started by `drive`.
            MirrorPhase::Paired => {}
            MirrorPhase::Split => {
                // M-12: the user went back to Split before the resync started: nothing is
                // overwritten, so the shift and its warning end here.
                if self.gate.take().is_some() {
                    out.push(Command::Note {
                        reason: REASON_RESYNC_CANCELLED,
                        message: format!(
                            "desiredState is Split again; the resync of {} was not started",
                            self.pair_name()
                        ),
                    });
                    self.clear_condition(
                        CONDITION_SECONDARY_MOUNTED,
                        "NoShiftPending",
                        "no formation or resync is pending".into(),
                        out,
                    );
                    self.clear_condition(
                        CONDITION_SHIFT_BLOCKED,
                        "NoShiftPending",
                        "no formation or resync is pending".into(),
                        out,
                    );
                }
            }
            // JP [0044]: no split in Duplex-Pending; M-1 extends that to every phase in which
            // the secondary is not a complete image. The spec keeps saying Split, so the cut
            // follows as soon as the pair is Paired.
            MirrorPhase::Simplex
            | MirrorPhase::Copying
            | MirrorPhase::Resyncing
            | MirrorPhase::Failed => out.push(self.split_rejected()),
        }
    }

    fn split_rejected(&self) -> Command {
        let state = match self.phase {
            MirrorPhase::Copying => format!("Copying ({} % of the formation copy)", self.progress),
            MirrorPhase::Resyncing => format!("Resyncing ({} % of the resync)", self.progress),
            other => format!("{other:?}"),
        };
        Command::Warn {
            reason: REASON_SPLIT_REJECTED,
            message: format!(
                "split of {} refused while the pair is {state}: the secondary is not a complete \
                 image of the primary yet; the split point is cut as soon as the pair is Paired",
                self.pair_name()
            ),
        }
    }

    fn on_progress(&mut self, kind: CopyKind, op: u64, percent: u8) {
        if self.copy_is(kind, op) {
            // M-9: monotonic, and 100 % only with the Done event (JP: Duplex at 100 %).
            self.progress = self.progress.max(percent.min(99));
        }
    }

    fn on_retry(&mut self, out: &mut Vec<Command>) {
        if self.phase != MirrorPhase::Failed {
            return;
        }
        match self.failure.as_ref().map(|f| f.during) {
            Some(CopyKind::Formation) => {
                // Start over: `drive` opens the formation's mount check again (claim 2).
                self.phase = MirrorPhase::Simplex;
                self.failure = None;
                self.progress = 0;
            }
            Some(CopyKind::Resync) if self.gate.is_none() => self.open_gate(CopyKind::Resync, out),
            _ => {}
        }
    }

    fn formation_done(&mut self, out: &mut Vec<Command>) {
        self.copy = None;
        self.phase = MirrorPhase::Paired;
        self.progress = 100;
        self.formed = true;
        // The full copy covers everything; nothing tracked can predate it.
        self.dirty.clear();
        self.changed.clear();
        let message = format!(
            "formation copy of {} complete ({} extents); writes are mirrored",
            self.pair_name(),
            self.setup.extents
        );
        out.push(Command::Note {
            reason: REASON_PAIR_FORMED,
            message: message.clone(),
        });
        self.set_condition(CONDITION_SYNCHRONIZED, true, "Paired", message, out);
    }

    fn copy_failed(&mut self, cause: String, out: &mut Vec<Command>) {
        let Some(pass) = self.copy.take() else {
            return;
        };
        let (reason, what, path) = match pass.kind {
            // A failed formation restarts from 0: tracking would buy nothing.
            CopyKind::Formation => (
                REASON_FORMATION_FAILED,
                "formation copy",
                DataPath::Unpaired,
            ),
            // M-8: the pass's extents are not known to be copied: back into the dirty set, and
            // the nodes track again so nothing written from now on is lost either.
            CopyKind::Resync => (REASON_RESYNC_FAILED, "resync", DataPath::Track),
        };
        self.dirty |= pass.extents;
        self.phase = MirrorPhase::Failed;
        self.failure = Some(Failure {
            during: pass.kind,
            cause: cause.clone(),
        });
        self.set_path(path, out);
        let message = format!(
            "the {what} of {} failed: {cause}; the secondary is not consistent; retry to run it \
             again",
            self.pair_name()
        );
        out.push(Command::Warn {
            reason,
            message: message.clone(),
        });
        self.set_condition(CONDITION_SYNCHRONIZED, false, reason, message, out);
    }

    fn resync_pass_done(&mut self, out: &mut Vec<Command>) {
        self.copy = None;
        if !self.dirty.is_empty() || !self.changed.is_empty() {
            // M-6: dirty bits reported during the pass (writes made while tracking): another
            // pass, Paired only when one ends with nothing left.
            self.start_resync_pass(out);
            return;
        }
        self.phase = MirrorPhase::Paired;
        self.progress = 100;
        out.push(Command::ClearDirty);
        let message = format!(
            "resync of {} complete; the secondary equals the primary and writes are mirrored",
            self.pair_name()
        );
        out.push(Command::Note {
            reason: REASON_PAIR_RESYNCED,
            message: message.clone(),
        });
        self.set_condition(CONDITION_SYNCHRONIZED, true, "Paired", message, out);
    }

    fn cut_done(&mut self, out: &mut Vec<Command>) {
        self.cut = None;
        self.phase = MirrorPhase::Split;
        // The cut switched the nodes inside the hold; no separate command.
        self.data_path = DataPath::Track;
        let message = format!(
            "{} split: the secondary is frozen at the split point; primary writes are tracked",
            self.pair_name()
        );
        out.push(Command::Note {
            reason: REASON_PAIR_SPLIT,
            message: message.clone(),
        });
        self.set_condition(CONDITION_SYNCHRONIZED, false, "Split", message, out);
    }

    // --- the mount-check gate ----------------------------------------------------------------

    fn open_gate(&mut self, purpose: CopyKind, out: &mut Vec<Command>) {
        if self.accessors.is_none() {
            return;
        }
        self.gate = Some(Gate {
            purpose,
            op: 0,
            asked: BTreeSet::new(),
            decision: None,
            warned: Vec::new(),
        });
        self.start_round(out);
    }

    fn start_round(&mut self, out: &mut Vec<Command>) {
        let Some(accessors) = self.accessors.clone() else {
            return;
        };
        if self.gate.is_none() {
            return;
        }
        let op = self.next_op();
        let nodes: Vec<String> = accessors.iter().cloned().collect();
        if let Some(gate) = self.gate.as_mut() {
            gate.op = op;
            gate.asked = accessors;
            gate.decision = None;
        }
        if nodes.is_empty() {
            // No node can reach the secondary: nobody to ask, nobody using it.
            self.decide(&BTreeMap::new(), out);
        } else {
            out.push(Command::StartMountCheck { op, nodes });
        }
    }

    fn decide(&mut self, answers: &BTreeMap<String, NodeAnswer>, out: &mut Vec<Command>) {
        let Some(gate) = self.gate.as_ref() else {
            return;
        };
        let check = decide_mount_check(
            self.setup.mount_check,
            self.setup.override_mount_check,
            &gate.asked,
            answers,
        );
        self.answers = check.answers.clone();
        self.apply_check(check, out);
    }

    /// A policy or override change while `Block` holds the shift: decide again on the same
    /// answers (no new round needed to let it go).
    fn redecide(&mut self, out: &mut Vec<Command>) {
        if self.is_blocked() {
            let answers: BTreeMap<String, NodeAnswer> = self.answers.iter().cloned().collect();
            self.decide(&answers, out);
        }
    }

    fn apply_check(&mut self, check: MountCheck, out: &mut Vec<Command>) {
        let Some(mut gate) = self.gate.take() else {
            return;
        };
        gate.decision = Some(check.decision);
        let (operation, overwrite) = match gate.purpose {
            CopyKind::Formation => ("formation copy", "overwrites its whole content"),
            CopyKind::Resync => (
                "resync",
                "overwrites every extent written to it since the split",
            ),
        };
        if check.in_use.is_empty() {
            self.set_condition(
                CONDITION_SECONDARY_MOUNTED,
                false,
                "NotMounted",
                format!(
                    "no node that can reach {} has it staged, published or mounted",
                    self.setup.secondary
                ),
                out,
            );
        } else {
            let effect = match check.decision {
                MountDecision::Wait => format!(
                    "mountCheck: Block holds the {operation} until it is unmounted everywhere or \
                     overrideMountCheck is set"
                ),
                _ if check.overridden => {
                    format!("the {operation} goes on because overrideMountCheck is set")
                }
                _ => format!("the {operation} goes on (mountCheck: Warn)"),
            };
            let message = format!(
                "secondary volume {} of pair {} is in use or unanswered on {}; the {operation} \
                 {overwrite}; {effect}",
                self.setup.secondary,
                self.pair_name(),
                check.in_use_text()
            );
            // The claimed output (seed 003 claims 1, 2): once per set of nodes, before any copy.
            if gate.warned != check.in_use {
                out.push(Command::Warn {
                    reason: REASON_SECONDARY_MOUNTED,
                    message: message.clone(),
                });
                gate.warned = check.in_use.clone();
            }
            self.set_condition(
                CONDITION_SECONDARY_MOUNTED,
                true,
                "MountedOnNodes",
                message,
                out,
            );
        }
        match check.decision {
            MountDecision::Wait => {
                self.set_condition(
                    CONDITION_SHIFT_BLOCKED,
                    true,
                    "SecondaryMounted",
                    format!(
                        "the {operation} of {} waits until {} is unmounted on {} or \
                         overrideMountCheck is set",
                        self.pair_name(),
                        self.setup.secondary,
                        check.in_use.join(", ")
                    ),
                    out,
                );
                self.gate = Some(gate);
            }
            MountDecision::Proceed | MountDecision::ProceedWithWarning => {
                if check.overridden {
                    out.push(Command::Warn {
                        reason: REASON_MOUNT_CHECK_OVERRIDDEN,
                        message: format!(
                            "overrideMountCheck is set: the {operation} of {} starts although {} \
                             is in use or unanswered on {}",
                            self.pair_name(),
                            self.setup.secondary,
                            check.in_use.join(", ")
                        ),
                    });
                }
                self.clear_condition(
                    CONDITION_SHIFT_BLOCKED,
                    "Proceeding",
                    format!("the {operation} of {} started", self.pair_name()),
                    out,
                );
                self.proceed(gate.purpose, out);
            }
        }
    }

    fn proceed(&mut self, purpose: CopyKind, out: &mut Vec<Command>) {
        self.failure = None;
        self.set_path(DataPath::Mirror, out);
        match purpose {
            CopyKind::Formation => {
                self.phase = MirrorPhase::Copying;
                self.progress = 0;
                let op = self.next_op();
                out.push(Command::Note {
                    reason: REASON_FORMATION_STARTED,
                    message: format!(
                        "formation copy of {} started ({} extents)",
                        self.pair_name(),
                        self.setup.extents
                    ),
                });
                let ranges = if self.setup.extents == 0 {
                    Vec::new()
                } else {
                    vec![ExtentRange::new(0, self.setup.extents)]
                };
                out.push(Command::StartCopy {
                    op,
                    kind: CopyKind::Formation,
                    ranges,
                });
                self.copy = Some(CopyPass {
                    op,
                    kind: CopyKind::Formation,
                    extents: RoaringTreemap::new(),
                });
                if self.setup.desired == MirrorState::Split {
                    out.push(self.split_rejected());
                }
            }
            CopyKind::Resync => {
                self.phase = MirrorPhase::Resyncing;
                let set = resync_set(&self.dirty, &self.changed, self.setup.extent_size_bytes);
                out.push(Command::Note {
                    reason: REASON_RESYNC_STARTED,
                    message: format!(
                        "resync of {} started: {} extents ({} bytes): {} dirty on the primary, \
                         {} changed on the secondary while split",
                        self.pair_name(),
                        set.len(),
                        set.bytes,
                        set.primary_dirty,
                        set.secondary_changed
                    ),
                });
                self.start_resync_pass(out);
            }
        }
    }

    fn start_resync_pass(&mut self, out: &mut Vec<Command>) {
        let set = resync_set(&self.dirty, &self.changed, self.setup.extent_size_bytes);
        self.dirty.clear();
        self.changed.clear();
        self.progress = 0;
        let op = self.next_op();
        // Even an empty pass goes through the copier: its Done also confirms that every node
        // mirrors again and has delivered its last dirty bits.
        out.push(Command::StartCopy {
            op,
            kind: CopyKind::Resync,
            ranges: set.ranges(),
        });
        self.copy = Some(CopyPass {
            op,
            kind: CopyKind::Resync,
            extents: set.extents,
        });
    }

    /// Level-triggered progress: what the current phase and desired state call for.
    fn drive(&mut self, out: &mut Vec<Command>) {
        match self.phase {
            // Seed 003 claim 2: inquire before pair control is newly initiated.
            MirrorPhase::Simplex if self.gate.is_none() => self.open_gate(CopyKind::Formation, out),
            MirrorPhase::Paired
                if self.setup.desired == MirrorState::Split
                    && self.cut.is_none()
                    && !self.cut_retry_wait =>
            {
                let op = self.next_op();
                self.cut = Some(op);
                out.push(Command::QuiesceAndCut { op });
            }
            // Seed 003 claim 1: inquire when shifting from the second process back to the first.
            MirrorPhase::Split
                if self.setup.desired == MirrorState::Paired && self.gate.is_none() =>
            {
                self.open_gate(CopyKind::Resync, out)
            }
            _ => {}
        }
    }
}

/// The transition function: applies `event`, then does what the resulting phase and desired
/// state call for. A repeated event returns the same state and no commands.
pub fn step(mut state: MirrorPairState, event: Event) -> (MirrorPairState, Vec<Command>) {
    let mut out = Vec::new();
    state.apply(event, &mut out);
    state.drive(&mut out);
    (state, out)
}

// ---------------------------------------------------------------------------------------------
// Volumes: roles, pair flags, selection, release (JP 2001-318833 embodiments 1–3)
// ---------------------------------------------------------------------------------------------

/// A volume's attribute (JP attribute 202 / 1201). Not in the API yet (API gaps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VolumeRole {
    /// Holds user data ("通常ボリューム"); never chosen automatically.
    Normal,
    /// In use as, or planned as, a secondary ("副ボリューム").
    SecondaryCandidate,
}

/// Which side of a pair a volume is on (JP pair flag 203; the side is needed for the messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PairMembership {
    Unpaired,
    Primary,
    Secondary,
}

/// What the planner needs to know about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeView {
    pub name: String,
    pub size_extents: u64,
    pub pool: String,
    pub role: VolumeRole,
    pub pair: PairMembership,
}

impl VolumeView {
    pub fn is_paired(&self) -> bool {
        self.pair != PairMembership::Unpaired
    }
}

/// JP embodiment 2's in-use flag 1202 (Fig. 13), derived from role and pair flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InUseFlag {
    /// "無効": a normal volume.
    Invalid,
    /// "使用中": a secondary in a pair.
    InUse,
    /// "未使用": a secondary in no pair.
    Unused,
}

pub fn in_use_flag(volume: &VolumeView) -> InUseFlag {
    match (volume.role, volume.is_paired()) {
        (VolumeRole::Normal, _) => InUseFlag::Invalid,
        (VolumeRole::SecondaryCandidate, true) => InUseFlag::InUse,
        (VolumeRole::SecondaryCandidate, false) => InUseFlag::Unused,
    }
}

/// The unused secondaries, by name (JP secondary report S1700, [0132]; Fig. 20's list).
pub fn unused_secondaries(volumes: &[VolumeView]) -> Vec<String> {
    let mut names: Vec<String> = volumes
        .iter()
        .filter(|v| in_use_flag(v) == InUseFlag::Unused)
        .map(|v| v.name.clone())
        .collect();
    names.sort();
    names
}

/// How the chosen secondary's size is made equal to the primary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resize {
    None,
    /// Return these (virtual) extents of the secondary to the pool: its tail beyond the
    /// primary's size (JP S2203, [0155]; M-15) — a `releaseRanges` VolumeRemap (D-17).
    Return {
        range: ExtentRange,
    },
    /// Append this many extents from the pool's unallocated space (JP S2202, [0154]) — growth
    /// (D-33).
    Add {
        extents: u64,
    },
}

/// The chosen secondary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub secondary: String,
    pub resize: Resize,
    /// Its size in extents after the resize.
    pub size_after: u64,
}

/// Why a candidate was not chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// It is the primary.
    IsPrimary,
    /// Already in a pair (JP pair flag "pair formed" / in-use flag "in use").
    Paired(PairMembership),
    /// Role Normal: holds user data (JP S700 searches attribute "secondary" only).
    NormalRole,
    /// Another pool than the primary's (M-13).
    OtherPool { pool: String },
    /// `SameSize`: not exactly the primary's size.
    NotSameSize { size: u64 },
    /// `SameOrLarger` (or a named secondary): smaller than the primary.
    TooSmall { size: u64 },
    /// `ResizeToMatch`: growing it needs more than the pool's unallocated extents.
    ShortfallExceedsUnallocated { shortfall: u64, unallocated: u64 },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::IsPrimary => f.write_str("it is the primary"),
            Rejection::Paired(PairMembership::Primary) => {
                f.write_str("already the primary of a pair")
            }
            Rejection::Paired(_) => f.write_str("already the secondary of a pair"),
            Rejection::NormalRole => f.write_str(
                "role Normal (holds user data; only SecondaryCandidate volumes are chosen)",
            ),
            Rejection::OtherPool { pool } => write!(f, "in pool {pool}, not the primary's"),
            Rejection::NotSameSize { size } => {
                write!(f, "{size} extents, not the primary's size")
            }
            Rejection::TooSmall { size } => write!(f, "{size} extents, smaller than the primary"),
            Rejection::ShortfallExceedsUnallocated {
                shortfall,
                unallocated,
            } => write!(
                f,
                "needs {shortfall} more extents but the pool has {unallocated} unallocated"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// JP S703 ([0071], [0073]): nothing fits; every candidate with its reason.
    #[error("{}", no_suitable_text(.primary, .primary_extents, .selection, .rejected))]
    NoSuitableSecondary {
        primary: String,
        primary_extents: u64,
        selection: SecondarySelection,
        rejected: Vec<(String, Rejection)>,
    },
    /// The named secondary cannot take the pair.
    #[error("secondary {name} cannot be paired with {primary}: {rejection}")]
    NamedSecondaryUnsuitable {
        primary: String,
        name: String,
        rejection: Rejection,
    },
    /// The primary is itself a secondary: its content belongs to its pair and it cannot take
    /// another role while paired (JP [0082], [0124]).
    #[error("{primary} is the secondary of a pair and cannot be a primary while paired")]
    PrimaryIsSecondary { primary: String },
}

fn no_suitable_text(
    primary: &str,
    primary_extents: &u64,
    selection: &SecondarySelection,
    rejected: &[(String, Rejection)],
) -> String {
    let reasons = if rejected.is_empty() {
        "there are no candidate volumes".to_string()
    } else {
        rejected
            .iter()
            .map(|(n, r)| format!("{n}: {r}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!(
        "no suitable secondary for {primary} ({primary_extents} extents, {selection:?}): {reasons}"
    )
}

impl SelectionError {
    /// The Warning event reason for this error.
    pub fn reason(&self) -> &'static str {
        REASON_NO_SUITABLE_SECONDARY
    }
}

/// Chooses a secondary for `primary` among `candidates` (JP embodiment 1, Fig. 8, S700–S705;
/// embodiment 3, Fig. 24, S2200–S2205).
///
/// A candidate qualifies when it is not the primary, is in no pair, has role
/// `SecondaryCandidate` and lives in the primary's pool. Among the qualified (M-14, ties by
/// name, so the input order never matters):
/// - `SameSize`: exactly the primary's size (S700; "choose any one", [0068]).
/// - `SameOrLarger`: the smallest at least the primary's size (same size first, S700, then
///   larger, S702 — the smallest keeps large secondaries for large primaries).
/// - `ResizeToMatch`: same size (S2200); else the smallest larger one, whose tail is returned
///   (S2201/S2203); else the largest smaller one the pool's `unallocated_extents` can grow
///   (S2202) — the least data to move in each case.
pub fn select_secondary(
    primary: &VolumeView,
    selection: SecondarySelection,
    candidates: &[VolumeView],
    unallocated_extents: u64,
) -> Result<Selection, SelectionError> {
    if primary.pair == PairMembership::Secondary {
        return Err(SelectionError::PrimaryIsSecondary {
            primary: primary.name.clone(),
        });
    }
    let need = primary.size_extents;
    let mut rejected: Vec<(String, Rejection)> = Vec::new();
    // (tier, distance, name): the smallest key wins.
    let mut best: Option<((u8, u64, String), Selection)> = None;
    for c in candidates {
        let basic = if c.name == primary.name {
            Some(Rejection::IsPrimary)
        } else if c.is_paired() {
            Some(Rejection::Paired(c.pair))
        } else if c.role != VolumeRole::SecondaryCandidate {
            Some(Rejection::NormalRole)
        } else if c.pool != primary.pool {
            Some(Rejection::OtherPool {
                pool: c.pool.clone(),
            })
        } else {
            None
        };
        if let Some(r) = basic {
            rejected.push((c.name.clone(), r));
            continue;
        }
        let size = c.size_extents;
        let ranked: Result<(u8, u64, Resize), Rejection> = match selection {
            SecondarySelection::SameSize if size == need => Ok((0, 0, Resize::None)),
            SecondarySelection::SameSize => Err(Rejection::NotSameSize { size }),
            SecondarySelection::SameOrLarger if size >= need => Ok((0, size - need, Resize::None)),
            SecondarySelection::SameOrLarger => Err(Rejection::TooSmall { size }),
            SecondarySelection::ResizeToMatch if size == need => Ok((0, 0, Resize::None)),
            SecondarySelection::ResizeToMatch if size > need => Ok((
                1,
                size - need,
                Resize::Return {
                    range: ExtentRange::new(need, size - need),
                },
            )),
            SecondarySelection::ResizeToMatch if need - size <= unallocated_extents => Ok((
                2,
                need - size,
                Resize::Add {
                    extents: need - size,
                },
            )),
            SecondarySelection::ResizeToMatch => Err(Rejection::ShortfallExceedsUnallocated {
                shortfall: need - size,
                unallocated: unallocated_extents,
            }),
        };
        match ranked {
            Err(r) => rejected.push((c.name.clone(), r)),
            Ok((tier, distance, resize)) => {
                let key = (tier, distance, c.name.clone());
                let size_after = match resize {
                    Resize::None => size,
                    Resize::Return { .. } | Resize::Add { .. } => need,
                };
                if best.as_ref().is_none_or(|(k, _)| key < *k) {
                    best = Some((
                        key,
                        Selection {
                            secondary: c.name.clone(),
                            resize,
                            size_after,
                        },
                    ));
                }
            }
        }
    }
    match best {
        Some((_, selection)) => Ok(selection),
        None => {
            rejected.sort_by(|a, b| a.0.cmp(&b.0));
            Err(SelectionError::NoSuitableSecondary {
                primary: primary.name.clone(),
                primary_extents: need,
                selection,
                rejected,
            })
        }
    }
}

/// Checks a secondary named in `spec.secondary` (JP embodiment 2: the host chooses, [0110]).
/// It must not be the primary, must be in no pair and must hold the primary's extents; its role
/// and pool are the user's explicit choice (M-16), and the mount check still guards its data
/// (claim 2). A larger one is used as is (JP "no condition", [0047]).
pub fn check_named_secondary(
    primary: &VolumeView,
    secondary: &VolumeView,
) -> Result<Selection, SelectionError> {
    if primary.pair == PairMembership::Secondary {
        return Err(SelectionError::PrimaryIsSecondary {
            primary: primary.name.clone(),
        });
    }
    let rejection = if secondary.name == primary.name {
        Some(Rejection::IsPrimary)
    } else if secondary.is_paired() {
        Some(Rejection::Paired(secondary.pair))
    } else if secondary.size_extents < primary.size_extents {
        Some(Rejection::TooSmall {
            size: secondary.size_extents,
        })
    } else {
        None
    };
    match rejection {
        Some(rejection) => Err(SelectionError::NamedSecondaryUnsuitable {
            primary: primary.name.clone(),
            name: secondary.name.clone(),
            rejection,
        }),
        None => Ok(Selection {
            secondary: secondary.name.clone(),
            resize: Resize::None,
            size_after: secondary.size_extents,
        }),
    }
}

/// A role change refused because the volume is paired (JP S901, [0082]; S1504, [0124]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "volume {volume} is the {side} of a pair; its role cannot change from {from:?} to {to:?} \
     until the pair is released"
)]
pub struct RoleChangeRefused {
    pub volume: String,
    pub side: &'static str,
    pub from: VolumeRole,
    pub to: VolumeRole,
}

/// JP Fig. 10 / Fig. 17: a paired volume (either side) keeps its role; an unchanged role is
/// always fine.
pub fn check_role_change(volume: &VolumeView, to: VolumeRole) -> Result<(), RoleChangeRefused> {
    if volume.role == to || !volume.is_paired() {
        return Ok(());
    }
    Err(RoleChangeRefused {
        volume: volume.name.clone(),
        side: match volume.pair {
            PairMembership::Primary => "primary",
            _ => "secondary",
        },
        from: volume.role,
        to,
    })
}

/// The secondary's attribute after a pair release (JP post-release state 502, [0052]). Not in
/// the API yet (API gaps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ReleaseAs {
    /// S801, [0078]: the secondary becomes a normal volume (keeps its data as user data).
    Normal,
    /// S802, [0077]: the attribute is unchanged. The default: [0091]'s "predetermined fixed
    /// attribute" (M-17).
    #[default]
    Secondary,
}

/// What deleting a MirrorPair does (JP pair release, Fig. 9, S800–S802).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasePlan {
    /// Stop the copy, stop mirroring or tracking, drop the dirty bits.
    pub commands: Vec<Command>,
    /// The secondary's role afterwards. Both volumes' pair flags are cleared.
    pub secondary_role: VolumeRole,
}

pub fn plan_release(
    state: &MirrorPairState,
    release_as: ReleaseAs,
    secondary_role: VolumeRole,
) -> ReleasePlan {
    let mut commands = Vec::new();
    if let Some((op, _)) = state.copy_in_flight() {
        commands.push(Command::CancelCopy { op });
    }
    if state.data_path() != DataPath::Unpaired {
        commands.push(Command::SetDataPath(DataPath::Unpaired));
    }
    commands.push(Command::ClearDirty);
    ReleasePlan {
        commands,
        secondary_role: match release_as {
            ReleaseAs::Normal => VolumeRole::Normal,
            ReleaseAs::Secondary => secondary_role,
        },
    }
}
