//! The mirror leg of the engine (seed 003 claim 1; `engine::mirror`; docs/mirror.md §7): mirrored
//! writes, the split cut, dirty collection, the formation/resync copy and the suspension of a
//! failing secondary, on temp-file areas. Scenario numbers are seed 003 §8.5.

mod engine_support;

use std::sync::Arc;

use bytes::Bytes;
use engine_support::{ES, Rig, loc, map, pattern};
use roaring::RoaringBitmap;
use tessera_api::model::{ExtentMap, ExtentSize, Generation, Run};
use tessera_api::v1alpha1::DataPriority;
use tessera_csi::backend::AreaBackend;
use tessera_csi::engine::{LegMode, MirrorLegSpec, UsageInit, Volume, VolumeOptions};

/// Enough extents for seed 003's sector 100 (51 200 bytes with 4 KiB extents).
const EXTENTS: u64 = 16;
/// Where the secondary starts on area `s`.
const S_SLOT: u64 = 20;

/// The primary (`EXTENTS` extents on area `p`) and the secondary's map (as many on area `s`,
/// from slot `S_SLOT`, so a translation mistake shows).
fn pair() -> (Rig, Volume, Arc<ExtentMap>) {
    let rig = Rig::new(&["p", "s"], 40 * ES);
    let primary = map(EXTENTS * ES, &[(0, EXTENTS, vec![loc("p", 0)])]);
    let secondary = map(EXTENTS * ES, &[(0, EXTENTS, vec![loc("s", S_SLOT)])]);
    let volume = Volume::open(
        "vol-0",
        primary,
        rig.registry.clone(),
        VolumeOptions {
            priority: DataPriority::High,
            usage: UsageInit::Empty,
        },
    )
    .expect("open");
    (rig, volume, secondary)
}

fn leg(map: &Arc<ExtentMap>, mode: LegMode) -> Option<MirrorLegSpec> {
    Some(MirrorLegSpec {
        secondary: "vol-1".into(),
        map: Arc::clone(map),
        mode,
    })
}

/// The secondary's bytes at volume offset `offset`.
async fn secondary_bytes(rig: &Rig, offset: u64, length: usize) -> Bytes {
    rig.area("s")
        .read(Generation(1), S_SLOT * ES + offset, length)
        .await
        .expect("read s")
}

fn bits(v: &[u32]) -> RoaringBitmap {
    v.iter().copied().collect()
}

#[tokio::test]
async fn s08_a_paired_primary_acknowledges_a_write_only_once_the_secondary_has_it() {
    let (rig, volume, secondary) = pair();
    volume
        .set_mirror_leg(leg(&secondary, LegMode::Mirror), false)
        .unwrap();
    // Seed 003 §8.5 scenario 8: a write to sector 100 of vol-0 is readable at sector 100 of vol-1.
    let data = Bytes::from(pattern(8, 512));
    volume.write(100 * 512, data.clone(), false).await.unwrap();
    assert_eq!(secondary_bytes(&rig, 100 * 512, 512).await, data);
    // Write-zeroes and trims are mirrored too.
    volume.write_zeroes(100 * 512, 512, false).await.unwrap();
    assert_eq!(secondary_bytes(&rig, 100 * 512, 512).await, vec![0u8; 512]);
    let view = volume.mirror_leg().unwrap();
    assert_eq!(
        (view.mode, view.failure.as_deref()),
        (LegMode::Mirror, None)
    );
}

#[tokio::test]
async fn s09_after_the_cut_the_secondary_keeps_the_image_of_the_split_instant() {
    let (rig, volume, secondary) = pair();
    volume
        .set_mirror_leg(leg(&secondary, LegMode::Mirror), false)
        .unwrap();
    let before = Bytes::from(pattern(1, ES as usize));
    volume.write(ES, before.clone(), false).await.unwrap();
    // The cut (done under a hold of the whole volume by the controller): track from empty.
    volume
        .set_mirror_leg(leg(&secondary, LegMode::Track), true)
        .unwrap();
    let (_, dirty) = volume.collect_dirty(0);
    assert!(dirty.is_empty(), "nothing is dirty at the cut: {dirty:?}");
    let after = Bytes::from(pattern(2, ES as usize));
    volume.write(ES, after.clone(), false).await.unwrap();
    volume.trim(3 * ES, ES).await.unwrap();
    assert_eq!(secondary_bytes(&rig, ES, ES as usize).await, before);
    assert_eq!(volume.read(ES, ES).await.unwrap(), after);
    let (_, dirty) = volume.collect_dirty(0);
    assert_eq!(dirty, bits(&[1, 3]));
    // Writes to the primary after the cut never reached the secondary.
    assert_eq!(secondary_bytes(&rig, 3 * ES, 16).await, vec![0u8; 16]);
}

#[tokio::test]
async fn the_formation_copy_fills_the_secondary_and_a_write_after_it_is_collected_for_another_pass()
{
    let (rig, volume, secondary) = pair();
    // Data written while the volume was simplex.
    let old = Bytes::from(pattern(3, (EXTENTS * ES) as usize));
    volume.write(0, old.clone(), false).await.unwrap();
    assert_ne!(secondary_bytes(&rig, 0, old.len()).await, old);

    volume
        .set_mirror_leg(leg(&secondary, LegMode::Mirror), false)
        .unwrap();
    let all: RoaringBitmap = (0..EXTENTS as u32).collect();
    let copied = volume.copy_to_leg(&all, true).await.unwrap();
    assert_eq!(copied, EXTENTS * ES);
    assert_eq!(secondary_bytes(&rig, 0, old.len()).await, old);

    // A write during the formation (here: after the copy) is mirrored and also dirty, so the
    // controller's next collection names it (the racing case copies it again).
    let (first, dirty) = volume.collect_dirty(0);
    assert!(dirty.is_empty(), "{dirty:?}");
    let new = Bytes::from(pattern(4, 512));
    volume
        .write(2 * ES + 512, new.clone(), false)
        .await
        .unwrap();
    let (_, dirty) = volume.collect_dirty(first);
    assert_eq!(dirty, bits(&[2]));
    volume.copy_to_leg(&dirty, true).await.unwrap();
    assert_eq!(
        secondary_bytes(&rig, 0, (EXTENTS * ES) as usize).await,
        volume.read(0, EXTENTS * ES).await.unwrap()
    );
}

