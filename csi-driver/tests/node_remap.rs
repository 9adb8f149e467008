//! The remap steps of seed 004 on real node agents (docs/remap.md "Node wiring"): two agents and
//! an embedded API server, one multi-writer Block volume staged on both (NBD exports), I/O
//! running through both exports while the test plays the coordinator: StageMapping, Quiesce,
//! CopyExtents, Commit, (mapping recorded), Resume — and the rollback, restart-inside-a-hold and
//! stale/duplicate paths. Runs without root (`--frontend nbd`).

mod node_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kube::api::{Patch, PatchParams};
use node_support::*;
use serde_json::json;
use tessera_api::v1alpha1::AttachmentState;
use tessera_csi::agent::FrontendChoice;
use tessera_proto::node_control::v1::node_control_client::NodeControlClient;
use tessera_proto::node_control::v1::{
    CopyExtentsRequest, GetGateStateRequest, HoldScope, MappedRun, Mapping, OperationRef,
    QuiesceRequest, RemapStepRequest, RemapStepResponse, Replica, StageMappingRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const VOLUME: &str = "vol-remap";
const EXTENTS: u64 = 4;
const BLOCK: u64 = 4096;
/// Blocks the load leaves alone: the test's own probe writes go there.
const PROBE_BLOCKS: [u64; 2] = [3, ES / BLOCK + 7];

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

/// The wire mapping of consecutive 1 MiB extents at `(area, area extent index)`.
fn wire(generation: i64, extents: &[(&str, u64)]) -> Mapping {
    Mapping {
        generation,
        extent_size_bytes: ES as i64,
        size_bytes: (EXTENTS * ES) as i64,
        runs: extents
            .iter()
            .enumerate()
            .map(|(i, (area, index))| MappedRun {
                offset: (i as u64 * ES) as i64,
                length: ES as i64,
                replicas: vec![Replica {
                    area: area.to_string(),
                    area_offset: (index * ES) as i64,
                }],
            })
            .collect(),
    }
}

fn op(id: &str, attempt: u32, generation: i64) -> Option<OperationRef> {
    Some(OperationRef {
        volume: VOLUME.into(),
        operation_id: id.into(),
        attempt,
        generation,
    })
}

fn step(id: &str, attempt: u32, generation: i64) -> RemapStepRequest {
    RemapStepRequest {
        operation: op(id, attempt, generation),
    }
}

/// Hold scope of extent `index`.
fn extent_scope(index: u64) -> Option<HoldScope> {
    Some(HoldScope {
        ranges: vec![tessera_proto::node_control::v1::ByteRange {
            offset: (index * ES) as i64,
            length: ES as i64,
        }],
    })
}

async fn stage(c: &mut Control, id: &str, mapping: Mapping) -> Result<RemapStepResponse, Status> {
    let generation = mapping.generation;
    c.stage_mapping(StageMappingRequest {
        operation: op(id, 1, generation),
        mapping: Some(mapping),
    })
    .await
    .map(|r| r.into_inner())
}

async fn quiesce(
    c: &mut Control,
    id: &str,
    generation: i64,
    scope: Option<HoldScope>,
) -> Result<RemapStepResponse, Status> {
    c.quiesce(QuiesceRequest {
        operation: op(id, 1, generation),
        scope,
        hold_timeout_ms: 0,
    })
    .await
    .map(|r| r.into_inner())
}

async fn gate_state(c: &mut Control) -> (String, i64, String) {
    let s = c
        .get_gate_state(GetGateStateRequest {
            volume: VOLUME.into(),
        })
        .await
        .expect("gate state")
        .into_inner();
    (s.state, s.active_generation, s.operation_id)
}

/// Two nodes, one area each (16 MiB), the volume on extents a0, a1, b0, b1 (gen 1), shared by
/// both nodes and staged on both as Block (NBD only).
async fn two_nodes_one_volume(cluster: &Cluster) -> (Node, Node) {
    let a = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let b = cluster
        .start_node(cluster.node_args("node-b", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    cluster
        .create_volume(
            VOLUME,
            EXTENTS * ES,
            1,
            &[
                Some(("node-a-area-0", 0)),
                Some(("node-a-area-0", 1)),
                Some(("node-b-area-0", 0)),
                Some(("node-b-area-0", 1)),
            ],
            Some("node-a"),
        )
        .await;
    cluster
        .volumes()
        .patch(
            VOLUME,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"accessNode": null, "sharedAccessNodes": ["node-a", "node-b"]}}),
            ),
        )
        .await
        .expect("shared access");
    for node in [&a, &b] {
        let staging = cluster.path(&format!("staging/{}", node.id));
        eventually(20, "stage on both nodes", || async {
            node.stage(VOLUME, &staging, block_cap()).await.ok()
        })
        .await;
    }
    (a, b)
}

