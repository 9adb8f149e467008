//! The remap coordinator: seed 004's configuration change control program 212 (Figs. 6, 16, 21;
//! §6 failure matrix; §7.3 state machine) as a pure state machine.
//!
//! [`step`] takes the persisted [`RemapState`] and one [`Event`] (a node's answer, a timer, a
//! hold timeout, a copy result, a restart) and returns the next state and the [`Command`]s to
//! carry out. The controller **persists the returned state (the VolumeRemap status) before it
//! carries out any command** (write-ahead, ARCHITECTURE §6 step 1), so a restarted or newly
//! elected operator resumes from the last persisted state with [`Event::Restarted`], which
//! re-sends what is still unanswered; nodes answer repeats idempotently.
//!
//! Time never enters: timers are commands ([`Command::StartTimer`]) and come back as events
//! ([`Event::Timer`]) tagged with the round they were started in, so a timer of an earlier
//! phase is ignored.
//!
//! The order guarantees of §7.7: no Commit is sent before every participant answered the
//! quiesce (1), no normal-path Resume before every participant answered the commit (2);
//! excluded participants are fenced and never sent anything again (7).

use std::collections::BTreeMap;
use std::fmt;

use tessera_api::model::Generation;
use tessera_api::v1alpha1::{RemapParticipant, RemapPhase};

/// §4.14, 607 normal case.
pub const MSG_SUCCEEDED: &str = "The mapping change completed.";
/// §4.14, 607 after 611 (excluded switches → nodes); the node list follows.
pub const MSG_NODES_STOPPED: &str = "Because synchronization of the I/O temporary hold failed during the mapping change and the mapping could not be changed on them, some nodes were stopped";
/// §4.14, 616 after 610 N, with the preferred hint.
pub const MSG_QUIESCE_FAILED: &str = "Waiting for I/O completion of the node plugins failed. Retry the mapping change when the I/O frequency from workloads to the volume is low.";
/// §4.14, 616 after a successful rollback (612–615).
pub const MSG_CHANGE_FAILED: &str = "Change to the mapping specified by the administrator failed.";
/// §4.14, 616 after 613 N or 615 N.
pub const MSG_RECOVERY_FAILED: &str = "Change to the mapping specified by the administrator failed, and recovery processing also failed.";

/// The failure policy (seed 004 §6; `VolumeRemap.spec.policy`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// 608: continue without the failed nodes only if at least this many succeeded ([0046]: 2).
    pub min_succeeded_to_continue: u32,
    /// 610: quiesce retries after timeouts ("a fixed number of times", [0047]).
    pub max_retries: u32,
    pub quiesce_timeout_ms: u64,
    /// Deadline of the stage, commit, rollback and resume waits (§7.6 inference).
    pub step_timeout_ms: u64,
    /// How often unanswered messages are sent again within a phase (lost messages).
    pub resend_interval_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_succeeded_to_continue: 2,
            max_retries: 3,
            quiesce_timeout_ms: 5_000,
            step_timeout_ms: 5_000,
            resend_interval_ms: 500,
        }
    }
}

impl From<&tessera_api::v1alpha1::RemapPolicy> for Policy {
    fn from(p: &tessera_api::v1alpha1::RemapPolicy) -> Self {
        let ms = |v: i64| u64::try_from(v).unwrap_or(1).max(1);
        Policy {
            min_succeeded_to_continue: u32::try_from(p.min_succeeded_to_continue)
                .unwrap_or(1)
                .max(1),
            max_retries: u32::try_from(p.max_retries).unwrap_or(0),
            quiesce_timeout_ms: ms(p.quiesce_timeout_ms),
            step_timeout_ms: ms(p.commit_timeout_ms),
            resend_interval_ms: (ms(p.quiesce_timeout_ms) / 5).max(1),
        }
    }
}

/// The node-control messages the coordinator sends.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum NodeStep {
    Stage,
    Quiesce,
    Commit,
    Resume,
    Rollback,
}

impl fmt::Display for NodeStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            NodeStep::Stage => "Stage",
            NodeStep::Quiesce => "Quiesce",
            NodeStep::Commit => "Commit",
            NodeStep::Resume => "Resume",
            NodeStep::Rollback => "Rollback",
        };
        f.write_str(name)
    }
}