#[tokio::test]
async fn a_secondary_that_fails_a_write_suspends_the_leg_and_the_primary_write_still_succeeds() {
    let (rig, volume, secondary) = pair();
    volume
        .set_mirror_leg(leg(&secondary, LegMode::Mirror), false)
        .unwrap();
    rig.fault("s").fail_writes(true);
    let data = Bytes::from(pattern(5, 512));
    volume.write(2 * ES, data.clone(), false).await.unwrap();
    assert_eq!(volume.read(2 * ES, 512).await.unwrap(), data);
    let view = volume.mirror_leg().unwrap();
    assert_eq!(view.mode, LegMode::Track);
    assert!(view.failure.is_some(), "{view:?}");
    // Suspended: later writes are not sent to the secondary, only tracked.
    rig.clear_calls();
    volume.write(3 * ES, data.clone(), false).await.unwrap();
    assert!(rig.fault("s").calls().is_empty());
    let (_, dirty) = volume.collect_dirty(0);
    assert_eq!(dirty, bits(&[2, 3]));
    // Setting the leg again (a resync) clears the failure.
    rig.fault("s").fail_writes(false);
    volume
        .set_mirror_leg(leg(&secondary, LegMode::Mirror), false)
        .unwrap();
    assert_eq!(volume.mirror_leg().unwrap().failure, None);
}

#[tokio::test]
async fn a_secondary_that_fails_a_flush_suspends_the_leg_and_the_flush_succeeds() {
    let (rig, volume, secondary) = pair();
    volume
        .set_mirror_leg(leg(&secondary, LegMode::Mirror), false)
        .unwrap();
    volume
        .write(0, Bytes::from(pattern(6, 512)), false)
        .await
        .unwrap();
    rig.fault("s").fail_flushes(true);
    volume.flush().await.unwrap();
    assert_eq!(volume.mirror_leg().unwrap().mode, LegMode::Track);
}

#[tokio::test]
async fn dirty_collection_loses_nothing_when_an_answer_is_lost() {
    let (_rig, volume, secondary) = pair();
    volume
        .set_mirror_leg(leg(&secondary, LegMode::Track), true)
        .unwrap();
    volume
        .write(0, Bytes::from(pattern(7, 512)), false)
        .await
        .unwrap();
    let (lost, dirty) = volume.collect_dirty(0);
    assert_eq!(dirty, bits(&[0]));
    volume
        .write(ES, Bytes::from(pattern(7, 512)), false)
        .await
        .unwrap();
    // The answer `lost` never reached the operator: it acknowledges nothing and gets both.
    let (kept, dirty) = volume.collect_dirty(0);
    assert!(kept > lost);
    assert_eq!(dirty, bits(&[0, 1]));
    // Acknowledged: gone.
    let (_, dirty) = volume.collect_dirty(kept);
    assert!(dirty.is_empty());
}

#[tokio::test]
async fn a_leg_that_cannot_mirror_the_whole_primary_is_refused() {
    let (rig, volume, _) = pair();
    let smaller = map((EXTENTS - 1) * ES, &[(0, EXTENTS - 1, vec![loc("s", 0)])]);
    let with_hole = map(EXTENTS * ES, &[(0, EXTENTS - 1, vec![loc("s", 0)])]);
    let other_extent = Arc::new(
        ExtentMap::from_runs(
            EXTENTS * ES,
            ExtentSize::new(2 * ES).unwrap(),
            Generation(1),
            vec![Run::new(0, EXTENTS * ES, vec![loc("s", 0)])],
        )
        .unwrap(),
    );
    let unknown_area = map(EXTENTS * ES, &[(0, EXTENTS, vec![loc("nowhere", 0)])]);
    for (name, bad) in [
        ("smaller", smaller),
        ("hole", with_hole),
        ("extent size", other_extent),
        ("unknown area", unknown_area),
    ] {
        let error = volume
            .set_mirror_leg(leg(&bad, LegMode::Mirror), false)
            .expect_err(name);
        assert!(!error.to_string().is_empty(), "{name}");
        assert!(volume.mirror_leg().is_none(), "{name}: nothing was set");
        assert!(!volume.dirty_tracking_enabled(), "{name}");
    }
    // Nothing was written to the secondary area by the refusals.
    assert!(rig.fault("s").calls().is_empty());
}

#[tokio::test]
async fn removing_the_leg_stops_mirroring_and_tracking() {
    let (rig, volume, secondary) = pair();
    volume
        .set_mirror_leg(leg(&secondary, LegMode::Mirror), false)
        .unwrap();
    volume.set_mirror_leg(None, false).unwrap();
    rig.clear_calls();
    volume
        .write(0, Bytes::from(pattern(9, 512)), false)
        .await
        .unwrap();
    assert!(rig.fault("s").calls().is_empty());
    assert!(!volume.dirty_tracking_enabled());
    assert!(volume.mirror_leg().is_none());
    assert!(volume.copy_to_leg(&bits(&[0]), true).await.is_err());
}
