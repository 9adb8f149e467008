//! The node I/O gate (`engine::gate`) against seed 004 §7.1/§7.2 and §11.7: table-driven
//! transitions, the AS-xx scenarios that apply to one node, and a property test against a small
//! reference model.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;
use tessera_api::model::{ByteRange, ExtentMap, ExtentSize, Generation};
use tessera_csi::engine::gate::{
    Admission, Answer, ControlKind, Effect, GateState, HoldRecord, HoldScope, IoGate, OpRef,
    Refusal, Reply, RequestId, Span,
};

const EXTENT: u64 = 4096;
const EXTENTS: u64 = 16;
const VOLUME: &str = "vol-a";
const HOLD_TIMEOUT: u64 = 1_000;

fn map(generation: u64) -> Arc<ExtentMap> {
    let es = ExtentSize::new(EXTENT).expect("extent size");
    Arc::new(
        ExtentMap::new_hole(EXTENT * EXTENTS, es)
            .expect("map")
            .with_generation(Generation(generation)),
    )
}

/// A map of the same generation that differs from [`map`] (it is larger).
fn other_map(generation: u64) -> Arc<ExtentMap> {
    let es = ExtentSize::new(EXTENT).expect("extent size");
    Arc::new(
        ExtentMap::new_hole(EXTENT * (EXTENTS + 1), es)
            .expect("map")
            .with_generation(Generation(generation)),
    )
}

/// A hold on one run of extents.
fn held_extents(range: std::ops::Range<u64>) -> HoldScope {
    HoldScope::extents(std::iter::once(range).collect())
}

fn op(attempt: u32, generation: u64) -> OpRef {
    OpRef::new("op-1", attempt, Generation(generation))
}

fn extents(start: u64, count: u64) -> ByteRange {
    ByteRange::new(start * EXTENT, count * EXTENT).expect("range")
}

fn answers(effects: &[Effect]) -> Vec<Answer> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Answer(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn only_answer(effects: &[Effect]) -> Result<Reply, Refusal> {
    let all = answers(effects);
    assert_eq!(all.len(), 1, "exactly one answer expected: {effects:?}");
    all[0].result.clone()
}

fn admitted(admission: Admission) -> RequestId {
    match admission {
        Admission::Admitted { id, .. } => id,
        other => panic!("expected admitted, got {other:?}"),
    }
}

fn parked(admission: Admission) -> RequestId {
    match admission {
        Admission::Parked { id } => id,
        other => panic!("expected parked, got {other:?}"),
    }
}

fn dispatched(effects: &[Effect]) -> Vec<(RequestId, Generation)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch { id, map } => Some((*id, map.generation())),
            _ => None,
        })
        .collect()
}

/// The states a table row starts from.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// Running at generation 1 with generation 2 staged.
    RunningStaged,
    /// Running at generation 1, nothing staged.
    RunningBare,
    /// Quiesced on extents 0..4 with one request still in flight there.
    Draining,
    /// Held (drained) on extents 0..4, generation 2 staged.
    Held,
    /// Held and committed to generation 2.
    HeldCommitted,
    /// Fenced.
    Fenced,
}

fn gate_in(start: Start) -> IoGate {
    let mut gate = IoGate::new(VOLUME, map(1), HOLD_TIMEOUT);
    if matches!(start, Start::RunningBare) {
        return gate;
    }
    let staged = gate.stage(VOLUME, op(1, 2), map(2));
    assert!(matches!(only_answer(&staged), Ok(Reply::Staged { .. })));
    let scope = held_extents(0..4);
    match start {
        Start::RunningStaged | Start::RunningBare => {}
        Start::Draining => {
            admitted(gate.submit(extents(1, 1), 0));
            assert!(answers(&gate.quiesce(VOLUME, op(1, 2), scope)).is_empty());
        }
        Start::Held | Start::HeldCommitted => {
            let q = gate.quiesce(VOLUME, op(1, 2), scope);
            assert!(matches!(only_answer(&q), Ok(Reply::QuiesceComplete { .. })));
            if matches!(start, Start::HeldCommitted) {
                let c = gate.commit(VOLUME, op(1, 2));
                assert!(matches!(only_answer(&c), Ok(Reply::Committed { .. })));
            }
        }
        Start::Fenced => {
            let f = gate.fence(VOLUME, op(1, 2));
            assert_eq!(only_answer(&f), Ok(Reply::Fenced));
        }
    }
    gate
}

