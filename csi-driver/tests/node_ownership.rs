//! The lender's ownership ledger (agent/ownership.rs, docs/node-agent.md "Extent ownership"):
//! an extent that changes owner reads as zeros for the new owner — through a local open and
//! through a peer's extent server — while a live volume's data is never zeroed.

mod node_support;

use bytes::Bytes;
use kube::ResourceExt;
use kube::api::DeleteParams;
use node_support::*;
use tessera_api::model::AreaId;
use tessera_csi::agent::FrontendChoice;

/// Writes `pattern(seed)` over `extents` whole extents of `volume` (staged on `node`).
async fn fill(node: &Node, volume: &str, extents: u64, seed: u8) {
    let nbd = node.nbd(volume).await;
    for e in 0..extents {
        nbd.write(
            e * ES,
            Bytes::from(pattern(seed + e as u8, ES as usize)),
            false,
        )
        .await
        .expect("write");
    }
    nbd.flush().await.expect("flush");
    nbd.disconnect().await;
}

/// Reads extent `e` of `volume` (staged on `node`).
async fn read_extent(node: &Node, volume: &str, e: u64) -> Vec<u8> {
    let nbd = node.nbd(volume).await;
    let data = nbd.read(e * ES, ES as u32).await.expect("read").to_vec();
    nbd.disconnect().await;
    data
}

fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|b| *b == 0)
}

async fn uid_of(cluster: &Cluster, volume: &str) -> String {
    cluster
        .volumes()
        .get(volume)
        .await
        .expect("volume")
        .uid()
        .expect("uid")
}

