//! Unit tests of the engine: every error, every replica behaviour, generations, usage and dirty
//! tracking through the public `Volume` API, on temp-file areas.

mod engine_support;

use std::sync::Arc;

use bytes::Bytes;
use engine_support::{ES, Rig, es, loc, map, pattern};
use tessera_api::model::{AreaId, ByteRange, ExtentMap, Generation, ReplicaLocation};
use tessera_api::v1alpha1::DataPriority;
use tessera_csi::backend::fault::CallKind;
use tessera_csi::backend::{AreaBackend, AreaRegistry, BackendFuture, IoDriver};
use tessera_csi::engine::{
    ApplyOutcome, EngineError, HealthState, UsageInit, UsageMirror, Volume, VolumeOptions,
};

fn open(rig: &Rig, map: Arc<ExtentMap>) -> Volume {
    Volume::open(
        "vol",
        map,
        rig.registry.clone(),
        VolumeOptions {
            priority: DataPriority::High,
            usage: UsageInit::Empty,
        },
    )
    .expect("open volume")
}

fn range(offset: u64, length: u64) -> ByteRange {
    ByteRange::new(offset, length).expect("range")
}

fn extents(bitmap: &roaring::RoaringBitmap) -> Vec<u32> {
    bitmap.iter().collect()
}

/// Extents 0–1 on area a, extent 2 on area b, extent 3 a hole.
fn single_copy() -> (Rig, Volume) {
    let rig = Rig::new(&["a", "b"], 16 * ES);
    let m = map(
        4 * ES,
        &[(0, 2, vec![loc("a", 4)]), (2, 1, vec![loc("b", 0)])],
    );
    let volume = open(&rig, m);
    (rig, volume)
}

/// Extents 0–3 mirrored on a and b (copies: 2).
fn two_copies() -> (Rig, Volume) {
    let rig = Rig::new(&["a", "b", "c"], 16 * ES);
    let m = map(4 * ES, &[(0, 4, vec![loc("a", 0), loc("b", 8)])]);
    let volume = open(&rig, m);
    (rig, volume)
}

#[tokio::test]
async fn requests_split_at_extent_boundaries_and_holes_read_as_zeros() {
    let (rig, volume) = single_copy();
    let data = pattern(1, 2 * ES as usize);
    // [ES/2, 2.5 ES): pieces in extent 0 and 1 (area a) and extent 2 (area b).
    volume
        .write(ES / 2, Bytes::from(data.clone()), false)
        .await
        .expect("write");
    let writes_a: Vec<_> = rig
        .fault("a")
        .calls()
        .iter()
        .map(|c| (c.area_offset, c.length))
        .collect();
    let writes_b: Vec<_> = rig
        .fault("b")
        .calls()
        .iter()
        .map(|c| (c.area_offset, c.length))
        .collect();
    assert_eq!(writes_a, vec![(4 * ES + ES / 2, ES / 2), (5 * ES, ES)]);
    assert_eq!(writes_b, vec![(0, ES / 2)]);

    let all = volume.read(0, 4 * ES).await.expect("read");
    assert_eq!(all.len(), 4 * ES as usize);
    assert!(all[..ES as usize / 2].iter().all(|&b| b == 0));
    assert_eq!(&all[ES as usize / 2..ES as usize * 5 / 2], &data[..]);
    assert!(
        all[3 * ES as usize..].iter().all(|&b| b == 0),
        "the hole reads as zeros"
    );
    // The data really is on the areas at the translated offsets.
    let on_b = rig
        .area("b")
        .read(Generation(1), 0, ES as usize / 2)
        .await
        .expect("raw read");
    assert_eq!(&on_b[..], &data[3 * ES as usize / 2..]);
}

#[tokio::test]
async fn unaligned_requests_are_refused_before_any_io() {
    let (rig, volume) = single_copy();
    for (offset, length) in [(100, 512), (512, 100), (1, 1)] {
        let error = volume.read(offset, length).await.expect_err("unaligned");
        assert!(matches!(error, EngineError::Unaligned { .. }), "{error}");
        assert_eq!(error.errno(), libc::EINVAL);
        let error = volume
            .write(offset, Bytes::from(vec![0; length as usize]), false)
            .await
            .expect_err("unaligned");
        assert!(matches!(error, EngineError::Unaligned { .. }));
        assert!(matches!(
            volume.trim(offset, length).await,
            Err(EngineError::Unaligned { .. })
        ));
        assert!(matches!(
            volume.write_zeroes(offset, length, false).await,
            Err(EngineError::Unaligned { .. })
        ));
    }
    assert!(rig.fault("a").calls().is_empty() && rig.fault("b").calls().is_empty());
}

