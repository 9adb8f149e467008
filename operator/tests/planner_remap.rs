//! The remap coordinator (`planners::remap`) against seed 004: table-driven tests named after
//! the §6 failure-matrix rows and the §11.7 scenarios that apply to the coordinator, and a
//! seeded randomized simulation of the coordinator with N simulated node gates, lossy network,
//! node crashes and coordinator restarts, checking invariants I1–I6 of §11.6.
//!
//! Replay one simulation run: `REMAP_SIM_SEED=<seed> cargo test -p tessera-operator --test
//! planner_remap simulation -- --nocapture`. `REMAP_SIM_RUNS` sets the number of runs.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use tessera_api::model::Generation;
use tessera_api::v1alpha1::RemapPhase;
use tessera_operator::planners::remap::{
    Command, CopyOutcome, Event, MSG_CHANGE_FAILED, MSG_NODES_STOPPED, MSG_QUIESCE_FAILED,
    MSG_RECOVERY_FAILED, MSG_SUCCEEDED, NodeMessage, NodeOutcome, NodeStep, Policy, RemapState,
    ResumeReason, TimerKind, step,
};

const BASE: Generation = Generation(5);
const TARGET: Generation = Generation(6);

fn nodes(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn new_state(names: &[&str], copy: bool) -> RemapState {
    RemapState::new("remap-1", nodes(names), BASE, Policy::default(), copy)
}

/// Drives the coordinator and keeps every command it issued.
struct Harness {
    state: RemapState,
    log: Vec<Command>,
}

impl Harness {
    fn new(names: &[&str]) -> Self {
        Harness {
            state: new_state(names, false),
            log: Vec::new(),
        }
    }

    fn with_policy(names: &[&str], policy: Policy, copy: bool) -> Self {
        Harness {
            state: RemapState::new("remap-1", nodes(names), BASE, policy, copy),
            log: Vec::new(),
        }
    }

    fn on(&mut self, event: Event) -> Vec<Command> {
        let (state, commands) = step(self.state.clone(), event);
        self.state = state;
        self.log.extend(commands.iter().cloned());
        commands
    }

    fn ok(&mut self, node: &str, kind: NodeStep) -> Vec<Command> {
        let generation = self.generation_of(kind);
        self.on(Event::Reply {
            node: node.into(),
            step: kind,
            attempt: self.state.attempt,
            generation,
            outcome: NodeOutcome::Done { active: generation },
        })
    }

    fn refuse(&mut self, node: &str, kind: NodeStep, cause: &str) -> Vec<Command> {
        let generation = self.generation_of(kind);
        self.on(Event::Reply {
            node: node.into(),
            step: kind,
            attempt: self.state.attempt,
            generation,
            outcome: NodeOutcome::Refused {
                cause: cause.into(),
                not_held_active: None,
            },
        })
    }

    fn generation_of(&self, kind: NodeStep) -> Generation {
        match (kind, self.state.restore_generation) {
            (NodeStep::Stage | NodeStep::Commit, Some(g)) => g,
            _ => self.state.target_generation,
        }
    }

    fn all_ok(&mut self, names: &[&str], kind: NodeStep) -> Vec<Command> {
        let mut out = Vec::new();
        for n in names {
            out.extend(self.ok(n, kind));
        }
        out
    }

    fn deadline(&mut self) -> Vec<Command> {
        self.on(Event::Timer {
            round: self.state.round,
            kind: TimerKind::Deadline,
        })
    }
}

fn sends(commands: &[Command], kind: NodeStep) -> BTreeSet<String> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Send(NodeMessage { node, step, .. }) if *step == kind => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn fenced(commands: &[Command]) -> BTreeSet<String> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Fence { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn recorded(commands: &[Command]) -> Vec<Generation> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::RecordMapping { generation } => Some(*generation),
            _ => None,
        })
        .collect()
}

const ABC: &[&str] = &["a", "b", "c"];

/// Drives a 3-node remap to the point where every node is held.
fn held_abc() -> Harness {
    let mut h = Harness::new(ABC);
    h.on(Event::Start);
    h.all_ok(ABC, NodeStep::Stage);
    h.all_ok(ABC, NodeStep::Quiesce);
    assert_eq!(h.state.phase, RemapPhase::Committing);
    h
}

/// AS-01 (Fig. 5, claim 1) and AS-05 (Fig. 13: staging precedes the hold): Stage to all, then
/// Quiesce to all; no Commit before every QuiesceComplete; no Resume before every
/// CommitComplete; the mapping is recorded before the resume; Succeeded with the 607 message.
#[test]
fn as01_happy_path_barrier_and_as05_staged_before_quiesce() {
    let mut h = Harness::new(ABC);
    let start = h.on(Event::Start);
    assert_eq!(h.state.phase, RemapPhase::Staging);
    assert_eq!(sends(&start, NodeStep::Stage), set(ABC));
    assert!(sends(&start, NodeStep::Quiesce).is_empty());
    assert!(sends(&h.ok("a", NodeStep::Stage), NodeStep::Quiesce).is_empty());
    h.ok("b", NodeStep::Stage);
    let q = h.ok("c", NodeStep::Stage);
    assert_eq!(
        sends(&q, NodeStep::Quiesce),
        set(ABC),
        "AS-05: stage acks first"
    );
    assert!(sends(&h.ok("a", NodeStep::Quiesce), NodeStep::Commit).is_empty());
    assert!(sends(&h.ok("b", NodeStep::Quiesce), NodeStep::Commit).is_empty());
    let c = h.ok("c", NodeStep::Quiesce);
    assert_eq!(sends(&c, NodeStep::Commit), set(ABC));
    assert!(sends(&h.ok("a", NodeStep::Commit), NodeStep::Resume).is_empty());
    assert!(sends(&h.ok("b", NodeStep::Commit), NodeStep::Resume).is_empty());
    let r = h.ok("c", NodeStep::Commit);
    assert_eq!(sends(&r, NodeStep::Resume), set(ABC));
    let record_at = r
        .iter()
        .position(|c| matches!(c, Command::RecordMapping { .. }));
    let first_resume = r
        .iter()
        .position(|c| matches!(c, Command::Send(m) if m.step == NodeStep::Resume));
    assert!(record_at < first_resume, "mapping recorded before resume");
    assert_eq!(recorded(&r), vec![TARGET]);
    h.all_ok(ABC, NodeStep::Resume);
    assert_eq!(h.state.phase, RemapPhase::Succeeded);
    assert_eq!(h.state.message.as_deref(), Some(MSG_SUCCEEDED));
    assert_eq!(h.state.committed_generation, TARGET);
}

