//! The node I/O gate of one volume (seed 004 §7.1/§7.2/§11.4; ARCHITECTURE §4 "I/O gate").
//!
//! **Sans-I/O.** The gate is a plain state machine: it owns no task, no timer and no socket. The
//! engine calls [`IoGate::submit`] before translating a request and [`IoGate::complete`] when
//! it finished; the node-control service calls the control methods ([`IoGate::stage`],
//! [`IoGate::quiesce`], [`IoGate::commit`], [`IoGate::resume`], [`IoGate::rollback`],
//! [`IoGate::fence`]) and [`IoGate::tick`] with the current time. Every call returns what must
//! happen next as [`Effect`]s: answers to the operator, parked requests to dispatch, hold records
//! to persist, hold timeouts to report. Time is a value ([`Millis`]) passed in by the caller.
//!
//! **Hold domains.** A hold covers the whole volume or a set of extents ([`HoldScope`], built from
//! the [`MapDiff`] of the remap: seed 004 813' [0086]). The patent keeps one in-process queue per
//! hold entry (2232); here every admitted request is recorded with its extent span, and the drain
//! of a hold counts exactly the admitted requests whose span meets the scope (810' [0087]). A
//! request that touches a held extent is parked whole (§11.4: a request must not be split across
//! two mappings); requests elsewhere are admitted untouched (802' N).
//!
//! **Messages.** Every control message carries an [`OpRef`] (operation id, attempt, generation,
//! with the volume name beside it). A message of a retired operation, an older attempt or an older
//! generation is refused as stale; a repeat of an answered message gets the recorded answer and
//! changes nothing (seed 004 §11.3, AS-27). A refusal changes nothing either (§7.1 open point:
//! "state after an error reply: unchanged").
//!
//! The states follow §7.1: `Running` (no hold), `Draining` (hold set, requests of the scope still
//! in flight), `Held` (hold set and drained — the only state that accepts `Commit`), and
//! `Fenced` (excluded by the operator: never dispatches again until the volume is restaged).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use tessera_api::model::{ByteRange, ExtentMap, ExtentSize, Generation, MapDiff};

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

/// How many retired operation ids a gate remembers to refuse their late messages.
const RETIRED_MEMORY: usize = 64;

/// The operation a control message belongs to (node-control `OperationRef`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpRef {
    pub operation_id: String,
    /// From 1; the coordinator raises it on every retry after an abort (seed 004 610).
    pub attempt: u32,
    /// The mapping generation the step is about: the staged (target) generation.
    pub generation: Generation,
}

impl OpRef {
    pub fn new(operation_id: impl Into<String>, attempt: u32, generation: Generation) -> Self {
        OpRef {
            operation_id: operation_id.into(),
            attempt,
            generation,
        }
    }
}

/// What a hold covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldScope {
    /// Every request of the volume (seed 004 first embodiment, one hold flag per switch).
    WholeVolume,
    /// Requests touching these extents (sorted, disjoint, non-empty index ranges).
    Extents(Vec<Range<u64>>),
}

impl HoldScope {
    /// The extents a diff changes (range-limited hold, 813').
    pub fn from_diff(diff: &MapDiff) -> HoldScope {
        HoldScope::Extents(diff.changed_extent_ranges())
    }

    /// Normalises arbitrary extent ranges (drops empty ones, sorts, merges).
    pub fn extents(mut ranges: Vec<Range<u64>>) -> HoldScope {
        ranges.retain(|r| r.start < r.end);
        ranges.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        HoldScope::Extents(out)
    }

    /// Whether a request spanning `span` must wait for this hold.
    pub fn touches(&self, span: &Span) -> bool {
        match (self, span) {
            (HoldScope::WholeVolume, _) | (_, Span::WholeVolume) => true,
            (HoldScope::Extents(_), Span::Extents(r)) if r.start >= r.end => false,
            (HoldScope::Extents(ranges), Span::Extents(r)) => {
                let i = ranges.partition_point(|h| h.end <= r.start);
                ranges.get(i).is_some_and(|h| h.start < r.end)
            }
        }
    }
}

/// The extents a request touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Span {
    /// Flush: it must reach the areas of whatever map later writes land on, so any hold stops it.
    WholeVolume,
    /// Extent indices `[start, end)`; empty for a zero-length request (never held).
    Extents(Range<u64>),
}