#[derive(Debug, Clone, Copy)]
enum Msg {
    Stage2,
    Quiesce,
    Commit,
    Resume,
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// No answer yet (the drain answers).
    Silent,
    Staged,
    QuiesceComplete,
    Committed(u64),
    RolledBack(u64),
    Resumed(u64),
    NotHeld,
    StillDraining,
    Fenced,
}

fn classify(effects: &[Effect]) -> Expect {
    let all = answers(effects);
    if all.is_empty() {
        return Expect::Silent;
    }
    assert_eq!(all.len(), 1, "{effects:?}");
    match &all[0].result {
        Ok(Reply::Staged { .. }) => Expect::Staged,
        Ok(Reply::QuiesceComplete { .. }) => Expect::QuiesceComplete,
        Ok(Reply::Committed { active }) => Expect::Committed(active.get()),
        Ok(Reply::RolledBack { active }) => Expect::RolledBack(active.get()),
        Ok(Reply::Resumed { active, .. }) => Expect::Resumed(active.get()),
        Ok(Reply::Fenced) => Expect::Fenced,
        Err(Refusal::NotHeld { .. }) => Expect::NotHeld,
        Err(Refusal::StillDraining { .. }) => Expect::StillDraining,
        Err(Refusal::Fenced { .. }) => Expect::Fenced,
        Err(other) => panic!("unexpected refusal {other}"),
    }
}

/// Seed 004 §7.1 (table rows) and §7.2 (plane states, per-domain hold), one row per transition:
/// start state, message, answer, state afterwards and active generation afterwards.
#[test]
fn transition_table_7_1_and_7_2() {
    use Expect::*;
    use GateState as S;
    let rows: &[(Start, Msg, Expect, GateState, u64)] = &[
        // RUNNING | IO-hold request → HELD at once when nothing is in flight (813/814 → 810 → 811).
        (
            Start::RunningStaged,
            Msg::Quiesce,
            QuiesceComplete,
            S::Held,
            1,
        ),
        // RUNNING | config change / switch → refused (706 N), map unchanged (AS-06).
        (Start::RunningStaged, Msg::Commit, NotHeld, S::Running, 1),
        // RUNNING | IO-resume → refused (710 N / 816 N), no change (AS-07).
        (Start::RunningStaged, Msg::Resume, NotHeld, S::Running, 1),
        (Start::RunningStaged, Msg::Rollback, NotHeld, S::Running, 1),
        // STAGED is a plane state, not a hold state (531: no I/O impact).
        (Start::RunningBare, Msg::Stage2, Staged, S::Running, 1),
        // DRAINING | IO-hold request repeated → no second answer; the drain answers (810').
        (Start::Draining, Msg::Quiesce, Silent, S::Draining, 1),
        // DRAINING | commit → refused until the hold completed (706 needs the hold state).
        (Start::Draining, Msg::Commit, StillDraining, S::Draining, 1),
        // HELD (or DRAINING) | IO-resume → RUNNING (§7.1 row "HELD (or DRAINING)").
        (Start::Draining, Msg::Resume, Resumed(1), S::Running, 1),
        // HELD | switch request → HELD on the new plane (507').
        (Start::Held, Msg::Commit, Committed(2), S::Held, 2),
        // HELD | rollback without a commit → nothing to undo, still held.
        (Start::Held, Msg::Rollback, RolledBack(1), S::Held, 1),
        (Start::Held, Msg::Resume, Resumed(1), S::Running, 1),
        // HELD | staging the cycle's map inside the hold (fourth embodiment, [0094]).
        (Start::Held, Msg::Stage2, Staged, S::Held, 1),
        // HELD (new config) | rollback → old plane again (612').
        (
            Start::HeldCommitted,
            Msg::Rollback,
            RolledBack(1),
            S::Held,
            1,
        ),
        (Start::HeldCommitted, Msg::Resume, Resumed(2), S::Running, 2),
        // Repeat of the commit: the same answer, nothing changes (AS-27).
        (Start::HeldCommitted, Msg::Commit, Committed(2), S::Held, 2),
        // FENCED refuses everything.
        (Start::Fenced, Msg::Commit, Fenced, S::Fenced, 1),
        (Start::Fenced, Msg::Resume, Fenced, S::Fenced, 1),
        (Start::Fenced, Msg::Quiesce, Fenced, S::Fenced, 1),
    ];
    for (i, (start, msg, expect, state, generation)) in rows.iter().enumerate() {
        let mut gate = gate_in(*start);
        let effects = match msg {
            Msg::Stage2 => gate.stage(VOLUME, op(1, 2), map(2)),
            Msg::Quiesce => gate.quiesce(VOLUME, op(1, 2), held_extents(0..4)),
            Msg::Commit => gate.commit(VOLUME, op(1, 2)),
            Msg::Resume => gate.resume(VOLUME, op(1, 2)),
            Msg::Rollback => gate.rollback(VOLUME, op(1, 2)),
        };
        let got = classify(&effects);
        assert_eq!(got, *expect, "row {i}: {start:?} + {msg:?}");
        assert_eq!(gate.state(), *state, "row {i}: {start:?} + {msg:?} state");
        assert_eq!(
            gate.active().generation(),
            Generation(*generation),
            "row {i}: {start:?} + {msg:?} generation"
        );
    }
}