/// §6 row "hold not completed, ≥2 succeeded" (602 N → 608 Y → 611) = AS-08: the failed node is
/// excluded and fenced, Commit and Resume go to the others only, 607 lists it.
#[test]
fn matrix_hold_failed_two_succeeded_excludes_as08() {
    let mut h = Harness::new(ABC);
    h.on(Event::Start);
    h.all_ok(ABC, NodeStep::Stage);
    h.all_ok(&["a", "b"], NodeStep::Quiesce);
    let d = h.deadline();
    assert_eq!(fenced(&d), set(&["c"]));
    assert_eq!(sends(&d, NodeStep::Commit), set(&["a", "b"]));
    let r = h.all_ok(&["a", "b"], NodeStep::Commit);
    assert_eq!(sends(&r, NodeStep::Resume), set(&["a", "b"]));
    h.all_ok(&["a", "b"], NodeStep::Resume);
    assert_eq!(h.state.phase, RemapPhase::Succeeded);
    let message = h.state.message.clone().expect("message");
    assert!(message.starts_with(MSG_SUCCEEDED) && message.contains(MSG_NODES_STOPPED));
    assert!(message.contains(": c."), "{message}");
    let status = h.state.participants_status();
    assert!(status.iter().any(|p| p.node == "c" && p.excluded));
    // AS-26 / I6: C is never sent anything after its exclusion.
    let fence_at = h
        .log
        .iter()
        .position(|c| matches!(c, Command::Fence { .. }))
        .expect("fenced");
    assert!(
        !h.log[fence_at..]
            .iter()
            .any(|c| matches!(c, Command::Send(m) if m.node == "c"))
    );
}

/// §6 rows "hold not completed, <2 succeeded" (608 N → 609) and "…cause was a timeout"
/// (610 Y) = AS-09/AS-10: resume all, retry with the next attempt, succeed.
#[test]
fn matrix_hold_failed_one_succeeded_resumes_all_and_retries_as09_as10() {
    let mut h = Harness::new(&["a", "b"]);
    h.on(Event::Start);
    h.all_ok(&["a", "b"], NodeStep::Stage);
    h.ok("a", NodeStep::Quiesce);
    let d = h.deadline();
    assert!(fenced(&d).is_empty());
    assert_eq!(sends(&d, NodeStep::Resume), set(&["a", "b"]), "609: all");
    assert!(sends(&d, NodeStep::Commit).is_empty());
    let retry = h.all_ok(&["a", "b"], NodeStep::Resume);
    assert_eq!(h.state.attempt, 2);
    assert_eq!(sends(&retry, NodeStep::Quiesce), set(&["a", "b"]));
    assert!(
        retry
            .iter()
            .any(|c| matches!(c, Command::Send(m) if m.attempt == 2))
    );
    h.all_ok(&["a", "b"], NodeStep::Quiesce);
    h.all_ok(&["a", "b"], NodeStep::Commit);
    h.all_ok(&["a", "b"], NodeStep::Resume);
    assert_eq!(h.state.phase, RemapPhase::Succeeded);
    assert_eq!(h.state.attempt, 2);
}

/// §6 row "no retry (or retries used up)" (610 N → 617 → 616) = AS-09 tail: Failed with the
/// 616 text and hint; the mapping was never recorded.
#[test]
fn matrix_retries_used_up_fails_with_616_message_as09() {
    let policy = Policy {
        max_retries: 1,
        ..Policy::default()
    };
    let mut h = Harness::with_policy(&["a", "b"], policy, false);
    h.on(Event::Start);
    h.all_ok(&["a", "b"], NodeStep::Stage);
    for attempt in 1..=2 {
        assert_eq!(h.state.attempt, attempt);
        h.ok("a", NodeStep::Quiesce);
        h.deadline();
        assert_eq!(h.state.phase, RemapPhase::Resuming);
        h.all_ok(&["a", "b"], NodeStep::Resume);
    }
    assert_eq!(h.state.phase, RemapPhase::Failed);
    let message = h.state.message.clone().expect("message");
    assert!(message.starts_with(MSG_QUIESCE_FAILED), "{message}");
    assert!(recorded(&h.log).is_empty());
    assert_eq!(h.state.committed_generation, BASE);
}

/// AS-11: a non-timeout quiesce error with fewer than 2 successes is not retried.
#[test]
fn as11_non_timeout_quiesce_error_not_retried() {
    let mut h = Harness::new(&["a", "b"]);
    h.on(Event::Start);
    h.all_ok(&["a", "b"], NodeStep::Stage);
    h.ok("a", NodeStep::Quiesce);
    h.refuse("b", NodeStep::Quiesce, "cannot record the hold");
    assert_eq!(
        h.state
            .resume_reason
            .as_ref()
            .map(|r| matches!(r, ResumeReason::Abort { retry: false, .. })),
        Some(true)
    );
    h.all_ok(&["a", "b"], NodeStep::Resume);
    assert_eq!(h.state.phase, RemapPhase::Failed);
    assert_eq!(h.state.attempt, 1);
    assert!(
        h.state
            .message
            .clone()
            .expect("message")
            .contains("cannot record the hold")
    );
}

/// §6 row "hold timer expired" (820 → 718 → 627 Y) = AS-16: resume all at once, retry.
#[test]
fn matrix_hold_timeout_resumes_all_and_retries_as16() {
    let mut h = Harness::new(ABC);
    h.on(Event::Start);
    h.all_ok(ABC, NodeStep::Stage);
    h.ok("a", NodeStep::Quiesce);
    let t = h.on(Event::HoldTimeout {
        node: "a".into(),
        attempt: 1,
    });
    assert_eq!(sends(&t, NodeStep::Resume), set(ABC));
    // A late QuiesceComplete of the aborted attempt changes nothing.
    let late = h.ok("b", NodeStep::Quiesce);
    assert!(late.is_empty());
    h.all_ok(ABC, NodeStep::Resume);
    assert_eq!(h.state.attempt, 2);
    assert_eq!(h.state.phase, RemapPhase::Quiescing);
    // A hold timeout of the old attempt is ignored.
    assert!(
        h.on(Event::HoldTimeout {
            node: "a".into(),
            attempt: 1
        })
        .is_empty()
    );
}

/// §6 row "config change fails on some switch" (604 N → 612–616) = AS-12: rollback on all
/// (the failed one included), resume all, Failed with the 616 text, RolledBack state.
#[test]
fn matrix_commit_failure_rolls_back_everywhere_as12() {
    let mut h = held_abc();
    h.ok("a", NodeStep::Commit);
    h.ok("c", NodeStep::Commit);
    let rb = h.refuse("b", NodeStep::Commit, "swap failed");
    assert_eq!(h.state.phase, RemapPhase::RollingBack);
    assert_eq!(sends(&rb, NodeStep::Rollback), set(ABC));
    let r = h.all_ok(ABC, NodeStep::Rollback);
    assert_eq!(sends(&r, NodeStep::Resume), set(ABC));
    h.all_ok(ABC, NodeStep::Resume);
    assert_eq!(h.state.phase, RemapPhase::Failed);
    assert!(
        h.state
            .message
            .clone()
            .expect("message")
            .starts_with(MSG_CHANGE_FAILED)
    );
    assert!(
        recorded(&h.log).is_empty(),
        "old mapping stays the valid one"
    );
    assert!(
        h.state
            .participants_status()
            .iter()
            .all(|p| p.state.as_deref() == Some("Resumed"))
    );
}

