//! Mirror pairs (`planners::mirror`) against seed 003: one test per acceptance scenario of §8.5
//! that applies at planner level (named `sNN_…`, with the reference's numbers: vol-0 1000 MB,
//! vol-1 1500 MB, as extents of 1 MiB), a table of every phase × every event, an idempotence
//! check over the same table, and a property test of random event sequences against a model of
//! what the secondary really lacks.
//!
//! Scenarios 7 (remote pair) and the byte-level halves of 1, 2, 8 and 9 need real nodes; see
//! docs/mirror.md §6.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use roaring::RoaringTreemap;
use tessera_api::v1alpha1::{
    MirrorPairSpec, MirrorPhase, MirrorState, MountAnswer, MountCheckPolicy, SecondarySelection,
};
use tessera_operator::planners::ExtentRange;
use tessera_operator::planners::mirror::{
    CONDITION_SECONDARY_MOUNTED, CONDITION_SHIFT_BLOCKED, CONDITION_SYNCHRONIZED, Command,
    CopyKind, DataPath, Event, InUseFlag, MirrorPairState, MountDecision, NodeAnswer,
    PairMembership, PairSetup, REASON_MOUNT_CHECK_OVERRIDDEN, REASON_NO_SUITABLE_SECONDARY,
    REASON_PAIR_FORMED, REASON_PAIR_RESYNCED, REASON_PAIR_SPLIT, REASON_RESYNC_CANCELLED,
    REASON_SECONDARY_MOUNTED, REASON_SPLIT_FAILED, REASON_SPLIT_REJECTED, Rejection, ReleaseAs,
    Resize, SelectionError, VolumeRole, VolumeView, check_named_secondary, check_role_change,
    decide_mount_check, extent_ranges, in_use_flag, plan_release, resync_set, select_secondary,
    step, unused_secondaries,
};

/// The fixture's extent: 1 MiB, so the reference's "1000 MB" volume is 1000 extents.
const MIB: u64 = 1 << 20;
/// vol-0, the primary (JP Fig. 2: 1000 MB).
const VOL0: u64 = 1000;
/// vol-1, the secondary candidate (JP Fig. 2: 1500 MB).
const VOL1: u64 = 1500;

fn set(nodes: &[&str]) -> BTreeSet<String> {
    nodes.iter().map(|n| n.to_string()).collect()
}

fn setup(secondary: &str, policy: MountCheckPolicy) -> PairSetup {
    PairSetup {
        primary: "vol-0".into(),
        secondary: secondary.into(),
        extents: VOL0,
        extent_size_bytes: MIB,
        desired: MirrorState::Paired,
        mount_check: policy,
        override_mount_check: false,
    }
}

/// Drives one pair and keeps every command.
struct Pair {
    state: MirrorPairState,
    log: Vec<Command>,
}

impl Pair {
    fn new(setup: PairSetup) -> Self {
        Pair {
            state: MirrorPairState::new(setup),
            log: Vec::new(),
        }
    }

    fn on(&mut self, event: Event) -> Vec<Command> {
        let (state, commands) = step(self.state.clone(), event);
        self.state = state;
        self.log.extend(commands.iter().cloned());
        commands
    }

    fn reconcile(&mut self, nodes: &[&str]) -> Vec<Command> {
        self.on(Event::Reconcile {
            accessors: set(nodes),
        })
    }

    /// Answers the outstanding inquiry round.
    fn answer(&mut self, answers: &[(&str, NodeAnswer)]) -> Vec<Command> {
        let op = self
            .state
            .mount_check_in_flight()
            .expect("an inquiry is outstanding");
        self.on(Event::MountCheckResult {
            op,
            answers: answers.iter().map(|(n, a)| (n.to_string(), *a)).collect(),
        })
    }

    fn copy_op(&self, kind: CopyKind) -> u64 {
        match self.state.copy_in_flight() {
            Some((op, k)) if k == kind => op,
            other => panic!("expected a {kind:?} copy, found {other:?}"),
        }
    }

    /// Simplex → Copying → Paired with node-2 able to reach the secondary and not using it.
    fn form(&mut self) {
        self.reconcile(&["node-2"]);
        self.answer(&[("node-2", NodeAnswer::NotInUse)]);
        let op = self.copy_op(CopyKind::Formation);
        self.on(Event::FormationCopyDone { op });
        assert_eq!(self.state.phase(), MirrorPhase::Paired);
    }

    /// Paired → Split through the cut.
    fn split(&mut self) {
        self.on(Event::DesiredStateChanged(MirrorState::Split));
        let op = self.state.cut_in_flight().expect("cut started");
        self.on(Event::SplitCutDone { op });
        assert_eq!(self.state.phase(), MirrorPhase::Split);
    }
}

fn warnings<'a>(commands: &'a [Command], reason: &str) -> Vec<&'a str> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Warn { reason: r, message } if *r == reason => Some(message.as_str()),
            _ => None,
        })
        .collect()
}

fn position(commands: &[Command], pred: impl Fn(&Command) -> bool) -> Option<usize> {
    commands.iter().position(pred)
}

fn is_copy(c: &Command) -> bool {
    matches!(c, Command::StartCopy { .. })
}

fn condition(commands: &[Command], kind: &str) -> Option<bool> {
    commands.iter().rev().find_map(|c| match c {
        Command::SetCondition {
            kind: k, status, ..
        } if *k == kind => Some(*status),
        _ => None,
    })
}

fn treemap(values: impl IntoIterator<Item = u64>) -> RoaringTreemap {
    values.into_iter().collect()
}

fn volume(name: &str, size: u64, role: VolumeRole, pair: PairMembership) -> VolumeView {
    VolumeView {
        name: name.into(),
        size_extents: size,
        pool: "pool-a".into(),
        role,
        pair,
    }
}

// ---------------------------------------------------------------------------------------------
// Seed 003 §8.5 acceptance scenarios
// ---------------------------------------------------------------------------------------------

/// Scenario 1 (claims 1, 3, 7, 8, 10): pair(vol-0, vol-1) Split, vol-1 mounted on node-2; the
/// user sets Paired → every node that can reach vol-1 is asked, node-2 is recorded `True`, a
/// Warning names node-2 and vol-1, `SecondaryMounted=True`; with Block the phase stays Split and
/// nothing writes vol-1 (no copy, no data-path change; the checksum itself is e2e).
#[test]
fn s01_resync_warns_when_secondary_mounted_and_block_keeps_split() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Block));
    p.form();
    p.split();
    p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(100, 4)],
    });
    p.reconcile(&["node-2", "node-3"]);

    let asked = p.on(Event::DesiredStateChanged(MirrorState::Paired));
    assert_eq!(
        asked,
        vec![Command::StartMountCheck {
            op: p.state.mount_check_in_flight().expect("round"),
            nodes: vec!["node-2".into(), "node-3".into()],
        }]
    );
    let out = p.answer(&[
        ("node-2", NodeAnswer::Mounted),
        ("node-3", NodeAnswer::NotInUse),
    ]);
    let warned = warnings(&out, REASON_SECONDARY_MOUNTED);
    assert_eq!(warned.len(), 1, "{out:?}");
    assert!(warned[0].contains("node-2 (mounted)") && warned[0].contains("vol-1"));
    assert!(!warned[0].contains("node-3"), "only in-use nodes are named");
    assert_eq!(condition(&out, CONDITION_SECONDARY_MOUNTED), Some(true));
    assert_eq!(condition(&out, CONDITION_SHIFT_BLOCKED), Some(true));
    assert!(!out.iter().any(is_copy));
    assert!(!out.iter().any(|c| matches!(c, Command::SetDataPath(_))));
    assert_eq!(p.state.phase(), MirrorPhase::Split);
    assert_eq!(p.state.data_path(), DataPath::Track, "vol-1 stays frozen");
    assert!(p.state.is_blocked());

    let status = p.state.status();
    let accessors: Vec<(String, MountAnswer)> = status
        .secondary_accessors
        .iter()
        .map(|a| (a.node.clone(), a.mounted))
        .collect();
    assert_eq!(
        accessors,
        vec![
            ("node-2".to_string(), MountAnswer::True),
            ("node-3".to_string(), MountAnswer::False)
        ]
    );
    assert_eq!(status.dirty_bytes, Some(4 * MIB as i64), "dirty bits kept");

    // Still mounted at the next reconcile: asked again, no second warning, still Split.
    p.reconcile(&["node-2", "node-3"]);
    let again = p.answer(&[
        ("node-2", NodeAnswer::Mounted),
        ("node-3", NodeAnswer::NotInUse),
    ]);
    assert!(warnings(&again, REASON_SECONDARY_MOUNTED).is_empty());
    assert!(!again.iter().any(is_copy));
    assert_eq!(p.state.phase(), MirrorPhase::Split);
}