/// Writes status.mapping (the coordinator's RecordMapping) and waits until each lender's grant
/// to the other node carries `generation` (the extent servers follow the committed mapping).
async fn record_mapping(
    cluster: &Cluster,
    a: &Node,
    b: &Node,
    generation: i64,
    extents: &[(&str, u64)],
) {
    let opt: Vec<Option<(&str, u64)>> = extents.iter().copied().map(Some).collect();
    cluster
        .set_mapping(VOLUME, EXTENTS * ES, generation, &opt)
        .await;
    for (lender, peer) in [(a, "node-b"), (b, "node-a")] {
        let auth = lender.agent.extent_authorization().expect("extent server");
        eventually(10, "grant follows the recorded mapping", || {
            let auth = Arc::clone(&auth);
            async move {
                (auth.generation(peer, VOLUME)
                    == Some(tessera_api::model::Generation(generation as u64)))
                .then_some(())
            }
        })
        .await;
    }
}

/// I/O load: each node's writer owns every other 4 KiB block of the volume (node a even, node b
/// odd), writes versioned patterns and reads its own blocks back, counting errors. The last
/// acknowledged version of every block is recorded for the final check.
struct Load {
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    ops: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u8>>>,
}

fn block_data(block: u64, version: u8) -> Bytes {
    let mut data = pattern(version, BLOCK as usize);
    data[..8].copy_from_slice(&block.to_le_bytes());
    Bytes::from(data)
}

async fn start_load(a: &Node, b: &Node) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let blocks = EXTENTS * ES / BLOCK;
    let mut tasks = Vec::new();
    for (parity, node) in [a, b].into_iter().enumerate() {
        let client = Arc::new(node.nbd(VOLUME).await);
        let (stop, errors, ops) = (stop.clone(), errors.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            // versions[i] = last acknowledged version of block 2i + parity (0: never written).
            let mut versions = vec![0u8; (blocks / 2) as usize];
            let mut x = 0x2545_f491_u64 + parity as u64;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let slot = ((x >> 33) % (blocks / 2)) as usize;
                let block = slot as u64 * 2 + parity as u64;
                if PROBE_BLOCKS.contains(&block) {
                    continue;
                }
                let version = versions[slot].wrapping_add(1).max(1);
                match client
                    .write(block * BLOCK, block_data(block, version), false)
                    .await
                {
                    Ok(()) => versions[slot] = version,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                match client.read(block * BLOCK, BLOCK as u32).await {
                    Ok(data) if data == block_data(block, version) => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
            let _ = client.flush().await;
            versions
        }));
    }
    Load {
        stop,
        errors,
        ops,
        tasks,
    }
}

impl Load {
    /// Stops the writers and checks every block on both nodes against its last acknowledged
    /// version.
    async fn finish(self, a: &Node, b: &Node) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut versions = Vec::new();
        for task in self.tasks {
            versions.push(task.await.expect("load task"));
        }
        assert_eq!(
            self.errors.load(Ordering::Relaxed),
            0,
            "no I/O error during the remap"
        );
        for node in [a, b] {
            let client = node.nbd(VOLUME).await;
            for (parity, versions) in versions.iter().enumerate() {
                for (slot, version) in versions.iter().enumerate() {
                    if *version == 0 {
                        continue;
                    }
                    let block = slot as u64 * 2 + parity as u64;
                    let data = client
                        .read(block * BLOCK, BLOCK as u32)
                        .await
                        .expect("read");
                    assert!(
                        data == block_data(block, *version),
                        "block {block} on {} is not its last acknowledged write",
                        node.id
                    );
                }
            }
        }
        self.ops.load(Ordering::Relaxed)
    }
}