/// One message to one node: `(volume, operationId, attempt, generation)` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeMessage {
    pub node: String,
    pub step: NodeStep,
    pub attempt: u32,
    /// The generation the step is about. For `Stage` the controller sends the map of this
    /// generation: the target map, a migration cycle's map, or the restore map ([`RemapState::
    /// restore_generation`]).
    pub generation: Generation,
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeOutcome {
    /// Done (704). `active` is the node's active generation afterwards.
    Done { active: Generation },
    /// Error + cause (713). `not_held_active` is set when the refusal was "not held", with the
    /// node's active generation: a Resume refused that way on a node already running the
    /// expected map is as good as done (the node restarted after resuming and lost its answer).
    Refused {
        cause: String,
        not_held_active: Option<Generation>,
    },
}

/// Timer kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// Re-send what is unanswered.
    Resend,
    /// The phase deadline: the unanswered nodes failed with a timeout.
    Deadline,
}

/// What the coordinator reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The VolumeRemap was accepted (the console request, 501) and this operator leads.
    Start,
    Reply {
        node: String,
        step: NodeStep,
        attempt: u32,
        generation: Generation,
        outcome: NodeOutcome,
    },
    Timer {
        round: u64,
        kind: TimerKind,
    },
    /// A node's hold timer expired (820 → 718).
    HoldTimeout {
        node: String,
        attempt: u32,
    },
    /// The copy of the held chunk ended (631/632). `more`: extents remain for a later cycle.
    CopyFinished {
        cycle: u32,
        result: Result<CopyOutcome, String>,
    },
    /// This operator (re)started or became leader with the persisted state.
    Restarted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOutcome {
    pub more: bool,
}

/// What the controller carries out, in order, after persisting the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Send(NodeMessage),
    StartTimer {
        round: u64,
        kind: TimerKind,
        after_ms: u64,
    },
    /// Exclude the node (611/617): mark its attachment Fenced, revoke its extent grants (so its
    /// in-flight remote pieces fail rather than land), and send it a best-effort Fence.
    Fence {
        node: String,
        cause: String,
    },
    /// Every participant runs `generation` now: write it to `VirtualVolume.status.mapping`
    /// (before any resume, so a node staging the volume afterwards gets it, AS-19).
    RecordMapping {
        generation: Generation,
    },
    /// Copy the held chunk of this cycle (631; the migration planner decides what).
    Copy {
        cycle: u32,
    },
    /// Suspend the running copy (6317): the hold timer expired during the copy (821).
    SuspendCopy {
        cycle: u32,
    },
    /// A Kubernetes Event on the VolumeRemap (§11.5).
    Report {
        reason: &'static str,
        message: String,
    },
}

/// Why a participant failed a step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Failure {
    Timeout,
    Error(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout => f.write_str("no answer before the deadline"),
            Failure::Error(cause) => f.write_str(cause),
        }
    }
}

/// Where one participant is in the current phase.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Wait {
    /// Waiting for its answer to this step.
    Pending(NodeStep),
    Done,
    Failed(Failure),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Participant {
    /// Last step the node completed (for status).
    pub last_done: Option<NodeStep>,
    pub excluded: bool,
    pub cause: Option<String>,
    /// Its progress in the current phase (`None`: not asked in this phase).
    pub wait: Option<Wait>,
}

/// Why the hold is being released.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResumeReason {
    /// 605: after every participant committed.
    Normal { more_cycles: bool },
    /// 609: the quiesce failed; `retry` decides 610 once the resume is through.
    Abort { retry: bool, cause: String },
    /// 614: after a rollback (or the restore of a failed copy).
    AfterRollback,
}

/// The persisted state of one VolumeRemap (its status).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemapState {
    pub operation_id: String,
    pub phase: RemapPhase,
    pub policy: Policy,
    /// Online copy (fourth embodiment): the cycle's map is staged inside the hold.
    pub copy: bool,
    /// From 1; raised at every retry after an abort (610).
    pub attempt: u32,
    /// Migration cycle, from 1.
    pub cycle: u32,
    /// The generation every participant ran before the operation.
    pub base_generation: Generation,
    /// The generation every participant runs now (raised by each committed cycle).
    pub committed_generation: Generation,
    /// The generation being staged and committed in this cycle.
    pub target_generation: Generation,
    /// Set when a failed copy restores the pre-operation layout as this generation (635).
    pub restore_generation: Option<Generation>,
    pub participants: BTreeMap<String, Participant>,
    /// Timer epoch: raised on every phase entry and restart.
    pub round: u64,
    pub resume_reason: Option<ResumeReason>,
    pub recovery_failed: bool,
    pub copy_suspended: bool,
    /// §4.14 text of the outcome (`status.message`).
    pub message: Option<String>,
}