/// AS-02: the quiesce is answered only after every in-flight request of the domain completed;
/// those requests were translated with the old map.
#[test]
fn as02_drain_before_acknowledgement() {
    let mut gate = gate_in(Start::RunningStaged);
    let mut ids = Vec::new();
    for e in 0..5 {
        match gate.submit(extents(e, 1), 0) {
            Admission::Admitted { id, map } => {
                assert_eq!(map.generation(), Generation(1));
                ids.push(id);
            }
            other => panic!("{other:?}"),
        }
    }
    let q = gate.quiesce(VOLUME, op(1, 2), HoldScope::WholeVolume);
    assert!(answers(&q).is_empty(), "answered before the drain: {q:?}");
    assert!(q.iter().any(|e| matches!(e, Effect::PersistHold(_))));
    for id in &ids[..4] {
        assert!(answers(&gate.complete(*id)).is_empty());
        assert_eq!(gate.state(), GateState::Draining);
    }
    let last = gate.complete(ids[4]);
    assert_eq!(
        only_answer(&last),
        Ok(Reply::QuiesceComplete {
            active: Generation(1)
        })
    );
    assert_eq!(gate.state(), GateState::Held);
    // The repeat after the drain gets the same answer.
    let again = gate.quiesce(VOLUME, op(1, 2), HoldScope::WholeVolume);
    assert_eq!(only_answer(&again), only_answer(&last));
}

/// AS-03: requests parked during the hold are dispatched in arrival order on the new map, and
/// none of them was ever handed the old map.
#[test]
fn as03_held_io_replayed_on_new_mapping_in_arrival_order() {
    let mut gate = gate_in(Start::Held);
    let order: Vec<RequestId> = [3, 0, 2, 1, 0]
        .iter()
        .map(|e| parked(gate.submit(extents(*e, 1), 10)))
        .collect();
    assert_eq!(gate.parked(), order);
    let c = gate.commit(VOLUME, op(1, 2));
    assert!(dispatched(&c).is_empty(), "commit must not dispatch");
    let r = gate.resume(VOLUME, op(1, 2));
    assert_eq!(
        only_answer(&r),
        Ok(Reply::Resumed {
            active: Generation(2),
            redispatched: 5
        })
    );
    let got = dispatched(&r);
    assert_eq!(
        got.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        order,
        "arrival order"
    );
    assert!(got.iter().all(|(_, g)| *g == Generation(2)));
    assert!(r.iter().any(|e| matches!(e, Effect::ClearHold)));
    assert_eq!(gate.in_flight(), 5, "dispatched requests are in flight");
}

/// AS-04: a hold on extents 0..4 leaves extent 8 alone; a request spanning 3..5 is held whole.
#[test]
fn as04_range_limited_hold() {
    let mut gate = gate_in(Start::Held);
    match gate.submit(extents(8, 1), 5) {
        Admission::Admitted { map, .. } => assert_eq!(map.generation(), Generation(1)),
        other => panic!("free domain held: {other:?}"),
    }
    parked(gate.submit(extents(1, 1), 5));
    let spanning = parked(gate.submit(extents(3, 2), 5));
    assert!(gate.parked().contains(&spanning));
    // A flush touches every domain.
    parked(gate.submit_span(Span::WholeVolume, 5));
    // Zero-length requests touch nothing.
    admitted(gate.submit(ByteRange::new(0, 0).expect("range"), 5));
}