/// Scenario 2: the same pair, vol-1 mounted nowhere → no warning, exactly the un-reflected
/// extents are copied, then Paired with the dirty bitmap cleared.
#[test]
fn s02_no_warning_when_not_mounted_and_resync_copies_only_unreflected_extents() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.form();
    p.split();
    p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(100, 4), ExtentRange::new(500, 1)],
    });
    p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(102, 3)],
    });
    assert_eq!(p.state.dirty_bytes(), 6 * MIB);

    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    let out = p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    assert!(warnings(&out, REASON_SECONDARY_MOUNTED).is_empty());
    assert_eq!(
        condition(&out, CONDITION_SECONDARY_MOUNTED),
        None,
        "already False"
    );
    assert_eq!(p.state.condition(CONDITION_SECONDARY_MOUNTED), Some(false));
    let op = p.copy_op(CopyKind::Resync);
    assert!(out.contains(&Command::SetDataPath(DataPath::Mirror)));
    assert!(out.contains(&Command::StartCopy {
        op,
        kind: CopyKind::Resync,
        ranges: vec![ExtentRange::new(100, 5), ExtentRange::new(500, 1)],
    }));
    assert_eq!(p.state.phase(), MirrorPhase::Resyncing);

    p.on(Event::ResyncProgress { op, percent: 50 });
    assert_eq!(p.state.copy_progress_percent(), 50);
    let done = p.on(Event::ResyncDone { op });
    assert_eq!(p.state.phase(), MirrorPhase::Paired);
    assert!(done.contains(&Command::ClearDirty));
    assert!(
        done.iter()
            .any(|c| matches!(c, Command::Note { reason, .. } if *reason == REASON_PAIR_RESYNCED))
    );
    assert_eq!(condition(&done, CONDITION_SYNCHRONIZED), Some(true));
    assert_eq!(p.state.dirty_bytes(), 0);
    assert_eq!(p.state.copy_progress_percent(), 100);
}

/// Scenario 3: vol-1 reachable only from node-2 and node-3 → exactly they are asked; an answer
/// from node-5, which cannot reach it, does not count.
#[test]
fn s03_only_nodes_that_can_reach_the_secondary_are_inquired() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Block));
    p.form();
    p.split();
    p.reconcile(&["node-2", "node-3"]);
    let out = p.on(Event::DesiredStateChanged(MirrorState::Paired));
    let Some(Command::StartMountCheck { nodes, .. }) = out.first() else {
        panic!("{out:?}");
    };
    assert_eq!(nodes, &vec!["node-2".to_string(), "node-3".to_string()]);

    let out = p.answer(&[
        ("node-2", NodeAnswer::NotInUse),
        ("node-3", NodeAnswer::NotInUse),
        ("node-5", NodeAnswer::Mounted),
    ]);
    assert!(warnings(&out, REASON_SECONDARY_MOUNTED).is_empty());
    assert_eq!(p.state.phase(), MirrorPhase::Resyncing);
    let names: Vec<&str> = p
        .state
        .accessor_answers()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, vec!["node-2", "node-3"]);

    // The decision function alone: the unreachable node's "mounted" never counts.
    let check = decide_mount_check(
        MountCheckPolicy::Block,
        false,
        &set(&["node-2", "node-3"]),
        &[("node-5".to_string(), NodeAnswer::Mounted)]
            .into_iter()
            .collect(),
    );
    // node-2 and node-3 did not answer at all: unknown, which warns (D-9).
    assert_eq!(check.decision, MountDecision::Wait);
    assert_eq!(check.in_use, vec!["node-2", "node-3"]);
    assert_eq!(
        check.in_use_text(),
        "node-2 (no answer), node-3 (no answer)"
    );
}

/// Scenario 4: after scenario 1, node-2 unmounts vol-1 → the next reconcile asks again, records
/// `False`, clears `SecondaryMounted`, and the Block-held resync proceeds.
#[test]
fn s04_unmount_clears_the_warning_and_the_held_resync_proceeds() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Block));
    p.form();
    p.split();
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    p.answer(&[("node-2", NodeAnswer::Mounted)]);
    assert!(p.state.is_blocked());

    let asked = p.reconcile(&["node-2"]);
    assert!(matches!(
        asked.as_slice(),
        [Command::StartMountCheck { .. }]
    ));
    let out = p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    assert_eq!(condition(&out, CONDITION_SECONDARY_MOUNTED), Some(false));
    assert_eq!(condition(&out, CONDITION_SHIFT_BLOCKED), Some(false));
    let cleared = position(&out, |c| {
        matches!(c, Command::SetCondition { kind, status: false, .. } if *kind == CONDITION_SECONDARY_MOUNTED)
    })
    .expect("cleared");
    let copy = position(&out, is_copy).expect("resync starts");
    assert!(cleared < copy);
    assert_eq!(p.state.phase(), MirrorPhase::Resyncing);
    assert_eq!(
        p.state.accessor_answers(),
        &[("node-2".to_string(), NodeAnswer::NotInUse)]
    );
}

/// Scenario 5: policy Warn, vol-1 mounted on node-2 → the warning comes before the copy.
#[test]
fn s05_warn_policy_warns_before_the_resync_copy_starts() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.form();
    p.split();
    p.on(Event::SecondaryWrite {
        extents: vec![ExtentRange::new(7, 1)],
    });
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    let out = p.answer(&[("node-2", NodeAnswer::Mounted)]);
    let warn = position(
        &out,
        |c| matches!(c, Command::Warn { reason, .. } if *reason == REASON_SECONDARY_MOUNTED),
    )
    .expect("warned");
    let mounted = position(&out, |c| {
        matches!(c, Command::SetCondition { kind, status: true, .. } if *kind == CONDITION_SECONDARY_MOUNTED)
    })
    .expect("condition set");
    let path = position(&out, |c| {
        matches!(c, Command::SetDataPath(DataPath::Mirror))
    })
    .unwrap();
    let copy = position(&out, is_copy).expect("resync starts");
    assert!(warn < copy && mounted < copy && warn < path, "{out:?}");
    assert!(warnings(&out, REASON_SECONDARY_MOUNTED)[0].contains("mountCheck: Warn"));
    // The secondary's own write is overwritten by the resync: it is in the copy.
    assert!(
        matches!(&out[copy], Command::StartCopy { ranges, .. } if ranges == &vec![ExtentRange::new(7, 1)])
    );
}

/// Scenario 6 (claim 2): vol-2 exists, is mounted on node-3 and in no pair; a MirrorPair
/// (vol-0, vol-2) is created → the inquiry runs and the warning precedes the formation copy.
#[test]
fn s06_new_pair_checks_the_existing_secondary_before_the_formation_copy() {
    let primary = volume("vol-0", VOL0, VolumeRole::Normal, PairMembership::Unpaired);
    // vol-2's size is ours (JP Fig. 13 gives none): the primary's.
    let vol2 = volume(
        "vol-2",
        VOL0,
        VolumeRole::SecondaryCandidate,
        PairMembership::Unpaired,
    );
    let chosen = check_named_secondary(&primary, &vol2).expect("vol-2 can be named");
    assert_eq!(chosen.resize, Resize::None);

    let spec = MirrorPairSpec {
        primary: "vol-0".into(),
        secondary: Some("vol-2".into()),
        secondary_selection: None,
        desired_state: MirrorState::Paired,
        mount_check: MountCheckPolicy::Warn,
        override_mount_check: false,
    };
    let mut p = Pair::new(PairSetup::from_spec(&spec, chosen.secondary, VOL0, MIB));
    // Before the first reconcile the accessor set is unknown: nothing starts.
    assert!(p.log.is_empty() && p.state.mount_check_in_flight().is_none());
    let asked = p.reconcile(&["node-3"]);
    assert!(
        matches!(asked.as_slice(), [Command::StartMountCheck { nodes, .. }] if nodes == &vec!["node-3".to_string()])
    );
    assert!(!asked.iter().any(is_copy), "no copy before the answers");

    let out = p.answer(&[("node-3", NodeAnswer::Mounted)]);
    let warned = warnings(&out, REASON_SECONDARY_MOUNTED);
    assert!(warned[0].contains("node-3") && warned[0].contains("vol-2"));
    assert!(warned[0].contains("formation copy"));
    let warn = position(&out, |c| matches!(c, Command::Warn { .. })).unwrap();
    let copy = position(&out, is_copy).unwrap();
    assert!(warn < copy);
    assert!(
        matches!(&out[copy], Command::StartCopy { kind: CopyKind::Formation, ranges, .. } if ranges == &vec![ExtentRange::new(0, VOL0)])
    );

    // With Block, the pair stays Simplex.
    let mut blocked = Pair::new(setup("vol-2", MountCheckPolicy::Block));
    blocked.reconcile(&["node-3"]);
    let out = blocked.answer(&[("node-3", NodeAnswer::Staged)]);
    assert!(warnings(&out, REASON_SECONDARY_MOUNTED)[0].contains("node-3 (staged)"));
    assert!(!out.iter().any(is_copy));
    assert_eq!(blocked.state.phase(), MirrorPhase::Simplex);
}

