//! Growing a Bound claim (ControllerExpandVolume raises `spec.sizeBytes`): the operator appends
//! runs for the new bytes past the old end of the volume's mapping at the next generation, then
//! raises the volume's `spec.sizeBytes`. Placement of the delta follows the same rules as an
//! allocation (copies on distinct nodes, `Single` stays in its area); a delta the unallocated
//! space does not admit leaves the claim Bound at its old size with `Expanded=False`.

mod controller_support;

use std::time::Duration;

use controller_support::*;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tessera_api::v1alpha1::{
    DataPriority, MappedRun, StorageArea, StorageClaim, StorageClaimSpec, VirtualVolume,
    VolumeLayout,
};
use tessera_operator::controllers::CrashPoint;

async fn resize(cluster: &Cluster, claim: &str, bytes: i64) {
    cluster
        .claims()
        .patch(
            claim,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sizeBytes": bytes}})),
        )
        .await
        .expect("claim resized");
}

async fn volume_of_size(cluster: &Cluster, volume: &str, bytes: i64) -> VirtualVolume {
    wait_for(
        &cluster.api::<VirtualVolume>(),
        volume,
        "grown",
        |v: &VirtualVolume| v.spec.size_bytes == bytes,
    )
    .await
}

fn runs(volume: &VirtualVolume) -> Vec<MappedRun> {
    volume
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map(|m| m.extents.clone())
        .unwrap_or_default()
}

fn mapped_end(volume: &VirtualVolume) -> i64 {
    runs(volume)
        .iter()
        .map(|r| r.offset + r.length)
        .max()
        .unwrap_or(0)
}

/// A run cut to a prefix: (offset, length, replicas as (area, area offset)).
type RunPrefix = (i64, i64, Vec<(String, i64)>);

/// The replica locations of the first `bytes` of a mapping, byte-exact per run start, so two
/// mappings can be compared over a prefix.
fn prefix(volume: &VirtualVolume, bytes: i64) -> Vec<RunPrefix> {
    runs(volume)
        .into_iter()
        .filter(|r| r.offset < bytes)
        .map(|r| {
            let len = r.length.min(bytes - r.offset);
            let replicas = r
                .replicas
                .iter()
                .map(|p| (p.area.clone(), p.area_offset))
                .collect();
            (r.offset, len, replicas)
        })
        .collect()
}

async fn create_claim_with(
    cluster: &Cluster,
    name: &str,
    extents: i64,
    copies: i32,
    layout: VolumeLayout,
) {
    let claim = StorageClaim::new(
        name,
        StorageClaimSpec {
            pool_name: "pool".into(),
            size_bytes: extents * ES,
            priority_class_name: "standard".into(),
            media_type: None,
            copies,
            layout,
            preferred_node: None,
        },
    );
    cluster
        .claims()
        .create(&PostParams::default(), &claim)
        .await
        .expect("claim created");
}

fn condition(claim: &StorageClaim, type_: &str) -> Option<(String, String)> {
    claim
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn growth_appends_extents_past_the_old_end_at_the_next_generation() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 100).await;
    cluster.create_claim("data", "pool", 10, "standard").await;
    let (_, before) = cluster.bound("data").await;
    assert_eq!(generation(&before), 1);

    // 12 extents and two blocks: 13 extents, the last one partial.
    let new_size = 12 * ES + 8192;
    resize(&cluster, "data", new_size).await;
    let after = volume_of_size(&cluster, &before.name_any(), new_size).await;
    assert_eq!(generation(&after), 2, "one mapping change");
    assert_eq!(
        mapped_end(&after),
        new_size,
        "the mapping covers the new size exactly"
    );
    assert_eq!(
        prefix(&after, 10 * ES),
        prefix(&before, 10 * ES),
        "the old bytes keep their places"
    );
    assert!(
        runs(&after).iter().all(|r| !r.replicas.is_empty()),
        "no hole: the new bytes are backed: {:?}",
        runs(&after)
    );
    let claim = wait_for(&cluster.claims(), "data", "expanded", |c: &StorageClaim| {
        condition(c, "Expanded") == Some(("True".into(), "Expanded".into()))
    })
    .await;
    let status = claim.status.unwrap();
    assert_eq!(status.allocated_bytes, Some(13 * ES));
    assert_eq!(status.observed_generation, claim.metadata.generation);
    cluster.event("data", "Expanded").await;
    let area = wait_for(
        &cluster.api::<StorageArea>(),
        "area-a",
        "counted",
        |a: &StorageArea| a.status.as_ref().and_then(|s| s.allocated_bytes) == Some(13 * ES),
    )
    .await;
    assert_eq!(area.status.unwrap().allocated_bytes, Some(13 * ES));
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}

#[tokio::test]
async fn growth_with_two_copies_keeps_every_run_on_two_nodes() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 30).await;
    cluster.create_area("area-b", "node-b", "pool", 30).await;
    cluster.create_area("area-c", "node-c", "pool", 30).await;
    create_claim_with(&cluster, "mirrored", 20, 2, VolumeLayout::Concatenated).await;
    let (_, before) = cluster.bound("mirrored").await;

    resize(&cluster, "mirrored", 35 * ES).await;
    let after = volume_of_size(&cluster, &before.name_any(), 35 * ES).await;
    assert_eq!(generation(&after), 2);
    assert_eq!(prefix(&after, 20 * ES), prefix(&before, 20 * ES));
    let node_of = |area: &str| area.trim_start_matches("area-").to_owned();
    for run in runs(&after) {
        assert_eq!(run.replicas.len(), 2, "{run:?}");
        assert_ne!(
            node_of(&run.replicas[0].area),
            node_of(&run.replicas[1].area),
            "replicas of one run share a node: {run:?}"
        );
    }
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}