#[tokio::test]
async fn out_of_range_requests_are_refused() {
    let (rig, volume) = single_copy();
    let error = volume.read(3 * ES, 2 * ES).await.expect_err("past the end");
    assert!(matches!(
        error,
        EngineError::OutOfRange { offset, length, size_bytes } if offset == 3 * ES && length == 2 * ES && size_bytes == 4 * ES
    ));
    assert_eq!(error.errno(), libc::EINVAL);
    // An end that overflows u64 is out of range too, not a panic.
    let top = u64::MAX - 511;
    assert!(matches!(
        volume.read(top, 1024).await,
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        volume.write(4 * ES, Bytes::from(vec![0; 512]), false).await,
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(rig.fault("a").calls().is_empty());
}

#[tokio::test]
async fn zero_length_requests_succeed_without_io() {
    let (rig, volume) = single_copy();
    assert!(volume.read(4 * ES, 0).await.expect("read").is_empty());
    volume.write(0, Bytes::new(), true).await.expect("write");
    volume.trim(ES, 0).await.expect("trim");
    volume.write_zeroes(3 * ES, 0, false).await.expect("zeroes");
    assert!(rig.fault("a").calls().is_empty());
    assert_eq!(volume.in_use_bytes(), 0);
}

#[tokio::test]
async fn a_write_touching_a_hole_needs_allocation_and_writes_nothing() {
    let rig = Rig::new(&["a"], 16 * ES);
    // Extent 1 and the partial tail extent 3 are holes; size 3.5 extents.
    let size = 3 * ES + ES / 2;
    let m = map(
        size,
        &[(0, 1, vec![loc("a", 0)]), (2, 1, vec![loc("a", 1)])],
    );
    let volume = open(&rig, m);
    let error = volume
        .write(ES / 2, Bytes::from(vec![1; ES as usize]), false)
        .await
        .expect_err("touches the hole");
    match &error {
        EngineError::NeedsAllocation { range: r } => assert_eq!(*r, range(ES, ES)),
        other => panic!("unexpected {other}"),
    }
    assert_eq!(error.errno(), libc::ENOSPC);
    // Two holes: the reported range covers both, clamped to the volume's end.
    let error = volume
        .write(0, Bytes::from(vec![1; size as usize]), false)
        .await
        .expect_err("touches both holes");
    assert!(
        matches!(error, EngineError::NeedsAllocation { range: r } if r == range(ES, size - ES))
    );
    assert!(
        rig.fault("a").calls().is_empty(),
        "nothing reached the area"
    );
    assert_eq!(volume.in_use_bytes(), 0, "a refused write marks nothing");
    assert!(
        volume
            .read(0, ES)
            .await
            .expect("read")
            .iter()
            .all(|&b| b == 0)
    );
    // Zeroing or trimming a hole is fine: it already reads as zeros.
    volume
        .write_zeroes(0, size, false)
        .await
        .expect("zeroes over holes");
    volume.trim(0, size).await.expect("trim over holes");
}

#[tokio::test]
async fn write_zeroes_reads_back_zero_and_whole_extent_discards_clear_usage() {
    let (rig, volume) = single_copy();
    volume
        .write(0, Bytes::from(pattern(2, 3 * ES as usize)), false)
        .await
        .expect("write");
    assert_eq!(extents(&volume.in_use_extents()), vec![0, 1, 2]);
    assert_eq!(volume.in_use_bytes(), 3 * ES);

    // A partial write-zeroes reads back zero but keeps the extent in use.
    volume.write_zeroes(512, 1024, false).await.expect("zeroes");
    let head = volume.read(0, 2048).await.expect("read");
    assert!(head[512..1536].iter().all(|&b| b == 0));
    assert_eq!(&head[..512], &pattern(2, 512)[..]);
    assert_eq!(extents(&volume.in_use_extents()), vec![0, 1, 2]);

    // A trim of extent 1 plus half of extent 2 clears only extent 1.
    volume.trim(ES, ES + ES / 2).await.expect("trim");
    assert_eq!(extents(&volume.in_use_extents()), vec![0, 2]);
    // Whole-extent write-zeroes clears too, and reads back zero.
    volume.write_zeroes(2 * ES, ES, true).await.expect("zeroes");
    assert_eq!(extents(&volume.in_use_extents()), vec![0]);
    assert!(
        volume
            .read(2 * ES, ES)
            .await
            .expect("read")
            .iter()
            .all(|&b| b == 0)
    );
    let zero_calls = rig.fault("b").calls();
    assert!(
        zero_calls
            .iter()
            .any(|c| c.kind == CallKind::WriteZeroes && c.fua)
    );
    assert_eq!(volume.in_use_bytes(), ES);
}

#[tokio::test]
async fn trim_of_the_partial_tail_extent_counts_as_whole() {
    let rig = Rig::new(&["a"], 16 * ES);
    let size = ES + 1024;
    let volume = open(&rig, map(size, &[(0, 2, vec![loc("a", 0)])]));
    volume
        .write(ES, Bytes::from(vec![9; 512]), false)
        .await
        .expect("write");
    assert_eq!(extents(&volume.in_use_extents()), vec![1]);
    volume.trim(ES, 1024).await.expect("trim the tail");
    assert!(volume.in_use_extents().is_empty());
}

#[tokio::test]
async fn every_backend_call_carries_the_pinned_generation() {
    let (rig, volume) = two_copies();
    volume
        .write(0, Bytes::from(vec![1; 1024]), true)
        .await
        .expect("write");
    volume.read(0, 1024).await.expect("read");
    volume.flush().await.expect("flush");
    for area in ["a", "b"] {
        let calls = rig.fault(area).calls();
        assert!(!calls.is_empty());
        assert!(
            calls.iter().all(|c| c.generation == Generation(1)),
            "{calls:?}"
        );
    }
    rig.clear_calls();
    let gen2 = Arc::new(volume.map().as_ref().clone().with_generation(Generation(2)));
    volume.swap_map(gen2).expect("swap");
    volume.trim(0, 512).await.expect("trim");
    volume.write_zeroes(512, 512, false).await.expect("zeroes");
    volume
        .write(0, Bytes::from(vec![1; 1024]), false)
        .await
        .expect("write");
    volume.read(0, 512).await.expect("read");
    volume.flush().await.expect("flush");
    for area in ["a", "b"] {
        let calls = rig.fault(area).calls();
        assert!(calls.len() >= 4);
        assert!(
            calls.iter().all(|c| c.generation == Generation(2)),
            "{calls:?}"
        );
    }
}

#[tokio::test]
async fn a_stale_generation_is_reported_and_not_a_replica_failure() {
    let (rig, volume) = two_copies();
    // The serving side moved on to generation 5 (a remote extent server would).
    rig.fault("a").serve_generation(Some(Generation(5)));
    let error = volume.read(0, 512).await.expect_err("stale");
    assert!(matches!(
        error,
        EngineError::StaleGeneration { ref area, sent, current }
            if area.as_str() == "a" && sent == Generation(1) && current == Generation(5)
    ));
    assert!(matches!(
        volume.write(0, Bytes::from(vec![0; 512]), false).await,
        Err(EngineError::StaleGeneration { .. })
    ));
    assert_eq!(volume.health().state, HealthState::Healthy);
    // After the map moves to generation 5, the area serves the volume again.
    let gen5 = Arc::new(volume.map().as_ref().clone().with_generation(Generation(5)));
    volume.swap_map(gen5).expect("swap");
    volume.read(0, 512).await.expect("read at generation 5");
}

#[tokio::test]
async fn swap_map_accepts_only_newer_compatible_maps() {
    let (rig, volume) = single_copy();
    let current = volume.map();
    let error = volume
        .swap_map(current.clone())
        .expect_err("same generation");
    assert!(matches!(
        error,
        EngineError::GenerationNotNewer { active, offered } if active == Generation(1) && offered == Generation(1)
    ));
    let other_pool = ExtentMap::new_hole(
        4 * ES,
        tessera_api::model::ExtentSize::new(2 * ES).expect("size"),
    )
    .expect("map")
    .with_generation(Generation(9));
    assert!(matches!(
        volume.swap_map(Arc::new(other_pool)),
        Err(EngineError::IncompatibleMap { .. })
    ));
    let smaller = ExtentMap::new_hole(2 * ES, es())
        .expect("map")
        .with_generation(Generation(9));
    assert!(matches!(
        volume.swap_map(Arc::new(smaller)),
        Err(EngineError::IncompatibleMap { .. })
    ));
    let unknown = current
        .assign(range(3 * ES, ES), vec![ReplicaLocation::new("nowhere", 0)])
        .expect("edit");
    let error = volume
        .swap_map(Arc::new(unknown))
        .expect_err("unknown area");
    assert!(matches!(error, EngineError::UnknownArea { ref area } if area.as_str() == "nowhere"));
    assert_eq!(volume.generation(), Generation(1), "nothing was swapped");

    // Growing works, the new tail is a hole, and its bits exist.
    let grown = current.grow(6 * ES).expect("grow");
    assert_eq!(grown.generation(), Generation(2));
    volume.swap_map(Arc::new(grown.clone())).expect("grow");
    assert_eq!(volume.size(), 6 * ES);
    assert!(matches!(
        volume.write(5 * ES, Bytes::from(vec![1; 512]), false).await,
        Err(EngineError::NeedsAllocation { .. })
    ));
    let allocated = grown
        .assign(range(5 * ES, ES), vec![loc("a", 9)])
        .expect("assign");
    volume.swap_map(Arc::new(allocated)).expect("allocate");
    volume
        .write(5 * ES, Bytes::from(vec![1; 512]), false)
        .await
        .expect("write");
    assert_eq!(extents(&volume.in_use_extents()), vec![5]);
    drop(rig);
}

#[tokio::test]
async fn punching_a_hole_through_swap_map_releases_usage() {
    let (_rig, volume) = single_copy();
    volume
        .write(0, Bytes::from(vec![3; 3 * ES as usize]), false)
        .await
        .expect("write");
    assert_eq!(extents(&volume.in_use_extents()), vec![0, 1, 2]);
    let punched = volume.map().punch_hole(range(ES, ES)).expect("punch");
    volume.swap_map(Arc::new(punched)).expect("swap");
    assert_eq!(extents(&volume.in_use_extents()), vec![0, 2]);
    assert_eq!(extents(&volume.high_priority_extents()), vec![0, 2]);
    assert!(
        volume
            .read(ES, ES)
            .await
            .expect("read")
            .iter()
            .all(|&b| b == 0)
    );
}

#[tokio::test]
async fn a_replicated_write_reaches_every_replica() {
    let (rig, volume) = two_copies();
    let data = pattern(4, 2 * ES as usize);
    volume
        .write(ES, Bytes::from(data.clone()), true)
        .await
        .expect("write");
    let on_a = rig
        .area("a")
        .read(Generation(1), ES, 2 * ES as usize)
        .await
        .expect("a");
    let on_b = rig
        .area("b")
        .read(Generation(1), 9 * ES, 2 * ES as usize)
        .await
        .expect("b");
    assert_eq!(&on_a[..], &data[..]);
    assert_eq!(&on_b[..], &data[..]);
    for area in ["a", "b"] {
        let writes: Vec<_> = rig
            .fault(area)
            .calls()
            .into_iter()
            .filter(|c| c.kind == CallKind::Write)
            .collect();
        assert_eq!(writes.len(), 2, "one piece per extent on {area}");
        assert!(writes.iter().all(|c| c.fua));
    }
    assert_eq!(volume.health().state, HealthState::Healthy);
}

#[tokio::test]
async fn a_failed_replica_is_marked_unhealthy_and_the_write_still_succeeds() {
    let (rig, volume) = two_copies();
    rig.fault("b").fail_writes(true);
    let data = pattern(5, ES as usize);
    volume
        .write(0, Bytes::from(data.clone()), false)
        .await
        .expect("degraded write");
    let health = volume.health();
    assert_eq!(health.state, HealthState::Degraded);
    assert_eq!(health.unhealthy_areas, vec![AreaId::new("b")]);
    assert_eq!(health.degraded_bytes, 4 * ES);
    assert_eq!(health.failed_bytes, 0);
    // From now on b is skipped: no more calls reach it.
    rig.fault("b").fail_writes(false);
    rig.clear_calls();
    volume
        .write(ES, Bytes::from(data.clone()), false)
        .await
        .expect("write");
    assert_eq!(&volume.read(0, ES).await.expect("read")[..], &data[..]);
    assert!(
        rig.fault("b").calls().is_empty(),
        "an unhealthy replica gets no I/O"
    );
    volume.flush().await.expect("flush");
    assert!(rig.fault("b").calls().is_empty());
}

#[tokio::test]
async fn a_read_falls_back_to_the_next_replica_and_marks_the_failed_one() {
    let (rig, volume) = two_copies();
    let data = pattern(6, ES as usize);
    volume
        .write(0, Bytes::from(data.clone()), false)
        .await
        .expect("write");
    rig.fault("a").fail_reads(true);
    rig.clear_calls();
    assert_eq!(&volume.read(0, ES).await.expect("fallback")[..], &data[..]);
    assert_eq!(rig.fault("a").calls().len(), 1);
    assert_eq!(rig.fault("b").calls().len(), 1);
    assert_eq!(volume.health().unhealthy_areas, vec![AreaId::new("a")]);
    // The next read goes straight to b.
    rig.clear_calls();
    volume.read(0, ES).await.expect("read");
    assert!(rig.fault("a").calls().is_empty());
}

#[tokio::test]
async fn when_every_replica_fails_the_request_fails_and_nothing_is_marked() {
    let (rig, volume) = two_copies();
    rig.fault("a").fail_writes(true);
    rig.fault("b").fail_writes(true);
    let error = volume
        .write(0, Bytes::from(vec![1; 512]), false)
        .await
        .expect_err("all replicas failed");
    match &error {
        EngineError::AllReplicasFailed { range: r, tried } => {
            assert_eq!(*r, range(0, 512));
            assert_eq!(tried.len(), 2);
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(error.errno(), libc::EIO);
    assert_eq!(
        volume.health().state,
        HealthState::Healthy,
        "nothing marked"
    );
    rig.fault("a").fail_writes(false);
    rig.fault("b").fail_writes(false);
    rig.fault("a").fail_reads(true);
    rig.fault("b").fail_reads(true);
    assert!(matches!(
        volume.read(0, 512).await,
        Err(EngineError::AllReplicasFailed { .. })
    ));
    assert_eq!(volume.health().state, HealthState::Healthy);
}

#[tokio::test]
async fn the_last_healthy_replica_failing_is_an_io_error_and_stays_healthy() {
    let (rig, volume) = two_copies();
    rig.fault("a").fail_writes(true);
    volume
        .write(0, Bytes::from(vec![1; 512]), false)
        .await
        .expect("degraded");
    rig.fault("b").fail_writes(true);
    let error = volume
        .write(0, Bytes::from(vec![2; 512]), false)
        .await
        .expect_err("only b left and it fails");
    assert!(matches!(error, EngineError::Io { ref area, .. } if area.as_str() == "b"));
    assert_eq!(error.errno(), libc::EIO);
    assert_eq!(volume.health().unhealthy_areas, vec![AreaId::new("a")]);
    // b still serves reads: the failed write never acknowledged anything.
    rig.fault("b").fail_writes(false);
    assert_eq!(
        &volume.read(0, 512).await.expect("read")[..],
        &[1u8; 512][..]
    );
}

#[tokio::test]
async fn a_single_copy_failure_is_an_io_error() {
    let (rig, volume) = single_copy();
    rig.fault("a").fail_next(1);
    let error = volume.read(0, 512).await.expect_err("injected");
    assert!(matches!(error, EngineError::Io { ref area, .. } if area.as_str() == "a"));
    assert_eq!(volume.health().state, HealthState::Healthy);
    volume.read(0, 512).await.expect("the next read works");
}

#[tokio::test]
async fn no_healthy_replica_left_means_failed_until_restored() {
    let (rig, volume) = two_copies();
    let data = pattern(7, 512);
    volume
        .write(0, Bytes::from(data.clone()), false)
        .await
        .expect("write");
    rig.fault("a").fail_reads(true);
    volume.read(0, 512).await.expect("fallback marks a");
    rig.fault("a").fail_reads(false);
    // Resync a from b (the operator's job), then bring it back.
    let copy = rig
        .area("b")
        .read(Generation(1), 8 * ES, 4 * ES as usize)
        .await
        .expect("copy");
    rig.area("a")
        .write(Generation(1), 0, copy, true)
        .await
        .expect("resync");
    assert!(volume.restore_replica(&AreaId::new("a")));
    assert!(!volume.restore_replica(&AreaId::new("a")));
    assert_eq!(volume.health().state, HealthState::Healthy);
    rig.clear_calls();
    assert_eq!(
        &volume.read(0, 512).await.expect("from a again")[..],
        &data[..]
    );
    assert_eq!(
        rig.fault("a").calls().len(),
        1,
        "a is the first replica again"
    );
    // Now a misses a write; then b, the only healthy replica, fails a read: EIO, b not marked.
    rig.fault("a").fail_writes(true);
    volume
        .write(0, Bytes::from(vec![8; 512]), false)
        .await
        .expect("degraded write");
    rig.fault("b").fail_reads(true);
    assert!(
        matches!(volume.read(0, 512).await, Err(EngineError::Io { ref area, .. }) if area.as_str() == "b")
    );
    assert_eq!(volume.health().state, HealthState::Degraded);
    assert_eq!(volume.health().unhealthy_areas, vec![AreaId::new("a")]);
}

#[tokio::test]
async fn health_is_per_area_so_two_failures_can_leave_a_run_without_replicas() {
    let rig = Rig::new(&["a", "b", "c"], 16 * ES);
    // Extent 0 on (a, b), extent 1 on (b, c).
    let m = map(
        2 * ES,
        &[
            (0, 1, vec![loc("a", 0), loc("b", 0)]),
            (1, 1, vec![loc("b", 1), loc("c", 0)]),
        ],
    );
    let volume = open(&rig, m);
    rig.fault("a").fail_writes(true);
    volume
        .write(0, Bytes::from(vec![1; 512]), false)
        .await
        .expect("b took it");
    rig.fault("b").fail_writes(true);
    volume
        .write(ES, Bytes::from(vec![1; 512]), false)
        .await
        .expect("c took it");
    let health = volume.health();
    assert_eq!(health.state, HealthState::Failed);
    assert_eq!(health.failed_bytes, ES);
    assert_eq!(health.degraded_bytes, ES);
    assert!(matches!(
        volume.read(0, 512).await,
        Err(EngineError::AllReplicasFailed { ref tried, .. }) if tried.is_empty()
    ));
    assert_eq!(
        &volume.read(ES, 512).await.expect("c serves")[..],
        &[1u8; 512][..]
    );
}

#[tokio::test]
async fn flush_reaches_every_healthy_area_and_tolerates_a_redundant_failure() {
    let (rig, volume) = two_copies();
    volume
        .write(0, Bytes::from(vec![1; 512]), false)
        .await
        .expect("write");
    volume.flush().await.expect("flush");
    for area in ["a", "b"] {
        assert!(
            rig.fault(area)
                .calls()
                .iter()
                .any(|c| c.kind == CallKind::Flush)
        );
    }
    assert!(
        rig.fault("c").calls().is_empty(),
        "c holds nothing of this volume"
    );
    rig.fault("b").fail_flushes(true);
    volume.flush().await.expect("a flushed every run");
    assert_eq!(volume.health().unhealthy_areas, vec![AreaId::new("b")]);
    rig.fault("a").fail_flushes(true);
    let error = volume.flush().await.expect_err("no durable copy");
    assert!(matches!(error, EngineError::Io { ref area, .. } if area.as_str() == "a"));
}

#[tokio::test]
async fn usage_counts_transitions_with_the_volume_priority() {
    let (_rig, volume) = single_copy();
    assert_eq!(volume.priority(), DataPriority::High);
    volume
        .write(0, Bytes::from(vec![1; 512]), false)
        .await
        .expect("write");
    volume
        .write(512, Bytes::from(vec![1; 512]), false)
        .await
        .expect("overwrite same extent");
    assert_eq!(
        volume.in_use_bytes(),
        ES,
        "a partial write marks the whole extent, once"
    );
    assert_eq!(volume.high_priority_bytes(), ES);
    volume.set_priority(DataPriority::Low);
    volume
        .write(ES, Bytes::from(vec![1; 512]), false)
        .await
        .expect("write");
    volume
        .write(0, Bytes::from(vec![1; 512]), false)
        .await
        .expect("rewrite as low");
    assert_eq!(volume.in_use_bytes(), 2 * ES);
    assert_eq!(volume.high_priority_bytes(), 0);

    let mut mirror = UsageMirror::default();
    let first = volume.take_usage_delta();
    assert!(first.full);
    assert_eq!(first.volume, "vol");
    assert_eq!(first.map_generation, Generation(1));
    assert_eq!(mirror.apply(&first), ApplyOutcome::Applied);
    volume.trim(0, ES).await.expect("trim");
    let delta = volume.take_usage_delta();
    assert_eq!(extents(&delta.cleared), vec![0]);
    let wire = tessera_csi::engine::UsageDelta::from_bytes(&delta.to_bytes()).expect("decode");
    assert_eq!(mirror.apply(&wire), ApplyOutcome::Applied);
    assert_eq!(mirror.apply(&wire), ApplyOutcome::Duplicate);
    assert_eq!(mirror.in_use, volume.in_use_extents());
    assert_eq!(delta.in_use_bytes, ES);
    let full = volume.take_usage_full_report();
    assert!(full.full && full.sequence == 3);
}

#[tokio::test]
async fn usage_starts_as_configured() {
    let rig = Rig::new(&["a"], 16 * ES);
    let m = map(4 * ES, &[(1, 2, vec![loc("a", 0)])]);
    let all = Volume::open(
        "v",
        m.clone(),
        rig.registry.clone(),
        VolumeOptions::default(),
    )
    .expect("open");
    assert_eq!(extents(&all.in_use_extents()), vec![1, 2]);
    assert_eq!(extents(&all.high_priority_extents()), vec![1, 2]);
    let mut in_use = roaring::RoaringBitmap::new();
    in_use.extend([0u32, 2]); // 0 is a hole: dropped
    let mut high = roaring::RoaringBitmap::new();
    high.insert(0);
    let restored = Volume::open(
        "v",
        m,
        rig.registry.clone(),
        VolumeOptions {
            priority: DataPriority::Low,
            usage: UsageInit::Restored {
                in_use,
                high_priority: high,
            },
        },
    )
    .expect("open");
    assert_eq!(extents(&restored.in_use_extents()), vec![2]);
    assert!(restored.high_priority_extents().is_empty());
    assert_eq!(restored.priority(), DataPriority::Low);
}

#[tokio::test]
async fn open_refuses_unknown_areas() {
    let rig = Rig::new(&["a"], 16 * ES);
    let m = map(2 * ES, &[(0, 1, vec![loc("zz", 0)])]);
    let error = Volume::open("v", m, rig.registry.clone(), VolumeOptions::default())
        .expect_err("unknown area");
    assert!(matches!(error, EngineError::UnknownArea { .. }));
}

#[tokio::test]
async fn dirty_tracking_records_data_changes_only_while_enabled() {
    let (_rig, volume) = two_copies();
    volume
        .write(0, Bytes::from(vec![1; 512]), false)
        .await
        .expect("write");
    assert!(!volume.dirty_tracking_enabled());
    volume.enable_dirty_tracking();
    assert!(
        volume.dirty_extents().is_empty(),
        "writes before enabling are not recorded"
    );
    volume
        .write(ES, Bytes::from(vec![1; 512]), false)
        .await
        .expect("write");
    volume.trim(2 * ES, 512).await.expect("trim");
    volume
        .write_zeroes(3 * ES, 512, false)
        .await
        .expect("zeroes");
    volume.read(0, 4 * ES).await.expect("reads are not changes");
    assert_eq!(extents(&volume.snapshot_and_clear_dirty()), vec![1, 2, 3]);
    assert!(volume.snapshot_and_clear_dirty().is_empty());
    volume
        .write(0, Bytes::from(vec![1; 2 * ES as usize]), false)
        .await
        .expect("write");
    assert_eq!(extents(&volume.dirty_extents()), vec![0, 1]);
    volume.disable_dirty_tracking();
    assert!(volume.dirty_extents().is_empty());
    volume
        .write(0, Bytes::from(vec![1; 512]), false)
        .await
        .expect("write");
    assert!(volume.dirty_extents().is_empty());
}

/// Writers and a snapshotter race; the first snapshot taken after a write was acknowledged must
/// contain that write's extent.
#[test]
fn dirty_snapshots_race_writes_without_losing_any() {
    const EXTENTS: u64 = 16;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let rig = Rig::new(&["a", "b"], 2 * EXTENTS * ES);
    let m = map(
        EXTENTS * ES,
        &[(0, EXTENTS, vec![loc("a", 0), loc("b", EXTENTS)])],
    );
    let volume = Arc::new(open(&rig, m));
    volume.enable_dirty_tracking();
    enum Event {
        Start(u64),
        Ack(u64),
        Snapshot(roaring::RoaringBitmap),
    }
    let log = Arc::new(parking_lot::Mutex::new(Vec::<Event>::new()));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for writer in 0..4u64 {
            let (volume, log) = (volume.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                let mut state = writer * 7919 + 1;
                for _ in 0..150 {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let extent = (state >> 33) % EXTENTS;
                    log.lock().push(Event::Start(extent));
                    volume
                        .write(extent * ES, Bytes::from(vec![writer as u8; 512]), false)
                        .await
                        .expect("write");
                    log.lock().push(Event::Ack(extent));
                }
            }));
        }
        let (snap_volume, snap_log) = (volume.clone(), log.clone());
        let snapshotter = tokio::spawn(async move {
            for _ in 0..200 {
                {
                    let mut log = snap_log.lock();
                    let snapshot = snap_volume.snapshot_and_clear_dirty();
                    log.push(Event::Snapshot(snapshot));
                }
                tokio::task::yield_now().await;
            }
        });
        for task in tasks {
            task.await.expect("writer");
        }
        snapshotter.await.expect("snapshotter");
    });
    let mut log = Arc::try_unwrap(log).ok().expect("sole owner").into_inner();
    log.push(Event::Snapshot(volume.snapshot_and_clear_dirty()));
    // A write is logged Start … Ack. It must be in a snapshot taken after its Start and no later
    // than the first snapshot after its Ack (the write completed before that snapshot began).
    let snapshots: Vec<(usize, &roaring::RoaringBitmap)> = log
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            Event::Snapshot(s) => Some((i, s)),
            _ => None,
        })
        .collect();
    let mut open: Vec<(u64, usize)> = Vec::new();
    let mut checked = 0;
    for (index, event) in log.iter().enumerate() {
        match event {
            Event::Start(extent) => open.push((*extent, index)),
            Event::Ack(extent) => {
                let position = open.iter().position(|(e, _)| e == extent).expect("started");
                let (_, started) = open.remove(position);
                let first_after_ack = snapshots
                    .iter()
                    .position(|(i, _)| *i > index)
                    .expect("a final snapshot follows every ack");
                let found = snapshots[..=first_after_ack]
                    .iter()
                    .filter(|(i, _)| *i > started)
                    .any(|(_, s)| s.contains(*extent as u32));
                assert!(
                    found,
                    "write of extent {extent} (log {started}..{index}) is in no snapshot"
                );
                checked += 1;
            }
            Event::Snapshot(_) => {}
        }
    }
    assert_eq!(checked, 600);
}