impl Span {
    /// The extents of a byte range.
    pub fn of_bytes(range: ByteRange, extent_size: ExtentSize) -> Span {
        if range.is_empty() {
            return Span::Extents(0..0);
        }
        let start = extent_size.index_of(range.offset());
        let end = extent_size.index_of(range.end() - 1) + 1;
        Span::Extents(start..end)
    }
}

/// Identifies one request between `submit` and `complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// The answer to [`IoGate::submit`].
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Translate with `map` now and call [`IoGate::complete`] when done.
    Admitted { id: RequestId, map: Arc<ExtentMap> },
    /// Wait: a later [`Effect::Dispatch`] (or [`Effect::Fail`]) names this id.
    Parked { id: RequestId },
    /// Not served (the volume is fenced): fail it back with EIO.
    Refused(Refusal),
}

/// Which control message an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ControlKind {
    Stage,
    Quiesce,
    Commit,
    Resume,
    Rollback,
    Fence,
}

/// A successful answer (seed 004 704, 504/508/512/532).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The map of `generation` is staged beside the active one (532).
    Staged { generation: Generation },
    /// Held and drained (504); `active` is the generation requests were translated with.
    QuiesceComplete { active: Generation },
    /// The staged map is now active (508').
    Committed { active: Generation },
    /// The map from before the commit is active again (612').
    RolledBack { active: Generation },
    /// The hold is released; `redispatched` parked requests went out on `active` (512).
    Resumed {
        active: Generation,
        redispatched: usize,
    },
    /// Excluded: parked requests failed, new ones refused.
    Fenced,
}

/// Why a message or request was refused (seed 004 713/819: error + cause).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("message for volume {got}, this gate serves {expected}")]
    WrongVolume { expected: String, got: String },
    #[error("operation {operation_id} is retired")]
    RetiredOperation { operation_id: String },
    #[error("operation {active} holds the volume; {offered} must wait")]
    OtherOperation { active: String, offered: String },
    #[error("attempt {offered} is older than the current attempt {current}")]
    StaleAttempt { current: u32, offered: u32 },
    #[error("generation {offered} is stale (active {active}, staged {staged:?})")]
    StaleGeneration {
        active: Generation,
        staged: Option<Generation>,
        offered: Generation,
    },
    #[error("a different map is already staged for generation {generation}")]
    StagedConflict { generation: Generation },
    #[error("the map of generation {offered} does not fit the volume: {reason}")]
    IncompatibleMap { offered: Generation, reason: String },
    /// 706 N / 710 N / 816 N. `active` lets the coordinator recognise a resume that already
    /// happened (a restarted node that lost its answers).
    #[error("not held (state {state}, active generation {active})")]
    NotHeld {
        state: &'static str,
        active: Generation,
    },
    /// A quiesce for a step that was already resumed (it arrived late, after its abort).
    #[error("attempt {attempt} at generation {generation} was already resumed")]
    AlreadyResumed {
        attempt: u32,
        generation: Generation,
    },
    /// Commit while the hold still drains (706 requires the hold to be complete).
    #[error("the hold is still draining ({in_flight} requests in flight)")]
    StillDraining { in_flight: usize },
    #[error("nothing staged for generation {generation}")]
    NothingStaged { generation: Generation },
    #[error("no committed map to roll back from")]
    NothingToRollBack,
    #[error("attempt {attempt} at generation {generation} was rolled back; its commit is void")]
    RolledBack {
        attempt: u32,
        generation: Generation,
    },
    #[error("the volume is fenced for operation {operation_id}; restage it")]
    Fenced { operation_id: String },
}

/// One answered control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub kind: ControlKind,
    pub op: OpRef,
    pub result: Result<Reply, Refusal>,
}

/// What the hold must survive across a node-plugin restart (mapping cache, ARCHITECTURE §4):
/// "held for operation X at generation g". Written on every change while held, cleared at resume.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldRecord {
    pub volume: String,
    pub op: OpRef,
    pub scope: HoldScope,
    /// The map requests must use after the hold (the committed one, if the commit happened).
    pub active: Arc<ExtentMap>,
    /// The map from before the commit, while a rollback is still possible.
    pub previous: Option<Arc<ExtentMap>>,
    pub staged: Option<Arc<ExtentMap>>,
    pub fenced: bool,
    /// This hold's step was rolled back: a commit for it arriving after a restart stays void.
    pub rolled_back: bool,
}

