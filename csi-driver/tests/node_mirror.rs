//! Mirror pairs on real node agents (seed 003; docs/mirror.md §7; `agent::mirror`): two agents
//! and an embedded API server, a primary staged on node a (NBD export) whose leg comes from
//! `status.mirror`, and the test playing the operator over node-control: SetMirrorLeg (the split
//! cut under a Quiesce hold), CollectDirty, CopyToLeg. The secondary lives on node b's area, so
//! node b's lender grants it to `status.mirror.writers`. A secondary staged on its own tracks
//! its writes (seed 003 §4.1 step 3), keeps them across an unstage (the dirty file) and says
//! `complete: false` after a restart. Runs without root (`--frontend nbd`).

mod node_support;

use std::path::PathBuf;

use bytes::Bytes;
use kube::api::{Patch, PatchParams};
use node_support::*;
use roaring::RoaringBitmap;
use serde_json::json;
use tessera_csi::agent::FrontendChoice;
use tessera_proto::node_control::v1::node_control_client::NodeControlClient;
use tessera_proto::node_control::v1::{
    CollectDirtyRequest, CollectDirtyResponse, CopyToLegRequest, LegMode, MirrorLegResponse,
    OperationRef, QuiesceRequest, RemapStepRequest, SetMirrorLegRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const PRIMARY: &str = "vol-p";
const SECONDARY: &str = "vol-s";
const PAIR: &str = "pair-1";
const EXTENTS: u64 = 4;
/// Where the secondary starts on node b's area (extent index), so a translation slip shows.
const S_SLOT: u64 = 6;
/// Seed 003 §8.5 scenario 8: sector 100.
const SECTOR_100: u64 = 100 * 512;

type Control = NodeControlClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>,
    >,
>;

async fn control(node: &Node) -> Control {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", node.agent.control_addr()))
            .expect("endpoint")
            .connect()
            .await
            .expect("node-control connects");
    NodeControlClient::with_interceptor(
        channel,
        Box::new(|mut request: Request<()>| {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {TOKEN}").parse().expect("metadata"),
            );
            Ok(request)
        }) as Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>,
    )
}

fn bits(v: &[u32]) -> RoaringBitmap {
    v.iter().copied().collect()
}

fn area_file(cluster: &Cluster, node: &str) -> PathBuf {
    cluster.path(&format!("{node}/areas/area-0.img"))
}

/// `length` bytes of `node`'s area at byte `at`.
fn area_bytes(cluster: &Cluster, node: &str, at: u64, length: u64) -> Vec<u8> {
    let area = std::fs::read(area_file(cluster, node)).expect("area file");
    area[at as usize..(at + length) as usize].to_vec()
}

/// The secondary's bytes at volume offset `offset` (it lives on node b's area from `S_SLOT`).
fn secondary_bytes(cluster: &Cluster, offset: u64, length: u64) -> Vec<u8> {
    area_bytes(cluster, "node-b", S_SLOT * ES + offset, length)
}

async fn set_mirror(cluster: &Cluster, volume: &str, link: serde_json::Value) {
    cluster
        .volumes()
        .patch_status(
            volume,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"mirror": link}})),
        )
        .await
        .expect("status.mirror written");
}