/// Scenario 8, planner half: in Paired the data path mirrors every write, so a primary write is
/// not a dirty extent. (Reading sector 100 of vol-1 back is e2e.)
#[test]
fn s08_paired_pair_mirrors_writes() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.form();
    assert_eq!(p.state.data_path(), DataPath::Mirror);
    assert!(p.log.contains(&Command::SetDataPath(DataPath::Mirror)));
    // 4 KiB at sector 100 lies in extent 0.
    p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(0, 1)],
    });
    assert_eq!(p.state.dirty_bytes(), 0);
    assert_eq!(p.state.condition(CONDITION_SYNCHRONIZED), Some(true));
}

/// Scenario 9, planner half: the split is cut under a quiesce; from the cut on, primary writes
/// are tracked and nothing is copied to vol-1 (JP [0007]). (Reading vol-1 is e2e.)
#[test]
fn s09_split_cut_freezes_the_secondary() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.form();
    let out = p.on(Event::DesiredStateChanged(MirrorState::Split));
    let op = p.state.cut_in_flight().expect("cut");
    assert_eq!(out, vec![Command::QuiesceAndCut { op }]);
    assert_eq!(
        p.state.phase(),
        MirrorPhase::Paired,
        "until the cut is done"
    );
    assert_eq!(p.state.data_path(), DataPath::Mirror);

    let out = p.on(Event::SplitCutDone { op });
    assert_eq!(p.state.phase(), MirrorPhase::Split);
    assert_eq!(p.state.data_path(), DataPath::Track);
    assert!(
        out.iter()
            .any(|c| matches!(c, Command::Note { reason, .. } if *reason == REASON_PAIR_SPLIT))
    );
    assert_eq!(condition(&out, CONDITION_SYNCHRONIZED), Some(false));

    let out = p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(0, 1)],
    });
    assert!(out.is_empty());
    assert_eq!(p.state.primary_dirty(), &treemap([0]));
    assert!(!p.log.iter().any(|c| matches!(
        c,
        Command::StartCopy {
            kind: CopyKind::Resync,
            ..
        }
    )));
}

/// Scenario 10 (JP [0044]): Split while Copying (copy < 100 %) → stays Copying with a Warning;
/// the split is cut once the copy reaches 100 %.
#[test]
fn s10_split_is_refused_while_copying() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.reconcile(&[]);
    let op = p.copy_op(CopyKind::Formation);
    p.on(Event::FormationCopyProgress { op, percent: 40 });

    let out = p.on(Event::DesiredStateChanged(MirrorState::Split));
    assert_eq!(p.state.phase(), MirrorPhase::Copying);
    let refused = warnings(&out, REASON_SPLIT_REJECTED);
    assert_eq!(refused.len(), 1);
    assert!(refused[0].contains("Copying (40 %"), "{}", refused[0]);
    assert!(
        !out.iter()
            .any(|c| matches!(c, Command::QuiesceAndCut { .. }))
    );
    assert!(
        p.on(Event::DesiredStateChanged(MirrorState::Split))
            .is_empty()
    );

    let out = p.on(Event::FormationCopyDone { op });
    assert_eq!(p.state.phase(), MirrorPhase::Paired);
    assert!(matches!(out.last(), Some(Command::QuiesceAndCut { .. })));
}

/// Scenario 11 (JP Fig. 8): only vol-1 (1500 MB) is unused; for vol-0 (1000 MB) `SameSize`
/// fails with "no suitable secondary" (S703); `SameOrLarger` picks vol-1, the pair starts at
/// 0 % Copying (Duplex-Pending) and becomes Paired (Duplex) at 100 %; vol-1 is then paired.
#[test]
fn s11_same_capacity_fails_and_same_or_larger_pairs_vol1() {
    let vol0 = volume("vol-0", VOL0, VolumeRole::Normal, PairMembership::Unpaired);
    let vol1 = volume(
        "vol-1",
        VOL1,
        VolumeRole::SecondaryCandidate,
        PairMembership::Unpaired,
    );
    let volumes = vec![vol0.clone(), vol1.clone()];

    let err = select_secondary(&vol0, SecondarySelection::SameSize, &volumes, 0).unwrap_err();
    assert_eq!(err.reason(), REASON_NO_SUITABLE_SECONDARY);
    match &err {
        SelectionError::NoSuitableSecondary { rejected, .. } => assert_eq!(
            rejected,
            &vec![
                ("vol-0".to_string(), Rejection::IsPrimary),
                ("vol-1".to_string(), Rejection::NotSameSize { size: VOL1 }),
            ]
        ),
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("no suitable secondary for vol-0 (1000 extents, SameSize)"));
    assert!(text.contains("vol-1: 1500 extents, not the primary's size"));

    let chosen = select_secondary(&vol0, SecondarySelection::SameOrLarger, &volumes, 0)
        .expect("vol-1 is larger");
    assert_eq!(chosen.secondary, "vol-1");
    assert_eq!(chosen.resize, Resize::None);

    let mut p = Pair::new(setup(&chosen.secondary, MountCheckPolicy::Warn));
    p.reconcile(&[]); // vol-1 is attached nowhere
    let status = p.state.status();
    assert_eq!(status.phase, Some(MirrorPhase::Copying));
    assert_eq!(status.copy_progress_percent, Some(0));
    let op = p.copy_op(CopyKind::Formation);
    p.on(Event::FormationCopyProgress { op, percent: 100 });
    assert_eq!(p.state.phase(), MirrorPhase::Copying, "Duplex only on Done");
    assert_eq!(p.state.copy_progress_percent(), 99);
    let out = p.on(Event::FormationCopyDone { op });
    assert_eq!(p.state.status().phase, Some(MirrorPhase::Paired));
    assert_eq!(p.state.status().copy_progress_percent, Some(100));
    assert!(
        out.iter()
            .any(|c| matches!(c, Command::Note { reason, .. } if *reason == REASON_PAIR_FORMED))
    );

    // vol-1 now carries the pair flag: a second pair cannot take it.
    let paired = VolumeView {
        pair: PairMembership::Secondary,
        ..vol1
    };
    let vol3 = volume("vol-3", VOL0, VolumeRole::Normal, PairMembership::Unpaired);
    let err =
        select_secondary(&vol3, SecondarySelection::SameOrLarger, &[vol0, paired], 0).unwrap_err();
    assert!(
        err.to_string()
            .contains("vol-1: already the secondary of a pair")
    );
    assert!(err.to_string().contains("vol-0: role Normal"));
}

/// Scenario 12 (JP embodiment 3, S2200–S2203): `ResizeToMatch` picks vol-1 (1500 MB) for
/// vol-0 (1000 MB) and returns its last 500 extents; a smaller candidate is grown from the
/// unallocated extents instead, if the pool has enough.
#[test]
fn s12_resize_to_match_returns_or_adds_extents() {
    let vol0 = volume("vol-0", VOL0, VolumeRole::Normal, PairMembership::Unpaired);
    let vol1 = volume(
        "vol-1",
        VOL1,
        VolumeRole::SecondaryCandidate,
        PairMembership::Unpaired,
    );
    let chosen = select_secondary(
        &vol0,
        SecondarySelection::ResizeToMatch,
        std::slice::from_ref(&vol1),
        0,
    )
    .unwrap();
    assert_eq!(chosen.secondary, "vol-1");
    assert_eq!(
        chosen.resize,
        Resize::Return {
            range: ExtentRange::new(1000, 500)
        }
    );
    assert_eq!(chosen.size_after, VOL0);

    let vol2 = volume(
        "vol-2",
        800,
        VolumeRole::SecondaryCandidate,
        PairMembership::Unpaired,
    );
    let grown = select_secondary(
        &vol0,
        SecondarySelection::ResizeToMatch,
        std::slice::from_ref(&vol2),
        300,
    )
    .unwrap();
    assert_eq!(grown.resize, Resize::Add { extents: 200 });
    assert_eq!(grown.size_after, VOL0);
    let short = select_secondary(
        &vol0,
        SecondarySelection::ResizeToMatch,
        std::slice::from_ref(&vol2),
        100,
    )
    .unwrap_err();
    assert!(matches!(
        &short,
        SelectionError::NoSuitableSecondary { rejected, .. }
            if rejected == &vec![("vol-2".to_string(), Rejection::ShortfallExceedsUnallocated { shortfall: 200, unallocated: 100 })]
    ));

    // S2200 → S2201 → S2202: the same size first, then larger, then smaller.
    let vol3 = volume(
        "vol-3",
        VOL0,
        VolumeRole::SecondaryCandidate,
        PairMembership::Unpaired,
    );
    let all = [vol2.clone(), vol1.clone(), vol3];
    let exact = select_secondary(&vol0, SecondarySelection::ResizeToMatch, &all, 1000).unwrap();
    assert_eq!(
        (exact.secondary.as_str(), exact.resize),
        ("vol-3", Resize::None)
    );
    let larger =
        select_secondary(&vol0, SecondarySelection::ResizeToMatch, &all[..2], 1000).unwrap();
    assert_eq!(larger.secondary, "vol-1");
}