#[tokio::test]
async fn io_uring_areas_serve_a_volume_when_the_kernel_allows() {
    let rig = match std::panic::catch_unwind(|| {
        Rig::with_driver(&["a", "b"], 16 * ES, IoDriver::IoUring)
    }) {
        Ok(rig) => rig,
        Err(_) => {
            eprintln!("io_uring unavailable here; skipping");
            return;
        }
    };
    assert!(rig.area("a").uses_io_uring());
    let volume = open(&rig, map(4 * ES, &[(0, 4, vec![loc("a", 0), loc("b", 4)])]));
    let data = pattern(8, 3 * ES as usize);
    // Aligned (O_DIRECT where supported) and unaligned (buffered) pieces, with FUA.
    volume
        .write(0, Bytes::from(data.clone()), true)
        .await
        .expect("write");
    volume
        .write(ES + 512, Bytes::from(vec![5; 1024]), false)
        .await
        .expect("write");
    volume.flush().await.expect("flush");
    let mut expected = data;
    expected[ES as usize + 512..ES as usize + 1536].fill(5);
    assert_eq!(
        &volume.read(0, 3 * ES).await.expect("read")[..],
        &expected[..]
    );
    volume.write_zeroes(0, ES, false).await.expect("zeroes");
    assert!(
        volume
            .read(0, ES)
            .await
            .expect("read")
            .iter()
            .all(|&b| b == 0)
    );
}

