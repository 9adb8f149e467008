//! Seed 000's reclaim story through real objects and the whole watch → reconcile → status loop
//! against the embedded API server (seed 000 §8.6 scenario 7 with the [0025] numbers; one
//! extent = one patent block, 64 KiB).
//!
//! VAREA01 holds 100000 blocks, 50000 in use of which 40000 high priority ([0025]); VAREA02
//! holds 30000 blocks of low-priority data; the pool has no unallocated block left. A claim for
//! 55000 blocks is admitted by C3 of [0045] (0 + 50000 + 40000 > 55000), then Fig. 7 runs: tier
//! Unused first — VAREA01 returns its 50000 unused blocks ([0054]) — and only when no volume has
//! unused blocks left, tier LowPriority — VAREA02, the volume with the most low-priority blocks
//! (30000 > 10000, [0056]), returns the 5000 still needed. High-priority data is never touched.

mod controller_support;

use controller_support::*;
use kube::ResourceExt;
use kube::api::ListParams;
use serde_json::json;
use tessera_api::v1alpha1::{
    DataPriority, ReclaimTier, RemapPhase, VirtualVolume, VolumeRange, VolumeRemap,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed000_reclaim_story_victims_shrink_in_fig7_order() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster
        .create_area("area-a", "node-a", "pool", 100_000)
        .await;
    cluster
        .create_area("area-b", "node-b", "pool", 30_000)
        .await;

    // Two servers' virtual areas fill the pool.
    cluster
        .create_claim("varea01", "pool", 100_000, "standard")
        .await;
    let (_, varea01) = cluster.bound("varea01").await;
    cluster
        .create_claim("varea02", "pool", 30_000, "standard")
        .await;
    let (_, varea02) = cluster.bound("varea02").await;
    let (v1, v2) = (varea01.name_any(), varea02.name_any());
    // Fig. 8 write accounting through node reports: [0025] for VAREA01, low-priority data for
    // VAREA02.
    cluster
        .report_usage(&v1, &[(0..40_000, true), (40_000..50_000, false)])
        .await;
    cluster.report_usage(&v2, &[(0..30_000, false)]).await;
    let before = cluster
        .pool_where("pool", "accounted", |s| {
            s.in_use_bytes == 80_000 * ES && s.unallocated_bytes == 0
        })
        .await;
    assert_eq!(before.total_bytes, 130_000 * ES);
    assert_eq!(before.allocated_bytes, 130_000 * ES);
    assert_eq!(before.unused_bytes, 50_000 * ES);
    assert_eq!(before.low_priority_bytes, 40_000 * ES);

    // SRV02 asks for 55000 blocks: more than the unallocated 0.
    let claim = cluster
        .create_claim("srv02", "pool", 55_000, "standard")
        .await;
    let (_, srv02) = cluster.bound("srv02").await;

    // The area returns, in order: VAREA01 / Unused / its last 50000 blocks, then VAREA02 /
    // LowPriority / its last 5000 blocks.
    let mut remaps = cluster
        .api::<VolumeRemap>()
        .list(
            &ListParams::default()
                .labels(&format!("tessera.io/claim-uid={}", claim.uid().unwrap())),
        )
        .await
        .unwrap()
        .items;
    remaps.sort_by_key(|r| r.labels()["tessera.io/reclaim-step"].clone());
    let returns: Vec<(String, ReclaimTier, Vec<VolumeRange>, Option<RemapPhase>)> = remaps
        .iter()
        .map(|r| {
            let release = r.spec.operation.release_ranges.clone().unwrap();
            (
                r.spec.volume_name.clone(),
                release.tier,
                release.ranges,
                r.status.as_ref().and_then(|s| s.phase),
            )
        })
        .collect();
    let range = |start: i64, len: i64| VolumeRange {
        offset: start * ES,
        length: len * ES,
    };
    assert_eq!(
        returns,
        vec![
            (
                v1.clone(),
                ReclaimTier::Unused,
                vec![range(50_000, 50_000)],
                Some(RemapPhase::Succeeded)
            ),
            (
                v2.clone(),
                ReclaimTier::LowPriority,
                vec![range(25_000, 5_000)],
                Some(RemapPhase::Succeeded)
            ),
        ]
    );

    // The victims shrank by exactly what was needed; high-priority data was never released.
    let volumes = cluster.api::<VirtualVolume>();
    let varea01 = wait_for(&volumes, &v1, "recounted", |v| usage_extents(v).0 == 50_000).await;
    let varea02 = wait_for(&volumes, &v2, "recounted", |v| usage_extents(v).0 == 25_000).await;
    let srv02 = wait_for(&volumes, &srv02.name_any(), "counted", |v| {
        usage_extents(v).0 == 55_000
    })
    .await;
    assert_eq!(usage_extents(&varea01), (50_000, 50_000, 40_000));
    assert_eq!(usage_extents(&varea02), (25_000, 25_000, 0));
    assert_eq!((generation(&varea01), generation(&varea02)), (2, 2));
    assert_eq!(usage_extents(&srv02), (55_000, 0, 0));
    assert_eq!(generation(&srv02), 1);
    cluster.assert_no_extent_mapped_twice().await;

    // The pool counters add up: total = allocated + unallocated, and they are the sums of the
    // volumes' counters (seed 000 §8.6 scenario 15).
    let after = cluster
        .pool_where("pool", "recounted", |s| {
            s.allocated_bytes == 130_000 * ES && s.in_use_bytes == 75_000 * ES
        })
        .await;
    assert_eq!(
        after.total_bytes,
        after.allocated_bytes + after.unallocated_bytes
    );
    assert_eq!(after.unallocated_bytes, 0);
    assert_eq!(after.high_priority_bytes, 40_000 * ES);
    assert_eq!(after.unused_bytes, 55_000 * ES);
    assert_eq!(after.low_priority_bytes, 35_000 * ES);
    assert_eq!(after.volumes, 3);
    let sums = [&varea01, &varea02, &srv02]
        .iter()
        .map(|v| usage_extents(v))
        .fold((0, 0, 0), |a, u| (a.0 + u.0, a.1 + u.1, a.2 + u.2));
    assert_eq!(
        (sums.0 * ES, sums.1 * ES, sums.2 * ES),
        (
            after.allocated_bytes,
            after.in_use_bytes,
            after.high_priority_bytes
        )
    );

    // The events tell the story.
    cluster.event("srv02", "Bound").await;
    let story = cluster.events_about("srv02").await;
    let reasons: Vec<&str> = story.iter().map(|(_, r, _)| r.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "ReclaimStarted",
            "AreaReturnRequested",
            "AreaReturned",
            "AreaReturnRequested",
            "LowPriorityDataReclaimed",
            "AreaReturned",
            "Bound",
        ],
        "{story:#?}"
    );
    assert!(story[0].2.contains("C3LowPriority"), "{}", story[0].2);
    assert!(
        story[1].2.contains(&v1)
            && story[1].2.contains("50000 extents")
            && story[1].2.contains("Unused")
    );
    assert!(
        story[3].2.contains(&v2)
            && story[3].2.contains("5000 extents")
            && story[3].2.contains("LowPriority")
    );
    assert_eq!(story[4].0, "Warning");
    assert!(story[6].2.contains(&srv02.name_any()));
    assert_eq!(operator.metrics.reclaim_returns("pool", "Unused"), 1);
    assert_eq!(operator.metrics.reclaim_returns("pool", "LowPriority"), 1);
    let metrics = operator.metrics.encode();
    assert!(
        metrics.contains(r#"tessera_reclaim_bytes_total{pool="pool",tier="Unused"} 3276800000"#),
        "{metrics}"
    );

    // The pool is no longer reclaiming.
    cluster
        .pool_where("pool", "idle", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Reclaiming" && c.status == "False")
        })
        .await;
    operator.stop().await;
}