/// Scenario 13 (JP [0082], [0124]): vol-1 paired → its role change to Normal is refused.
#[test]
fn s13_role_change_of_a_paired_volume_is_refused() {
    let vol1 = volume(
        "vol-1",
        VOL1,
        VolumeRole::SecondaryCandidate,
        PairMembership::Secondary,
    );
    let err = check_role_change(&vol1, VolumeRole::Normal).unwrap_err();
    assert_eq!(err.volume, "vol-1");
    assert!(err.to_string().contains("vol-1 is the secondary of a pair"));
    assert!(check_role_change(&vol1, VolumeRole::SecondaryCandidate).is_ok());

    let vol0 = volume("vol-0", VOL0, VolumeRole::Normal, PairMembership::Primary);
    assert!(check_role_change(&vol0, VolumeRole::SecondaryCandidate).is_err());
    let free = VolumeView {
        pair: PairMembership::Unpaired,
        ..vol1
    };
    assert!(check_role_change(&free, VolumeRole::Normal).is_ok());
}

/// Scenario 14 (JP Fig. 13): vol-0 Normal (invalid), vol-1 in use, vol-2 unused → [vol-2].
#[test]
fn s14_unused_secondaries_list() {
    let volumes = vec![
        volume(
            "vol-2",
            VOL0,
            VolumeRole::SecondaryCandidate,
            PairMembership::Unpaired,
        ),
        volume("vol-0", VOL0, VolumeRole::Normal, PairMembership::Primary),
        volume(
            "vol-1",
            VOL1,
            VolumeRole::SecondaryCandidate,
            PairMembership::Secondary,
        ),
    ];
    let flags: Vec<InUseFlag> = volumes.iter().map(in_use_flag).collect();
    assert_eq!(
        flags,
        vec![InUseFlag::Unused, InUseFlag::Invalid, InUseFlag::InUse]
    );
    assert_eq!(unused_secondaries(&volumes), vec!["vol-2".to_string()]);
}

/// Scenario 15 (JP Fig. 9): deleting the pair stops mirroring; `releaseSecondaryAs: Normal`
/// makes the secondary Normal, `Secondary` leaves its role unchanged.
#[test]
fn s15_release_sets_the_secondary_role() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.form();
    let normal = plan_release(&p.state, ReleaseAs::Normal, VolumeRole::SecondaryCandidate);
    assert_eq!(normal.secondary_role, VolumeRole::Normal);
    assert_eq!(
        normal.commands,
        vec![
            Command::SetDataPath(DataPath::Unpaired),
            Command::ClearDirty
        ]
    );
    let kept = plan_release(
        &p.state,
        ReleaseAs::Secondary,
        VolumeRole::SecondaryCandidate,
    );
    assert_eq!(kept.secondary_role, VolumeRole::SecondaryCandidate);
    assert_eq!(ReleaseAs::default(), ReleaseAs::Secondary);

    // Released mid-copy: the copy is cancelled first.
    let mut copying = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    copying.reconcile(&[]);
    let op = copying.copy_op(CopyKind::Formation);
    let plan = plan_release(&copying.state, ReleaseAs::Secondary, VolumeRole::Normal);
    assert_eq!(plan.commands[0], Command::CancelCopy { op });
    assert_eq!(plan.secondary_role, VolumeRole::Normal);
}

/// Scenario 16 (JP Fig. 11): the status shows the secondary, the copy progress and the state.
#[test]
fn s16_status_reports_secondary_progress_and_state() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.reconcile(&["node-2"]);
    p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    let op = p.copy_op(CopyKind::Formation);
    p.on(Event::FormationCopyProgress { op, percent: 37 });
    p.on(Event::FormationCopyProgress { op, percent: 20 }); // late, out of order
    let status = p.state.status();
    assert_eq!(status.secondary_name.as_deref(), Some("vol-1"));
    assert_eq!(status.copy_progress_percent, Some(37));
    assert_eq!(status.phase, Some(MirrorPhase::Copying));
    assert_eq!(status.dirty_bytes, Some(0));
    assert_eq!(status.secondary_accessors.len(), 1);
    assert_eq!(status.message, None);

    p.on(Event::FormationCopyFailed {
        op,
        cause: "area-3 offline".into(),
    });
    let status = p.state.status();
    assert_eq!(status.phase, Some(MirrorPhase::Failed));
    assert!(status.message.unwrap().contains("area-3 offline"));
}

// ---------------------------------------------------------------------------------------------
// More behaviour
// ---------------------------------------------------------------------------------------------

#[test]
fn resync_set_is_the_union_with_its_bytes() {
    let s = resync_set(&treemap([1, 2, 3]), &treemap([3, 4, 9]), MIB);
    assert_eq!(s.extents, treemap([1, 2, 3, 4, 9]));
    assert_eq!(
        (s.primary_dirty, s.secondary_changed, s.both, s.len()),
        (3, 3, 1, 5)
    );
    assert_eq!(s.bytes, 5 * MIB);
    assert_eq!(
        s.ranges(),
        vec![ExtentRange::new(1, 4), ExtentRange::new(9, 1)]
    );
    assert!(extent_ranges(&RoaringTreemap::new()).is_empty());
}

#[test]
fn mount_decision_table() {
    use MountCheckPolicy::{Block, Warn};
    let reach = set(&["a", "b"]);
    let ans = |a: NodeAnswer, b: NodeAnswer| -> BTreeMap<String, NodeAnswer> {
        [("a".to_string(), a), ("b".to_string(), b)]
            .into_iter()
            .collect()
    };
    use NodeAnswer::*;
    let rows = [
        (Warn, false, NotInUse, NotInUse, MountDecision::Proceed, 0),
        (Block, false, NotInUse, NotInUse, MountDecision::Proceed, 0),
        (
            Warn,
            false,
            Mounted,
            NotInUse,
            MountDecision::ProceedWithWarning,
            1,
        ),
        (Block, false, Published, NotInUse, MountDecision::Wait, 1),
        (Block, false, Staged, NoAnswer, MountDecision::Wait, 2),
        (
            Block,
            true,
            Mounted,
            NotInUse,
            MountDecision::ProceedWithWarning,
            1,
        ),
        (
            Warn,
            true,
            NoAnswer,
            NoAnswer,
            MountDecision::ProceedWithWarning,
            2,
        ),
    ];
    for (policy, over, a, b, decision, named) in rows {
        let check = decide_mount_check(policy, over, &reach, &ans(a, b));
        assert_eq!(check.decision, decision, "{policy:?} {over} {a:?} {b:?}");
        assert_eq!(check.in_use.len(), named);
        assert_eq!(
            check.overridden,
            policy == Block && over && named > 0,
            "{policy:?} {over}"
        );
    }
    // Nobody can reach the secondary: proceed without asking.
    let none = decide_mount_check(Block, false, &BTreeSet::new(), &BTreeMap::new());
    assert_eq!(none.decision, MountDecision::Proceed);
    assert!(none.answers.is_empty());
    assert_eq!(NodeAnswer::NoAnswer.to_api(), MountAnswer::Unknown);
    assert_eq!(NodeAnswer::Staged.to_api(), MountAnswer::True);
}

/// D-13: the override lets a held resync go, with its own audit warning; the mount warning is not
/// repeated for the same nodes.
#[test]
fn override_releases_a_blocked_resync_with_an_audit_warning() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Block));
    p.form();
    p.split();
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    p.answer(&[("node-2", NodeAnswer::NoAnswer)]);
    assert!(p.state.is_blocked());
    assert!(
        p.state
            .status()
            .message
            .unwrap()
            .contains("waits until vol-1")
    );

    let out = p.on(Event::OverrideSet(true));
    assert_eq!(warnings(&out, REASON_MOUNT_CHECK_OVERRIDDEN).len(), 1);
    assert!(warnings(&out, REASON_SECONDARY_MOUNTED).is_empty());
    assert_eq!(condition(&out, CONDITION_SHIFT_BLOCKED), Some(false));
    assert_eq!(condition(&out, CONDITION_SECONDARY_MOUNTED), Some(true));
    assert!(out.iter().any(is_copy));
    assert_eq!(p.state.phase(), MirrorPhase::Resyncing);
    assert!(p.on(Event::OverrideSet(true)).is_empty());
}

#[test]
fn switching_block_to_warn_releases_the_held_resync() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Block));
    p.form();
    p.split();
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    p.answer(&[("node-2", NodeAnswer::Mounted)]);
    let out = p.on(Event::MountCheckPolicyChanged(MountCheckPolicy::Warn));
    assert!(out.iter().any(is_copy));
    assert!(warnings(&out, REASON_MOUNT_CHECK_OVERRIDDEN).is_empty());
}