/// Holds writes until released, to catch a write in flight.
#[derive(Debug)]
struct Paused {
    inner: Arc<dyn AreaBackend>,
    gate: tokio::sync::Semaphore,
}

impl AreaBackend for Paused {
    fn area(&self) -> &AreaId {
        self.inner.area()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read(
        &self,
        generation: Generation,
        area_offset: u64,
        length: usize,
    ) -> BackendFuture<'_, Bytes> {
        self.inner.read(generation, area_offset, length)
    }
    fn write(
        &self,
        generation: Generation,
        area_offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            let permit = self.gate.acquire().await;
            drop(permit);
            self.inner.write(generation, area_offset, data, fua).await
        })
    }
    fn write_zeroes(
        &self,
        generation: Generation,
        area_offset: u64,
        length: u64,
        fua: bool,
    ) -> BackendFuture<'_, ()> {
        self.inner
            .write_zeroes(generation, area_offset, length, fua)
    }
    fn trim(&self, generation: Generation, area_offset: u64, length: u64) -> BackendFuture<'_, ()> {
        self.inner.trim(generation, area_offset, length)
    }
    fn flush(&self, generation: Generation) -> BackendFuture<'_, ()> {
        self.inner.flush(generation)
    }
}

#[tokio::test]
async fn a_write_in_flight_during_a_snapshot_is_in_that_snapshot_and_the_next() {
    let rig = Rig::new(&["a"], 16 * ES);
    let paused = Arc::new(Paused {
        inner: rig.area("a").clone() as Arc<dyn AreaBackend>,
        gate: tokio::sync::Semaphore::new(0),
    });
    let registry = Arc::new(AreaRegistry::new());
    registry.insert(paused.clone() as Arc<dyn AreaBackend>);
    let volume = Arc::new(
        Volume::open(
            "v",
            map(4 * ES, &[(0, 4, vec![loc("a", 0)])]),
            registry,
            VolumeOptions::default(),
        )
        .expect("open"),
    );
    volume.enable_dirty_tracking();
    let writer = {
        let volume = volume.clone();
        tokio::spawn(async move { volume.write(2 * ES, Bytes::from(vec![1; 512]), false).await })
    };
    // Let the write reach the backend, where it waits.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!writer.is_finished());
    assert_eq!(
        extents(&volume.snapshot_and_clear_dirty()),
        vec![2],
        "marked before issue"
    );
    // A resync would copy extent 2 now, before the write lands; so the next snapshot needs it.
    paused.gate.add_permits(1);
    writer.await.expect("task").expect("write");
    assert_eq!(
        extents(&volume.snapshot_and_clear_dirty()),
        vec![2],
        "marked again after completion"
    );
    assert!(volume.snapshot_and_clear_dirty().is_empty());
}