fn area_file(cluster: &Cluster, node: &str) -> std::path::PathBuf {
    cluster.path(&format!("{node}/areas/area-0.img"))
}

async fn attachment_state(cluster: &Cluster, node: &str) -> Option<AttachmentState> {
    let volume = cluster.volumes().get(VOLUME).await.ok()?;
    volume
        .status?
        .attachments
        .into_iter()
        .find(|a| a.node == node)
        .map(|a| a.state)
}

const GEN1: [(&str, u64); 4] = [
    ("node-a-area-0", 0),
    ("node-a-area-0", 1),
    ("node-b-area-0", 0),
    ("node-b-area-0", 1),
];
/// Extent 1 moves from node a's area (extent 1) to node b's area (extent 5).
const GEN2: [(&str, u64); 4] = [
    ("node-a-area-0", 0),
    ("node-b-area-0", 5),
    ("node-b-area-0", 0),
    ("node-b-area-0", 1),
];

/// AS-01 (staged path, two nodes), AS-02 (held I/O parks, nothing fails), AS-03 (parked requests
/// run on the new map), AS-04 (I/O outside the held extent runs during the hold), AS-27
/// (repeats get the recorded answer), stale messages refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as01_remap_under_load_moves_an_extent_with_no_io_error() {
    let cluster = Cluster::start().await;
    let (a, b) = two_nodes_one_volume(&cluster).await;
    let (mut ca, mut cb) = (control(&a).await, control(&b).await);
    let load = start_load(&a, &b).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Stage: no I/O impact; a stale generation is refused.
    for c in [&mut ca, &mut cb] {
        let staged = stage(c, "op-1", wire(2, &GEN2)).await.expect("staged");
        assert_eq!(
            (staged.state.as_str(), staged.active_generation),
            ("Running", 1)
        );
    }
    let stale = stage(&mut ca, "op-1", wire(1, &GEN1))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");

    // Commit before the hold: refused (706 N).
    let early = ca.commit(step("op-1", 1, 2)).await.expect_err("not held");
    assert_eq!(early.code(), Code::FailedPrecondition);
    assert!(early.message().contains("not held"), "{}", early.message());

    // Quiesce extent 1 on both: answered held (drained).
    for c in [&mut ca, &mut cb] {
        let held = quiesce(c, "op-1", 2, extent_scope(1))
            .await
            .expect("quiesced");
        assert_eq!((held.state.as_str(), held.active_generation), ("Held", 1));
    }
    // AS-27: a repeated Quiesce gets the same answer.
    let again = quiesce(&mut ca, "op-1", 2, extent_scope(1))
        .await
        .expect("repeat");
    assert_eq!(again.state, "Held");
    // The hold is in the mapping cache before the answer (§11.4).
    let cached = std::fs::read_to_string(a.state_dir().join(format!("mappings/{VOLUME}.json")))
        .expect("cache");
    assert!(cached.contains("\"operationId\": \"op-1\""), "{cached}");

    // AS-02/AS-03: a write to the held extent parks; AS-04: one elsewhere completes at once.
    let probe = Arc::new(a.nbd(VOLUME).await);
    let marker = Bytes::from(pattern(0xA5, BLOCK as usize));
    let parked = tokio::spawn({
        let probe = Arc::clone(&probe);
        let marker = marker.clone();
        async move { probe.write(ES + 7 * BLOCK, marker, true).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !parked.is_finished(),
        "a write to the held extent must park"
    );
    tokio::time::timeout(
        Duration::from_secs(2),
        probe.write(3 * BLOCK, block_data(3, 1), false),
    )
    .await
    .expect("a write outside the held extent is not held")
    .expect("write");

    // Copy extent 1 to node b's area extent 5 (node b reaches the source through node a's
    // extent server), then commit on both.
    let copied = cb
        .copy_extents(CopyExtentsRequest {
            operation: op("op-1", 1, 2),
            offset: ES as i64,
            length: ES as i64,
            destination: vec![Replica {
                area: "node-b-area-0".into(),
                area_offset: (5 * ES) as i64,
            }],
        })
        .await
        .expect("copy")
        .into_inner();
    assert_eq!(copied.bytes_copied, ES);
    for c in [&mut ca, &mut cb] {
        let committed = c
            .commit(step("op-1", 1, 2))
            .await
            .expect("commit")
            .into_inner();
        assert_eq!(
            (committed.state.as_str(), committed.active_generation),
            ("Held", 2)
        );
    }
    // AS-27: a duplicate Commit gets the same answer; a Commit of another generation is refused.
    let dup = ca
        .commit(step("op-1", 1, 2))
        .await
        .expect("repeat")
        .into_inner();
    assert_eq!(dup.active_generation, 2);
    let other = ca
        .commit(step("op-1", 1, 3))
        .await
        .expect_err("not the held step");
    assert_eq!(other.code(), Code::FailedPrecondition);
    // Another operation while op-1 holds the volume is refused.
    let foreign = stage(&mut ca, "op-x", wire(3, &GEN1))
        .await
        .expect_err("other op");
    assert!(foreign.message().contains("op-1"), "{}", foreign.message());

    record_mapping(&cluster, &a, &b, 2, &GEN2).await;
    for c in [&mut ca, &mut cb] {
        let resumed = c
            .resume(step("op-1", 1, 2))
            .await
            .expect("resume")
            .into_inner();
        assert_eq!(
            (resumed.state.as_str(), resumed.active_generation),
            ("Running", 2)
        );
    }
    // The parked write ran on generation 2 after the resume.
    tokio::time::timeout(Duration::from_secs(5), parked)
        .await
        .expect("parked write dispatched at resume")
        .expect("task")
        .expect("parked write succeeded");
    // A late repeat of the answered Quiesce replays its answer (AS-27) and sets no hold.
    quiesce(&mut ca, "op-1", 2, extent_scope(1))
        .await
        .expect("replayed");
    assert_eq!(
        gate_state(&mut ca).await.0,
        "Running",
        "a repeat sets no hold"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let ops = load.finish(&a, &b).await;
    assert!(ops > 0, "the load ran");
    // Bytes of extent 1 now live on node b's area extent 5, none of it on node a's extent 1
    // after the move: the probe write landed there.
    let area_b = std::fs::read(area_file(&cluster, "node-b")).expect("area b");
    let at = (5 * ES + 7 * BLOCK) as usize;
    assert_eq!(
        &area_b[at..at + BLOCK as usize],
        &marker[..],
        "parked write on the new area"
    );
    let client = b.nbd(VOLUME).await;
    let whole = client.read(ES, ES as u32).await.expect("read extent 1");
    assert_eq!(
        &area_b[(5 * ES) as usize..(6 * ES) as usize],
        &whole[..],
        "extent 1 is served from node b's area extent 5"
    );
    for c in [&mut ca, &mut cb] {
        assert_eq!(gate_state(c).await.0, "Running");
    }
    eprintln!("remap under load: {ops} write+read pairs, no I/O error");
    a.stop().await;
    b.stop().await;
}

/// AS-12 (rollback after a commit): both nodes commit, the coordinator rolls back; the old map is
/// active again, parked I/O runs on it, data written before the hold is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as12_rollback_restores_the_previous_map() {
    let cluster = Cluster::start().await;
    let (a, b) = two_nodes_one_volume(&cluster).await;
    let (mut ca, mut cb) = (control(&a).await, control(&b).await);
    let client = a.nbd(VOLUME).await;
    let before = Bytes::from(pattern(7, ES as usize));
    client.write(ES, before.clone(), true).await.expect("write");

    for c in [&mut ca, &mut cb] {
        stage(c, "op-rb", wire(2, &GEN2)).await.expect("staged");
        quiesce(c, "op-rb", 2, None)
            .await
            .expect("held (whole volume)");
        let committed = c
            .commit(step("op-rb", 1, 2))
            .await
            .expect("commit")
            .into_inner();
        assert_eq!(committed.active_generation, 2);
    }
    let parked = tokio::spawn(async move {
        let r = client.read(ES, ES as u32).await;
        (client, r)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!parked.is_finished(), "a whole-volume hold parks reads too");
    for c in [&mut ca, &mut cb] {
        let rolled = c
            .rollback(step("op-rb", 1, 2))
            .await
            .expect("rollback")
            .into_inner();
        assert_eq!(
            (rolled.state.as_str(), rolled.active_generation),
            ("Held", 1)
        );
        // AS-12: the rolled-back step's commit is void, also when repeated.
        let void = c
            .commit(step("op-rb", 1, 2))
            .await
            .expect_err("void commit");
        assert!(void.message().contains("rolled back"), "{}", void.message());
        let resumed = c
            .resume(step("op-rb", 1, 2))
            .await
            .expect("resume")
            .into_inner();
        assert_eq!(
            (resumed.state.as_str(), resumed.active_generation),
            ("Running", 1)
        );
    }
    let (_client, read) = tokio::time::timeout(Duration::from_secs(5), parked)
        .await
        .expect("parked read dispatched")
        .expect("task");
    assert_eq!(
        read.expect("read"),
        before,
        "the parked read ran on the old map"
    );
    let area_a = std::fs::read(area_file(&cluster, "node-a")).expect("area a");
    assert_eq!(&area_a[ES as usize..2 * ES as usize], &before[..]);
    a.stop().await;
    b.stop().await;
}

/// AS-18: a node plugin restarted inside a hold comes back held (mapping cache), reports
/// `state: Held` in the attachment, never resumes by itself, and serves once the coordinator
/// resumes it. AS-26 (fence): a fenced gate fails I/O and refuses Resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as18_restart_inside_a_hold_comes_back_held_and_as26_fence() {
    let cluster = Cluster::start().await;
    let (a, b) = two_nodes_one_volume(&cluster).await;
    let mut ca = control(&a).await;
    stage(&mut ca, "op-rs", wire(2, &GEN2))
        .await
        .expect("staged");
    quiesce(&mut ca, "op-rs", 2, extent_scope(1))
        .await
        .expect("held");
    eventually(10, "attachment says Held", || async {
        (attachment_state(&cluster, "node-a").await == Some(AttachmentState::Held)).then_some(())
    })
    .await;

    let args = a.args.clone();
    a.stop().await;
    let a = cluster.start_node(args).await;
    let mut ca = control(&a).await;
    let (state, active, operation) = gate_state(&mut ca).await;
    assert_eq!(
        (state.as_str(), active, operation.as_str()),
        ("Held", 1, "op-rs")
    );
    eventually(10, "attachment still Held after the restart", || async {
        (attachment_state(&cluster, "node-a").await == Some(AttachmentState::Held)).then_some(())
    })
    .await;
    let client = Arc::new(a.nbd(VOLUME).await);
    let parked = tokio::spawn({
        let client = Arc::clone(&client);
        async move {
            client
                .write(ES, Bytes::from(pattern(3, BLOCK as usize)), false)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !parked.is_finished(),
        "restarted held: the held extent parks"
    );
    assert_eq!(
        gate_state(&mut ca).await.0,
        "Held",
        "never resumes by itself"
    );
    // The restored hold is for op-rs: the operator re-sends Resume; the gate answers it.
    let resumed = ca
        .resume(step("op-rs", 1, 2))
        .await
        .expect("resume")
        .into_inner();
    assert_eq!(
        (resumed.state.as_str(), resumed.redispatched),
        ("Running", 1)
    );
    tokio::time::timeout(Duration::from_secs(5), parked)
        .await
        .expect("dispatched")
        .expect("task")
        .expect("write after resume");
    eventually(10, "attachment Running again", || async {
        (attachment_state(&cluster, "node-a").await == Some(AttachmentState::Running)).then_some(())
    })
    .await;

    // AS-26: fenced → I/O fails (EIO), Resume refused; the attachment says Fenced.
    let fenced = ca
        .fence(step("op-fence", 1, 2))
        .await
        .expect("fence")
        .into_inner();
    assert_eq!(fenced.state, "Fenced");
    let failed = client
        .write(0, Bytes::from(pattern(4, BLOCK as usize)), false)
        .await;
    assert!(failed.is_err(), "a fenced node must not serve I/O");
    let refused = ca.resume(step("op-fence", 1, 2)).await.expect_err("fenced");
    assert!(
        refused.message().contains("fenced"),
        "{}",
        refused.message()
    );
    eventually(10, "attachment Fenced", || async {
        (attachment_state(&cluster, "node-a").await == Some(AttachmentState::Fenced)).then_some(())
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// AS-19 (docs/remap.md §5a "Participants that have not staged the volume"): a node the volume
/// is published to but not staged on answers every step at once (`Absent`); its Quiesce keeps
/// a NodeStage of the volume out until the Resume; and a NodeStage while a VolumeRemap of the
/// volume is in flight waits for it to end, then stages the mapping it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as19_a_node_staging_during_a_remap_waits_until_it_ends() {
    use kube::api::{Api, PostParams};
    use tessera_api::v1alpha1::{
        CopyPolicy, RemapOperation, RemapOperationType, RemapPolicy, VolumeRange, VolumeRemap,
        VolumeRemapSpec,
    };

    let cluster = Cluster::start().await;
    let (a, b) = two_nodes_one_volume(&cluster).await;
    let staging_b = cluster.path("staging/node-b");
    b.unstage(VOLUME, &staging_b).await.expect("unstage on b");
    let mut cb = control(&b).await;

    // Published, not staged: every step is done at once.
    let held = quiesce(&mut cb, "op-19", 2, extent_scope(1))
        .await
        .expect("quiesce of an absent volume");
    assert_eq!(held.state, "Absent");
    let refused = b
        .stage(VOLUME, &staging_b, block_cap())
        .await
        .expect_err("NodeStage inside the absent hold");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("op-19"), "{refused:?}");
    for answer in [
        stage(&mut cb, "op-19", wire(2, &GEN2)).await,
        cb.commit(step("op-19", 1, 2)).await.map(|r| r.into_inner()),
        cb.resume(step("op-19", 1, 2)).await.map(|r| r.into_inner()),
    ] {
        assert_eq!(answer.expect("absent step").state, "Absent");
    }
    b.stage(VOLUME, &staging_b, block_cap())
        .await
        .expect("NodeStage after the Resume");
    b.unstage(VOLUME, &staging_b).await.expect("unstage on b");

    // A VolumeRemap of the volume in flight: NodeStage waits until it ends.
    let remaps: Api<VolumeRemap> = Api::all(cluster.client.clone());
    let remap = VolumeRemap::new(
        "as19",
        VolumeRemapSpec {
            volume_name: VOLUME.into(),
            operation: RemapOperation {
                type_: RemapOperationType::ReleaseRanges,
                r#move: None,
                evacuate_area: None,
                release_ranges: Some(tessera_api::v1alpha1::ReleaseRanges {
                    ranges: vec![VolumeRange {
                        offset: 0,
                        length: ES as i64,
                    }],
                    tier: tessera_api::v1alpha1::ReclaimTier::Unused,
                    discard: false,
                }),
            },
            copy: CopyPolicy::default(),
            policy: RemapPolicy::default(),
        },
    );
    remaps
        .create(&PostParams::default(), &remap)
        .await
        .expect("VolumeRemap");
    let set_phase = |phase: &'static str| {
        let remaps = remaps.clone();
        async move {
            remaps
                .patch_status(
                    "as19",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"phase": phase}})),
                )
                .await
                .expect("remap status");
        }
    };
    set_phase("Quiescing").await;
    let staging = tokio::spawn({
        let b = Arc::new(b);
        let staging_b = staging_b.clone();
        async move { b.stage(VOLUME, &staging_b, block_cap()).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !staging.is_finished(),
        "NodeStage went ahead while a remap of the volume was in flight"
    );
    set_phase("Succeeded").await;
    tokio::time::timeout(Duration::from_secs(10), staging)
        .await
        .expect("NodeStage ends once the remap ended")
        .expect("task")
        .expect("NodeStage after the remap");
    drop(a);
}
