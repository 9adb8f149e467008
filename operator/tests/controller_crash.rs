//! The operator killed between any two reconcile steps of a claim, then restarted: exactly one
//! allocation, exactly one release per area return, no extent leaked or mapped twice.
//!
//! The claim needs reclaim, so one run passes every step: the reclaim intent in the claim's
//! status, the VolumeRemap, the remap's intent, the victim's new mapping, the volume creation
//! with its planned mapping, the mapping commit, and binding. For each step the operator is
//! started with `crash_at` that step; it stops abruptly right after the step's write (no lease
//! release, nothing else finished), and a fresh operator (the same pod restarted: same
//! identity) takes over.

mod controller_support;

use controller_support::*;
use kube::ResourceExt;
use kube::api::ListParams;
use serde_json::json;
use tessera_api::v1alpha1::{DataPriority, RemapPhase, VirtualVolume, VolumeRemap};
use tessera_operator::controllers::CrashPoint;

const POINTS: [CrashPoint; 7] = [
    CrashPoint::ClaimReclaimIntent,
    CrashPoint::RemapCreated,
    CrashPoint::RemapIntent,
    CrashPoint::RangesReleased,
    CrashPoint::VolumeCreated,
    CrashPoint::VolumeMapped,
    CrashPoint::ClaimBound,
];

/// A 1000-extent pool with a 999-extent volume holding 400 extents of data: a 500-extent claim
/// finds 1 unallocated extent and must take 499 of the victim's 599 unused extents.
async fn crash_and_restart_at(point: CrashPoint) {
    let cluster = Cluster::start().await;
    let setup = cluster.spawn(cluster.config("setup"));
    cluster.create_class("standard", 0, DataPriority::Low).await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 1_000).await;
    cluster
        .create_claim("victim", "pool", 999, "standard")
        .await;
    let (_, victim) = cluster.bound("victim").await;
    cluster
        .report_usage(&victim.name_any(), &[(0..400, false)])
        .await;
    setup.stop().await;

    let doomed = cluster.spawn(Cluster::with_crash(cluster.config("operator-0"), point));
    let claim = cluster.create_claim("new", "pool", 500, "standard").await;
    assert_eq!(doomed.crashed().await, point);

    let restarted = cluster.spawn(cluster.config("operator-0"));
    let (claim_now, volume) = cluster.bound("new").await;
    assert_eq!(claim_now.uid(), claim.uid());

    // Exactly one volume for the claim, with the claim's size.
    let volumes = cluster
        .api::<VirtualVolume>()
        .list(&ListParams::default())
        .await
        .unwrap();
    let owned: Vec<&VirtualVolume> = volumes
        .items
        .iter()
        .filter(|v| v.spec.claim_ref.as_ref().and_then(|c| c.uid.clone()) == claim.uid())
        .collect();
    assert_eq!(owned.len(), 1, "{point:?}: {owned:#?}");
    assert_eq!(owned[0].name_any(), volume.name_any());
    let volume = wait_for(
        &cluster.api::<VirtualVolume>(),
        &volume.name_any(),
        "counted",
        |v| usage_extents(v).0 == 500,
    )
    .await;
    assert_eq!(generation(&volume), 1, "{point:?}");

    // Exactly one area return, applied once: the victim lost 500 unused extents, kept its data.
    let remaps = cluster
        .api::<VolumeRemap>()
        .list(
            &ListParams::default()
                .labels(&format!("tessera.io/claim-uid={}", claim.uid().unwrap())),
        )
        .await
        .unwrap();
    assert_eq!(remaps.items.len(), 1, "{point:?}: {:#?}", remaps.items);
    assert_eq!(
        remaps.items[0].status.as_ref().and_then(|s| s.phase),
        Some(RemapPhase::Succeeded)
    );
    let victim = wait_for(
        &cluster.api::<VirtualVolume>(),
        &victim.name_any(),
        "counted",
        |v| usage_extents(v).0 == 500,
    )
    .await;
    assert_eq!(usage_extents(&victim), (500, 400, 0), "{point:?}");
    assert_eq!(generation(&victim), 2, "{point:?}: released exactly once");
    cluster.assert_no_extent_mapped_twice().await;

    // Nothing leaked: every extent of the area is accounted for, once.
    let pool = cluster
        .pool_where("pool", "recounted", |s| s.allocated_bytes == 1_000 * ES)
        .await;
    assert_eq!(pool.total_bytes, 1_000 * ES);
    assert_eq!(pool.unallocated_bytes, 0, "{point:?}");
    assert_eq!(pool.in_use_bytes, 400 * ES, "{point:?}");
    restarted.stop().await;
}

impl Cluster {
    fn with_crash(
        mut config: tessera_operator::controllers::Config,
        point: CrashPoint,
    ) -> tessera_operator::controllers::Config {
        config.crash_at = Some(point);
        config
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_between_any_two_steps_allocates_exactly_once() {
    for point in POINTS {
        crash_and_restart_at(point).await;
    }
}