/// What the caller must do after a gate call.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send this answer to the operator.
    Answer(Answer),
    /// A parked request may go now, translated with `map` (817'); it is in flight from here.
    Dispatch { id: RequestId, map: Arc<ExtentMap> },
    /// A parked request is failed back with EIO (fenced volume).
    Fail { id: RequestId, cause: Refusal },
    /// Report to the operator: the hold exceeded the hold timeout (820 → 718). The gate keeps
    /// holding.
    HoldTimeout { op: OpRef, held_since: Millis },
    /// Persist (atomically replace) the hold record of this volume.
    PersistHold(HoldRecord),
    /// Delete the hold record of this volume.
    ClearHold,
    /// Restarted inside a hold: ask the operator how the operation ended (§11.4).
    AskOperator { op: OpRef },
}

/// The §7.1 state name, for messages and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    Running,
    Draining,
    Held,
    Fenced,
}

impl GateState {
    fn name(self) -> &'static str {
        match self {
            GateState::Running => "Running",
            GateState::Draining => "Draining",
            GateState::Held => "Held",
            GateState::Fenced => "Fenced",
        }
    }
}

/// The operation the gate currently serves.
#[derive(Debug, Clone)]
struct CurrentOp {
    id: String,
    attempt: u32,
    /// Successful answers given, for idempotent repeats: keyed by kind, attempt and generation.
    /// Refusals are not recorded: they are recomputed, so one caused by a reordered message
    /// does not stick once the step it waited for happened.
    answers: BTreeMap<(ControlKind, u32, Generation), Reply>,
    /// The latest (attempt, generation) resumed, or refused a resume: a quiesce for it or an
    /// earlier step arriving afterwards is late and must not set a hold nobody will release.
    closed: Option<(u32, Generation)>,
    /// The latest (attempt, generation) rolled back: a commit for it arriving afterwards (a
    /// delayed one that lost the race against the rollback) must not undo the rollback.
    rolled_back: Option<(u32, Generation)>,
}

#[derive(Debug, Clone)]
struct Hold {
    op: OpRef,
    scope: HoldScope,
    /// Admitted requests meeting the scope that have not completed yet.
    draining: BTreeSet<RequestId>,
    /// When the first request was parked (805': the hold timer starts there).
    first_parked_at: Option<Millis>,
    /// Next time a HoldTimeout is reported.
    report_at: Option<Millis>,
    /// Whether the staged map was committed in this hold.
    committed: bool,
}

#[derive(Debug, Clone)]
struct Parked {
    id: RequestId,
    span: Span,
}

/// The I/O gate of one volume. See the module documentation.
#[derive(Debug, Clone)]
pub struct IoGate {
    volume: String,
    hold_timeout: Millis,
    active: Arc<ExtentMap>,
    previous: Option<Arc<ExtentMap>>,
    staged: Option<Arc<ExtentMap>>,
    op: Option<CurrentOp>,
    retired: VecDeque<String>,
    hold: Option<Hold>,
    fenced: bool,
    in_flight: BTreeMap<RequestId, Span>,
    parked: VecDeque<Parked>,
    next_id: u64,
}