#[tokio::test]
async fn single_layout_grows_inside_its_own_area() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    // Pack: a new placement takes the fullest area that can hold it.
    cluster
        .create_pool("pool", json!({"placement": {"strategy": "Pack"}}))
        .await;
    cluster.create_area("area-a", "node-a", "pool", 40).await;
    cluster.create_area("area-b", "node-b", "pool", 100).await;
    create_claim_with(&cluster, "single", 10, 1, VolumeLayout::Single).await;
    let (_, before) = cluster.bound("single").await;
    assert_eq!(runs(&before)[0].replicas[0].area, "area-a");
    // Fuller than area-a and able to hold the delta: where a fresh placement of 20 extents
    // would go.
    cluster.create_area("area-c", "node-c", "pool", 25).await;

    resize(&cluster, "single", 30 * ES).await;
    let after = volume_of_size(&cluster, &before.name_any(), 30 * ES).await;
    for run in runs(&after) {
        assert_eq!(run.replicas[0].area, "area-a", "{:?}", runs(&after));
    }
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}

#[tokio::test]
async fn growth_short_of_capacity_is_rejected_then_retried_when_an_area_comes() {
    let cluster = Cluster::start().await;
    let mut config = cluster.config("operator-0");
    // The retry of a rejected growth happens at the resync.
    config.resync = Duration::from_millis(500);
    let operator = cluster.spawn(config);
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 20).await;
    cluster.create_claim("data", "pool", 10, "standard").await;
    let (_, before) = cluster.bound("data").await;

    resize(&cluster, "data", 30 * ES).await;
    let claim = wait_for(
        &cluster.claims(),
        "data",
        "expansion rejected",
        |c: &StorageClaim| {
            condition(c, "Expanded") == Some(("False".into(), "InsufficientCapacity".into()))
        },
    )
    .await;
    assert_eq!(
        claim.status.as_ref().and_then(|s| s.phase),
        Some(tessera_api::v1alpha1::ClaimPhase::Bound),
        "the volume keeps working at its old size"
    );
    let note = cluster.event("data", "ExpansionRejected").await;
    assert!(note.contains("InsufficientCapacity"), "{note}");
    let unchanged = cluster
        .api::<VirtualVolume>()
        .get(&before.name_any())
        .await
        .unwrap();
    assert_eq!(unchanged.spec.size_bytes, 10 * ES);
    assert_eq!(generation(&unchanged), 1, "nothing was allocated");

    cluster.create_area("area-b", "node-b", "pool", 40).await;
    let after = volume_of_size(&cluster, &before.name_any(), 30 * ES).await;
    assert_eq!(generation(&after), 2);
    assert_eq!(mapped_end(&after), 30 * ES);
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}

#[tokio::test]
async fn concurrent_growths_never_map_an_extent_twice() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 200).await;
    let names = ["g0", "g1", "g2", "g3"];
    for name in names {
        cluster.create_claim(name, "pool", 5, "standard").await;
    }
    let mut volumes = Vec::new();
    for name in names {
        volumes.push(cluster.bound(name).await.1.name_any());
    }
    futures::future::join_all(names.iter().map(|n| resize(&cluster, n, 30 * ES))).await;
    for volume in &volumes {
        volume_of_size(&cluster, volume, 30 * ES).await;
    }
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}

/// Killed right after the mapping write, before `spec.sizeBytes` is raised: the restarted
/// operator raises the size without planning again (same generation, same runs).
#[tokio::test]
async fn a_crash_between_the_two_writes_is_finished_by_the_next_leader() {
    let cluster = Cluster::start().await;
    let setup = cluster.spawn(cluster.config("setup"));
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 100).await;
    cluster.create_claim("data", "pool", 10, "standard").await;
    let (_, before) = cluster.bound("data").await;
    setup.stop().await;

    let mut doomed_config = cluster.config("operator-0");
    doomed_config.crash_at = Some(CrashPoint::VolumeGrown);
    let doomed = cluster.spawn(doomed_config);
    resize(&cluster, "data", 25 * ES).await;
    assert_eq!(doomed.crashed().await, CrashPoint::VolumeGrown);
    let half = cluster
        .api::<VirtualVolume>()
        .get(&before.name_any())
        .await
        .unwrap();
    assert_eq!(mapped_end(&half), 25 * ES, "the mapping was written");
    assert_eq!(half.spec.size_bytes, 10 * ES, "the size was not raised yet");
    assert_eq!(generation(&half), 2);

    let restarted = cluster.spawn(cluster.config("operator-0"));
    let after = volume_of_size(&cluster, &before.name_any(), 25 * ES).await;
    assert_eq!(generation(&after), 2, "not planned a second time");
    assert_eq!(runs(&after), runs(&half));
    wait_for(&cluster.claims(), "data", "expanded", |c: &StorageClaim| {
        condition(c, "Expanded") == Some(("True".into(), "Expanded".into()))
    })
    .await;
    cluster.assert_no_extent_mapped_twice().await;
    restarted.stop().await;
}