/// A request admitted into a free domain while held does not delay the quiesce answer, and one
/// that was in flight in a free domain is not waited for (810' looks at the scope only).
#[test]
fn drain_counts_only_the_scope() {
    let mut gate = gate_in(Start::RunningStaged);
    let outside = admitted(gate.submit(extents(9, 1), 0));
    let inside = admitted(gate.submit(extents(2, 1), 0));
    let q = gate.quiesce(VOLUME, op(1, 2), held_extents(0..4));
    assert!(answers(&q).is_empty());
    let done = gate.complete(inside);
    assert!(matches!(
        only_answer(&done),
        Ok(Reply::QuiesceComplete { .. })
    ));
    assert_eq!(gate.state(), GateState::Held);
    assert!(answers(&gate.complete(outside)).is_empty());
}

/// AS-16 (node side): the hold timer reports HoldTimeout, repeats the report, and never
/// resumes; the timer starts with the first parked request (805').
#[test]
fn as16_hold_timeout_reports_and_never_resumes() {
    let mut gate = gate_in(Start::Held);
    assert!(gate.tick(50_000).is_empty(), "no parked request, no timer");
    let id = parked(gate.submit(extents(0, 1), 100));
    assert!(gate.tick(100 + HOLD_TIMEOUT - 1).is_empty());
    let t = gate.tick(100 + HOLD_TIMEOUT);
    assert_eq!(
        t,
        vec![Effect::HoldTimeout {
            op: op(1, 2),
            held_since: 100
        }]
    );
    assert!(
        gate.tick(100 + HOLD_TIMEOUT + 10).is_empty(),
        "rate-limited"
    );
    let again = gate.tick(100 + 3 * HOLD_TIMEOUT);
    assert_eq!(again.len(), 1);
    assert_eq!(gate.state(), GateState::Held);
    assert_eq!(gate.parked(), vec![id]);
    let r = gate.resume(VOLUME, op(1, 2));
    assert_eq!(dispatched(&r), vec![(id, Generation(1))]);
    assert!(gate.tick(100 + 10 * HOLD_TIMEOUT).is_empty(), "timer reset");
}

/// AS-18: a node plugin restarted inside a hold comes back held for that operation, asks the
/// operator, parks new requests, and finishes on whatever the operator decides.
#[test]
fn as18_restart_inside_hold_comes_back_held() {
    let gate = gate_in(Start::HeldCommitted);
    let record: HoldRecord = gate.hold_record().expect("held");
    assert_eq!(record.op, op(1, 2));
    assert_eq!(record.active.generation(), Generation(2));
    drop(gate);
    let (mut gate, effects) = IoGate::restore(record, HOLD_TIMEOUT, 7);
    assert_eq!(effects, vec![Effect::AskOperator { op: op(1, 2) }]);
    assert_eq!(gate.state(), GateState::Held);
    parked(gate.submit(extents(1, 1), 8));
    // The hold timer runs from the restart.
    assert_eq!(gate.tick(7 + HOLD_TIMEOUT).len(), 1);
    // The operator may still roll back after the restart (the previous map was persisted)...
    let rb = gate.rollback(VOLUME, op(1, 2));
    assert_eq!(
        only_answer(&rb),
        Ok(Reply::RolledBack {
            active: Generation(1)
        })
    );
    // ...and only its Resume releases the parked request.
    let r = gate.resume(VOLUME, op(1, 2));
    assert_eq!(dispatched(&r).len(), 1);
    assert_eq!(gate.state(), GateState::Running);
}

