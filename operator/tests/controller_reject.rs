//! Claims that cannot be satisfied are Rejected and nothing changes (seed 000 600/602,
//! [0045]–[0046]; §8.6 scenarios 9 and 10), and attached victims are skipped with a Warning
//! until the remap protocol can quiesce them.

mod controller_support;

use controller_support::*;
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use tessera_api::v1alpha1::{ClaimPhase, DataPriority, StorageClaim, VirtualVolume, VolumeRemap};

/// A pool holding only VAREA01 in the [0025] state: U = 1, F = 50000, L = 10000. (One spare
/// block: under Strict admission a first claim exactly the size of an empty pool is refused.)
async fn varea01_pool(cluster: &Cluster) -> VirtualVolume {
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster
        .create_area("area-a", "node-a", "pool", 100_001)
        .await;
    cluster
        .create_claim("varea01", "pool", 100_000, "standard")
        .await;
    let (_, volume) = cluster.bound("varea01").await;
    cluster
        .report_usage(
            &volume.name_any(),
            &[(0..40_000, true), (40_000..50_000, false)],
        )
        .await;
    cluster
        .pool_where("pool", "accounted", |s| s.in_use_bytes == 50_000 * ES)
        .await;
    cluster
        .api::<VirtualVolume>()
        .get(&volume.name_any())
        .await
        .unwrap()
}

async fn rejected(cluster: &Cluster, name: &str) -> StorageClaim {
    wait_for(&cluster.claims(), name, "Rejected", |c: &StorageClaim| {
        c.status.as_ref().and_then(|s| s.phase) == Some(ClaimPhase::Rejected)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsatisfiable_claims_are_rejected_and_nothing_changes() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    let varea01 = varea01_pool(&cluster).await;
    let pool_before = cluster.pool_status("pool").await;

    // Scenario 9: 70000 > 1 + 50000 + 10000.
    cluster
        .create_claim("too-big", "pool", 70_000, "standard")
        .await;
    let claim = rejected(&cluster, "too-big").await;
    let status = claim.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("InsufficientCapacity"));
    let message = status.message.unwrap();
    assert!(
        message.contains("needs 70000 extents but at most 60001 can be made free"),
        "{message}"
    );
    assert!(status.volume_name.is_none());
    let event = cluster.event("too-big", "AllocationRejected").await;
    assert!(event.starts_with("InsufficientCapacity"), "{event}");
    assert_eq!(cluster.events_about("too-big").await[0].0, "Warning");

    // Scenario 10: exactly 60001 = U + F + L; the patent's strict "more than" refuses it.
    cluster
        .create_claim("exactly", "pool", 60_001, "standard")
        .await;
    rejected(&cluster, "exactly").await;
    cluster.event("exactly", "AllocationRejected").await;

    // Nothing changed: no return was asked for, no volume created, VAREA01 untouched, the pool
    // counters the same — and the pool says its capacity is exhausted.
    let remaps = cluster
        .api::<VolumeRemap>()
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(remaps.items.is_empty(), "{:?}", remaps.items);
    let volumes = cluster
        .api::<VirtualVolume>()
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(volumes.items.len(), 1);
    let now = &volumes.items[0];
    assert_eq!(
        now.status.as_ref().unwrap().mapping,
        varea01.status.as_ref().unwrap().mapping
    );
    assert_eq!(usage_extents(now), (100_000, 50_000, 40_000));
    let pool_after = cluster
        .pool_where("pool", "exhausted", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "CapacityExhausted" && c.status == "True")
        })
        .await;
    for (before, after) in [
        (pool_before.total_bytes, pool_after.total_bytes),
        (pool_before.allocated_bytes, pool_after.allocated_bytes),
        (pool_before.unallocated_bytes, pool_after.unallocated_bytes),
        (pool_before.in_use_bytes, pool_after.in_use_bytes),
        (
            pool_before.high_priority_bytes,
            pool_after.high_priority_bytes,
        ),
    ] {
        assert_eq!(before, after);
    }
    // Rejected is final for the claim's generation: it is not retried.
    let reconciles = operator.metrics.reconcile_count("claim");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(operator.metrics.reconcile_count("claim") <= reconciles + 1);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attached_victims_are_skipped_with_a_warning() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    let varea01 = varea01_pool(&cluster).await;
    // ControllerPublish gave the volume to node-a: its I/O cannot be held yet.
    cluster
        .api::<VirtualVolume>()
        .patch(
            &varea01.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"accessNode": "node-a"}})),
        )
        .await
        .unwrap();
    wait_for(
        &cluster.api::<VirtualVolume>(),
        &varea01.name_any(),
        "Attached",
        |v: &VirtualVolume| {
            v.status.as_ref().and_then(|s| s.phase)
                == Some(tessera_api::v1alpha1::VolumePhase::Attached)
        },
    )
    .await;

    // 30000 would come from VAREA01's unused blocks, but VAREA01 is attached.
    cluster
        .create_claim("wants-space", "pool", 30_000, "standard")
        .await;
    let claim = rejected(&cluster, "wants-space").await;
    let message = claim.status.unwrap().message.unwrap();
    assert!(
        message.contains("attached") && message.contains(&varea01.name_any()),
        "{message}"
    );
    let warning = cluster.event("wants-space", "VictimSkipped").await;
    assert!(
        warning.contains(&varea01.name_any()) && warning.contains("node-a"),
        "{warning}"
    );
    assert!(
        cluster
            .api::<VolumeRemap>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let now = cluster
        .api::<VirtualVolume>()
        .get(&varea01.name_any())
        .await
        .unwrap();
    assert_eq!(generation(&now), 1);
    operator.stop().await;
}