/// §6 row "rollback or post-rollback resume fails" (613 N → 617) = AS-13.
#[test]
fn matrix_rollback_failure_failed_recovery_as13() {
    let mut h = held_abc();
    h.refuse("b", NodeStep::Commit, "swap failed");
    h.all_ok(&["a", "c"], NodeStep::Commit);
    h.ok("a", NodeStep::Rollback);
    h.ok("c", NodeStep::Rollback);
    let r = h.refuse("b", NodeStep::Rollback, "restore failed");
    assert_eq!(fenced(&r), set(&["b"]));
    assert_eq!(sends(&r, NodeStep::Resume), set(&["a", "c"]));
    h.all_ok(&["a", "c"], NodeStep::Resume);
    assert_eq!(h.state.phase, RemapPhase::FailedRecovery);
    assert!(
        h.state
            .message
            .clone()
            .expect("message")
            .starts_with(MSG_RECOVERY_FAILED)
    );
}

/// §6 (615 N) = AS-14: resume after a rollback fails on one node.
#[test]
fn matrix_resume_after_rollback_fails_as14() {
    let mut h = held_abc();
    h.refuse("a", NodeStep::Commit, "swap failed");
    h.all_ok(&["b", "c"], NodeStep::Commit);
    h.all_ok(ABC, NodeStep::Rollback);
    h.all_ok(&["a", "b"], NodeStep::Resume);
    let f = h.deadline();
    assert_eq!(fenced(&f), set(&["c"]));
    assert_eq!(h.state.phase, RemapPhase::FailedRecovery);
}

/// §6 row "resume fails in the normal path" (606 N, inference) = AS-15: the node is excluded
/// and fenced; the others are unaffected; the mapping stays committed (Succeeded + 607 list).
#[test]
fn matrix_resume_fails_normal_path_as15() {
    let mut h = held_abc();
    h.all_ok(ABC, NodeStep::Commit);
    h.all_ok(&["a", "b"], NodeStep::Resume);
    let f = h.refuse("c", NodeStep::Resume, "requeue failed");
    assert_eq!(fenced(&f), set(&["c"]));
    assert_eq!(h.state.phase, RemapPhase::Succeeded);
    assert!(
        h.state
            .message
            .clone()
            .expect("message")
            .contains(MSG_NODES_STOPPED)
    );
}

/// A Resume refused as "not held" by a node already on the expected map (it restarted after
/// resuming and lost its answer) counts as resumed; on another map it is a failure.
#[test]
fn resume_not_held_on_expected_generation_counts_as_done() {
    let mut h = held_abc();
    h.all_ok(ABC, NodeStep::Commit);
    h.all_ok(&["a", "b"], NodeStep::Resume);
    h.on(Event::Reply {
        node: "c".into(),
        step: NodeStep::Resume,
        attempt: 1,
        generation: TARGET,
        outcome: NodeOutcome::Refused {
            cause: "not held".into(),
            not_held_active: Some(TARGET),
        },
    });
    assert_eq!(h.state.phase, RemapPhase::Succeeded);
    assert!(h.state.excluded_nodes().is_empty());
}

/// Staging failure (625/626, inference): nothing is held; Failed without any quiesce.
#[test]
fn matrix_stage_failure_fails_before_any_hold() {
    let mut h = Harness::new(ABC);
    h.on(Event::Start);
    h.all_ok(&["a", "b"], NodeStep::Stage);
    h.refuse("c", NodeStep::Stage, "unknown area");
    assert_eq!(h.state.phase, RemapPhase::Failed);
    assert!(sends(&h.log, NodeStep::Quiesce).is_empty());
}

/// AS-17 (leader change): a new leader resumes from the persisted state, re-sends only what
/// is unanswered, and ignores timers of the old leader.
#[test]
fn as17_restart_resends_unanswered_and_ignores_old_timers() {
    let mut h = held_abc();
    h.ok("a", NodeStep::Commit);
    let old_round = h.state.round;
    let r = h.on(Event::Restarted);
    assert_eq!(sends(&r, NodeStep::Commit), set(&["b", "c"]));
    assert!(
        h.on(Event::Timer {
            round: old_round,
            kind: TimerKind::Deadline
        })
        .is_empty(),
        "old leader's timer"
    );
    h.all_ok(&["b", "c"], NodeStep::Commit);
    assert_eq!(h.state.phase, RemapPhase::Resuming);
}

/// Lost messages are re-sent on the resend timer, to the unanswered nodes only.
#[test]
fn resend_timer_resends_unanswered() {
    let mut h = Harness::new(ABC);
    h.on(Event::Start);
    h.ok("a", NodeStep::Stage);
    let r = h.on(Event::Timer {
        round: h.state.round,
        kind: TimerKind::Resend,
    });
    assert_eq!(sends(&r, NodeStep::Stage), set(&["b", "c"]));
}

/// AS-27 (coordinator side): duplicates and answers of another attempt or step change nothing.
#[test]
fn as27_duplicate_and_stale_replies_ignored() {
    let mut h = Harness::new(&["a", "b"]);
    h.on(Event::Start);
    h.all_ok(&["a", "b"], NodeStep::Stage);
    h.ok("a", NodeStep::Quiesce);
    let before = h.state.clone();
    assert!(h.ok("a", NodeStep::Quiesce).is_empty(), "duplicate");
    assert!(
        h.ok("a", NodeStep::Stage).is_empty(),
        "answer of a finished step"
    );
    assert!(
        h.on(Event::Reply {
            node: "b".into(),
            step: NodeStep::Quiesce,
            attempt: 7,
            generation: TARGET,
            outcome: NodeOutcome::Done { active: BASE }
        })
        .is_empty(),
        "another attempt"
    );
    assert!(
        h.ok("zz", NodeStep::Quiesce).is_empty(),
        "not a participant"
    );
    assert_eq!(h.state, before);
}

/// AS-28: no attachments — the mapping is recorded with no node message.
#[test]
fn as28_volume_without_attachments() {
    let mut h = Harness::new(&[]);
    let out = h.on(Event::Start);
    assert!(!out.iter().any(|c| matches!(c, Command::Send(_))));
    assert_eq!(recorded(&out), vec![TARGET]);
    assert_eq!(h.state.phase, RemapPhase::Succeeded);
}