/// AS-27: stale attempts, retired operations, foreign volumes and other operations are refused
/// without a state change; repeats answer the same.
#[test]
fn as27_idempotent_and_stale_messages() {
    let mut gate = gate_in(Start::Held);
    // Abort attempt 1, retry as attempt 2.
    let r1 = gate.resume(VOLUME, op(1, 2));
    assert!(matches!(only_answer(&r1), Ok(Reply::Resumed { .. })));
    let q2 = gate.quiesce(VOLUME, op(2, 2), held_extents(0..4));
    assert!(matches!(
        only_answer(&q2),
        Ok(Reply::QuiesceComplete { .. })
    ));
    // A delayed Commit and Quiesce of attempt 1 are stale now.
    assert!(matches!(
        only_answer(&gate.commit(VOLUME, op(1, 2))),
        Err(Refusal::StaleAttempt {
            current: 2,
            offered: 1
        })
    ));
    // The repeat of attempt 1's resume gets its recorded answer and does not resume attempt 2.
    assert_eq!(
        only_answer(&gate.resume(VOLUME, op(1, 2))),
        only_answer(&r1)
    );
    assert_eq!(gate.state(), GateState::Held);
    // Another operation must wait while this one holds the volume.
    let other = OpRef::new("op-2", 1, Generation(3));
    assert!(matches!(
        only_answer(&gate.quiesce(VOLUME, other.clone(), HoldScope::WholeVolume)),
        Err(Refusal::OtherOperation { .. })
    ));
    assert!(matches!(
        only_answer(&gate.commit("vol-b", op(2, 2))),
        Err(Refusal::WrongVolume { .. })
    ));
    // Commit, resume; a repeated commit after the resume answers the same and changes nothing.
    let c = gate.commit(VOLUME, op(2, 2));
    let r = gate.resume(VOLUME, op(2, 2));
    assert!(matches!(only_answer(&r), Ok(Reply::Resumed { .. })));
    assert_eq!(only_answer(&gate.commit(VOLUME, op(2, 2))), only_answer(&c));
    assert_eq!(gate.state(), GateState::Running);
    // A new operation retires op-1: its late messages are refused.
    let s = gate.stage(VOLUME, other, map(3));
    assert!(matches!(only_answer(&s), Ok(Reply::Staged { .. })));
    assert!(matches!(
        only_answer(&gate.quiesce(VOLUME, op(2, 2), HoldScope::WholeVolume)),
        Err(Refusal::RetiredOperation { .. })
    ));
    assert_eq!(gate.state(), GateState::Running);
}

/// A Resume overtaking its own Quiesce (an abort after a quiesce timeout) must not leave a late
/// Quiesce holding the volume with nobody to release it.
#[test]
fn late_quiesce_after_its_resume_is_refused() {
    let mut gate = gate_in(Start::RunningStaged);
    assert!(matches!(
        only_answer(&gate.resume(VOLUME, op(1, 2))),
        Err(Refusal::NotHeld { .. })
    ));
    assert!(matches!(
        only_answer(&gate.quiesce(VOLUME, op(1, 2), HoldScope::WholeVolume)),
        Err(Refusal::AlreadyResumed { .. })
    ));
    assert_eq!(gate.state(), GateState::Running);
    // The retry's quiesce is accepted.
    let q = gate.quiesce(VOLUME, op(2, 2), HoldScope::WholeVolume);
    assert!(matches!(only_answer(&q), Ok(Reply::QuiesceComplete { .. })));
}

#[test]
fn staging_rules() {
    let mut gate = IoGate::new(VOLUME, map(1), HOLD_TIMEOUT);
    assert!(matches!(
        only_answer(&gate.stage(VOLUME, op(1, 1), map(1))),
        Err(Refusal::StaleGeneration { .. })
    ));
    assert!(matches!(
        only_answer(&gate.stage(VOLUME, op(1, 3), map(2))),
        Err(Refusal::IncompatibleMap { .. })
    ));
    assert!(matches!(
        only_answer(&gate.stage(VOLUME, op(1, 2), map(2))),
        Ok(Reply::Staged { .. })
    ));
    // The same generation with another map conflicts; the same map repeats.
    assert!(matches!(
        only_answer(&gate.stage(VOLUME, op(1, 2), other_map(2))),
        Err(Refusal::StagedConflict { .. })
    ));
    assert!(matches!(
        only_answer(&gate.stage(VOLUME, op(1, 2), map(2))),
        Ok(Reply::Staged { .. })
    ));
    // Commit of a generation other than the staged one is refused.
    let q = gate.quiesce(VOLUME, op(1, 3), HoldScope::WholeVolume);
    assert!(matches!(only_answer(&q), Ok(Reply::QuiesceComplete { .. })));
    assert!(matches!(
        only_answer(&gate.commit(VOLUME, op(1, 3))),
        Err(Refusal::NothingStaged { .. })
    ));
    assert_eq!(gate.active().generation(), Generation(1));
}

/// Fencing (611/617; AS-26): parked requests fail, new ones are refused, nothing resumes.
#[test]
fn fence_fails_parked_and_refuses_new() {
    let mut gate = gate_in(Start::Held);
    let a = parked(gate.submit(extents(0, 1), 1));
    let f = gate.fence(VOLUME, op(1, 2));
    assert!(
        f.iter()
            .any(|e| matches!(e, Effect::Fail { id, .. } if *id == a))
    );
    assert!(matches!(
        gate.submit(extents(9, 1), 2),
        Admission::Refused(Refusal::Fenced { .. })
    ));
    assert!(gate.tick(1_000_000).is_empty());
    assert!(gate.hold_record().expect("persisted").fenced);
    assert_eq!(gate.state(), GateState::Fenced);
}