/// Two nodes (one 16 MiB area each); the primary on node a's area extents 0..4 published to
/// node a; the secondary on node b's area extents `S_SLOT..`, published to `secondary_access`.
/// `status.mirror` of both as the mirror controller writes it: the primary's leg `leg`, the
/// secondary written by node a.
async fn pair(cluster: &Cluster, leg: &str, secondary_access: Option<&str>) -> (Node, Node) {
    let a = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let b = cluster
        .start_node(cluster.node_args("node-b", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let primary: Vec<Option<(&str, u64)>> =
        (0..EXTENTS).map(|i| Some(("node-a-area-0", i))).collect();
    let secondary: Vec<Option<(&str, u64)>> = (0..EXTENTS)
        .map(|i| Some(("node-b-area-0", S_SLOT + i)))
        .collect();
    cluster
        .create_volume(PRIMARY, EXTENTS * ES, 1, &primary, Some("node-a"))
        .await;
    cluster
        .create_volume(SECONDARY, EXTENTS * ES, 1, &secondary, secondary_access)
        .await;
    set_mirror(
        cluster,
        SECONDARY,
        json!({"pair": PAIR, "role": "Secondary", "peer": PRIMARY, "leg": "Mirror",
               "writers": ["node-a"]}),
    )
    .await;
    set_mirror(
        cluster,
        PRIMARY,
        json!({"pair": PAIR, "role": "Primary", "peer": SECONDARY, "leg": leg}),
    )
    .await;
    (a, b)
}

/// Stages `volume` on `node` as Block (retrying while the lenders' grants catch up).
async fn stage(cluster: &Cluster, node: &Node, volume: &str) -> PathBuf {
    let staging = cluster.path(&format!("staging/{}/{volume}", node.id));
    eventually(30, "NodeStage", || async {
        node.stage(volume, &staging, block_cap()).await.ok()
    })
    .await;
    staging
}

fn set_leg(mode: LegMode, reset_dirty: bool, cut: &str) -> SetMirrorLegRequest {
    SetMirrorLegRequest {
        volume: PRIMARY.into(),
        secondary: SECONDARY.into(),
        mode: mode as i32,
        reset_dirty,
        cut: cut.into(),
    }
}

async fn collect(
    c: &mut Control,
    volume: &str,
    acknowledge: u64,
) -> (CollectDirtyResponse, RoaringBitmap) {
    let answer = c
        .collect_dirty(CollectDirtyRequest {
            volume: volume.into(),
            acknowledge,
        })
        .await
        .expect("CollectDirty")
        .into_inner();
    // The "not staged here" answer carries no bytes at all (not a serialized empty bitmap).
    let extents = if answer.extents.is_empty() {
        RoaringBitmap::new()
    } else {
        RoaringBitmap::deserialize_from(&answer.extents[..]).expect("roaring bits")
    };
    (answer, extents)
}

fn leg_of(answer: &CollectDirtyResponse) -> &MirrorLegResponse {
    answer.leg.as_ref().expect("leg in the answer")
}

fn cut_op(id: &str) -> Option<OperationRef> {
    Some(OperationRef {
        volume: PRIMARY.into(),
        operation_id: id.into(),
        attempt: 1,
        generation: 1,
    })
}

/// Writes `data` at `offset` of `volume`'s export on `node`, then flushes.
async fn write(node: &Node, volume: &str, offset: u64, data: &[u8]) {
    let client = node.nbd(volume).await;
    client
        .write(offset, Bytes::copy_from_slice(data), false)
        .await
        .expect("write");
    client.flush().await.expect("flush");
}

fn dirty_file(node: &Node, volume: &str) -> PathBuf {
    node.state_dir().join(format!("dirty/{volume}.bits"))
}

/// Seed 003 §8.5 scenario 8 on nodes: the primary staged on node a mirrors a write of sector 100
/// into the secondary on node b's area (granted to node a as a writer only: the secondary is
/// published to nobody), and reading the secondary after the pair is released gives it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s08_a_write_to_the_primary_lands_on_the_secondary_on_the_other_nodes_area() {
    let cluster = Cluster::start().await;
    let (a, b) = pair(&cluster, "Mirror", None).await;
    let staging = stage(&cluster, &a, PRIMARY).await;
    let mut ca = control(&a).await;
    let (answer, _) = collect(&mut ca, PRIMARY, 0).await;
    assert_eq!(leg_of(&answer).mode, LegMode::LegMirror as i32);
    assert_eq!(leg_of(&answer).secondary_generation, 1);

    let data = pattern(8, 512);
    write(&a, PRIMARY, SECTOR_100, &data).await;
    assert_eq!(
        secondary_bytes(&cluster, SECTOR_100, 512),
        data,
        "sector 100 of the secondary holds the primary's write"
    );
    // A write spanning an extent boundary lands at the same volume offsets too.
    let across = pattern(9, 8192);
    write(&a, PRIMARY, 2 * ES - 4096, &across).await;
    assert_eq!(secondary_bytes(&cluster, 2 * ES - 4096, 8192), across);
    assert_eq!(
        area_bytes(&cluster, "node-a", SECTOR_100, 512),
        data,
        "and the primary has it"
    );
    let (answer, _) = collect(&mut ca, PRIMARY, 0).await;
    assert_eq!(leg_of(&answer).failure, "", "the leg was never suspended");

    // The secondary on its own, staged on node b after the primary went: it reads the write.
    a.unstage(PRIMARY, &staging).await.expect("unstage primary");
    cluster.set_access_node(SECONDARY, Some("node-b")).await;
    let staging_b = stage(&cluster, &b, SECONDARY).await;
    let client = b.nbd(SECONDARY).await;
    assert_eq!(
        client.read(SECTOR_100, 512).await.expect("read"),
        Bytes::from(data)
    );
    drop(client);
    b.unstage(SECONDARY, &staging_b).await.expect("unstage");
    a.stop().await;
    b.stop().await;
}

/// The split cut: `reset_dirty` is refused unless the primary is held; under a Quiesce hold it
/// switches to Track and starts the bits afresh; after the Resume, a repeat of the same cut
/// message keeps the bits of writes made since, and the secondary stays frozen (scenario 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_cut_needs_a_hold_and_a_repeated_cut_keeps_later_bits() {
    let cluster = Cluster::start().await;
    let (a, b) = pair(&cluster, "Mirror", None).await;
    let staging = stage(&cluster, &a, PRIMARY).await;
    let mut ca = control(&a).await;
    let before = pattern(1, 4096);
    write(&a, PRIMARY, 0, &before).await;

    let refused = ca
        .set_mirror_leg(set_leg(LegMode::LegTrack, true, "c1"))
        .await
        .expect_err("a cut without a hold");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let (answer, still) = collect(&mut ca, PRIMARY, 0).await;
    assert_eq!(
        leg_of(&answer).mode,
        LegMode::LegMirror as i32,
        "the refused cut changed nothing"
    );
    assert_eq!(still, bits(&[0]));

    let held = ca
        .quiesce(QuiesceRequest {
            operation: cut_op("cut-1"),
            scope: None,
            hold_timeout_ms: 0,
        })
        .await
        .expect("quiesce")
        .into_inner();
    assert_eq!(held.state, "Held");
    let cut = ca
        .set_mirror_leg(set_leg(LegMode::LegTrack, true, "c1"))
        .await
        .expect("the cut under the hold")
        .into_inner();
    assert_eq!(
        (cut.state.as_str(), cut.mode),
        ("Held", LegMode::LegTrack as i32)
    );
    let resumed = ca
        .resume(RemapStepRequest {
            operation: cut_op("cut-1"),
        })
        .await
        .expect("resume")
        .into_inner();
    assert_eq!(resumed.state, "Running");

    // After the cut: tracked, not mirrored (the secondary keeps the image of the cut).
    let after = pattern(2, 4096);
    write(&a, PRIMARY, 2 * ES, &after).await;
    write(&a, PRIMARY, 0, &pattern(3, 4096)).await;
    assert_eq!(secondary_bytes(&cluster, 2 * ES, 4096), vec![0u8; 4096]);
    assert_eq!(
        secondary_bytes(&cluster, 0, 4096),
        before,
        "the secondary is frozen at the cut"
    );

    // The cut message again (a retry of the operator): accepted, not held, and it drops nothing.
    let repeated = ca
        .set_mirror_leg(set_leg(LegMode::LegTrack, true, "c1"))
        .await
        .expect("a repeated cut is a no-op")
        .into_inner();
    assert_eq!(
        (repeated.state.as_str(), repeated.mode),
        ("Running", LegMode::LegTrack as i32)
    );
    // Another cut outside a hold is still refused.
    let other = ca
        .set_mirror_leg(set_leg(LegMode::LegTrack, true, "c2"))
        .await
        .expect_err("a new cut needs a hold");
    assert_eq!(other.code(), Code::FailedPrecondition);
    let (_, dirty) = collect(&mut ca, PRIMARY, 0).await;
    assert_eq!(
        dirty,
        bits(&[0, 2]),
        "exactly the writes since the resume; the write before the cut is not dirty"
    );
    a.unstage(PRIMARY, &staging).await.expect("unstage");
    a.stop().await;
    b.stop().await;
}