impl RemapState {
    /// A new operation on `nodes` (every node with the volume staged), moving the volume from
    /// `base` to `base.next()`.
    pub fn new(
        operation_id: impl Into<String>,
        nodes: impl IntoIterator<Item = String>,
        base: Generation,
        policy: Policy,
        copy: bool,
    ) -> Self {
        RemapState {
            operation_id: operation_id.into(),
            phase: RemapPhase::Pending,
            policy,
            copy,
            attempt: 1,
            cycle: 1,
            base_generation: base,
            committed_generation: base,
            target_generation: base.next(),
            restore_generation: None,
            participants: nodes
                .into_iter()
                .map(|n| {
                    (
                        n,
                        Participant {
                            last_done: None,
                            excluded: false,
                            cause: None,
                            wait: None,
                        },
                    )
                })
                .collect(),
            round: 0,
            resume_reason: None,
            recovery_failed: false,
            copy_suspended: false,
            message: None,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self.phase,
            RemapPhase::Succeeded | RemapPhase::Failed | RemapPhase::FailedRecovery
        )
    }

    /// Participants not excluded.
    pub fn active_nodes(&self) -> Vec<String> {
        self.participants
            .iter()
            .filter(|(_, p)| !p.excluded)
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn excluded_nodes(&self) -> Vec<String> {
        self.participants
            .iter()
            .filter(|(_, p)| p.excluded)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `status.participants`.
    pub fn participants_status(&self) -> Vec<RemapParticipant> {
        self.participants
            .iter()
            .map(|(node, p)| RemapParticipant {
                node: node.clone(),
                state: p.last_done.map(|s| {
                    match s {
                        NodeStep::Stage => "Staged",
                        NodeStep::Quiesce => "Held",
                        NodeStep::Commit => "Committed",
                        NodeStep::Resume => "Resumed",
                        NodeStep::Rollback => "RolledBack",
                    }
                    .to_string()
                }),
                excluded: p.excluded,
                cause: p.cause.clone(),
            })
            .collect()
    }

    /// The generation a step of the current phase names.
    fn step_generation(&self, step: NodeStep) -> Generation {
        match (step, self.restore_generation) {
            (NodeStep::Stage | NodeStep::Commit, Some(restore)) => restore,
            _ => self.target_generation,
        }
    }

    fn message(&self, node: &str, step: NodeStep) -> Command {
        Command::Send(NodeMessage {
            node: node.to_string(),
            step,
            attempt: self.attempt,
            generation: self.step_generation(step),
        })
    }
}

/// The coordinator's transition function. See the module documentation.
pub fn step(mut state: RemapState, event: Event) -> (RemapState, Vec<Command>) {
    let mut out = Vec::new();
    if state.is_finished() {
        return (state, out);
    }
    match event {
        // A leader that finds the operation still Pending starts it (the old one may have died
        // before it could).
        Event::Start | Event::Restarted if state.phase == RemapPhase::Pending => {
            {
                out.push(Command::Report {
                    reason: "ChangeRequested",
                    message: format!(
                        "remap to generation {} on {} node(s)",
                        state.target_generation,
                        state.participants.len()
                    ),
                });
                if state.copy {
                    // The cycle's map depends on the copy: it is staged inside the hold.
                    enter(&mut state, RemapPhase::Quiescing, &mut out);
                } else {
                    enter(&mut state, RemapPhase::Staging, &mut out);
                }
            }
        }
        Event::Start => {}
        Event::Restarted => restart(&mut state, &mut out),
        Event::Reply {
            node,
            step: kind,
            attempt,
            generation,
            outcome,
        } => on_reply(
            &mut state, &node, kind, attempt, generation, outcome, &mut out,
        ),
        Event::Timer { round, kind } if round == state.round => match kind {
            TimerKind::Resend => {
                let pending: Vec<(String, NodeStep)> = pending_nodes(&state);
                for (node, kind) in pending {
                    out.push(state.message(&node, kind));
                }
                if !matches!(state.phase, RemapPhase::Copying) {
                    out.push(Command::StartTimer {
                        round: state.round,
                        kind: TimerKind::Resend,
                        after_ms: state.policy.resend_interval_ms,
                    });
                }
            }
            TimerKind::Deadline => {
                for p in state.participants.values_mut() {
                    if matches!(p.wait, Some(Wait::Pending(_))) {
                        p.wait = Some(Wait::Failed(Failure::Timeout));
                    }
                }
                conclude(&mut state, &mut out);
            }
        },
        Event::Timer { .. } => {}
        Event::HoldTimeout { node, attempt } => {
            let known = state.participants.get(&node).is_some_and(|p| !p.excluded);
            if !known || attempt != state.attempt {
                return (state, out);
            }
            match state.phase {
                // 627: release the hold before the workload's I/O times out, then retry.
                RemapPhase::Quiescing => {
                    out.push(Command::Report {
                        reason: "HoldTimeout",
                        message: format!("node {node} held I/O longer than its hold timeout"),
                    });
                    let retry = state.attempt <= state.policy.max_retries;
                    abort(
                        &mut state,
                        retry,
                        format!("hold timeout on node {node}"),
                        &mut out,
                    );
                }
                // 821 → 6317: the copy is what keeps the hold; suspend it and commit what is
                // copied.
                RemapPhase::Copying if !state.copy_suspended => {
                    state.copy_suspended = true;
                    out.push(Command::SuspendCopy { cycle: state.cycle });
                }
                // After the commit was sent the hold cannot be abandoned: the commit, rollback
                // or resume in progress ends it.
                _ => {}
            }
        }
        Event::CopyFinished { cycle, result } => {
            if state.phase != RemapPhase::Copying || cycle != state.cycle {
                return (state, out);
            }
            match result {
                Ok(CopyOutcome { more }) => {
                    state.resume_reason = Some(ResumeReason::Normal { more_cycles: more });
                    enter(&mut state, RemapPhase::Committing, &mut out);
                }
                Err(cause) => {
                    // 635: restore the layout from before the operation (as a new generation,
                    // staged and committed inside the hold), resume, report.
                    out.push(Command::Report {
                        reason: "CopyFailed",
                        message: cause.clone(),
                    });
                    state.message = Some(format!("{MSG_CHANGE_FAILED} Copy failed: {cause}"));
                    if state.committed_generation == state.base_generation {
                        // Nothing was committed by this operation: resuming on the old map is
                        // the restore.
                        state.resume_reason = Some(ResumeReason::AfterRollback);
                        enter(&mut state, RemapPhase::Resuming, &mut out);
                    } else {
                        state.restore_generation = Some(state.target_generation);
                        state.resume_reason = Some(ResumeReason::AfterRollback);
                        enter(&mut state, RemapPhase::RollingBack, &mut out);
                    }
                }
            }
        }
    }
    (state, out)
}

/// Nodes whose answer is outstanding, with the step they owe.
fn pending_nodes(state: &RemapState) -> Vec<(String, NodeStep)> {
    state
        .participants
        .iter()
        .filter(|(_, p)| !p.excluded)
        .filter_map(|(n, p)| match p.wait {
            Some(Wait::Pending(kind)) => Some((n.clone(), kind)),
            _ => None,
        })
        .collect()
}

/// The first step of each node in a phase.
fn first_step(state: &RemapState, phase: RemapPhase) -> Option<NodeStep> {
    match phase {
        RemapPhase::Staging => Some(NodeStep::Stage),
        RemapPhase::Quiescing => Some(NodeStep::Quiesce),
        // Copy mode stages the cycle's map inside the hold, then commits it.
        RemapPhase::Committing if state.copy => Some(NodeStep::Stage),
        RemapPhase::Committing => Some(NodeStep::Commit),
        // A failed copy is undone by staging and committing the restore map (635); a failed
        // commit by the node's own rollback (612').
        RemapPhase::RollingBack if state.restore_generation.is_some() => Some(NodeStep::Stage),
        RemapPhase::RollingBack => Some(NodeStep::Rollback),
        RemapPhase::Resuming => Some(NodeStep::Resume),
        _ => None,
    }
}

fn deadline_of(state: &RemapState, phase: RemapPhase) -> u64 {
    match phase {
        RemapPhase::Quiescing => state.policy.quiesce_timeout_ms,
        _ => state.policy.step_timeout_ms,
    }
}

/// Enters `phase`: sends its first step to every active participant and arms its timers. A
/// phase with nobody to ask (AS-28: no attachments) concludes at once.
fn enter(state: &mut RemapState, phase: RemapPhase, out: &mut Vec<Command>) {
    state.phase = phase;
    state.round += 1;
    if phase == RemapPhase::Copying {
        state.copy_suspended = false;
        for p in state.participants.values_mut() {
            p.wait = None;
        }
        out.push(Command::Copy { cycle: state.cycle });
        return;
    }
    let Some(kind) = first_step(state, phase) else {
        return;
    };
    let nodes = state.active_nodes();
    for p in state.participants.values_mut() {
        p.wait = if p.excluded {
            None
        } else {
            Some(Wait::Pending(kind))
        };
    }
    for node in &nodes {
        out.push(state.message(node, kind));
    }
    if nodes.is_empty() {
        conclude(state, out);
        return;
    }
    out.push(Command::StartTimer {
        round: state.round,
        kind: TimerKind::Resend,
        after_ms: state.policy.resend_interval_ms,
    });
    out.push(Command::StartTimer {
        round: state.round,
        kind: TimerKind::Deadline,
        after_ms: deadline_of(state, phase),
    });
}

/// After a restart or failover: re-issue the idempotent side effects the previous leader may
/// have persisted but not carried out (fences of excluded nodes, the committed mapping), new
/// timers, re-send what is unanswered (nodes answer repeats with the recorded answer), re-issue
/// a running copy.
fn restart(state: &mut RemapState, out: &mut Vec<Command>) {
    for (node, p) in &state.participants {
        if p.excluded {
            out.push(Command::Fence {
                node: node.clone(),
                cause: p.cause.clone().unwrap_or_default(),
            });
        }
    }
    if state.committed_generation != state.base_generation {
        out.push(Command::RecordMapping {
            generation: state.committed_generation,
        });
    }
    match state.phase {
        RemapPhase::Pending => {}
        RemapPhase::Copying => {
            state.round += 1;
            out.push(Command::Copy { cycle: state.cycle });
        }
        _ => {
            state.round += 1;
            for (node, kind) in pending_nodes(state) {
                out.push(state.message(&node, kind));
            }
            out.push(Command::StartTimer {
                round: state.round,
                kind: TimerKind::Resend,
                after_ms: state.policy.resend_interval_ms,
            });
            out.push(Command::StartTimer {
                round: state.round,
                kind: TimerKind::Deadline,
                after_ms: deadline_of(state, state.phase),
            });
            if pending_nodes(state).is_empty() {
                conclude(state, out);
            }
        }
    }
}

fn on_reply(
    state: &mut RemapState,
    node: &str,
    kind: NodeStep,
    attempt: u32,
    generation: Generation,
    outcome: NodeOutcome,
    out: &mut Vec<Command>,
) {
    if attempt != state.attempt || generation != state.step_generation(kind) {
        return;
    }
    let resume_ok_generation = match &state.resume_reason {
        Some(ResumeReason::Normal { .. }) => state.target_generation,
        _ => state.committed_generation,
    };
    let phase = state.phase;
    let copy = state.copy;
    let restoring = state.restore_generation.is_some();
    let Some(p) = state.participants.get_mut(node) else {
        return;
    };
    if p.excluded || p.wait != Some(Wait::Pending(kind)) {
        return;
    }
    let next = match outcome {
        NodeOutcome::Done { .. } => {
            p.last_done = Some(kind);
            // Two-step phases: the map staged inside the hold is committed next.
            let staged_in_hold = kind == NodeStep::Stage
                && ((phase == RemapPhase::Committing && copy)
                    || (phase == RemapPhase::RollingBack && restoring));
            if staged_in_hold {
                Wait::Pending(NodeStep::Commit)
            } else {
                Wait::Done
            }
        }
        NodeOutcome::Refused {
            not_held_active: Some(active),
            ..
        } if kind == NodeStep::Resume && active == resume_ok_generation => {
            p.last_done = Some(kind);
            Wait::Done
        }
        NodeOutcome::Refused { cause, .. } => Wait::Failed(Failure::Error(cause)),
    };
    let send_commit = next == Wait::Pending(NodeStep::Commit);
    p.wait = Some(next);
    if send_commit {
        out.push(state.message(node, NodeStep::Commit));
    }
    if pending_nodes(state).is_empty() {
        conclude(state, out);
    }
}

/// Failed participants of the current phase, with their failures.
fn failures(state: &RemapState) -> Vec<(String, Failure)> {
    state
        .participants
        .iter()
        .filter(|(_, p)| !p.excluded)
        .filter_map(|(n, p)| match &p.wait {
            Some(Wait::Failed(f)) => Some((n.clone(), f.clone())),
            _ => None,
        })
        .collect()
}

fn succeeded(state: &RemapState) -> usize {
    state
        .participants
        .values()
        .filter(|p| !p.excluded && p.wait == Some(Wait::Done))
        .count()
}

/// 611/617: exclude and fence.
fn exclude(state: &mut RemapState, failed: &[(String, Failure)], out: &mut Vec<Command>) {
    for (node, failure) in failed {
        if let Some(p) = state.participants.get_mut(node) {
            p.excluded = true;
            p.wait = None;
            p.cause = Some(failure.to_string());
        }
        out.push(Command::Fence {
            node: node.clone(),
            cause: failure.to_string(),
        });
        out.push(Command::Report {
            reason: "NodeExcluded",
            message: format!("node {node} excluded and fenced: {failure}"),
        });
    }
}

/// 609: resume everything (no mapping changed in this attempt) and decide 610 afterwards.
fn abort(state: &mut RemapState, retry: bool, cause: String, out: &mut Vec<Command>) {
    state.resume_reason = Some(ResumeReason::Abort { retry, cause });
    enter(state, RemapPhase::Resuming, out);
}

fn causes(failed: &[(String, Failure)]) -> String {
    failed
        .iter()
        .map(|(n, f)| format!("{n}: {f}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn stopped_message(state: &RemapState) -> Option<String> {
    let excluded = state.excluded_nodes();
    (!excluded.is_empty()).then(|| format!("{MSG_NODES_STOPPED}: {}.", excluded.join(", ")))
}

fn finish(state: &mut RemapState, phase: RemapPhase, message: String, out: &mut Vec<Command>) {
    let mut message = message;
    if phase != RemapPhase::Succeeded
        && state.copy
        && state.committed_generation != state.base_generation
        && state.restore_generation.is_none()
    {
        // Earlier cycles stay applied (the patent loops 601 per cycle): say where the volume is.
        message = format!(
            "{message} The volume stays on the partly migrated mapping of generation {} (copied extents are written to both areas).",
            state.committed_generation
        );
    }
    state.phase = phase;
    state.round += 1;
    for p in state.participants.values_mut() {
        p.wait = None;
    }
    let reason = match phase {
        RemapPhase::Succeeded => "Succeeded",
        RemapPhase::FailedRecovery => "RecoveryFailed",
        _ => "Failed",
    };
    out.push(Command::Report {
        reason,
        message: message.clone(),
    });
    state.message = Some(message);
}

/// Every participant answered (or timed out) in the current phase: decide (602/604/606/613/615).
fn conclude(state: &mut RemapState, out: &mut Vec<Command>) {
    let failed = failures(state);
    match state.phase {
        RemapPhase::Staging => {
            if failed.is_empty() {
                out.push(Command::Report {
                    reason: "Staged",
                    message: format!("generation {} staged", state.target_generation),
                });
                enter(state, RemapPhase::Quiescing, out);
            } else {
                // Nothing is held yet (625/626 failure; inference): report and stop.
                let message = format!(
                    "{MSG_CHANGE_FAILED} Staging the new mapping failed ({}).",
                    causes(&failed)
                );
                finish(state, RemapPhase::Failed, message, out);
            }
        }
        RemapPhase::Quiescing => {
            if failed.is_empty() {
                out.push(Command::Report {
                    reason: "QuiesceCompleted",
                    message: format!("attempt {} held on every participant", state.attempt),
                });
                let next = if state.copy {
                    RemapPhase::Copying
                } else {
                    RemapPhase::Committing
                };
                if !state.copy {
                    state.resume_reason = Some(ResumeReason::Normal { more_cycles: false });
                }
                enter(state, next, out);
            } else if succeeded(state) >= state.policy.min_succeeded_to_continue as usize {
                // 608 Y → 611: exclude the failed ones and go on with the rest.
                exclude(state, &failed, out);
                let next = if state.copy {
                    RemapPhase::Copying
                } else {
                    state.resume_reason = Some(ResumeReason::Normal { more_cycles: false });
                    RemapPhase::Committing
                };
                enter(state, next, out);
            } else {
                // 608 N → 609, and 610: retry only when every failure was a timeout.
                let timeouts_only = failed.iter().all(|(_, f)| *f == Failure::Timeout);
                let retry = timeouts_only && state.attempt <= state.policy.max_retries;
                out.push(Command::Report {
                    reason: "QuiesceFailed",
                    message: causes(&failed),
                });
                abort(state, retry, causes(&failed), out);
            }
        }
        RemapPhase::Committing => {
            if failed.is_empty() {
                out.push(Command::Report {
                    reason: "CommitCompleted",
                    message: format!("generation {} active everywhere", state.target_generation),
                });
                state.committed_generation = state.target_generation;
                out.push(Command::RecordMapping {
                    generation: state.target_generation,
                });
                enter(state, RemapPhase::Resuming, out);
            } else {
                // 604 N → 612: roll back every participant, the failed ones included.
                out.push(Command::Report {
                    reason: "CommitFailed",
                    message: causes(&failed),
                });
                state.message = Some(format!("{MSG_CHANGE_FAILED} ({})", causes(&failed)));
                state.resume_reason = Some(ResumeReason::AfterRollback);
                enter(state, RemapPhase::RollingBack, out);
            }
        }
        RemapPhase::RollingBack => {
            if !failed.is_empty() {
                // 613 N → 617.
                state.recovery_failed = true;
                exclude(state, &failed, out);
            }
            if let Some(restore) = state.restore_generation {
                state.committed_generation = restore;
                out.push(Command::RecordMapping {
                    generation: restore,
                });
            }
            state.resume_reason = Some(ResumeReason::AfterRollback);
            enter(state, RemapPhase::Resuming, out);
        }
        RemapPhase::Resuming => {
            if !failed.is_empty() {
                // 615 N / 617 (and 606 N, which the patent leaves open: treated the same).
                exclude(state, &failed, out);
            }
            match state.resume_reason.clone() {
                Some(ResumeReason::Normal { more_cycles: true }) if state.copy => {
                    // 634 N: next cycle.
                    state.cycle += 1;
                    state.target_generation = state.target_generation.next();
                    enter(state, RemapPhase::Quiescing, out);
                }
                Some(ResumeReason::Normal { .. }) => {
                    let message = match stopped_message(state) {
                        Some(stopped) => format!("{MSG_SUCCEEDED} {stopped}"),
                        None => MSG_SUCCEEDED.to_string(),
                    };
                    finish(state, RemapPhase::Succeeded, message, out);
                }
                Some(ResumeReason::Abort { retry, cause }) => {
                    if retry && !state.active_nodes().is_empty() {
                        state.attempt += 1;
                        out.push(Command::Report {
                            reason: "QuiesceRetry",
                            message: format!(
                                "attempt {} of {}",
                                state.attempt,
                                state.policy.max_retries + 1
                            ),
                        });
                        enter(state, RemapPhase::Quiescing, out);
                    } else {
                        let mut message = format!("{MSG_QUIESCE_FAILED} ({cause})");
                        if let Some(stopped) = stopped_message(state) {
                            message = format!("{message} {stopped}");
                        }
                        finish(state, RemapPhase::Failed, message, out);
                    }
                }
                Some(ResumeReason::AfterRollback) | None => {
                    let failed_recovery = state.recovery_failed || !failed.is_empty();
                    let detail = state
                        .message
                        .clone()
                        .unwrap_or_else(|| MSG_CHANGE_FAILED.to_string());
                    if failed_recovery {
                        let stopped = stopped_message(state).unwrap_or_default();
                        let message = format!("{MSG_RECOVERY_FAILED} {stopped}");
                        finish(
                            state,
                            RemapPhase::FailedRecovery,
                            message.trim().to_string(),
                            out,
                        );
                    } else {
                        finish(state, RemapPhase::Failed, detail, out);
                    }
                }
            }
        }
        _ => {}
    }
}