impl IoGate {
    /// A gate serving `active`, not held. `hold_timeout` is timer 215 (`holdTimeoutMs`).
    pub fn new(volume: impl Into<String>, active: Arc<ExtentMap>, hold_timeout: Millis) -> Self {
        IoGate {
            volume: volume.into(),
            hold_timeout,
            active,
            previous: None,
            staged: None,
            op: None,
            retired: VecDeque::new(),
            hold: None,
            fenced: false,
            in_flight: BTreeMap::new(),
            parked: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Rebuilds the gate of a node plugin that restarted inside a hold (§11.4, AS-18): it comes
    /// back held (nothing can be in flight after a restart, so the drain is complete), arms the
    /// hold timer at `now` and asks the operator what happened. It never resumes by itself.
    pub fn restore(record: HoldRecord, hold_timeout: Millis, now: Millis) -> (Self, Vec<Effect>) {
        let op = record.op.clone();
        let committed = record.previous.is_some();
        let gate = IoGate {
            volume: record.volume,
            hold_timeout,
            active: record.active,
            previous: record.previous,
            staged: record.staged,
            op: Some(CurrentOp {
                id: op.operation_id.clone(),
                attempt: op.attempt,
                answers: BTreeMap::new(),
                closed: None,
                rolled_back: record.rolled_back.then_some((op.attempt, op.generation)),
            }),
            retired: VecDeque::new(),
            hold: Some(Hold {
                op: op.clone(),
                scope: record.scope,
                draining: BTreeSet::new(),
                first_parked_at: Some(now),
                report_at: Some(now.saturating_add(hold_timeout)),
                committed,
            }),
            fenced: record.fenced,
            in_flight: BTreeMap::new(),
            parked: VecDeque::new(),
            next_id: 0,
        };
        (gate, vec![Effect::AskOperator { op }])
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Changes timer 215 (`holdTimeoutMs`); a running hold timer keeps its current deadline.
    pub fn set_hold_timeout(&mut self, hold_timeout: Millis) {
        self.hold_timeout = hold_timeout;
    }

    /// The step the hold is set for, if any (for GetGateState and the copy of a held range).
    pub fn hold_op(&self) -> Option<&OpRef> {
        self.hold.as_ref().map(|h| &h.op)
    }

    /// The id of the operation the gate serves (held or last answered), if any.
    pub fn operation(&self) -> Option<(&str, u32)> {
        self.op.as_ref().map(|o| (o.id.as_str(), o.attempt))
    }

    /// Growth without a hold (ARCHITECTURE §6: runs appended or holes filled, nothing mapped
    /// moves, so no in-flight request can observe the change): `map` becomes active at once.
    /// Refused while a hold is set or the volume is fenced — a remap in progress owns the map —
    /// and for a generation that is not newer. The caller checked that the change is growth.
    pub fn apply_growth(&mut self, map: Arc<ExtentMap>) -> Result<(), Refusal> {
        if self.fenced {
            return Err(self.fenced_refusal());
        }
        if let Some(hold) = &self.hold {
            return Err(Refusal::OtherOperation {
                active: hold.op.operation_id.clone(),
                offered: format!("growth to generation {}", map.generation()),
            });
        }
        if map.generation() <= self.active.generation() {
            return Err(self.stale_generation(map.generation()));
        }
        if self
            .staged
            .as_ref()
            .is_some_and(|s| s.generation() <= map.generation())
        {
            self.staged = None;
        }
        self.active = map;
        Ok(())
    }

    pub fn state(&self) -> GateState {
        match &self.hold {
            _ if self.fenced => GateState::Fenced,
            None => GateState::Running,
            Some(h) if h.draining.is_empty() => GateState::Held,
            Some(_) => GateState::Draining,
        }
    }

    /// The map requests are translated with now.
    pub fn active(&self) -> &Arc<ExtentMap> {
        &self.active
    }

    pub fn staged(&self) -> Option<&Arc<ExtentMap>> {
        self.staged.as_ref()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Parked request ids in arrival order.
    pub fn parked(&self) -> Vec<RequestId> {
        self.parked.iter().map(|p| p.id).collect()
    }

    /// The hold record to persist, if held (the same one [`Effect::PersistHold`] carries).
    pub fn hold_record(&self) -> Option<HoldRecord> {
        self.hold.as_ref().map(|h| HoldRecord {
            volume: self.volume.clone(),
            op: h.op.clone(),
            scope: h.scope.clone(),
            active: Arc::clone(&self.active),
            previous: self.previous.clone(),
            staged: self.staged.clone(),
            fenced: self.fenced,
            rolled_back: self.op.as_ref().and_then(|o| o.rolled_back)
                == Some((h.op.attempt, h.op.generation)),
        })
    }

    // ---- data path -------------------------------------------------------------------------

    /// Admission of a request for `range` (a flush passes [`Span::WholeVolume`] through
    /// [`IoGate::submit_span`]). Seed 004 801/802': admitted (and counted in flight, 803') unless
    /// it touches a held domain, then parked in arrival order (805') and the hold timer armed.
    pub fn submit(&mut self, range: ByteRange, now: Millis) -> Admission {
        let span = Span::of_bytes(range, self.active.extent_size());
        self.submit_span(span, now)
    }

    /// [`IoGate::submit`] for an explicit span.
    pub fn submit_span(&mut self, span: Span, now: Millis) -> Admission {
        if self.fenced {
            return Admission::Refused(self.fenced_refusal());
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        match self.hold.as_mut() {
            Some(hold) if hold.scope.touches(&span) => {
                if hold.first_parked_at.is_none() {
                    hold.first_parked_at = Some(now);
                    hold.report_at = Some(now.saturating_add(self.hold_timeout));
                }
                self.parked.push_back(Parked { id, span });
                Admission::Parked { id }
            }
            _ => {
                self.in_flight.insert(id, span);
                Admission::Admitted {
                    id,
                    map: Arc::clone(&self.active),
                }
            }
        }
    }

    /// A request finished (807/808'). When it was the last one in flight in a draining hold, the
    /// hold completes and the quiesce is answered (810'/811).
    pub fn complete(&mut self, id: RequestId) -> Vec<Effect> {
        if self.in_flight.remove(&id).is_none() {
            return Vec::new();
        }
        let Some(hold) = self.hold.as_mut() else {
            return Vec::new();
        };
        if hold.draining.remove(&id) && hold.draining.is_empty() && !self.fenced {
            let op = hold.op.clone();
            let reply = Ok(Reply::QuiesceComplete {
                active: self.active.generation(),
            });
            return vec![self.answer(ControlKind::Quiesce, op, reply)];
        }
        Vec::new()
    }

    /// The hold timer (timer 215, 820): reports [`Effect::HoldTimeout`] once the first parked
    /// request waited `hold_timeout`, and again every further `hold_timeout` while the hold
    /// lasts (a lost report must not leave the host waiting). Never releases anything.
    pub fn tick(&mut self, now: Millis) -> Vec<Effect> {
        let timeout = self.hold_timeout;
        match self.hold.as_mut() {
            Some(hold) if !self.fenced => match (hold.report_at, hold.first_parked_at) {
                (Some(at), Some(since)) if now >= at => {
                    hold.report_at = Some(now.saturating_add(timeout.max(1)));
                    vec![Effect::HoldTimeout {
                        op: hold.op.clone(),
                        held_since: since,
                    }]
                }
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    }

    // ---- control messages ------------------------------------------------------------------

    /// `StageMapping` (530/531, 707 on the unused plane): keep `map` beside the active one. No
    /// I/O impact. Accepted while running or held for the same operation (the fourth
    /// embodiment builds each cycle's map during the hold, [0094]).
    pub fn stage(&mut self, volume: &str, op: OpRef, map: Arc<ExtentMap>) -> Vec<Effect> {
        let kind = ControlKind::Stage;
        // A repeat must carry the same map: check before the recorded answer is replayed.
        if let Some(staged) = &self.staged
            && staged.generation() == op.generation
            && **staged != *map
            && volume == self.volume
        {
            let refusal = Refusal::StagedConflict {
                generation: op.generation,
            };
            return vec![self.answer_unrecorded(kind, op, refusal)];
        }
        if let Some(done) = self.admit_message(kind, volume, &op) {
            return done;
        }
        let result = self.do_stage(&op, map);
        vec![self.answer(kind, op, result)]
    }

    fn do_stage(&mut self, op: &OpRef, map: Arc<ExtentMap>) -> Result<Reply, Refusal> {
        if self.fenced {
            return Err(self.fenced_refusal());
        }
        if map.generation() != op.generation {
            return Err(Refusal::IncompatibleMap {
                offered: op.generation,
                reason: format!("the map carries generation {}", map.generation()),
            });
        }
        if op.generation <= self.active.generation() {
            return Err(self.stale_generation(op.generation));
        }
        if let Some(staged) = &self.staged {
            if staged.generation() == op.generation && **staged != *map {
                return Err(Refusal::StagedConflict {
                    generation: op.generation,
                });
            }
            if staged.generation() > op.generation {
                return Err(self.stale_generation(op.generation));
            }
        }
        if map.extent_size() != self.active.extent_size() {
            return Err(Refusal::IncompatibleMap {
                offered: op.generation,
                reason: format!(
                    "extent size {} differs from the volume's {}",
                    map.extent_size(),
                    self.active.extent_size()
                ),
            });
        }
        if map.size_bytes() < self.active.size_bytes() {
            return Err(Refusal::IncompatibleMap {
                offered: op.generation,
                reason: "volumes only grow".to_string(),
            });
        }
        self.staged = Some(map);
        Ok(Reply::Staged {
            generation: op.generation,
        })
    }

    /// `Quiesce` (502/503, 812–814, 813'): set the hold on `scope`; the answer comes once every
    /// admitted request meeting the scope completed — at once when none is in flight, otherwise
    /// from the [`IoGate::complete`] call that drains it. A repeat while draining answers
    /// nothing new (the drain will); a repeat after the drain gets the same answer.
    pub fn quiesce(&mut self, volume: &str, op: OpRef, scope: HoldScope) -> Vec<Effect> {
        let kind = ControlKind::Quiesce;
        if let Some(done) = self.admit_message(kind, volume, &op) {
            return done;
        }
        if self.fenced {
            let refusal = Err(self.fenced_refusal());
            return vec![self.answer(kind, op, refusal)];
        }
        if let Some(hold) = &self.hold {
            if hold.op == op {
                // Still draining: the answer is on its way.
                return Vec::new();
            }
            // Held for an earlier step of this operation (a later attempt or cycle must first
            // be resumed: the coordinator always resumes before it re-quiesces).
            let refusal = Err(self.not_held("held for another attempt"));
            return vec![self.answer(kind, op, refusal)];
        }
        let closed = self.op.as_ref().and_then(|o| o.closed);
        if closed.is_some_and(|c| (op.attempt, op.generation) <= c) {
            let refusal = Err(Refusal::AlreadyResumed {
                attempt: op.attempt,
                generation: op.generation,
            });
            return vec![self.answer(kind, op, refusal)];
        }
        if op.generation < self.active.generation() {
            let refusal = Err(self.stale_generation(op.generation));
            return vec![self.answer(kind, op, refusal)];
        }
        let draining: BTreeSet<RequestId> = self
            .in_flight
            .iter()
            .filter(|(_, span)| scope.touches(span))
            .map(|(id, _)| *id)
            .collect();
        let drained = draining.is_empty();
        self.hold = Some(Hold {
            op: op.clone(),
            scope,
            draining,
            first_parked_at: None,
            report_at: None,
            committed: false,
        });
        self.previous = None;
        let mut effects = vec![self.persist()];
        if drained {
            let reply = Ok(Reply::QuiesceComplete {
                active: self.active.generation(),
            });
            effects.push(self.answer(kind, op, reply));
        }
        effects
    }

    /// `Commit` (506'/507', 706–708): refused unless held and drained for this operation and
    /// attempt; swaps the staged map in. Requests admitted afterwards, and parked ones at resume,
    /// use it.
    pub fn commit(&mut self, volume: &str, op: OpRef) -> Vec<Effect> {
        let kind = ControlKind::Commit;
        if let Some(done) = self.admit_message(kind, volume, &op) {
            return done;
        }
        let rolled_back = self.op.as_ref().and_then(|o| o.rolled_back);
        let result = if rolled_back.is_some_and(|r| (op.attempt, op.generation) <= r) {
            Err(Refusal::RolledBack {
                attempt: op.attempt,
                generation: op.generation,
            })
        } else {
            self.do_commit(&op)
        };
        let mut effects = Vec::new();
        if result.is_ok() {
            effects.push(self.persist());
        }
        effects.push(self.answer(kind, op, result));
        effects
    }

    fn do_commit(&mut self, op: &OpRef) -> Result<Reply, Refusal> {
        if self.fenced {
            return Err(self.fenced_refusal());
        }
        let state = self.state();
        let active = self.active.generation();
        let Some(hold) = self.hold.as_mut() else {
            return Err(Refusal::NotHeld {
                state: state.name(),
                active,
            });
        };
        if (hold.op.attempt, hold.op.generation) != (op.attempt, op.generation) {
            return Err(Refusal::NotHeld {
                state: "held for another step",
                active,
            });
        }
        if !hold.draining.is_empty() {
            return Err(Refusal::StillDraining {
                in_flight: hold.draining.len(),
            });
        }
        if hold.committed && self.active.generation() == op.generation {
            // Answered before under another key? Same state: same answer.
            return Ok(Reply::Committed {
                active: op.generation,
            });
        }
        let staged = match &self.staged {
            Some(s) if s.generation() == op.generation => Arc::clone(s),
            _ => {
                return Err(Refusal::NothingStaged {
                    generation: op.generation,
                });
            }
        };
        if !hold.committed {
            self.previous = Some(Arc::clone(&self.active));
        }
        hold.committed = true;
        self.active = staged;
        self.staged = None;
        Ok(Reply::Committed {
            active: op.generation,
        })
    }

    /// `Rollback` (612/612'): while held, make the map from before this hold's commit active
    /// again. Without a commit there is nothing to undo and the answer is the active generation.
    pub fn rollback(&mut self, volume: &str, op: OpRef) -> Vec<Effect> {
        let kind = ControlKind::Rollback;
        if let Some(done) = self.admit_message(kind, volume, &op) {
            return done;
        }
        let result = self.do_rollback(&op);
        let mut effects = Vec::new();
        if result.is_ok() {
            if let Some(current) = self.op.as_mut() {
                let step = (op.attempt, op.generation);
                current.rolled_back = Some(current.rolled_back.map_or(step, |r| r.max(step)));
                current
                    .answers
                    .remove(&(ControlKind::Commit, op.attempt, op.generation));
            }
            effects.push(self.persist());
        }
        effects.push(self.answer(kind, op, result));
        effects
    }

    fn do_rollback(&mut self, op: &OpRef) -> Result<Reply, Refusal> {
        if self.fenced {
            return Err(self.fenced_refusal());
        }
        let state = self.state();
        let active = self.active.generation();
        let Some(hold) = self.hold.as_mut() else {
            return Err(Refusal::NotHeld {
                state: state.name(),
                active,
            });
        };
        if (hold.op.attempt, hold.op.generation) != (op.attempt, op.generation) {
            return Err(Refusal::NotHeld {
                state: "held for another step",
                active,
            });
        }
        if hold.committed {
            let Some(previous) = self.previous.take() else {
                return Err(Refusal::NothingToRollBack);
            };
            self.staged = Some(std::mem::replace(&mut self.active, previous));
            hold.committed = false;
        }
        Ok(Reply::RolledBack {
            active: self.active.generation(),
        })
    }

    /// `Resume` (510/511, 815–817'): refused unless the hold is set for this very step (same
    /// attempt and generation) (held, or still draining —
    /// an abort after a quiesce timeout resumes nodes that never finished draining, §7.1 "HELD
    /// (or DRAINING)"); clears the hold, stops the timer and dispatches every parked request in
    /// arrival order on the now-active map.
    pub fn resume(&mut self, volume: &str, op: OpRef) -> Vec<Effect> {
        let kind = ControlKind::Resume;
        if let Some(done) = self.admit_message(kind, volume, &op) {
            return done;
        }
        if self.fenced {
            let refusal = Err(self.fenced_refusal());
            return vec![self.answer(kind, op, refusal)];
        }
        // Whatever the outcome, a quiesce for this step or an earlier one is late from now on.
        if let Some(current) = self.op.as_mut() {
            let step = (op.attempt, op.generation);
            current.closed = Some(current.closed.map_or(step, |c| c.max(step)));
        }
        match &self.hold {
            None => {
                let refusal = Err(self.not_held(self.state().name()));
                return vec![self.answer(kind, op, refusal)];
            }
            // A Resume of an earlier cycle (same attempt, older generation) arriving late must
            // not release this cycle's hold.
            Some(hold) if (hold.op.attempt, hold.op.generation) != (op.attempt, op.generation) => {
                let refusal = Err(self.not_held("held for another step"));
                return vec![self.answer(kind, op, refusal)];
            }
            Some(_) => {}
        }
        self.hold = None;
        self.previous = None;
        let mut effects = vec![Effect::ClearHold];
        let parked: Vec<Parked> = self.parked.drain(..).collect();
        let redispatched = parked.len();
        for p in parked {
            self.in_flight.insert(p.id, p.span);
            effects.push(Effect::Dispatch {
                id: p.id,
                map: Arc::clone(&self.active),
            });
        }
        let reply = Ok(Reply::Resumed {
            active: self.active.generation(),
            redispatched,
        });
        // The answer goes first so the operator hears about the resume even if dispatching is
        // slow; the order of the dispatches among themselves is the arrival order.
        effects.insert(0, self.answer(kind, op, reply));
        effects
    }

    /// `Fence` (611/617: the node was excluded): parked requests fail with EIO, new ones are
    /// refused, and the gate never dispatches again. Requests already in flight finish (the
    /// operator revokes this node's extent grants, so remote pieces fail). Re-admission is a
    /// restage (a new gate at the current generation).
    pub fn fence(&mut self, volume: &str, op: OpRef) -> Vec<Effect> {
        let kind = ControlKind::Fence;
        if let Some(done) = self.admit_message(kind, volume, &op) {
            return done;
        }
        self.fenced = true;
        let cause = self.fenced_refusal();
        let mut effects: Vec<Effect> = self
            .parked
            .drain(..)
            .map(|p| Effect::Fail {
                id: p.id,
                cause: cause.clone(),
            })
            .collect();
        if self.hold.is_none() {
            self.hold = Some(Hold {
                op: op.clone(),
                scope: HoldScope::WholeVolume,
                draining: BTreeSet::new(),
                first_parked_at: None,
                report_at: None,
                committed: false,
            });
        }
        effects.push(self.persist());
        effects.push(self.answer(kind, op, Ok(Reply::Fenced)));
        effects
    }

    // ---- helpers ---------------------------------------------------------------------------

    /// Common admission of a control message: volume, retired operation, other operation,
    /// stale attempt, and repeats. Returns `Some(effects)` when the message is fully answered
    /// here; otherwise the current operation is this one (possibly just started).
    fn admit_message(
        &mut self,
        kind: ControlKind,
        volume: &str,
        op: &OpRef,
    ) -> Option<Vec<Effect>> {
        if volume != self.volume {
            let refusal = Refusal::WrongVolume {
                expected: self.volume.clone(),
                got: volume.to_string(),
            };
            return Some(vec![self.answer_unrecorded(kind, op.clone(), refusal)]);
        }
        if self.retired.iter().any(|r| *r == op.operation_id) {
            let refusal = Refusal::RetiredOperation {
                operation_id: op.operation_id.clone(),
            };
            return Some(vec![self.answer_unrecorded(kind, op.clone(), refusal)]);
        }
        match &mut self.op {
            Some(current) if current.id == op.operation_id => {
                if let Some(reply) = current.answers.get(&(kind, op.attempt, op.generation)) {
                    let answer = Answer {
                        kind,
                        op: op.clone(),
                        result: Ok(reply.clone()),
                    };
                    return Some(vec![Effect::Answer(answer)]);
                }
                if op.attempt < current.attempt {
                    let refusal = Refusal::StaleAttempt {
                        current: current.attempt,
                        offered: op.attempt,
                    };
                    return Some(vec![self.answer_unrecorded(kind, op.clone(), refusal)]);
                }
                // A newer attempt starts only once the hold of the old one is released.
                if op.attempt > current.attempt && self.hold.is_none() {
                    current.attempt = op.attempt;
                }
                None
            }
            Some(current) if self.hold.is_some() || self.fenced => {
                let refusal = Refusal::OtherOperation {
                    active: current.id.clone(),
                    offered: op.operation_id.clone(),
                };
                Some(vec![self.answer_unrecorded(kind, op.clone(), refusal)])
            }
            _ => {
                // A new operation while running: the previous one is over for this node.
                if let Some(old) = self.op.take() {
                    self.retired.push_back(old.id);
                    while self.retired.len() > RETIRED_MEMORY {
                        self.retired.pop_front();
                    }
                    self.staged = None;
                }
                self.op = Some(CurrentOp {
                    id: op.operation_id.clone(),
                    attempt: op.attempt,
                    answers: BTreeMap::new(),
                    closed: None,
                    rolled_back: None,
                });
                None
            }
        }
    }

    /// Records a successful answer for repeats and wraps it as an effect.
    fn answer(&mut self, kind: ControlKind, op: OpRef, result: Result<Reply, Refusal>) -> Effect {
        if let (Some(current), Ok(reply)) = (self.op.as_mut(), &result)
            && current.id == op.operation_id
        {
            current
                .answers
                .insert((kind, op.attempt, op.generation), reply.clone());
        }
        Effect::Answer(Answer { kind, op, result })
    }

    /// A refusal that must not be replayed (it depends on the message, not on the step).
    fn answer_unrecorded(&self, kind: ControlKind, op: OpRef, refusal: Refusal) -> Effect {
        Effect::Answer(Answer {
            kind,
            op,
            result: Err(refusal),
        })
    }

    fn persist(&self) -> Effect {
        match self.hold_record() {
            Some(record) => Effect::PersistHold(record),
            None => Effect::ClearHold,
        }
    }

    fn not_held(&self, state: &'static str) -> Refusal {
        Refusal::NotHeld {
            state,
            active: self.active.generation(),
        }
    }

    fn fenced_refusal(&self) -> Refusal {
        Refusal::Fenced {
            operation_id: self.op.as_ref().map(|o| o.id.clone()).unwrap_or_default(),
        }
    }

    fn stale_generation(&self, offered: Generation) -> Refusal {
        Refusal::StaleGeneration {
            active: self.active.generation(),
            staged: self.staged.as_ref().map(|s| s.generation()),
            offered,
        }
    }
}