/// CollectDirty in Track mode: exactly the written extents; an answer not acknowledged comes
/// back (with newer bits), an acknowledged one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collect_dirty_returns_written_extents_until_acknowledged() {
    let cluster = Cluster::start().await;
    let (a, b) = pair(&cluster, "Track", None).await;
    let staging = stage(&cluster, &a, PRIMARY).await;
    let mut ca = control(&a).await;
    let (first, nothing) = collect(&mut ca, PRIMARY, 0).await;
    assert!(nothing.is_empty(), "nothing written yet: {nothing:?}");
    assert!(first.complete);
    assert_eq!(leg_of(&first).mode, LegMode::LegTrack as i32);

    write(&a, PRIMARY, ES + 512, &pattern(4, 512)).await;
    // Spans extents 2 and 3.
    write(&a, PRIMARY, 3 * ES - 4096, &pattern(5, 8192)).await;
    let (one, dirty) = collect(&mut ca, PRIMARY, first.sequence).await;
    assert_eq!(dirty, bits(&[1, 2, 3]));
    assert_eq!(
        secondary_bytes(&cluster, ES + 512, 512),
        vec![0u8; 512],
        "Track does not write the secondary"
    );

    // The answer was lost: the operator asks again with its old acknowledgement.
    write(&a, PRIMARY, 0, &pattern(6, 512)).await;
    let (two, again) = collect(&mut ca, PRIMARY, first.sequence).await;
    assert!(two.sequence > one.sequence);
    assert_eq!(
        again,
        bits(&[0, 1, 2, 3]),
        "the same bits, plus the newer write"
    );
    // Acknowledging a superseded answer drops nothing.
    let (three, kept) = collect(&mut ca, PRIMARY, one.sequence).await;
    assert_eq!(kept, bits(&[0, 1, 2, 3]));
    // Acknowledging the last answer drops what it carried.
    let (four, gone) = collect(&mut ca, PRIMARY, three.sequence).await;
    assert!(gone.is_empty(), "{gone:?}");
    assert!(four.complete);
    write(&a, PRIMARY, 2 * ES, &pattern(7, 512)).await;
    let (_, later) = collect(&mut ca, PRIMARY, four.sequence).await;
    assert_eq!(later, bits(&[2]));
    a.unstage(PRIMARY, &staging).await.expect("unstage");
    a.stop().await;
    b.stop().await;
}