// ---- property test against a reference model ------------------------------------------------

#[derive(Debug, Clone)]
enum Action {
    Submit {
        start: u64,
        len: u64,
    },
    Flush,
    Complete {
        pick: usize,
    },
    Quiesce {
        whole: bool,
        start: u64,
        len: u64,
    },
    Stage,
    Commit,
    Resume,
    Rollback,
    Tick {
        advance: u64,
    },
    /// A repeat of the last control message.
    Repeat,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0..EXTENTS, 1..4u64).prop_map(|(start, len)| Action::Submit { start, len: len.min(EXTENTS - start) }),
        1 => Just(Action::Flush),
        6 => any::<usize>().prop_map(|pick| Action::Complete { pick }),
        2 => (any::<bool>(), 0..EXTENTS, 1..6u64).prop_map(|(whole, start, len)| Action::Quiesce { whole, start, len: len.min(EXTENTS - start) }),
        1 => Just(Action::Stage),
        2 => Just(Action::Commit),
        2 => Just(Action::Resume),
        1 => Just(Action::Rollback),
        2 => (0..600u64).prop_map(|advance| Action::Tick { advance }),
        1 => Just(Action::Repeat),
    ]
}

/// What the model knows: the hold (scope as a set of extents, or everything), requests in flight
/// and parked with their extents, and whether a quiesce answer is owed.
#[derive(Default)]
struct Model {
    hold: Option<Option<BTreeSet<u64>>>,
    in_flight: BTreeMap<RequestId, Option<BTreeSet<u64>>>,
    parked: VecDeque<RequestId>,
    parked_spans: BTreeMap<RequestId, Option<BTreeSet<u64>>>,
    quiesce_answered: bool,
    /// The commit of this hold was answered: a repeat replays that answer, even after a
    /// rollback, and changes nothing.
    commit_answered: Option<u64>,
    /// A rollback was answered in this hold: commits of the step are void from then on.
    rolled_back: bool,
    committed: bool,
    active: u64,
    staged: Option<u64>,
    first_parked_at: Option<u64>,
}

fn touches(hold: &Option<BTreeSet<u64>>, span: &Option<BTreeSet<u64>>) -> bool {
    match (hold, span) {
        (None, _) | (_, None) => true,
        (Some(h), Some(s)) => !h.is_disjoint(s),
    }
}