/// AS-20 (coordinator side): copy cycles — hold, copy, stage the cycle's map in the hold,
/// commit, resume, next cycle with the next generation; Succeeded after the last.
#[test]
fn as20_copy_cycles() {
    let mut h = Harness::with_policy(&["a", "b"], Policy::default(), true);
    let s = h.on(Event::Start);
    assert!(
        sends(&s, NodeStep::Stage).is_empty(),
        "cycle maps are staged in the hold"
    );
    assert_eq!(sends(&s, NodeStep::Quiesce), set(&["a", "b"]));
    for cycle in 1..=2u32 {
        let copy = h.all_ok(&["a", "b"], NodeStep::Quiesce);
        assert_eq!(h.state.phase, RemapPhase::Copying);
        assert!(copy.contains(&Command::Copy { cycle }));
        let staged = h.on(Event::CopyFinished {
            cycle,
            result: Ok(CopyOutcome { more: cycle == 1 }),
        });
        assert_eq!(sends(&staged, NodeStep::Stage), set(&["a", "b"]));
        assert!(sends(&staged, NodeStep::Commit).is_empty());
        let commit = h.ok("a", NodeStep::Stage);
        assert_eq!(
            sends(&commit, NodeStep::Commit),
            set(&["a"]),
            "per node, after its stage"
        );
        h.ok("b", NodeStep::Stage);
        let resume = h.all_ok(&["a", "b"], NodeStep::Commit);
        assert_eq!(
            recorded(&resume),
            vec![Generation(BASE.get() + u64::from(cycle))]
        );
        h.all_ok(&["a", "b"], NodeStep::Resume);
    }
    assert_eq!(h.state.phase, RemapPhase::Succeeded);
    assert_eq!(h.state.committed_generation, Generation(BASE.get() + 2));
}

/// AS-22: the hold timer expires during the copy → the copy is suspended (once).
#[test]
fn as22_hold_timeout_during_copy_suspends_it() {
    let mut h = Harness::with_policy(&["a", "b"], Policy::default(), true);
    h.on(Event::Start);
    h.all_ok(&["a", "b"], NodeStep::Quiesce);
    let s = h.on(Event::HoldTimeout {
        node: "b".into(),
        attempt: 1,
    });
    assert_eq!(s, vec![Command::SuspendCopy { cycle: 1 }]);
    assert!(
        h.on(Event::HoldTimeout {
            node: "a".into(),
            attempt: 1
        })
        .is_empty()
    );
    assert_eq!(h.state.phase, RemapPhase::Copying);
}

/// AS-23 / §6 row "copy fails" (632 N → 635): after a committed cycle, the restore map is
/// staged and committed inside the hold, then resume, Failed.
#[test]
fn as23_copy_failure_restores_the_original_layout() {
    let mut h = Harness::with_policy(&["a", "b"], Policy::default(), true);
    h.on(Event::Start);
    h.all_ok(&["a", "b"], NodeStep::Quiesce);
    h.on(Event::CopyFinished {
        cycle: 1,
        result: Ok(CopyOutcome { more: true }),
    });
    h.all_ok(&["a", "b"], NodeStep::Stage);
    h.all_ok(&["a", "b"], NodeStep::Commit);
    h.all_ok(&["a", "b"], NodeStep::Resume);
    h.all_ok(&["a", "b"], NodeStep::Quiesce);
    let rb = h.on(Event::CopyFinished {
        cycle: 2,
        result: Err("destination write failed".into()),
    });
    assert_eq!(h.state.phase, RemapPhase::RollingBack);
    let restore = h.state.restore_generation.expect("restore generation");
    assert!(restore > h.state.committed_generation);
    assert!(rb.iter().any(
        |c| matches!(c, Command::Send(m) if m.step == NodeStep::Stage && m.generation == restore)
    ));
    h.all_ok(&["a", "b"], NodeStep::Stage);
    let r = h.all_ok(&["a", "b"], NodeStep::Commit);
    assert_eq!(recorded(&r), vec![restore]);
    h.all_ok(&["a", "b"], NodeStep::Resume);
    assert_eq!(h.state.phase, RemapPhase::Failed);
    assert!(
        h.state
            .message
            .clone()
            .expect("message")
            .contains("destination write failed")
    );
}

// ---- randomized simulation ---------------------------------------------------------------

/// splitmix64: small, seedable, good enough to explore interleavings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `per_mille`/1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

const EXTENTS: u64 = 8;
/// Extents 0..AFFECTED change placement (the hold scope); the rest never do.
const AFFECTED: u64 = 4;
const HOLD_TIMEOUT: u64 = 400;

fn sim_policy() -> Policy {
    Policy {
        min_succeeded_to_continue: 2,
        max_retries: 3,
        quiesce_timeout_ms: 300,
        step_timeout_ms: 300,
        resend_interval_ms: 80,
    }
}

/// Where a generation puts one remapped extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The source area.
    Old,
    /// The destination area.
    New,
    /// Copied during a migration: read the destination, write both ([0116]).
    Dual,
}

#[derive(Debug, Clone)]
struct Req {
    id: u64,
    extent: u64,
    /// The value written, for writes.
    write: Option<u64>,
    submitted: u64,
    generation: u64,
}

#[derive(Debug, Clone)]
struct SimHold {
    attempt: u32,
    generation: u64,
    committed: bool,
    draining: BTreeSet<u64>,
    first_parked: Option<u64>,
    report_at: Option<u64>,
}

/// What the node's mapping cache keeps across a crash.
#[derive(Debug, Clone)]
struct Persisted {
    active: u64,
    previous: Option<u64>,
    staged: Option<u64>,
    hold: Option<(u32, u64, bool)>,
    rolled_back: Option<(u32, u64)>,
    fenced: bool,
    attempt: u32,
}

/// A tiny model of `engine::gate` (the operator crate cannot depend on tessera-csi): the same
/// admission, drain, commit/rollback/resume guards, idempotent answers, void commits after a
/// rollback and late-quiesce refusal.
#[derive(Debug, Clone)]
struct SimNode {
    alive: bool,
    fenced: bool,
    active: u64,
    previous: Option<u64>,
    staged: Option<u64>,
    hold: Option<SimHold>,
    attempt: u32,
    answers: BTreeMap<(NodeStep, u32, u64), u64>,
    closed: Option<(u32, u64)>,
    rolled_back: Option<(u32, u64)>,
    in_flight: BTreeMap<u64, Req>,
    parked: VecDeque<Req>,
    persisted: Persisted,
}

impl SimNode {
    fn new(active: u64) -> Self {
        SimNode {
            alive: true,
            fenced: false,
            active,
            previous: None,
            staged: None,
            hold: None,
            attempt: 0,
            answers: BTreeMap::new(),
            closed: None,
            rolled_back: None,
            in_flight: BTreeMap::new(),
            parked: VecDeque::new(),
            persisted: Persisted {
                active,
                previous: None,
                staged: None,
                hold: None,
                rolled_back: None,
                fenced: false,
                attempt: 0,
            },
        }
    }

    fn persist(&mut self) {
        self.persisted = Persisted {
            active: self.active,
            previous: self.previous,
            staged: self.staged,
            hold: self
                .hold
                .as_ref()
                .map(|h| (h.attempt, h.generation, h.committed)),
            rolled_back: self.rolled_back,
            fenced: self.fenced,
            attempt: self.attempt,
        };
    }