/// CopyToLeg (formation / resync pass) copies exactly the extents named, across nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_to_leg_copies_the_named_extents() {
    let cluster = Cluster::start().await;
    let (a, b) = pair(&cluster, "Track", None).await;
    let staging = stage(&cluster, &a, PRIMARY).await;
    let mut ca = control(&a).await;
    for extent in 0..EXTENTS {
        write(
            &a,
            PRIMARY,
            extent * ES,
            &pattern(10 + extent as u8, ES as usize),
        )
        .await;
    }
    assert_eq!(secondary_bytes(&cluster, ES, ES), vec![0u8; ES as usize]);

    let copy = |extents: &[u32], held: bool| {
        let mut bytes = Vec::new();
        bits(extents).serialize_into(&mut bytes).expect("roaring");
        CopyToLegRequest {
            volume: PRIMARY.into(),
            extents: bytes,
            held,
        }
    };
    let copied = ca
        .copy_to_leg(copy(&[1, 3], false))
        .await
        .expect("copy")
        .into_inner();
    assert_eq!(copied.bytes_copied, 2 * ES);
    for extent in 0..EXTENTS {
        let expected = if extent == 1 || extent == 3 {
            pattern(10 + extent as u8, ES as usize)
        } else {
            vec![0u8; ES as usize]
        };
        assert!(
            secondary_bytes(&cluster, extent * ES, ES) == expected,
            "secondary extent {extent} after copying 1 and 3"
        );
    }
    // Extents past the end are skipped, not an error.
    let past = ca
        .copy_to_leg(copy(&[0, 9], false))
        .await
        .expect("copy")
        .into_inner();
    assert_eq!(past.bytes_copied, ES);
    assert!(secondary_bytes(&cluster, 0, ES) == pattern(10, ES as usize));
    // A volume not staged here has nothing to copy.
    let absent = ca
        .copy_to_leg(CopyToLegRequest {
            volume: SECONDARY.into(),
            ..copy(&[0], false)
        })
        .await
        .expect_err("not staged");
    assert_eq!(absent.code(), Code::FailedPrecondition, "{absent:?}");
    a.unstage(PRIMARY, &staging).await.expect("unstage");
    a.stop().await;
    b.stop().await;
}