impl Model {
    fn drained(&self) -> bool {
        match &self.hold {
            None => false,
            Some(scope) => !self.in_flight.values().any(|s| touches(scope, s)),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random interleavings of submit/complete/quiesce/stage/commit/resume/rollback/tick. Checks:
    /// no request admitted into a held domain; parked requests dispatched in arrival order on the
    /// active map; the quiesce answered only once drained and exactly then; commit only while
    /// held and drained; timeouts never release anything.
    #[test]
    fn gate_matches_reference_model(actions in proptest::collection::vec(action(), 1..120)) {
        let mut gate = IoGate::new(VOLUME, map(1), HOLD_TIMEOUT);
        let mut m = Model { active: 1, ..Model::default() };
        let mut now = 0u64;
        let mut attempt = 1u32;
        let mut next_gen = 2u64;
        let mut last: Option<Action> = None;
        for a in actions {
            let a = if let Action::Repeat = a { match &last { Some(l) => l.clone(), None => continue } } else { a };
            let effects: Vec<Effect> = match &a {
                Action::Submit { start, len } => {
                    let span: Option<BTreeSet<u64>> = Some((*start..start + len).collect());
                    let expect_parked = m.hold.as_ref().is_some_and(|h| touches(h, &span));
                    match gate.submit(extents(*start, *len), now) {
                        Admission::Admitted { id, map } => {
                            prop_assert!(!expect_parked, "admitted into a held domain");
                            prop_assert_eq!(map.generation().get(), m.active);
                            m.in_flight.insert(id, span);
                        }
                        Admission::Parked { id } => {
                            prop_assert!(expect_parked, "parked outside the hold");
                            if m.first_parked_at.is_none() { m.first_parked_at = Some(now); }
                            m.parked.push_back(id);
                            m.parked_spans.insert(id, span);
                        }
                        Admission::Refused(r) => prop_assert!(false, "refused {}", r),
                    }
                    Vec::new()
                }
                Action::Flush => {
                    match gate.submit_span(Span::WholeVolume, now) {
                        Admission::Admitted { id, .. } => { prop_assert!(m.hold.is_none()); m.in_flight.insert(id, None); }
                        Admission::Parked { id } => {
                            prop_assert!(m.hold.is_some());
                            if m.first_parked_at.is_none() { m.first_parked_at = Some(now); }
                            m.parked.push_back(id); m.parked_spans.insert(id, None);
                        }
                        Admission::Refused(r) => prop_assert!(false, "refused {}", r),
                    }
                    Vec::new()
                }
                Action::Complete { pick } => {
                    if m.in_flight.is_empty() { continue }
                    let id = *m.in_flight.keys().nth(pick % m.in_flight.len()).expect("some");
                    m.in_flight.remove(&id);
                    gate.complete(id)
                }
                Action::Quiesce { whole, start, len } => {
                    let scope = if *whole { HoldScope::WholeVolume } else { held_extents(*start..start + len) };
                    let effects = gate.quiesce(VOLUME, op(attempt, next_gen), scope);
                    if m.hold.is_none() && answers(&effects).iter().all(|a| a.result.is_ok()) {
                        m.hold = Some(if *whole { None } else { Some((*start..start + len).collect()) });
                        m.quiesce_answered = false;
                        m.commit_answered = None;
                        m.rolled_back = false;
                        m.committed = false;
                    }
                    effects
                }
                Action::Stage => gate.stage(VOLUME, op(attempt, next_gen), map(next_gen)),
                Action::Commit => gate.commit(VOLUME, op(attempt, next_gen)),
                Action::Resume => gate.resume(VOLUME, op(attempt, next_gen)),
                Action::Rollback => gate.rollback(VOLUME, op(attempt, next_gen)),
                Action::Tick { advance } => { now += advance; gate.tick(now) }
                Action::Repeat => unreachable!(),
            };
            // Check the answers against the model.
            for ans in answers(&effects) {
                match (ans.kind, &ans.result) {
                    (ControlKind::Quiesce, Ok(Reply::QuiesceComplete { .. })) => {
                        prop_assert!(m.hold.is_some() && m.drained(), "quiesce answered before the drain");
                        m.quiesce_answered = true;
                    }
                    (ControlKind::Stage, Ok(_)) => { m.staged = Some(next_gen); }
                    (ControlKind::Commit, Ok(_)) if m.rolled_back => {
                        prop_assert!(false, "commit accepted after a rollback of the same step");
                    }
                    (ControlKind::Commit, Ok(Reply::Committed { active })) if m.commit_answered.is_some() => {
                        prop_assert_eq!(Some(active.get()), m.commit_answered, "replayed commit answer differs");
                    }
                    (ControlKind::Commit, Ok(Reply::Committed { active })) => {
                        prop_assert!(m.hold.is_some() && m.drained(), "commit while not held");
                        m.commit_answered = Some(active.get());
                        prop_assert_eq!(Some(active.get()), m.staged.or(if m.committed { Some(m.active) } else { None }));
                        if !m.committed { m.committed = true; m.active = active.get(); m.staged = None; }
                    }
                    (ControlKind::Commit, Err(_)) => {
                        prop_assert!(!(m.hold.is_some() && m.drained() && m.staged == Some(next_gen)) || m.committed || m.commit_answered.is_some() || m.rolled_back,
                            "commit refused although held, drained and staged");
                    }
                    (ControlKind::Rollback, Ok(Reply::RolledBack { active })) => {
                        prop_assert!(m.hold.is_some());
                        m.rolled_back = true;
                        if m.committed { m.committed = false; m.staged = Some(m.active); }
                        m.active = active.get();
                    }
                    (ControlKind::Resume, Ok(Reply::Resumed { active, redispatched })) => {
                        prop_assert!(m.hold.is_some(), "resumed while not held");
                        prop_assert_eq!(active.get(), m.active);
                        let got = dispatched(&effects);
                        prop_assert_eq!(got.len(), *redispatched);
                        let expected: Vec<RequestId> = m.parked.drain(..).collect();
                        prop_assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), expected, "arrival order");
                        prop_assert!(got.iter().all(|(_, g)| g.get() == m.active));
                        for (id, _) in got { let span = m.parked_spans.remove(&id).expect("parked"); m.in_flight.insert(id, span); }
                        m.hold = None;
                        m.first_parked_at = None;
                        if m.committed { next_gen += 1; }
                        m.committed = false;
                        attempt += 1;
                    }
                    (ControlKind::Resume, Err(_)) => {
                        prop_assert!(m.hold.is_none(), "resume refused while held");
                        // The refused step is closed on the gate; the model moves on as well.
                        attempt += 1;
                    }
                    _ => {}
                }
            }
            // Timeouts: reported only after the first parked request waited the hold timeout,
            // and they never release anything.
            for e in &effects {
                if let Effect::HoldTimeout { held_since, .. } = e {
                    prop_assert_eq!(Some(*held_since), m.first_parked_at);
                    prop_assert!(now >= held_since + HOLD_TIMEOUT);
                }
                if let Effect::Dispatch { .. } = e {
                    prop_assert!(matches!(a, Action::Resume | Action::Repeat), "dispatch outside resume");
                }
            }
            // The state agrees with the model.
            let expected_state = match &m.hold { None => GateState::Running, Some(_) if m.drained() => GateState::Held, Some(_) => GateState::Draining };
            prop_assert_eq!(gate.state(), expected_state);
            prop_assert_eq!(gate.parked(), m.parked.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(gate.active().generation().get(), m.active);
            if m.hold.is_some() && m.drained() && !m.quiesce_answered {
                prop_assert!(false, "drained hold without a quiesce answer");
            }
            last = Some(a);
        }
    }
}

/// AS-12 (node side, the race the patent does not consider): the coordinator timed out on this
/// node's commit and rolled everyone back; the delayed Commit then arrives after the Rollback
/// and must not switch the node to the new map (it would serve another generation than its
/// peers after the resume: invariant I2).
#[test]
fn as12_delayed_commit_after_rollback_is_void() {
    let mut gate = gate_in(Start::Held);
    let rb = gate.rollback(VOLUME, op(1, 2));
    assert_eq!(
        only_answer(&rb),
        Ok(Reply::RolledBack {
            active: Generation(1)
        })
    );
    assert!(matches!(
        only_answer(&gate.commit(VOLUME, op(1, 2))),
        Err(Refusal::RolledBack { .. })
    ));
    assert_eq!(gate.active().generation(), Generation(1));
    // After a commit and its rollback, a replayed commit is void as well.
    let mut gate = gate_in(Start::HeldCommitted);
    gate.rollback(VOLUME, op(1, 2));
    assert!(matches!(
        only_answer(&gate.commit(VOLUME, op(1, 2))),
        Err(Refusal::RolledBack { .. })
    ));
    // The void commit survives a restart inside the hold.
    let record = gate.hold_record().expect("held");
    assert!(record.rolled_back);
    let (mut gate, _) = IoGate::restore(record, HOLD_TIMEOUT, 0);
    assert!(matches!(
        only_answer(&gate.commit(VOLUME, op(1, 2))),
        Err(Refusal::RolledBack { .. })
    ));
    let r = gate.resume(VOLUME, op(1, 2));
    assert_eq!(
        only_answer(&r),
        Ok(Reply::Resumed {
            active: Generation(1),
            redispatched: 0
        })
    );
}

/// Copy mode keeps the attempt across cycles and raises the generation: a late Resume of the
/// previous cycle must not release the current cycle's hold (found by the remap simulation,
/// after a node restart lost the answer cache).
#[test]
fn late_resume_of_previous_cycle_does_not_release_the_hold() {
    let mut gate = gate_in(Start::HeldCommitted);
    gate.resume(VOLUME, op(1, 2));
    let q = gate.quiesce(VOLUME, op(1, 3), HoldScope::WholeVolume);
    assert!(matches!(only_answer(&q), Ok(Reply::QuiesceComplete { .. })));
    let record = gate.hold_record().expect("held");
    let (mut gate, _) = IoGate::restore(record, HOLD_TIMEOUT, 0);
    assert!(matches!(
        only_answer(&gate.resume(VOLUME, op(1, 2))),
        Err(Refusal::NotHeld { .. })
    ));
    assert!(matches!(
        only_answer(&gate.commit(VOLUME, op(1, 2))),
        Err(Refusal::NotHeld { .. })
    ));
    assert_eq!(gate.state(), GateState::Held);
}