/// A new node using the secondary while the resync is held → a new warning naming it.
#[test]
fn a_changed_set_of_in_use_nodes_warns_again() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Block));
    p.form();
    p.split();
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    p.answer(&[("node-2", NodeAnswer::Mounted)]);
    p.reconcile(&["node-2", "node-3"]);
    let out = p.answer(&[
        ("node-2", NodeAnswer::Mounted),
        ("node-3", NodeAnswer::Published),
    ]);
    let w = warnings(&out, REASON_SECONDARY_MOUNTED);
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("node-2 (mounted), node-3 (published)"));
}

/// An accessor set that changes while a round is unanswered restarts the round; answers to the
/// old round are ignored.
#[test]
fn a_changed_accessor_set_restarts_an_unanswered_round() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.reconcile(&["node-2"]);
    let old = p.state.mount_check_in_flight().unwrap();
    let out = p.reconcile(&["node-2", "node-4"]);
    let new = p.state.mount_check_in_flight().unwrap();
    assert_ne!(old, new);
    assert_eq!(
        out,
        vec![Command::StartMountCheck {
            op: new,
            nodes: vec!["node-2".into(), "node-4".into()]
        }]
    );
    let stale = p.on(Event::MountCheckResult {
        op: old,
        answers: BTreeMap::new(),
    });
    assert!(stale.is_empty());
    assert_eq!(p.state.phase(), MirrorPhase::Simplex);
    // All accessors gone: nothing to ask, the formation starts.
    let out = p.reconcile(&[]);
    assert!(out.iter().any(is_copy));
}

/// M-6: dirty bits reported during the resync (writes made while tracking) get another pass;
/// Paired only when a pass ends with nothing left.
#[test]
fn late_dirty_reports_get_another_pass() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.form();
    p.split();
    p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(1, 1)],
    });
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    let first = p.copy_op(CopyKind::Resync);
    p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(900, 200)], // clipped at the volume's end
    });
    assert_eq!(p.state.pending_extents().len(), 1 + 100);
    let out = p.on(Event::ResyncDone { op: first });
    let second = p.copy_op(CopyKind::Resync);
    assert_ne!(first, second);
    assert_eq!(
        out,
        vec![Command::StartCopy {
            op: second,
            kind: CopyKind::Resync,
            ranges: vec![ExtentRange::new(900, 100)]
        }]
    );
    assert_eq!(p.state.phase(), MirrorPhase::Resyncing);
    let out = p.on(Event::ResyncDone { op: second });
    assert!(out.contains(&Command::ClearDirty));
    assert_eq!(p.state.phase(), MirrorPhase::Paired);
}

/// M-8: a failed resync keeps its extents, tracks again, and Retry re-runs the mount check and
/// copies them.
#[test]
fn failed_resync_keeps_its_extents_and_retry_checks_again() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Block));
    p.form();
    p.split();
    p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(10, 5)],
    });
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    let op = p.copy_op(CopyKind::Resync);
    let out = p.on(Event::ResyncFailed {
        op,
        cause: "secondary area unreachable".into(),
    });
    assert!(out.contains(&Command::SetDataPath(DataPath::Track)));
    assert_eq!(p.state.phase(), MirrorPhase::Failed);
    assert_eq!(p.state.primary_dirty(), &treemap(10..15));
    p.on(Event::SecondaryWrite {
        extents: vec![ExtentRange::new(40, 1)],
    });

    let out = p.on(Event::Retry);
    assert!(matches!(out.as_slice(), [Command::StartMountCheck { .. }]));
    let out = p.answer(&[("node-2", NodeAnswer::Mounted)]);
    assert!(!out.iter().any(is_copy), "Block holds the retry too");
    p.reconcile(&["node-2"]);
    let out = p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    let op = p.copy_op(CopyKind::Resync);
    assert!(out.contains(&Command::StartCopy {
        op,
        kind: CopyKind::Resync,
        ranges: vec![ExtentRange::new(10, 5), ExtentRange::new(40, 1)]
    }));
    assert_eq!(p.state.phase(), MirrorPhase::Resyncing);
    assert!(p.state.failure().is_none());
}

/// A failed formation restarts from 0 with a new mount check (claim 2).
#[test]
fn failed_formation_retries_from_zero_with_a_new_mount_check() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.reconcile(&["node-2"]);
    p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    let op = p.copy_op(CopyKind::Formation);
    p.on(Event::FormationCopyProgress { op, percent: 70 });
    let out = p.on(Event::FormationCopyFailed {
        op,
        cause: "io error".into(),
    });
    assert!(out.contains(&Command::SetDataPath(DataPath::Unpaired)));
    let out = p.on(Event::Retry);
    assert_eq!(p.state.phase(), MirrorPhase::Simplex);
    assert_eq!(p.state.copy_progress_percent(), 0);
    assert!(matches!(out.as_slice(), [Command::StartMountCheck { .. }]));
    p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    assert_ne!(p.copy_op(CopyKind::Formation), op);
    assert!(!p.state.formation_complete());
}

/// M-12: back to Split before the held resync started → the shift is cancelled and its warning
/// state cleared; nothing was copied.
#[test]
fn desired_split_while_the_resync_is_held_cancels_it() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Block));
    p.form();
    p.split();
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    p.answer(&[("node-2", NodeAnswer::Mounted)]);
    let out = p.on(Event::DesiredStateChanged(MirrorState::Split));
    assert!(
        out.iter().any(
            |c| matches!(c, Command::Note { reason, .. } if *reason == REASON_RESYNC_CANCELLED)
        )
    );
    assert_eq!(condition(&out, CONDITION_SECONDARY_MOUNTED), Some(false));
    assert_eq!(condition(&out, CONDITION_SHIFT_BLOCKED), Some(false));
    assert!(p.state.awaiting_mount_check().is_none());
    assert_eq!(p.state.phase(), MirrorPhase::Split);
    assert!(p.reconcile(&["node-2"]).is_empty(), "no re-check any more");
}

/// M-11: a failed cut keeps the pair Paired and is retried at the next reconcile, not at once.
#[test]
fn failed_split_cut_is_retried_at_the_next_reconcile() {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.form();
    p.on(Event::DesiredStateChanged(MirrorState::Split));
    let op = p.state.cut_in_flight().unwrap();
    let out = p.on(Event::SplitCutFailed {
        op,
        cause: "node-2 quiesce timeout".into(),
    });
    assert_eq!(warnings(&out, REASON_SPLIT_FAILED).len(), 1);
    assert_eq!(p.state.phase(), MirrorPhase::Paired);
    assert!(p.state.cut_in_flight().is_none());
    let out = p.reconcile(&["node-2"]);
    let retry = p.state.cut_in_flight().unwrap();
    assert_ne!(retry, op);
    assert_eq!(out, vec![Command::QuiesceAndCut { op: retry }]);
}

/// A pair created with desiredState Split is formed first, then split (M-1).
#[test]
fn pair_created_split_is_formed_then_cut() {
    let mut p = Pair::new(PairSetup {
        desired: MirrorState::Split,
        ..setup("vol-1", MountCheckPolicy::Warn)
    });
    let out = p.reconcile(&[]);
    assert_eq!(warnings(&out, REASON_SPLIT_REJECTED).len(), 1);
    let op = p.copy_op(CopyKind::Formation);
    let out = p.on(Event::FormationCopyDone { op });
    assert!(matches!(out.last(), Some(Command::QuiesceAndCut { .. })));
}

/// The selection does not depend on the input order; ties go to the name.
#[test]
fn selection_is_order_independent_and_ties_break_by_name() {
    let vol0 = volume("vol-0", VOL0, VolumeRole::Normal, PairMembership::Unpaired);
    let mut cands: Vec<VolumeView> = ["vol-9", "vol-4", "vol-7"]
        .iter()
        .map(|n| {
            volume(
                n,
                1200,
                VolumeRole::SecondaryCandidate,
                PairMembership::Unpaired,
            )
        })
        .collect();
    cands.push(VolumeView {
        pool: "pool-b".into(),
        ..volume(
            "vol-1",
            VOL0,
            VolumeRole::SecondaryCandidate,
            PairMembership::Unpaired,
        )
    });
    for sel in [
        SecondarySelection::SameOrLarger,
        SecondarySelection::ResizeToMatch,
    ] {
        let a = select_secondary(&vol0, sel, &cands, 0).unwrap();
        cands.reverse();
        let b = select_secondary(&vol0, sel, &cands, 0).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.secondary, "vol-4", "vol-1 is in another pool");
    }
    let err = select_secondary(&vol0, SecondarySelection::SameSize, &cands, 0).unwrap_err();
    assert!(err.to_string().contains("vol-1: in pool pool-b"));

    let as_secondary = VolumeView {
        pair: PairMembership::Secondary,
        ..vol0.clone()
    };
    assert!(matches!(
        select_secondary(&as_secondary, SecondarySelection::SameOrLarger, &cands, 0),
        Err(SelectionError::PrimaryIsSecondary { .. })
    ));
    let small = volume("vol-5", 10, VolumeRole::Normal, PairMembership::Unpaired);
    assert!(matches!(
        check_named_secondary(&vol0, &small),
        Err(SelectionError::NamedSecondaryUnsuitable {
            rejection: Rejection::TooSmall { size: 10 },
            ..
        })
    ));
    assert!(check_named_secondary(&vol0, &vol0).is_err());
}

