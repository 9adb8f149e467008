//! The MirrorPair controller against the embedded API server: secondary selection with
//! `ResizeToMatch` (JP 2001-318833 Fig. 24: S2202 grow, S2203 return the excess; seed 003 §8.5
//! scenario 12 with real volumes) and the links it writes on both volumes. No node plugin runs
//! here: the data path is covered by `e2e/tests/mirror.rs`.

mod controller_support;

use controller_support::*;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tessera_api::v1alpha1::*;

async fn setup(cluster: &Cluster) {
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 32).await;
    cluster.create_area("area-b", "node-b", "pool", 32).await;
}

/// A bound claim's volume, labelled as a secondary candidate.
async fn candidate(cluster: &Cluster, name: &str, extents: i64) -> VirtualVolume {
    cluster
        .create_claim(name, "pool", extents, "standard")
        .await;
    let (_, volume) = cluster.bound(name).await;
    cluster
        .api::<VirtualVolume>()
        .patch(
            &volume.name_any(),
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "labels": { MIRROR_ROLE_LABEL: "SecondaryCandidate" } } }),
            ),
        )
        .await
        .unwrap()
}

async fn create_pair(cluster: &Cluster, primary: &str) {
    let pair: MirrorPair = serde_json::from_value(json!({
        "apiVersion": "tessera.io/v1alpha1",
        "kind": "MirrorPair",
        "metadata": { "name": "pair" },
        "spec": { "primary": primary, "secondarySelection": "ResizeToMatch" },
    }))
    .unwrap();
    cluster
        .api::<MirrorPair>()
        .create(&PostParams::default(), &pair)
        .await
        .unwrap();
}

/// Both volumes linked to the pair (the pair flag, JP 203).
async fn linked(cluster: &Cluster, primary: &str, secondary: &str) {
    for (volume, role) in [
        (primary, MirrorRole::Primary),
        (secondary, MirrorRole::Secondary),
    ] {
        wait_for(
            &cluster.api::<VirtualVolume>(),
            volume,
            "linked to the pair",
            |v: &VirtualVolume| {
                v.status
                    .as_ref()
                    .and_then(|s| s.mirror.as_ref())
                    .is_some_and(|l| l.pair == "pair" && l.role == role)
            },
        )
        .await;
    }
}

fn mapped_extents(volume: &VirtualVolume) -> i64 {
    volume
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map_or(0, |m| {
            m.extents
                .iter()
                .filter(|r| !r.replicas.is_empty())
                .map(|r| r.length / ES)
                .sum()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s12_resize_to_match_returns_the_excess_of_a_larger_secondary() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    setup(&cluster).await;
    cluster.create_claim("vol-0", "pool", 4, "standard").await;
    let (_, primary) = cluster.bound("vol-0").await;
    let larger = candidate(&cluster, "vol-1", 6).await;
    create_pair(&cluster, &primary.name_any()).await;

    // The excess (extents 4 and 5) goes back to the pool by a releaseRanges remap.
    let remap = wait_for(
        &cluster.api::<VolumeRemap>(),
        "mirror-resize-pair",
        "Succeeded",
        |r: &VolumeRemap| r.status.as_ref().and_then(|s| s.phase) == Some(RemapPhase::Succeeded),
    )
    .await;
    let ranges = &remap.spec.operation.release_ranges.as_ref().unwrap().ranges;
    assert_eq!(
        (ranges[0].offset, ranges[0].length),
        (4 * ES, 2 * ES),
        "{ranges:?}"
    );
    assert_eq!(remap.spec.volume_name, larger.name_any());
    linked(&cluster, &primary.name_any(), &larger.name_any()).await;
    let after = cluster
        .api::<VirtualVolume>()
        .get(&larger.name_any())
        .await
        .unwrap();
    assert_eq!(
        mapped_extents(&after),
        4,
        "the secondary keeps the primary's size"
    );
    let pair = cluster.api::<MirrorPair>().get("pair").await.unwrap();
    assert_eq!(
        pair.status.and_then(|s| s.secondary_name),
        Some(larger.name_any())
    );
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s12_resize_to_match_grows_a_smaller_secondary_through_its_claim() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    setup(&cluster).await;
    cluster.create_claim("vol-0", "pool", 4, "standard").await;
    let (_, primary) = cluster.bound("vol-0").await;
    let smaller = candidate(&cluster, "vol-1", 2).await;
    create_pair(&cluster, &primary.name_any()).await;

    let grown = wait_for(
        &cluster.api::<VirtualVolume>(),
        &smaller.name_any(),
        "grown to the primary's size",
        |v: &VirtualVolume| v.spec.size_bytes == 4 * ES && mapped_extents(v) == 4,
    )
    .await;
    let claim = cluster.claims().get("vol-1").await.unwrap();
    assert_eq!(claim.spec.size_bytes, 4 * ES);
    linked(&cluster, &primary.name_any(), &grown.name_any()).await;
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}