    /// Restart: volatile state lost, hold record restored (AS-18).
    fn restart(&mut self, now: u64) {
        let p = self.persisted.clone();
        *self = SimNode::new(p.active);
        self.previous = p.previous;
        self.staged = p.staged;
        self.fenced = p.fenced;
        self.attempt = p.attempt;
        self.rolled_back = p.rolled_back;
        self.hold = p.hold.map(|(attempt, generation, committed)| SimHold {
            attempt,
            generation,
            committed,
            draining: BTreeSet::new(),
            first_parked: Some(now),
            report_at: Some(now + HOLD_TIMEOUT),
        });
        self.persist();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SimEvent {
    /// A message reaches a node.
    ToNode(NodeMessage),
    /// The best-effort Fence message reaches a node.
    FenceNode(usize),
    /// A message reaches the coordinator (`incarnation` only matters for timers).
    ToCoordinator(u64, EventKey),
    Submit(usize),
    Complete(usize, u64),
    Tick(usize),
    Crash(usize),
    Restart(usize),
    CoordinatorRestart,
}

/// `Event` is not `Ord`; the queue keeps events in a side table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct EventKey(usize);

struct Sim {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64, SimEvent)>>,
    coordinator_events: Vec<Option<Event>>,
    names: Vec<String>,
    nodes: Vec<SimNode>,
    state: RemapState,
    coordinator_up: bool,
    incarnation: u64,
    /// Nodes the coordinator fenced (storage refuses their I/O from then on).
    storage_fenced: BTreeSet<usize>,
    /// Copy mode (fourth embodiment): cycles of `chunk` extents, dual writes.
    copy: bool,
    chunk: u64,
    copy_failure: u64,
    /// Extents copied so far (copy mode).
    copied: BTreeSet<u64>,
    /// The outcome of each copy cycle, replayed when a restarted coordinator re-issues it.
    copy_results: BTreeMap<u32, Result<bool, String>>,
    /// Where each generation puts the remapped extents.
    maps: BTreeMap<u64, Vec<Route>>,
    /// The source areas (old placement) and the destination areas (new placement).
    old_store: Vec<u64>,
    new_store: Vec<u64>,
    acked: Vec<u64>,
    /// Extents with a write outstanding anywhere (writes to one extent are serialised, like a
    /// cluster file system would).
    write_locks: BTreeSet<u64>,
    recorded: Option<u64>,
    /// The newest generation some node committed since the last rollback (I1 floor).
    commit_floor: Option<u64>,
    quiesced: BTreeSet<(String, u32)>,
    committed: BTreeSet<(String, u32)>,
    next_req: u64,
    next_value: u64,
    finished_at: Option<u64>,
    // Fault knobs (per mille).
    loss: u64,
    dup: u64,
    slow_io: u64,
    coordinator_crash_after_step: u64,
    max_delay: u64,
    max_wait_seen: u64,
    trace: bool,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let n = rng.range(1, 4) as usize;
        let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
        let copy = rng.chance(400);
        let chunk = rng.range(1, AFFECTED);
        let copy_failure = if copy { rng.range(0, 150) } else { 0 };
        let state = RemapState::new("remap-sim", names.clone(), BASE, sim_policy(), copy);
        let mut maps = BTreeMap::new();
        maps.insert(BASE.get(), vec![Route::Old; AFFECTED as usize]);
        if !copy {
            maps.insert(TARGET.get(), vec![Route::New; AFFECTED as usize]);
        }
        let loss = rng.range(0, 60);
        let dup = rng.range(0, 60);
        let slow_io = rng.range(0, 30);
        let coordinator_crash_after_step = rng.range(0, 30);
        let mut sim = Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            coordinator_events: Vec::new(),
            names,
            nodes: (0..n).map(|_| SimNode::new(BASE.get())).collect(),
            state,
            coordinator_up: true,
            incarnation: 0,
            storage_fenced: BTreeSet::new(),
            copy,
            chunk,
            copy_failure,
            copied: BTreeSet::new(),
            copy_results: BTreeMap::new(),
            maps,
            old_store: vec![0; EXTENTS as usize],
            new_store: vec![0; EXTENTS as usize],
            acked: vec![0; EXTENTS as usize],
            write_locks: BTreeSet::new(),
            recorded: None,
            commit_floor: None,
            quiesced: BTreeSet::new(),
            committed: BTreeSet::new(),
            next_req: 0,
            next_value: 1,
            finished_at: None,
            loss,
            dup,
            slow_io,
            coordinator_crash_after_step,
            max_delay: 0,
            max_wait_seen: 0,
            trace: std::env::var("REMAP_SIM_TRACE").is_ok(),
        };
        for i in 0..n {
            let t = sim.rng.range(0, 20);
            sim.at(t, SimEvent::Submit(i));
            sim.at(10, SimEvent::Tick(i));
            if sim.rng.chance(300) {
                let t = sim.rng.range(50, 3_000);
                sim.at(t, SimEvent::Crash(i));
            }
        }
        if sim.rng.chance(300) {
            let t = sim.rng.range(50, 3_000);
            sim.at(t, SimEvent::CoordinatorRestart);
        }
        let start = sim.coordinator_event(Event::Start);
        sim.at(100, start);
        sim
    }

    fn at(&mut self, delay: u64, event: SimEvent) {
        self.seq += 1;
        self.queue
            .push(std::cmp::Reverse((self.now + delay, self.seq, event)));
    }

    fn coordinator_event(&mut self, event: Event) -> SimEvent {
        self.coordinator_events.push(Some(event));
        SimEvent::ToCoordinator(
            self.incarnation,
            EventKey(self.coordinator_events.len() - 1),
        )
    }

    fn delay(&mut self) -> u64 {
        let d = if self.rng.chance(50) {
            self.rng.range(50, 250)
        } else {
            self.rng.range(1, 20)
        };
        self.max_delay = self.max_delay.max(d);
        d
    }

    /// Sends over the lossy, duplicating, reordering network.
    fn send(&mut self, event: SimEvent) {
        if self.rng.chance(self.loss) {
            return;
        }
        let copies = if self.rng.chance(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let d = self.delay();
            self.at(d, event.clone());
        }
    }

    fn reply(
        &mut self,
        node: usize,
        kind: NodeStep,
        attempt: u32,
        generation: u64,
        outcome: NodeOutcome,
    ) {
        let event = self.coordinator_event(Event::Reply {
            node: self.names[node].clone(),
            step: kind,
            attempt,
            generation: Generation(generation),
            outcome,
        });
        self.send(event);
    }

    fn node_index(&self, name: &str) -> usize {
        self.names.iter().position(|n| n == name).expect("node")
    }

    fn run(&mut self) -> Result<(), String> {
        while let Some(std::cmp::Reverse((t, _, event))) = self.queue.pop() {
            self.now = t;
            if self.now > 60_000 {
                return Err(format!(
                    "no progress: phase {:?} at {} ms",
                    self.state.phase, self.now
                ));
            }
            if let Some(done) = self.finished_at
                && self.now > done + 1_500
            {
                break;
            }
            self.handle(event)?;
        }
        self.check_final()
    }

    fn handle(&mut self, event: SimEvent) -> Result<(), String> {
        if self.trace && !matches!(event, SimEvent::Tick(_) | SimEvent::Submit(_)) {
            match &event {
                SimEvent::ToCoordinator(_, key) => {
                    eprintln!(
                        "{:>6} coordinator <- {:?}",
                        self.now, self.coordinator_events[key.0]
                    )
                }
                other => eprintln!("{:>6} {other:?}", self.now),
            }
        }
        match event {
            SimEvent::ToCoordinator(incarnation, key) => {
                let Some(e) = self.coordinator_events[key.0].clone() else {
                    return Ok(());
                };
                if !self.coordinator_up {
                    return Ok(());
                }
                // Timers die with the process that started them.
                if matches!(e, Event::Timer { .. }) && incarnation != self.incarnation {
                    return Ok(());
                }
                self.coordinate(e)?;
            }
            SimEvent::ToNode(m) => self.node_message(m)?,
            SimEvent::FenceNode(i) => {
                let node = &mut self.nodes[i];
                if node.alive {
                    node.fenced = true;
                    let parked: Vec<Req> = node.parked.drain(..).collect();
                    node.persist();
                    for r in parked {
                        self.release(&r);
                    }
                }
            }
            SimEvent::Submit(i) => {
                self.submit(i)?;
                let next = self.rng.range(3, 40);
                self.at(next, SimEvent::Submit(i));
            }
            SimEvent::Complete(i, id) => self.complete(i, id)?,
            SimEvent::Tick(i) => {
                let now = self.now;
                let node = &mut self.nodes[i];
                let mut report = None;
                if node.alive
                    && !node.fenced
                    && let Some(hold) = node.hold.as_mut()
                    && let Some(at) = hold.report_at
                    && now >= at
                {
                    hold.report_at = Some(now + HOLD_TIMEOUT);
                    report = Some(hold.attempt);
                }
                if let Some(attempt) = report {
                    let e = self.coordinator_event(Event::HoldTimeout {
                        node: self.names[i].clone(),
                        attempt,
                    });
                    self.send(e);
                }
                self.at(10, SimEvent::Tick(i));
            }
            SimEvent::Crash(i) => {
                let node = &mut self.nodes[i];
                node.alive = false;
                // In-flight and parked requests die with the process: never acknowledged.
                let lost: Vec<Req> = node
                    .in_flight
                    .values()
                    .cloned()
                    .chain(node.parked.iter().cloned())
                    .collect();
                node.in_flight.clear();
                node.parked.clear();
                for r in lost {
                    self.release(&r);
                }
                let back = self.rng.range(50, 1_500);
                self.at(back, SimEvent::Restart(i));
            }
            SimEvent::Restart(i) => {
                let now = self.now;
                self.nodes[i].restart(now);
            }
            SimEvent::CoordinatorRestart => {
                self.coordinator_up = true;
                self.incarnation += 1;
                self.coordinate(Event::Restarted)?;
            }
        }
        Ok(())
    }

    fn release(&mut self, r: &Req) {
        if r.write.is_some() {
            self.write_locks.remove(&r.extent);
        }
    }

    fn coordinate(&mut self, event: Event) -> Result<(), String> {
        if let Event::Reply {
            node,
            step: kind,
            attempt,
            outcome: NodeOutcome::Done { .. },
            ..
        } = &event
        {
            match kind {
                NodeStep::Quiesce => {
                    self.quiesced.insert((node.clone(), *attempt));
                }
                NodeStep::Commit => {
                    self.committed.insert((node.clone(), *attempt));
                }
                _ => {}
            }
        }
        let (state, commands) = step(self.state.clone(), event);
        if self.trace {
            eprintln!(
                "{:>6}   -> {:?} attempt {} cycle {} {:?}",
                self.now, state.phase, state.attempt, state.cycle, commands
            );
        }
        // Write-ahead: the state is persisted before any command runs.
        self.state = state;
        if !self.state.is_finished() && self.rng.chance(self.coordinator_crash_after_step) {
            // Crash after persisting, before acting: the commands are lost.
            self.coordinator_up = false;
            let back = self.rng.range(10, 800);
            self.at(back, SimEvent::CoordinatorRestart);
            return Ok(());
        }
        let attempt = self.state.attempt;
        let mut copied = false;
        for c in commands {
            match c {
                Command::Send(m) => {
                    if !self.copy && m.step == NodeStep::Commit && !copied {
                        // Without copy mode the data copy is modelled as the first thing the
                        // controller does when it carries out the commits (claim 5: before any
                        // commit): every participant is held and drained, and the excluded ones
                        // are fenced — their Fence commands come first, also after a restart.
                        copied = true;
                        for e in 0..AFFECTED as usize {
                            self.new_store[e] = self.old_store[e];
                        }
                    }
                    // §7.7 (1), (2): the coordinator-level barriers.
                    let active: Vec<String> = self.state.active_nodes();
                    if m.step == NodeStep::Commit
                        && let Some(missing) = active
                            .iter()
                            .find(|n| !self.quiesced.contains(&((*n).clone(), attempt)))
                    {
                        return Err(format!("Commit sent before {missing} quiesced"));
                    }
                    if m.step == NodeStep::Resume
                        && matches!(self.state.resume_reason, Some(ResumeReason::Normal { .. }))
                        && let Some(missing) = active
                            .iter()
                            .find(|n| !self.committed.contains(&((*n).clone(), attempt)))
                    {
                        return Err(format!("Resume sent before {missing} committed"));
                    }
                    if self.storage_fenced.contains(&self.node_index(&m.node)) {
                        return Err(format!("message to excluded node {}", m.node));
                    }
                    self.send(SimEvent::ToNode(m));
                }
                Command::StartTimer {
                    round,
                    kind,
                    after_ms,
                } => {
                    let e = self.coordinator_event(Event::Timer { round, kind });
                    self.at(after_ms, e);
                }
                Command::Fence { node, .. } => {
                    let i = self.node_index(&node);
                    self.storage_fenced.insert(i);
                    self.send(SimEvent::FenceNode(i));
                }
                Command::RecordMapping { generation } => self.recorded = Some(generation.get()),
                Command::Copy { cycle } => {
                    if !self.copy {
                        return Err("copy command without copy mode".into());
                    }
                    self.copy_cycle(cycle)?;
                }
                // The modelled copy is instantaneous; nothing to suspend.
                Command::SuspendCopy { .. } => {}
                Command::Report { .. } => {}
            }
        }
        if self.state.is_finished() && self.finished_at.is_none() {
            self.finished_at = Some(self.now);
        }
        Ok(())
    }

    /// The copy of one cycle (631–633), while every participant is held and the excluded ones
    /// are fenced: copy the next chunk, define the cycle's map, report. A failed copy defines
    /// the restore map instead (635). A re-issued copy replays its result.
    fn copy_cycle(&mut self, cycle: u32) -> Result<(), String> {
        let result = match self.copy_results.get(&cycle) {
            Some(r) => r.clone(),
            None => {
                let target = self.state.target_generation.get();
                let r = if self.rng.chance(self.copy_failure) {
                    self.maps
                        .insert(target, vec![Route::Old; AFFECTED as usize]);
                    Err("destination write failed".to_string())
                } else {
                    let chunk: Vec<u64> = (0..AFFECTED)
                        .filter(|e| !self.copied.contains(e))
                        .take(self.chunk as usize)
                        .collect();
                    for &e in &chunk {
                        self.new_store[e as usize] = self.old_store[e as usize];
                        self.copied.insert(e);
                    }
                    let map = (0..AFFECTED)
                        .map(|e| {
                            if self.copied.contains(&e) {
                                Route::Dual
                            } else {
                                Route::Old
                            }
                        })
                        .collect();
                    self.maps.insert(target, map);
                    Ok((self.copied.len() as u64) < AFFECTED)
                };
                self.copy_results.insert(cycle, r.clone());
                r
            }
        };
        let event = self.coordinator_event(Event::CopyFinished {
            cycle,
            result: result.map(|more| CopyOutcome { more }),
        });
        // The copier runs beside the coordinator: its report is not lost, only delayed.
        let d = self.rng.range(1, 30);
        self.at(d, event);
        Ok(())
    }

    fn node_message(&mut self, m: NodeMessage) -> Result<(), String> {
        let i = self.node_index(&m.node);
        let g = m.generation.get();
        let key = (m.step, m.attempt, g);
        let node = &mut self.nodes[i];
        if !node.alive {
            return Ok(());
        }
        if let Some(active) = node.answers.get(&key).copied() {
            self.reply(
                i,
                m.step,
                m.attempt,
                g,
                NodeOutcome::Done {
                    active: Generation(active),
                },
            );
            return Ok(());
        }
        let mut redispatch: Vec<Req> = Vec::new();
        let refuse = |cause: &str, not_held: Option<u64>| NodeOutcome::Refused {
            cause: cause.to_string(),
            not_held_active: not_held.map(Generation),
        };
        let outcome: Option<NodeOutcome> = if m.attempt < node.attempt {
            Some(refuse("stale attempt", None))
        } else if node.fenced {
            Some(refuse("fenced", None))
        } else {
            match m.step {
                NodeStep::Stage => {
                    if g <= node.active {
                        Some(refuse("stale generation", None))
                    } else {
                        node.staged = Some(g);
                        node.persist();
                        Some(NodeOutcome::Done {
                            active: Generation(node.active),
                        })
                    }
                }
                NodeStep::Quiesce => match &node.hold {
                    Some(h) if h.attempt == m.attempt && h.generation == g => None,
                    Some(_) => Some(refuse("held for another attempt", None)),
                    None if node.closed.is_some_and(|c| (m.attempt, g) <= c) => {
                        Some(refuse("already resumed", None))
                    }
                    None => {
                        node.attempt = node.attempt.max(m.attempt);
                        let draining: BTreeSet<u64> = node
                            .in_flight
                            .values()
                            .filter(|r| r.extent < AFFECTED)
                            .map(|r| r.id)
                            .collect();
                        let drained = draining.is_empty();
                        node.hold = Some(SimHold {
                            attempt: m.attempt,
                            generation: g,
                            committed: false,
                            draining,
                            first_parked: None,
                            report_at: None,
                        });
                        node.previous = None;
                        node.persist();
                        drained.then_some(NodeOutcome::Done {
                            active: Generation(node.active),
                        })
                    }
                },
                NodeStep::Commit => {
                    let void = node.rolled_back.is_some_and(|r| (m.attempt, g) <= r);
                    match node.hold.as_mut() {
                        _ if void => Some(refuse("rolled back", None)),
                        Some(h)
                            if h.attempt == m.attempt
                                && h.generation == g
                                && h.draining.is_empty() =>
                        {
                            if h.committed && node.active == g {
                                Some(NodeOutcome::Done {
                                    active: Generation(g),
                                })
                            } else if node.staged == Some(g) {
                                // I5: only here does a node switch maps, held and drained.
                                h.committed = true;
                                node.previous = Some(node.active);
                                node.active = g;
                                node.staged = None;
                                node.persist();
                                self.commit_floor = Some(self.commit_floor.map_or(g, |f| f.max(g)));
                                Some(NodeOutcome::Done {
                                    active: Generation(g),
                                })
                            } else {
                                Some(refuse("nothing staged", None))
                            }
                        }
                        _ => Some(refuse("not held", Some(node.active))),
                    }
                }
                NodeStep::Rollback => match node.hold.as_mut() {
                    Some(h) if h.attempt == m.attempt && h.generation == g => {
                        if h.committed {
                            h.committed = false;
                            node.staged = Some(node.active);
                            node.active = node.previous.take().expect("previous map");
                        }
                        let s = (m.attempt, g);
                        node.rolled_back = Some(node.rolled_back.map_or(s, |r| r.max(s)));
                        node.answers.remove(&(NodeStep::Commit, m.attempt, g));
                        node.persist();
                        self.commit_floor = None;
                        Some(NodeOutcome::Done {
                            active: Generation(node.active),
                        })
                    }
                    _ => Some(refuse("not held", Some(node.active))),
                },
                NodeStep::Resume => {
                    let s = (m.attempt, g);
                    node.closed = Some(node.closed.map_or(s, |c| c.max(s)));
                    match &node.hold {
                        Some(h) if h.attempt == m.attempt && h.generation == g => {
                            // I6 is checked where messages are sent: nothing is sent to
                            // a node after its exclusion, and a node resumes only on a Resume
                            // (a restart comes back held). A Resume sent before the exclusion
                            // may still arrive; the storage fence refuses what follows.
                            node.hold = None;
                            node.previous = None;
                            node.persist();
                            redispatch = node.parked.drain(..).collect();
                            Some(NodeOutcome::Done {
                                active: Generation(node.active),
                            })
                        }
                        _ => Some(refuse("not held", Some(node.active))),
                    }
                }
            }
        };
        // 817': parked requests go out in arrival order on the now-active map.
        for r in redispatch {
            self.dispatch(i, r, true)?;
        }
        if let Some(outcome) = outcome {
            if let NodeOutcome::Done { active } = &outcome {
                self.nodes[i].answers.insert(key, active.get());
            }
            self.reply(i, m.step, m.attempt, g, outcome);
        }
        Ok(())
    }

    fn submit(&mut self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        if !node.alive || node.fenced || self.finished_at.is_some_and(|f| self.now > f + 1_000) {
            return Ok(());
        }
        let extent = self.rng.below(EXTENTS);
        let write = if self.rng.chance(700) && !self.write_locks.contains(&extent) {
            self.write_locks.insert(extent);
            self.next_value += 1;
            Some(self.next_value)
        } else {
            None
        };
        self.next_req += 1;
        let req = Req {
            id: self.next_req,
            extent,
            write,
            submitted: self.now,
            generation: 0,
        };
        let now = self.now;
        let node = &mut self.nodes[i];
        if let Some(hold) = node.hold.as_mut()
            && extent < AFFECTED
        {
            if hold.first_parked.is_none() {
                hold.first_parked = Some(now);
                hold.report_at = Some(now + HOLD_TIMEOUT);
            }
            node.parked.push_back(req);
            return Ok(());
        }
        self.dispatch(i, req, false)
    }

    /// A request reaches the storage, translated with the node's active generation. I1, I2 and
    /// I4 are checked here.
    fn dispatch(&mut self, i: usize, mut req: Req, from_parked: bool) -> Result<(), String> {
        let node = &self.nodes[i];
        req.generation = node.active;
        let affected = req.extent < AFFECTED;
        let fenced = self.storage_fenced.contains(&i);
        if from_parked {
            let waited = self.now - req.submitted;
            self.max_wait_seen = self.max_wait_seen.max(waited);
            // I4 (as far as this design bounds it): the hold timeout, plus the phases that
            // cannot be abandoned once the commit was sent (commit, rollback, resume), plus
            // message delays and node restarts.
            let p = sim_policy();
            let bound =
                HOLD_TIMEOUT + p.quiesce_timeout_ms + 3 * p.step_timeout_ms + 8 * 250 + 1_500;
            if waited > bound {
                return Err(format!("I4: request waited {waited} ms > {bound} ms"));
            }
        }
        if affected && !fenced {
            // I1: after the first commit and before any rollback, nobody uses the old map; after
            // the operation succeeded, never again.
            let succeeded = self.state.phase == RemapPhase::Succeeded;
            let floor = if succeeded {
                self.recorded
            } else {
                self.commit_floor
            };
            if floor.is_some_and(|f| req.generation < f) {
                return Err(format!(
                    "I1: {} dispatched generation {} after generation {:?} was committed",
                    self.names[i], req.generation, floor
                ));
            }
            // I2: no two nodes serve the range with different generations at once.
            for (j, other) in self.nodes.iter().enumerate() {
                if j == i || !other.alive || self.storage_fenced.contains(&j) {
                    continue;
                }
                if let Some(r) = other
                    .in_flight
                    .values()
                    .find(|r| r.extent < AFFECTED && r.generation != req.generation)
                {
                    return Err(format!(
                        "I2: {} on generation {} while {} has generation {} in flight",
                        self.names[i], req.generation, self.names[j], r.generation
                    ));
                }
            }
        }
        let duration = if self.rng.chance(self.slow_io) {
            self.rng.range(300, 900)
        } else {
            self.rng.range(1, 25)
        };
        let id = req.id;
        self.nodes[i].in_flight.insert(id, req);
        self.at(duration, SimEvent::Complete(i, id));
        Ok(())
    }

    fn complete(&mut self, i: usize, id: u64) -> Result<(), String> {
        let Some(req) = self.nodes[i].in_flight.remove(&id) else {
            return Ok(()); // lost in a crash
        };
        self.release(&req);
        if let Some(value) = req.write {
            // A fenced node's I/O is refused by the storage: never lands, never acknowledged.
            if !self.storage_fenced.contains(&i) {
                let e = req.extent as usize;
                let route = if req.extent < AFFECTED {
                    let map = self
                        .maps
                        .get(&req.generation)
                        .ok_or(format!("unknown generation {}", req.generation))?;
                    map[e]
                } else {
                    Route::Old
                };
                match route {
                    Route::Old => self.old_store[e] = value,
                    Route::New => self.new_store[e] = value,
                    Route::Dual => {
                        self.old_store[e] = value;
                        self.new_store[e] = value;
                    }
                }
                self.acked[e] = value;
            }
        }
        let node = &mut self.nodes[i];
        let drained = match node.hold.as_mut() {
            Some(h) => {
                let was_draining = h.draining.remove(&id);
                (was_draining && h.draining.is_empty()).then_some((h.attempt, h.generation))
            }
            None => None,
        };
        if let Some((attempt, generation)) = drained
            && !node.fenced
        {
            let active = node.active;
            node.answers
                .insert((NodeStep::Quiesce, attempt, generation), active);
            self.reply(
                i,
                NodeStep::Quiesce,
                attempt,
                generation,
                NodeOutcome::Done {
                    active: Generation(active),
                },
            );
        }
        Ok(())
    }

    /// I3: every acknowledged write is readable afterwards from where the final mapping points.
    fn check_final(&self) -> Result<(), String> {
        if !self.state.is_finished() {
            return Err(format!("did not finish: {:?}", self.state.phase));
        }
        let final_generation = self.recorded.unwrap_or(BASE.get());
        if self.state.phase == RemapPhase::Succeeded {
            let expected = self.state.target_generation.get();
            if final_generation != expected {
                return Err(format!(
                    "succeeded but recorded {final_generation}, not {expected}"
                ));
            }
            if self.copy && self.copied.len() as u64 != AFFECTED {
                return Err("succeeded before every extent was copied".into());
            }
        }
        // A failed operation leaves the source layout, or — in copy mode, when a later cycle
        // failed to quiesce — the last committed cycle's dual-write mapping (seed 004 loops
        // 601 per cycle; earlier cycles stay applied). Never a destination-only placement.
        if self.state.phase != RemapPhase::Succeeded
            && self.maps[&final_generation].contains(&Route::New)
        {
            return Err(format!(
                "{:?} but generation {final_generation} reads from the destination only",
                self.state.phase
            ));
        }
        let map = &self.maps[&final_generation];
        for e in 0..EXTENTS as usize {
            let route = if (e as u64) < AFFECTED {
                map[e]
            } else {
                Route::Old
            };
            let store = match route {
                Route::Old => &self.old_store,
                Route::New | Route::Dual => &self.new_store,
            };
            if store[e] != self.acked[e] {
                return Err(format!(
                    "I3: extent {e} reads {} but the last acknowledged write was {}",
                    store[e], self.acked[e]
                ));
            }
        }
        Ok(())
    }
}