/// Seed 003 §4.1 step 3: the secondary staged on its own (node b) tracks its writes; after the
/// unstage CollectDirty still returns them from the dirty file until acknowledged; a new staging
/// before the acknowledgement reports the file's bits with its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secondary_used_on_its_own_reports_its_writes_across_an_unstage() {
    let cluster = Cluster::start().await;
    let (a, b) = pair(&cluster, "Track", Some("node-b")).await;
    let staging = stage(&cluster, &b, SECONDARY).await;
    let mut cb = control(&b).await;
    write(&b, SECONDARY, ES, &pattern(20, 4096)).await;
    write(&b, SECONDARY, 3 * ES + 512, &pattern(21, 512)).await;
    let (staged, dirty) = collect(&mut cb, SECONDARY, 0).await;
    assert_eq!(dirty, bits(&[1, 3]));
    assert!(staged.complete);
    assert_eq!(
        (leg_of(&staged).state.as_str(), leg_of(&staged).mode),
        ("Running", LegMode::LegNone as i32),
        "a secondary has no leg"
    );

    b.unstage(SECONDARY, &staging).await.expect("unstage");
    assert!(dirty_file(&b, SECONDARY).exists(), "bits kept on disk");
    let (file, kept) = collect(&mut cb, SECONDARY, staged.sequence).await;
    assert_eq!(
        kept,
        bits(&[1, 3]),
        "acknowledging the staged answer does not drop bits the unstage kept"
    );
    assert!(file.complete);
    assert!(file.sequence > staged.sequence);
    let (repeat, same) = collect(&mut cb, SECONDARY, 0).await;
    assert_eq!((repeat.sequence, same), (file.sequence, bits(&[1, 3])));

    // Staged again before the acknowledgement: the file's bits come with the new ones.
    let staging = stage(&cluster, &b, SECONDARY).await;
    write(&b, SECONDARY, 0, &pattern(22, 512)).await;
    let (merged, all) = collect(&mut cb, SECONDARY, file.sequence).await;
    assert_eq!(
        all,
        bits(&[0, 1, 3]),
        "the file's bits are not acknowledged by a stale sequence"
    );
    assert!(merged.sequence > file.sequence);
    let (_, still) = collect(&mut cb, SECONDARY, file.sequence).await;
    assert_eq!(still, bits(&[0, 1, 3]));
    b.unstage(SECONDARY, &staging).await.expect("unstage again");
    let (last, both) = collect(&mut cb, SECONDARY, 0).await;
    assert_eq!(both, bits(&[0, 1, 3]));

    // Acknowledged: the file goes, the answer is empty.
    let (acked, none) = collect(&mut cb, SECONDARY, last.sequence).await;
    assert!(none.is_empty() && acked.complete, "{acked:?}");
    assert!(!dirty_file(&b, SECONDARY).exists());
    let (after, none) = collect(&mut cb, SECONDARY, 0).await;
    assert!(none.is_empty() && after.complete);
    assert_eq!(leg_of(&after).state, "Absent");
    a.stop().await;
    b.stop().await;
}

