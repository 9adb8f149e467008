//! Online migration (seed 004 fourth embodiment): copy progress table 224, copy program 214 and
//! copy priority, against Fig. 26 and the scenarios AS-20 … AS-24 of §11.7.

use tessera_operator::planners::migration::{CopyAction, CopyState, Migration, Route};

/// Seed 004 Fig. 26 ([0115]–[0119]; digest §4.10 and AS-21), regions 1001–1005 as extents 0–4:
/// (A) 224a during the copy: [4, 1, 1, 1, 0] with the COPY I/O of 13212 → 13222 outstanding;
/// a host write to region 1004 is held → copy priority → suspend: (B) 224b [4, 2, 2, 2, 0];
/// the outstanding COPY I/O completes: [4, 4, 0, 0, 0]; the restart with the address of 13214
/// gives (C) 224c [4, 4, 0, 1, 0], and 13214 → 13224 is copied first.
#[test]
fn fig26_write_triggered_copy_priority() {
    let mut m = Migration::new(5);
    // Cycle 1 copied region 1001 (COPY start, 902: table cleared first).
    assert_eq!(m.copy_range(0..1), vec![CopyAction::CopyExtent(0)]);
    assert_eq!(m.copy_done(0, Ok(())), vec![CopyAction::ChunkDone]);
    assert_eq!(m.values(), vec![4, 0, 0, 0, 0]);
    // Cycle 2 holds regions 1002–1004 and copies them (COPY restart, 6313 → 906 → 903).
    assert_eq!(m.copy_range(1..4), vec![CopyAction::CopyExtent(1)]);
    assert_eq!(m.values(), vec![4, 1, 1, 1, 0], "224a");
    assert_eq!(
        m.routes_during_copy(),
        vec![
            Route::DestinationWriteBoth,
            Route::Held,
            Route::Held,
            Route::Held,
            Route::Source
        ],
        "Fig. 26 (A) arrows: 1001 read from the destination and written twice, 1002–1004 held"
    );
    // Fig. 26 (B): a write held on region 1004 → 806 copy priority request → 6317 suspend.
    assert_eq!(
        m.held_request(3, true, false),
        vec![CopyAction::RequestSuspend]
    );
    m.suspend();
    assert_eq!(m.values(), vec![4, 2, 2, 2, 0], "224b");
    // [0119]: the COPY I/O to 13222 completes → 2242b 2 → 4, the others 2 → 0; then 6313 with
    // the address of 13214 → 2244b = 1 (Fig. 26 C) and its copy goes first.
    let next = m.copy_done(1, Ok(()));
    assert_eq!(m.values(), vec![4, 4, 0, 1, 0], "224c");
    assert_eq!(next, vec![CopyAction::CopyExtent(3)]);
    assert_eq!(m.copy_done(3, Ok(())), vec![CopyAction::ChunkDone]);
    assert_eq!(m.values(), vec![4, 4, 0, 4, 0]);
    // 633: the cycle's mapping. The held write to 1004 is re-dispatched after this commit and
    // lands on both areas.
    assert_eq!(
        m.routes_after_cycle(),
        vec![
            Route::DestinationWriteBoth,
            Route::DestinationWriteBoth,
            Route::Source,
            Route::DestinationWriteBoth,
            Route::Source
        ]
    );
    assert_eq!(m.next_chunk(8), Some(2..3));
}

/// AS-20: chunked cycles until every extent is copied; the final mapping is the destination.
#[test]
fn as20_chunked_migration_normal_path() {
    let mut m = Migration::new(5);
    let mut cycles = 0;
    while let Some(chunk) = m.next_chunk(2) {
        cycles += 1;
        let mut actions = m.copy_range(chunk.clone());
        loop {
            match actions.as_slice() {
                [CopyAction::CopyExtent(e)] => {
                    assert!(chunk.contains(e));
                    assert_eq!(m.routes_during_copy()[*e as usize], Route::Held);
                    actions = m.copy_done(*e, Ok(()));
                }
                [CopyAction::ChunkDone] => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(m.final_routes().is_none() || m.is_complete());
    }
    assert_eq!(cycles, 3);
    assert!(m.is_complete());
    assert_eq!(m.final_routes(), Some(vec![Route::Destination; 5]));
}

/// AS-22: the hold times out during the copy → suspend → the finished extent commits (4), the
/// unfinished ones go back to 0 and come in a later cycle.
#[test]
fn as22_copy_timeout_suspends_and_commits_partial_progress() {
    let mut m = Migration::new(4);
    assert_eq!(m.copy_range(0..4), vec![CopyAction::CopyExtent(0)]);
    assert_eq!(m.hold_timeout(), vec![CopyAction::RequestSuspend]);
    m.suspend();
    assert_eq!(m.values(), vec![2, 2, 2, 2]);
    assert!(m.hold_timeout().is_empty(), "suspended once");
    assert_eq!(m.copy_done(0, Ok(())), vec![CopyAction::ChunkDone]);
    assert_eq!(m.values(), vec![4, 0, 0, 0]);
    assert_eq!(m.next_chunk(4), Some(1..4));
}

/// AS-23: a COPY I/O fails → entries 1 and 2 back to 0, the chunk fails; the restore mapping
/// puts every extent back on the source.
#[test]
fn as23_copy_failure_resets_and_restores() {
    let mut m = Migration::new(3);
    m.copy_range(0..1);
    m.copy_done(0, Ok(()));
    assert_eq!(m.copy_range(1..3), vec![CopyAction::CopyExtent(1)]);
    let failed = m.copy_done(1, Err("destination write failed".into()));
    assert_eq!(
        failed,
        vec![CopyAction::ChunkFailed {
            extent: 1,
            cause: "destination write failed".into()
        }]
    );
    assert_eq!(
        m.states(),
        &[
            CopyState::Copied,
            CopyState::NotCopied,
            CopyState::NotCopied
        ]
    );
    assert_eq!(m.restore_routes(), vec![Route::Source; 3]);
}

/// AS-24: with the [0108] variant a held read suspends the copy; without it a read waits.
#[test]
fn as24_read_triggered_suspend_variant() {
    let mut m = Migration::new(3);
    m.copy_range(0..3);
    assert!(m.held_request(2, false, false).is_empty());
    assert_eq!(
        m.held_request(2, false, true),
        vec![CopyAction::RequestSuspend]
    );
    // A request on the extent whose copy is outstanding needs nothing: it completes first.
    assert!(m.held_request(0, true, true).is_empty());
    // A request outside the copying chunk is not held at all.
    let mut m = Migration::new(3);
    m.copy_range(0..1);
    assert!(m.held_request(2, true, false).is_empty());
}

/// Only the first copy invocation clears the table (902); a late completion of an extent that is
/// not outstanding is ignored.
#[test]
fn start_clears_once_and_stray_completions_are_ignored() {
    let mut m = Migration::new(3);
    m.copy_range(0..1);
    m.copy_done(0, Ok(()));
    m.copy_range(1..2);
    assert_eq!(m.values(), vec![4, 1, 0]);
    assert!(m.copy_done(2, Ok(())).is_empty());
    assert_eq!(m.in_flight(), Some(1));
}