// ---------------------------------------------------------------------------------------------
// Every phase × every event
// ---------------------------------------------------------------------------------------------

const PHASES: [&str; 6] = [
    "Simplex",
    "Copying",
    "Paired",
    "Split",
    "Resyncing",
    "Failed",
];

/// Fixtures: Warn policy, node-2 reaches the secondary and does not use it. Split has extents
/// 5–7 dirty; Resyncing copies them; Failed is a failed resync.
fn fixture(phase: &str) -> MirrorPairState {
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Warn));
    p.reconcile(&["node-2"]);
    if phase == "Simplex" {
        return p.state;
    }
    p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    if phase == "Copying" {
        return p.state;
    }
    let op = p.copy_op(CopyKind::Formation);
    p.on(Event::FormationCopyDone { op });
    if phase == "Paired" {
        return p.state;
    }
    p.split();
    p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(5, 3)],
    });
    if phase == "Split" {
        return p.state;
    }
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    p.answer(&[("node-2", NodeAnswer::NotInUse)]);
    if phase == "Resyncing" {
        return p.state;
    }
    let op = p.copy_op(CopyKind::Resync);
    p.on(Event::ResyncFailed {
        op,
        cause: "boom".into(),
    });
    assert_eq!(phase, "Failed");
    p.state
}

const EVENTS: [&str; 19] = [
    "Reconcile(same)",
    "Reconcile(new)",
    "Desired(Split)",
    "Desired(Paired)",
    "Policy(Block)",
    "Override(true)",
    "Answer(not)",
    "Answer(mounted)",
    "FormProgress",
    "FormDone",
    "FormFailed",
    "CutDone",
    "CutFailed",
    "ResyncProgress",
    "ResyncDone",
    "ResyncFailed",
    "PrimaryWrite",
    "SecondaryWrite",
    "Retry",
];

/// The event, aimed at the state's outstanding operation (or its last one).
fn event(name: &str, s: &MirrorPairState) -> Event {
    let op = s.outstanding_op().unwrap_or(s.last_op());
    let answers = |a: NodeAnswer| [("node-2".to_string(), a)].into_iter().collect();
    match name {
        "Reconcile(same)" => Event::Reconcile {
            accessors: set(&["node-2"]),
        },
        "Reconcile(new)" => Event::Reconcile {
            accessors: set(&["node-2", "node-3"]),
        },
        "Desired(Split)" => Event::DesiredStateChanged(MirrorState::Split),
        "Desired(Paired)" => Event::DesiredStateChanged(MirrorState::Paired),
        "Policy(Block)" => Event::MountCheckPolicyChanged(MountCheckPolicy::Block),
        "Override(true)" => Event::OverrideSet(true),
        "Answer(not)" => Event::MountCheckResult {
            op,
            answers: answers(NodeAnswer::NotInUse),
        },
        "Answer(mounted)" => Event::MountCheckResult {
            op,
            answers: answers(NodeAnswer::Mounted),
        },
        "FormProgress" => Event::FormationCopyProgress { op, percent: 50 },
        "FormDone" => Event::FormationCopyDone { op },
        "FormFailed" => Event::FormationCopyFailed {
            op,
            cause: "x".into(),
        },
        "CutDone" => Event::SplitCutDone { op },
        "CutFailed" => Event::SplitCutFailed {
            op,
            cause: "x".into(),
        },
        "ResyncProgress" => Event::ResyncProgress { op, percent: 50 },
        "ResyncDone" => Event::ResyncDone { op },
        "ResyncFailed" => Event::ResyncFailed {
            op,
            cause: "x".into(),
        },
        "PrimaryWrite" => Event::PrimaryWrite {
            extents: vec![ExtentRange::new(10, 2)],
        },
        "SecondaryWrite" => Event::SecondaryWrite {
            extents: vec![ExtentRange::new(20, 1)],
        },
        "Retry" => Event::Retry,
        other => panic!("unknown event {other}"),
    }
}

fn tag(c: &Command) -> String {
    match c {
        Command::StartMountCheck { nodes, .. } => format!("StartMountCheck[{}]", nodes.join(",")),
        Command::SetDataPath(p) => format!("SetDataPath({p:?})"),
        Command::StartCopy { kind, .. } => format!("StartCopy({kind:?})"),
        Command::CancelCopy { .. } => "CancelCopy".into(),
        Command::QuiesceAndCut { .. } => "QuiesceAndCut".into(),
        Command::ClearDirty => "ClearDirty".into(),
        Command::Warn { reason, .. } => format!("Warn({reason})"),
        Command::Note { reason, .. } => format!("Note({reason})"),
        Command::SetCondition { kind, status, .. } => format!("SetCondition({kind}={status})"),
    }
}

use MirrorPhase::{Copying, Failed, Paired, Resyncing, Simplex, Split};

/// (fixture, event, resulting phase, commands). Rows absent from a phase's list are no-ops
/// (same phase, no commands); the test checks those too.
const TABLE: &[(&str, &str, MirrorPhase, &[&str])] = &[
    // Simplex: the formation's inquiry to node-2 is outstanding.
    (
        "Simplex",
        "Reconcile(new)",
        Simplex,
        &["StartMountCheck[node-2,node-3]"],
    ),
    (
        "Simplex",
        "Desired(Split)",
        Simplex,
        &["Warn(SplitRejected)"],
    ),
    (
        "Simplex",
        "Answer(not)",
        Copying,
        &[
            "SetCondition(SecondaryMounted=false)",
            "SetDataPath(Mirror)",
            "Note(FormationCopyStarted)",
            "StartCopy(Formation)",
        ],
    ),
    (
        "Simplex",
        "Answer(mounted)",
        Copying,
        &[
            "Warn(SecondaryVolumeMounted)",
            "SetCondition(SecondaryMounted=true)",
            "SetDataPath(Mirror)",
            "Note(FormationCopyStarted)",
            "StartCopy(Formation)",
        ],
    ),
    // Copying: the formation copy runs.
    (
        "Copying",
        "Desired(Split)",
        Copying,
        &["Warn(SplitRejected)"],
    ),
    ("Copying", "FormProgress", Copying, &[]),
    (
        "Copying",
        "FormDone",
        Paired,
        &["Note(PairFormed)", "SetCondition(Synchronized=true)"],
    ),
    (
        "Copying",
        "FormFailed",
        Failed,
        &[
            "SetDataPath(Unpaired)",
            "Warn(FormationCopyFailed)",
            "SetCondition(Synchronized=false)",
        ],
    ),
    // Paired.
    ("Paired", "Desired(Split)", Paired, &["QuiesceAndCut"]),
    // Split: extents 5–7 dirty.
    (
        "Split",
        "Desired(Paired)",
        Split,
        &["StartMountCheck[node-2]"],
    ),
    // Resyncing: extents 5–7 being copied.
    (
        "Resyncing",
        "Desired(Split)",
        Resyncing,
        &["Warn(SplitRejected)"],
    ),
    (
        "Resyncing",
        "ResyncDone",
        Paired,
        &[
            "ClearDirty",
            "Note(PairResynced)",
            "SetCondition(Synchronized=true)",
        ],
    ),
    (
        "Resyncing",
        "ResyncFailed",
        Failed,
        &[
            "SetDataPath(Track)",
            "Warn(ResyncFailed)",
            "SetCondition(Synchronized=false)",
        ],
    ),
    // Failed (a resync failed).
    ("Failed", "Desired(Split)", Failed, &["Warn(SplitRejected)"]),
    ("Failed", "Retry", Failed, &["StartMountCheck[node-2]"]),
];