async fn delete_volume(cluster: &Cluster, volume: &str) {
    cluster
        .volumes()
        .delete(volume, &DeleteParams::default())
        .await
        .expect("volume deleted");
    eventually(5, "volume gone", || async {
        cluster
            .volumes()
            .get_opt(volume)
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
}

/// Owner of `offset` in `area`'s ledger on `node`.
async fn owner_at(node: &Node, area: &str, offset: u64) -> Option<String> {
    let ledger = node
        .agent
        .ownership()
        .ledger(&AreaId::new(area))
        .await
        .expect("area ledger");
    ledger
        .parts(offset..offset + 1)
        .first()
        .and_then(|(_, owner)| owner.map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_staged_on_the_lender_never_reads_a_deleted_volumes_extents() {
    let cluster = Cluster::start().await;
    let a = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let area = "node-a-area-0";
    let old: Vec<Option<(&str, u64)>> = (0..3).map(|i| Some((area, 2 + i))).collect();
    cluster
        .create_volume("vol-old", 3 * ES, 1, &old, Some("node-a"))
        .await;
    let staging = cluster.path("a/staging/vol-old");
    a.stage("vol-old", &staging, block_cap())
        .await
        .expect("stage vol-old");
    fill(&a, "vol-old", 3, 10).await;
    a.unstage("vol-old", &staging).await.expect("unstage");
    let old_uid = uid_of(&cluster, "vol-old").await;
    delete_volume(&cluster, "vol-old").await;
    // Lazy: deletion zeroes nothing; the bytes and the last owner stay.
    assert_eq!(owner_at(&a, area, 3 * ES).await, Some(old_uid.clone()));

    // The next volume gets slots 3 and 4 (vol-old's extents 1 and 2) and a never-used slot 9.
    let new = [Some((area, 3)), Some((area, 4)), Some((area, 9))];
    cluster
        .create_volume("vol-new", 3 * ES, 1, &new, Some("node-a"))
        .await;
    let staging = cluster.path("a/staging/vol-new");
    a.stage("vol-new", &staging, block_cap())
        .await
        .expect("stage vol-new");
    for e in 0..3 {
        assert!(
            is_zero(&read_extent(&a, "vol-new", e).await),
            "extent {e} of vol-new shows a previous tenant's bytes"
        );
    }
    let new_uid = uid_of(&cluster, "vol-new").await;
    assert_eq!(owner_at(&a, area, 3 * ES).await, Some(new_uid.clone()));
    assert_eq!(owner_at(&a, area, 9 * ES).await, Some(new_uid.clone()));
    // Slot 2 was vol-old's and nobody took it: it keeps its last owner (and its bytes).
    assert_eq!(owner_at(&a, area, 2 * ES).await, Some(old_uid));

    // The new owner's own writes survive an unstage and a stage (no zeroing of its own data).
    fill(&a, "vol-new", 3, 40).await;
    a.unstage("vol-new", &staging).await.expect("unstage");
    a.stage("vol-new", &staging, block_cap())
        .await
        .expect("stage again");
    assert!(read_extent(&a, "vol-new", 1).await == pattern(41, ES as usize));
    a.unstage("vol-new", &staging).await.expect("unstage");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_borrower_never_reads_extents_released_by_a_reclaim_victim() {
    let cluster = Cluster::start().await;
    let a = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let b = cluster
        .start_node(cluster.node_args("node-b", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let area = "node-a-area-0";
    // The victim lives on node-a's area and is borrowed by node-b (remote I/O, grants).
    let victim: Vec<Option<(&str, u64)>> = (0..4).map(|i| Some((area, i))).collect();
    cluster
        .create_volume("vol-low", 4 * ES, 1, &victim, Some("node-b"))
        .await;
    let staging = cluster.path("b/staging/vol-low");
    b.stage("vol-low", &staging, block_cap())
        .await
        .expect("stage the victim");
    fill(&b, "vol-low", 4, 20).await;
    b.unstage("vol-low", &staging).await.expect("unstage");
    cluster.set_access_node("vol-low", None).await;

    // Reclaim releases extents 2 and 3 (holes at the next generation, D-17).
    cluster
        .set_mapping(
            "vol-low",
            4 * ES,
            2,
            &[Some((area, 0)), Some((area, 1)), None, None],
        )
        .await;
    // They go to another volume, also borrowed by node-b.
    cluster
        .create_volume(
            "vol-high",
            2 * ES,
            1,
            &[Some((area, 3)), Some((area, 2))],
            Some("node-b"),
        )
        .await;
    let staging_high = cluster.path("b/staging/vol-high");
    b.stage("vol-high", &staging_high, block_cap())
        .await
        .expect("stage the new owner");
    for e in 0..2 {
        assert!(
            is_zero(&read_extent(&b, "vol-high", e).await),
            "extent {e} of vol-high shows the reclaim victim's bytes"
        );
    }
    // The lender zeroed the area itself, not just what node-b was shown.
    let on_disk = std::fs::read(cluster.path("node-a/areas/area-0.img")).expect("area file");
    assert!(is_zero(&on_disk[(2 * ES) as usize..(4 * ES) as usize]));
    b.unstage("vol-high", &staging_high).await.expect("unstage");

    // The victim keeps what it still maps.
    cluster.set_access_node("vol-low", Some("node-b")).await;
    b.stage("vol-low", &staging, block_cap())
        .await
        .expect("stage the victim again");
    for e in 0..2 {
        assert!(
            read_extent(&b, "vol-low", e).await == pattern(20 + e as u8, ES as usize),
            "extent {e} of the victim lost its data"
        );
    }
    assert!(
        is_zero(&read_extent(&b, "vol-low", 2).await),
        "a hole reads zeros"
    );
    b.unstage("vol-low", &staging).await.expect("unstage");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_ledger_is_adopted_from_the_mappings_without_zeroing_live_data() {
    let cluster = Cluster::start().await;
    let args = cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd);
    let a = cluster.start_node(args.clone()).await;
    let area = "node-a-area-0";
    let live: Vec<Option<(&str, u64)>> = (0..2).map(|i| Some((area, 5 + i))).collect();
    cluster
        .create_volume("vol-live", 2 * ES, 1, &live, Some("node-a"))
        .await;
    cluster
        .create_volume("vol-gone", ES, 1, &[Some((area, 1))], Some("node-a"))
        .await;
    let staging = cluster.path("a/staging/vol-live");
    let staging_gone = cluster.path("a/staging/vol-gone");
    a.stage("vol-live", &staging, block_cap())
        .await
        .expect("stage");
    a.stage("vol-gone", &staging_gone, block_cap())
        .await
        .expect("stage");
    fill(&a, "vol-live", 2, 30).await;
    fill(&a, "vol-gone", 1, 90).await;
    a.unstage("vol-live", &staging).await.expect("unstage");
    a.unstage("vol-gone", &staging_gone).await.expect("unstage");
    delete_volume(&cluster, "vol-gone").await;
    a.stop().await;

    // The state is lost (an upgrade from a version without ledgers looks the same).
    let ledger = args.state_dir.join(format!("areas/{area}.owners.json"));
    std::fs::remove_file(&ledger).expect("ledger file existed");
    let a = cluster.start_node(args).await;
    assert!(ledger.exists(), "the adopted ledger is written at start");
    let live_uid = uid_of(&cluster, "vol-live").await;
    assert_eq!(owner_at(&a, area, 5 * ES).await, Some(live_uid.clone()));
    assert_eq!(owner_at(&a, area, 6 * ES).await, Some(live_uid));
    // Nobody maps slot 1 now: its owner is unknown, so its next owner gets it zeroed.
    assert_eq!(owner_at(&a, area, ES).await, None);

    a.stage("vol-live", &staging, block_cap())
        .await
        .expect("stage after the restart");
    for e in 0..2 {
        assert!(
            read_extent(&a, "vol-live", e).await == pattern(30 + e as u8, ES as usize),
            "adoption zeroed live extent {e}"
        );
    }
    a.unstage("vol-live", &staging).await.expect("unstage");
    cluster
        .create_volume("vol-next", ES, 1, &[Some((area, 1))], Some("node-a"))
        .await;
    let staging_next = cluster.path("a/staging/vol-next");
    a.stage("vol-next", &staging_next, block_cap())
        .await
        .expect("stage");
    assert!(is_zero(&read_extent(&a, "vol-next", 0).await));
    a.unstage("vol-next", &staging_next).await.expect("unstage");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ledger_survives_a_restart_and_still_zeroes_for_the_next_owner() {
    let cluster = Cluster::start().await;
    let args_a = cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd);
    let a = cluster.start_node(args_a.clone()).await;
    let b = cluster
        .start_node(cluster.node_args("node-b", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let area = "node-a-area-0";
    let extents: Vec<Option<(&str, u64)>> = (0..2).map(|i| Some((area, 7 + i))).collect();
    cluster
        .create_volume("vol-first", 2 * ES, 1, &extents, Some("node-b"))
        .await;
    let staging = cluster.path("b/staging/vol-first");
    b.stage("vol-first", &staging, block_cap())
        .await
        .expect("stage");
    fill(&b, "vol-first", 2, 60).await;
    b.unstage("vol-first", &staging).await.expect("unstage");
    let first_uid = uid_of(&cluster, "vol-first").await;
    a.stop().await;
    delete_volume(&cluster, "vol-first").await;

    // The deleted volume is still the recorded owner after the restart: the ledger came from
    // its file (adoption from the mappings could not know a deleted volume).
    let a = cluster.start_node(args_a).await;
    assert_eq!(owner_at(&a, area, 7 * ES).await, Some(first_uid.clone()));
    assert_eq!(owner_at(&a, area, 8 * ES).await, Some(first_uid));

    // The same name again is another volume (another uid): it reads zeros through node-b.
    cluster
        .create_volume("vol-first", 2 * ES, 1, &extents, Some("node-b"))
        .await;
    b.stage("vol-first", &staging, block_cap())
        .await
        .expect("stage the new volume of the same name");
    for e in 0..2 {
        assert!(
            is_zero(&read_extent(&b, "vol-first", e).await),
            "extent {e} of the recreated volume shows the deleted one's bytes"
        );
    }
    let second_uid = uid_of(&cluster, "vol-first").await;
    assert_eq!(owner_at(&a, area, 7 * ES).await, Some(second_uid));
    b.unstage("vol-first", &staging).await.expect("unstage");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expansion_onto_freed_extents_reads_zeros_there() {
    let cluster = Cluster::start().await;
    let a = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let area = "node-a-area-0";
    cluster
        .create_volume("vol-freed", ES, 1, &[Some((area, 5))], Some("node-a"))
        .await;
    let staging_freed = cluster.path("a/staging/vol-freed");
    a.stage("vol-freed", &staging_freed, block_cap())
        .await
        .expect("stage");
    fill(&a, "vol-freed", 1, 70).await;
    a.unstage("vol-freed", &staging_freed)
        .await
        .expect("unstage");
    delete_volume(&cluster, "vol-freed").await;

    cluster
        .create_volume("vol-grow", ES, 1, &[Some((area, 0))], Some("node-a"))
        .await;
    let staging = cluster.path("a/staging/vol-grow");
    a.stage("vol-grow", &staging, block_cap())
        .await
        .expect("stage");
    fill(&a, "vol-grow", 1, 80).await;
    // D-33 growth appends slot 5 (freed above) at generation 2; the node applies it.
    cluster
        .set_mapping("vol-grow", 2 * ES, 2, &[Some((area, 0)), Some((area, 5))])
        .await;
    let size = a
        .csi
        .clone()
        .node_expand_volume(tessera_proto::csi::v1::NodeExpandVolumeRequest {
            volume_id: "vol-grow".into(),
            volume_path: staging.display().to_string(),
            capacity_range: Some(tessera_proto::csi::v1::CapacityRange {
                required_bytes: (2 * ES) as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("expand")
        .into_inner()
        .capacity_bytes;
    assert_eq!(size, (2 * ES) as i64);
    assert!(
        is_zero(&read_extent(&a, "vol-grow", 1).await),
        "the appended extent shows the freed volume's bytes"
    );
    assert!(
        read_extent(&a, "vol-grow", 0).await == pattern(80, ES as usize),
        "the volume's own extent was zeroed by its growth"
    );
    a.unstage("vol-grow", &staging).await.expect("unstage");
    a.stop().await;
}