#[test]
fn simulation_invariants_i1_to_i6() {
    let runs: u64 = std::env::var("REMAP_SIM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let seeds: Vec<u64> = match std::env::var("REMAP_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("REMAP_SIM_SEED is a u64")],
        Err(_) => (0..runs).map(|i| 0x5EED_0000 + i).collect(),
    };
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut max_wait = 0;
    for &seed in &seeds {
        let mut sim = Sim::new(seed);
        if let Err(violation) = sim.run() {
            panic!(
                "seed {seed} failed: {violation}\nreplay: REMAP_SIM_SEED={seed} cargo test -p tessera-operator --test planner_remap simulation -- --nocapture"
            );
        }
        max_wait = max_wait.max(sim.max_wait_seen);
        let mode = if sim.copy { "copy" } else { "staged" };
        *outcomes
            .entry(format!("{mode}/{:?}", sim.state.phase))
            .or_default() += 1;
    }
    println!(
        "remap simulation: {} runs, outcomes {outcomes:?}, longest parked wait {max_wait} ms",
        seeds.len()
    );
    // The simulation must exercise the interesting endings, not only the happy path.
    if seeds.len() >= 1_000 {
        for key in [
            "staged/Succeeded",
            "staged/Failed",
            "staged/FailedRecovery",
            "copy/Succeeded",
            "copy/Failed",
        ] {
            assert!(
                outcomes.contains_key(key),
                "no run ended {key}: {outcomes:?}"
            );
        }
    }
}