/// A node restarted while a tracked secondary was staged lost the bits of its earlier writes:
/// it answers `complete: false` (with the bits it has) until the operator acknowledges such an
/// answer, and tracks again from the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_reports_its_secondary_incomplete_until_acknowledged() {
    let cluster = Cluster::start().await;
    let (a, b) = pair(&cluster, "Track", Some("node-b")).await;
    let staging = stage(&cluster, &b, SECONDARY).await;
    write(&b, SECONDARY, ES, &pattern(30, 512)).await;

    let args = b.args.clone();
    b.stop().await;
    let b = cluster.start_node(args).await;
    let mut cb = control(&b).await;
    let (first, _) = collect(&mut cb, SECONDARY, 0).await;
    assert!(!first.complete, "the bits before the restart are gone");
    assert_eq!(
        leg_of(&first).state,
        "Running",
        "restored from the mapping cache"
    );
    write(&b, SECONDARY, 2 * ES, &pattern(31, 512)).await;
    // Not acknowledged (the answer was lost): still incomplete, and the new write is tracked.
    let (second, dirty) = collect(&mut cb, SECONDARY, 0).await;
    assert!(!second.complete);
    assert_eq!(dirty, bits(&[2]));
    let (third, _) = collect(&mut cb, SECONDARY, first.sequence).await;
    assert!(
        !third.complete,
        "a superseded answer's acknowledgement does not count"
    );
    let (fourth, dirty) = collect(&mut cb, SECONDARY, third.sequence).await;
    assert!(
        fourth.complete,
        "acknowledged: the operator took every extent as dirty"
    );
    assert!(dirty.is_empty(), "{dirty:?}");
    b.unstage(SECONDARY, &staging).await.expect("unstage");
    assert!(
        !dirty_file(&b, SECONDARY).exists(),
        "nothing unacknowledged: no dirty file"
    );
    a.stop().await;
    b.stop().await;
}

/// While the pair's copy runs (`status.mirror.copying`), NodeStage of the primary waits: the
/// copy's final pass must hold every node that can write it (docs/mirror.md M-26).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_is_staged_only_once_its_mirror_copy_ended() {
    let cluster = Cluster::start().await;
    let (a, b) = pair(&cluster, "Mirror", None).await;
    set_mirror(
        &cluster,
        PRIMARY,
        json!({"pair": PAIR, "role": "Primary", "peer": SECONDARY, "leg": "Mirror",
               "copying": true}),
    )
    .await;
    let staging = cluster.path("staging/node-a/waits");
    {
        let staged = a.stage(PRIMARY, &staging, block_cap());
        tokio::pin!(staged);
        // Still waiting a while later: the copy has not ended.
        tokio::select! {
            result = &mut staged => panic!("NodeStage did not wait for the copy: {result:?}"),
            () = tokio::time::sleep(std::time::Duration::from_millis(1500)) => {}
        }
        set_mirror(
            &cluster,
            PRIMARY,
            json!({"pair": PAIR, "role": "Primary", "peer": SECONDARY, "leg": "Mirror",
                   "copying": false}),
        )
        .await;
        staged.await.expect("NodeStage once the copy ended");
    }
    a.unstage(PRIMARY, &staging).await.expect("unstage");
    a.stop().await;
    b.stop().await;
}