#[test]
fn every_phase_times_every_event() {
    let mut checked = 0;
    for phase in PHASES {
        let before = fixture(phase);
        assert_eq!(format!("{:?}", before.phase()), phase);
        for name in EVENTS {
            let (after, commands) = step(before.clone(), event(name, &before));
            let tags: Vec<String> = commands.iter().map(tag).collect();
            let (want_phase, want): (MirrorPhase, Vec<String>) = TABLE
                .iter()
                .find(|(p, e, _, _)| *p == phase && *e == name)
                .map(|(_, _, ph, c)| (*ph, c.iter().map(|s| s.to_string()).collect()))
                .unwrap_or((before.phase(), Vec::new()));
            assert_eq!(
                (after.phase(), &tags),
                (want_phase, &want),
                "{phase} × {name}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, PHASES.len() * EVENTS.len());
}

/// Extra effects of the rows the table shows as silent.
#[test]
fn silent_rows_update_what_they_should() {
    let copying = fixture("Copying");
    let (s, _) = step(copying.clone(), event("FormProgress", &copying));
    assert_eq!(s.copy_progress_percent(), 50);
    let split = fixture("Split");
    let (s, _) = step(split.clone(), event("PrimaryWrite", &split));
    assert_eq!(s.primary_dirty(), &treemap([5, 6, 7, 10, 11]));
    let (s, _) = step(split.clone(), event("SecondaryWrite", &split));
    assert_eq!(s.secondary_changed(), &treemap([20]));
    let resyncing = fixture("Resyncing");
    assert_eq!(resyncing.pending_extents(), treemap([5, 6, 7]));
    let (s, _) = step(resyncing.clone(), event("PrimaryWrite", &resyncing));
    assert_eq!(s.pending_extents(), treemap([5, 6, 7, 10, 11]));
    let failed = fixture("Failed");
    assert_eq!(failed.primary_dirty(), &treemap([5, 6, 7]));
    let (s, _) = step(failed.clone(), event("SecondaryWrite", &failed));
    assert_eq!(s.secondary_changed(), &treemap([20]));
    // Writes outside tracking are mirrored: nothing recorded.
    for phase in ["Simplex", "Copying", "Paired"] {
        let st = fixture(phase);
        let (s, _) = step(st.clone(), event("PrimaryWrite", &st));
        assert!(s.pending_extents().is_empty(), "{phase}");
    }
}

/// A repeated event changes nothing: same state, no commands.
#[test]
fn every_event_is_idempotent() {
    for phase in PHASES {
        let before = fixture(phase);
        for name in EVENTS {
            let e = event(name, &before);
            let (once, _) = step(before.clone(), e.clone());
            let (twice, again) = step(once.clone(), e);
            assert!(again.is_empty(), "{phase} × {name} twice: {again:?}");
            assert_eq!(once, twice, "{phase} × {name}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property: random event sequences against a model of what the secondary lacks
// ---------------------------------------------------------------------------------------------

const EXTENTS: u64 = 64;
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

#[derive(Debug, Clone)]
enum Act {
    Reconcile(u8),
    Desired(bool),
    Block(bool),
    Override(bool),
    /// One code per node: 0 mounted, 1 published, 2 staged, 3–5 not in use, 6 no answer. `stranger`
    /// adds an answer from a node that cannot reach the secondary.
    Answer {
        codes: [u8; 3],
        stranger: bool,
        stale: bool,
    },
    FormProgress(u8),
    FormDone(bool),
    FormFail(bool),
    CutDone(bool),
    CutFail(bool),
    ResyncProgress(u8),
    ResyncDone(bool),
    ResyncFail(bool),
    PrimaryWrite(u64, u64),
    SecondaryWrite(u64, u64),
    Retry,
}

fn act() -> impl Strategy<Value = Act> {
    let stale = prop::bool::weighted(0.2);
    prop_oneof![
        2 => (0u8..8).prop_map(Act::Reconcile),
        2 => any::<bool>().prop_map(Act::Desired),
        1 => any::<bool>().prop_map(Act::Block),
        1 => any::<bool>().prop_map(Act::Override),
        4 => (prop::array::uniform3(0u8..7), prop::bool::weighted(0.2), stale)
            .prop_map(|(codes, stranger, stale)| Act::Answer { codes, stranger, stale }),
        1 => (0u8..=100).prop_map(Act::FormProgress),
        3 => stale.prop_map(Act::FormDone),
        1 => stale.prop_map(Act::FormFail),
        3 => stale.prop_map(Act::CutDone),
        1 => stale.prop_map(Act::CutFail),
        1 => (0u8..=100).prop_map(Act::ResyncProgress),
        3 => stale.prop_map(Act::ResyncDone),
        1 => stale.prop_map(Act::ResyncFail),
        4 => (0u64..EXTENTS + 4, 1u64..6).prop_map(|(s, l)| Act::PrimaryWrite(s, l)),
        2 => (0u64..EXTENTS + 4, 1u64..6).prop_map(|(s, l)| Act::SecondaryWrite(s, l)),
        1 => Just(Act::Retry),
    ]
}

fn answer_of(code: u8) -> Option<NodeAnswer> {
    match code {
        0 => Some(NodeAnswer::Mounted),
        1 => Some(NodeAnswer::Published),
        2 => Some(NodeAnswer::Staged),
        3..=5 => Some(NodeAnswer::NotInUse),
        _ => None,
    }
}

struct Check {
    op: u64,
    asked: BTreeSet<String>,
    in_use: Option<bool>,
    /// Issued since the last copy started.
    fresh: bool,
}

/// What the real world knows, built only from the events the test sends and the commands the
/// planner issues.
struct Model {
    accessors: BTreeSet<String>,
    block: bool,
    override_set: bool,
    check: Option<Check>,
    warned: bool,
    copy: Option<(u64, CopyKind, BTreeSet<u64>)>,
    cut: Option<u64>,
    path: DataPath,
    /// Nodes switched from Track to Mirror and may still report tracked writes (until a resync
    /// pass completes, ResyncDone's contract).
    late_window: bool,
    formed: bool,
    /// Extents where the secondary may differ from the primary because of tracked writes.
    written: BTreeSet<u64>,
    last_op: u64,
}

impl Model {
    fn new() -> Self {
        Model {
            accessors: BTreeSet::new(),
            block: false,
            override_set: false,
            check: None,
            warned: false,
            copy: None,
            cut: None,
            path: DataPath::Unpaired,
            late_window: false,
            formed: false,
            written: BTreeSet::new(),
            last_op: 0,
        }
    }

    fn op(&self, current: Option<u64>, stale: bool) -> u64 {
        let op = current.unwrap_or(self.last_op);
        if stale { op.saturating_sub(1) } else { op }
    }

    fn write(&mut self, start: u64, len: u64) {
        if self.path == DataPath::Track || self.late_window {
            self.written
                .extend((start..(start + len).min(EXTENTS)).filter(|e| *e < EXTENTS));
        }
    }

    /// Turns an act into an event, updating what the world knows. Returns the event and whether
    /// it completes a resync pass (a copy that follows in the same step continues the resync).
    fn event(&mut self, a: &Act) -> (Event, bool) {
        let copy_op =
            |m: &Model, kind: CopyKind| m.copy.as_ref().filter(|c| c.1 == kind).map(|c| c.0);
        match a {
            Act::Reconcile(mask) => {
                self.accessors = NODES
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, n)| n.to_string())
                    .collect();
                (
                    Event::Reconcile {
                        accessors: self.accessors.clone(),
                    },
                    false,
                )
            }
            Act::Desired(paired) => (
                Event::DesiredStateChanged(if *paired {
                    MirrorState::Paired
                } else {
                    MirrorState::Split
                }),
                false,
            ),
            Act::Block(b) => {
                self.block = *b;
                (
                    Event::MountCheckPolicyChanged(if *b {
                        MountCheckPolicy::Block
                    } else {
                        MountCheckPolicy::Warn
                    }),
                    false,
                )
            }
            Act::Override(o) => {
                self.override_set = *o;
                (Event::OverrideSet(*o), false)
            }
            Act::Answer {
                codes,
                stranger,
                stale,
            } => {
                let mut answers: BTreeMap<String, NodeAnswer> = BTreeMap::new();
                for (node, code) in NODES.iter().zip(codes) {
                    if let Some(a) = answer_of(*code) {
                        answers.insert(node.to_string(), a);
                    }
                }
                if *stranger {
                    answers.insert("node-9".into(), NodeAnswer::Mounted);
                }
                let current = self
                    .check
                    .as_ref()
                    .filter(|c| c.in_use.is_none())
                    .map(|c| c.op);
                let op = self.op(current, *stale);
                if let Some(check) = self
                    .check
                    .as_mut()
                    .filter(|c| c.op == op && c.in_use.is_none())
                {
                    check.in_use = Some(
                        check
                            .asked
                            .iter()
                            .any(|n| answers.get(n).is_none_or(|a| a.possibly_in_use())),
                    );
                }
                (Event::MountCheckResult { op, answers }, false)
            }
            Act::FormProgress(p) => (
                Event::FormationCopyProgress {
                    op: self.op(copy_op(self, CopyKind::Formation), false),
                    percent: *p,
                },
                false,
            ),
            Act::FormDone(stale) | Act::FormFail(stale) => {
                let current = copy_op(self, CopyKind::Formation);
                let op = self.op(current, *stale);
                let ok = matches!(a, Act::FormDone(_));
                if current == Some(op) {
                    self.copy = None;
                    if ok {
                        self.formed = true;
                        self.written.clear();
                    }
                }
                let e = if ok {
                    Event::FormationCopyDone { op }
                } else {
                    Event::FormationCopyFailed {
                        op,
                        cause: "x".into(),
                    }
                };
                (e, false)
            }
            Act::CutDone(stale) | Act::CutFail(stale) => {
                let op = self.op(self.cut, *stale);
                let ok = matches!(a, Act::CutDone(_));
                if self.cut == Some(op) {
                    self.cut = None;
                    if ok {
                        self.path = DataPath::Track;
                    }
                }
                let e = if ok {
                    Event::SplitCutDone { op }
                } else {
                    Event::SplitCutFailed {
                        op,
                        cause: "x".into(),
                    }
                };
                (e, false)
            }
            Act::ResyncProgress(p) => (
                Event::ResyncProgress {
                    op: self.op(copy_op(self, CopyKind::Resync), false),
                    percent: *p,
                },
                false,
            ),
            Act::ResyncDone(stale) | Act::ResyncFail(stale) => {
                let current = copy_op(self, CopyKind::Resync);
                let op = self.op(current, *stale);
                let ok = matches!(a, Act::ResyncDone(_));
                let mut completes = false;
                if current == Some(op) {
                    let (_, _, covered) = self.copy.take().expect("current copy");
                    if ok {
                        for e in covered {
                            self.written.remove(&e);
                        }
                        self.late_window = false;
                        completes = true;
                    }
                }
                let e = if ok {
                    Event::ResyncDone { op }
                } else {
                    Event::ResyncFailed {
                        op,
                        cause: "x".into(),
                    }
                };
                (e, completes)
            }
            Act::PrimaryWrite(s, l) => {
                self.write(*s, *l);
                (
                    Event::PrimaryWrite {
                        extents: vec![ExtentRange::new(*s, *l)],
                    },
                    false,
                )
            }
            Act::SecondaryWrite(s, l) => {
                self.write(*s, *l);
                (
                    Event::SecondaryWrite {
                        extents: vec![ExtentRange::new(*s, *l)],
                    },
                    false,
                )
            }
            Act::Retry => (Event::Retry, false),
        }
    }

    /// Follows the planner's commands, checking the mount-safety rules on every copy start.
    fn observe(&mut self, commands: &[Command], continues_resync: bool) -> Result<(), String> {
        for c in commands {
            match c {
                Command::StartMountCheck { op, nodes } => {
                    let asked: BTreeSet<String> = nodes.iter().cloned().collect();
                    if asked != self.accessors {
                        return Err(format!("asked {asked:?}, reachable {:?}", self.accessors));
                    }
                    self.last_op = self.last_op.max(*op);
                    self.check = Some(Check {
                        op: *op,
                        asked,
                        in_use: None,
                        fresh: true,
                    });
                }
                Command::Warn { reason, .. } if *reason == REASON_SECONDARY_MOUNTED => {
                    self.warned = true
                }
                Command::Note { reason, .. } if *reason == REASON_RESYNC_CANCELLED => {
                    self.warned = false
                }
                Command::SetDataPath(p) => {
                    if self.path == DataPath::Track && *p == DataPath::Mirror {
                        self.late_window = true;
                    }
                    self.path = *p;
                }
                Command::QuiesceAndCut { op } => {
                    self.last_op = self.last_op.max(*op);
                    self.cut = Some(*op);
                }
                Command::StartCopy { op, kind, ranges } => {
                    self.last_op = self.last_op.max(*op);
                    let continuation = continues_resync && *kind == CopyKind::Resync;
                    if !continuation && !self.accessors.is_empty() {
                        let Some(check) = self.check.as_mut().filter(|c| c.fresh) else {
                            return Err("copy started without a fresh mount check".into());
                        };
                        if check.asked != self.accessors {
                            return Err("copy started on a stale set of accessors".into());
                        }
                        let Some(in_use) = check.in_use else {
                            return Err("copy started before the answers".into());
                        };
                        if in_use && !self.warned {
                            return Err("copy over an in-use secondary without a warning".into());
                        }
                        if in_use && self.block && !self.override_set {
                            return Err("Block let a copy start over an in-use secondary".into());
                        }
                        check.fresh = false;
                    }
                    if !continuation {
                        self.warned = false;
                    }
                    let extents: BTreeSet<u64> =
                        ranges.iter().flat_map(|r| r.start..r.end()).collect();
                    match kind {
                        CopyKind::Formation => {
                            if extents != (0..EXTENTS).collect() {
                                return Err("a formation copy must copy every extent".into());
                            }
                            self.formed = false;
                            self.copy = Some((*op, *kind, BTreeSet::new()));
                        }
                        CopyKind::Resync => {
                            let covered = self.written.intersection(&extents).copied().collect();
                            self.copy = Some((*op, *kind, covered));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random sequences of spec changes, answers, copy and cut results (current, stale and
    /// repeated), and dirty reports: (1) before a resync completes, no extent written while
    /// tracking is missing from the pair's pending set; (2) Paired only after a completed
    /// formation copy and with nothing pending; (3) no copy starts over an in-use secondary
    /// without a warning, and never under Block without the override; (4) the inquiry asks
    /// exactly the reachable nodes; (5) the data path is what the commands said.
    #[test]
    fn random_sequences_never_lose_dirty_extents_nor_pair_without_a_copy(
        acts in proptest::collection::vec(act(), 1..80),
    ) {
        let mut state = MirrorPairState::new(PairSetup {
            primary: "vol-0".into(),
            secondary: "vol-1".into(),
            extents: EXTENTS,
            extent_size_bytes: MIB,
            desired: MirrorState::Paired,
            mount_check: MountCheckPolicy::Warn,
            override_mount_check: false,
        });
        let mut model = Model::new();
        for (i, a) in acts.iter().enumerate() {
            let (e, completes) = model.event(a);
            let (next, commands) = step(state, e);
            state = next;
            if let Err(why) = model.observe(&commands, completes) {
                prop_assert!(false, "step {i} {a:?}: {why}; commands {commands:?}");
            }
            let pending: BTreeSet<u64> = state.pending_extents().iter().collect();
            if state.phase() == MirrorPhase::Paired {
                prop_assert!(state.formation_complete(), "step {i}: Paired without a formation copy");
                prop_assert!(model.formed, "step {i}: Paired but the copier never finished");
                prop_assert!(model.written.is_empty(), "step {i}: Paired while {:?} are not on the secondary", model.written);
            } else {
                prop_assert!(
                    model.written.is_subset(&pending),
                    "step {i} {a:?}: lost {:?}", model.written.difference(&pending).collect::<Vec<_>>()
                );
            }
            prop_assert_eq!(state.data_path(), model.path, "step {}", i);
            prop_assert_eq!(state.dirty_bytes(), pending.len() as u64 * MIB);
        }
    }
}

/// The controller persists the planner state as JSON (docs/mirror.md M-20) and a restarted
/// leader continues from it: at every point of a pair's life (inquiry held, copy in flight, cut
/// in flight, split with dirty and changed extents, resync in flight) the state read back equals
/// the state written and answers the next events with the same commands.
#[test]
fn the_persisted_state_round_trips_and_continues_identically() {
    fn round_trip(state: &MirrorPairState) -> MirrorPairState {
        let text = serde_json::to_string(state).expect("serialize");
        let back: MirrorPairState = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(&back, state, "{text}");
        back
    }
    fn same_next(state: &MirrorPairState, event: Event) {
        let restored = round_trip(state);
        assert_eq!(step(state.clone(), event.clone()), step(restored, event));
    }
    let mut p = Pair::new(setup("vol-1", MountCheckPolicy::Block));
    p.reconcile(&["node-2"]);
    // An inquiry round in flight.
    same_next(
        &p.state,
        Event::MountCheckResult {
            op: p.state.mount_check_in_flight().unwrap(),
            answers: BTreeMap::from([("node-2".to_string(), NodeAnswer::Mounted)]),
        },
    );
    // Held by Block, with a warning given.
    p.answer(&[("node-2", NodeAnswer::Mounted)]);
    assert!(p.state.is_blocked());
    same_next(&p.state, Event::OverrideSet(true));
    p.on(Event::OverrideSet(true));
    // The formation copy in flight.
    let op = p.copy_op(CopyKind::Formation);
    same_next(&p.state, Event::FormationCopyDone { op });
    p.on(Event::FormationCopyDone { op });
    // The cut in flight.
    p.on(Event::DesiredStateChanged(MirrorState::Split));
    let cut = p.state.cut_in_flight().unwrap();
    same_next(&p.state, Event::SplitCutDone { op: cut });
    p.on(Event::SplitCutDone { op: cut });
    // Split with dirty and changed extents.
    p.on(Event::PrimaryWrite {
        extents: vec![ExtentRange::new(3, 4)],
    });
    p.on(Event::SecondaryWrite {
        extents: vec![ExtentRange::new(900, 2)],
    });
    assert_eq!(p.state.pending_extents().len(), 6);
    same_next(&p.state, Event::DesiredStateChanged(MirrorState::Paired));
    // The resync in flight.
    p.on(Event::DesiredStateChanged(MirrorState::Paired));
    p.reconcile(&[]);
    if let Some(op) = p.state.mount_check_in_flight() {
        p.on(Event::MountCheckResult {
            op,
            answers: BTreeMap::new(),
        });
    }
    let op = p.copy_op(CopyKind::Resync);
    assert_eq!(p.state.copy_pass_extents().map(|e| e.len()), Some(6));
    same_next(&p.state, Event::ResyncDone { op });
}
