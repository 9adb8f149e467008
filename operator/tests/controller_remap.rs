//! The VolumeRemap coordinator against the embedded API server and fake node plugins: real
//! tonic node-control servers on 127.0.0.1:0, registered through node Leases, each with a
//! few-line I/O gate (held / running / fenced, staged and active generation) and a shared
//! call log so the tests can check the order guarantees of seed 004 §7.7. Named after the
//! seed 004 §11.7 scenarios they cover.

mod controller_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use controller_support::*;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use roaring::RoaringBitmap;
use serde_json::json;
use tessera_api::v1alpha1::*;
use tessera_operator::controllers::{Config, node_control};
use tessera_operator::planners::remap::{
    MSG_CHANGE_FAILED, MSG_NODES_STOPPED, MSG_QUIESCE_FAILED, MSG_SUCCEEDED,
};
use tessera_proto::node_control::v1 as pb;
use tessera_proto::node_control::v1::node_control_server::{NodeControl, NodeControlServer};
use tonic::{Request, Response, Status};

const TOKEN: &str = "remap-test-token";

/// One logged call: (sequence, node, rpc, attempt, generation).
type Log = Arc<Mutex<Vec<(String, String, u32, i64)>>>;

#[derive(Default)]
struct Gate {
    held: bool,
    fenced: bool,
    active: i64,
    previous: i64,
    staged: Option<i64>,
    /// The attempt/generation of the last Resume, for repeats.
    resumed: Option<(u32, i64)>,
}

#[derive(Clone, Default)]
struct Behaviour {
    /// Quiesce never answers.
    quiesce_hangs: bool,
    /// The first Quiesce answers only after this long.
    first_quiesce_delay: Option<Duration>,
    /// Commit is refused.
    commit_fails: bool,
    /// Extents the node's usage view says hold data.
    in_use: Vec<u32>,
}

struct FakeNode {
    name: String,
    log: Log,
    gate: Mutex<Gate>,
    behaviour: Behaviour,
    quiesces: Mutex<u32>,
}

impl FakeNode {
    fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        match metadata.get("authorization").and_then(|v| v.to_str().ok()) {
            Some(v) if v == format!("Bearer {TOKEN}") => Ok(()),
            _ => Err(Status::unauthenticated("bad token")),
        }
    }

    fn log(&self, rpc: &str, op: &Option<pb::OperationRef>) {
        let (attempt, generation) = op.as_ref().map_or((0, 0), |o| (o.attempt, o.generation));
        self.log
            .lock()
            .unwrap()
            .push((self.name.clone(), rpc.into(), attempt, generation));
    }

    fn answer(&self, gate: &Gate) -> Response<pb::RemapStepResponse> {
        let state = if gate.fenced {
            "Fenced"
        } else if gate.held {
            "Held"
        } else {
            "Running"
        };
        Response::new(pb::RemapStepResponse {
            state: state.into(),
            active_generation: gate.active,
            redispatched: 0,
            hold_ms: 1,
        })
    }
}

/// The gRPC face of a [`FakeNode`] (the test keeps the node to inspect its gate).
struct Served(Arc<FakeNode>);

impl std::ops::Deref for Served {
    type Target = FakeNode;
    fn deref(&self) -> &FakeNode {
        &self.0
    }
}

#[tonic::async_trait]
impl NodeControl for Served {
    async fn apply_mapping(
        &self,
        _: Request<pb::ApplyMappingRequest>,
    ) -> Result<Response<pb::ApplyMappingResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn report_usage(
        &self,
        request: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        self.check(request.metadata())?;
        self.log("ReportUsage", &None);
        let bitmap: RoaringBitmap = self.behaviour.in_use.iter().copied().collect();
        let mut bytes = Vec::new();
        bitmap.serialize_into(&mut bytes).unwrap();
        Ok(Response::new(pb::ReportUsageResponse {
            generation: self.gate.lock().unwrap().active,
            in_use_extents: bytes,
            high_priority_extents: Vec::new(),
            sequence: 1,
        }))
    }

    async fn mount_inquiry(
        &self,
        _: Request<pb::MountInquiryRequest>,
    ) -> Result<Response<pb::MountInquiryResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn set_mirror_leg(
        &self,
        _: Request<pb::SetMirrorLegRequest>,
    ) -> Result<Response<pb::MirrorLegResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn collect_dirty(
        &self,
        _: Request<pb::CollectDirtyRequest>,
    ) -> Result<Response<pb::CollectDirtyResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn copy_to_leg(
        &self,
        _: Request<pb::CopyToLegRequest>,
    ) -> Result<Response<pb::CopyToLegResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn stage_mapping(
        &self,
        request: Request<pb::StageMappingRequest>,
    ) -> Result<Response<pb::RemapStepResponse>, Status> {
        self.check(request.metadata())?;
        let r = request.into_inner();
        self.log("Stage", &r.operation);
        let mut gate = self.gate.lock().unwrap();
        if gate.fenced {
            return Err(Status::failed_precondition("fenced"));
        }
        gate.staged = r.mapping.map(|m| m.generation);
        Ok(self.answer(&gate))
    }

    async fn quiesce(
        &self,
        request: Request<pb::QuiesceRequest>,
    ) -> Result<Response<pb::RemapStepResponse>, Status> {
        self.check(request.metadata())?;
        let r = request.into_inner();
        self.log("Quiesce", &r.operation);
        if self.behaviour.quiesce_hangs {
            std::future::pending::<()>().await;
        }
        let first = {
            let mut n = self.quiesces.lock().unwrap();
            *n += 1;
            *n == 1
        };
        if first && let Some(delay) = self.behaviour.first_quiesce_delay {
            tokio::time::sleep(delay).await;
        }
        let mut gate = self.gate.lock().unwrap();
        if gate.fenced {
            return Err(Status::failed_precondition("fenced"));
        }
        gate.held = true;
        Ok(self.answer(&gate))
    }

    async fn commit(
        &self,
        request: Request<pb::RemapStepRequest>,
    ) -> Result<Response<pb::RemapStepResponse>, Status> {
        self.check(request.metadata())?;
        let op = request.into_inner().operation;
        self.log("Commit", &op);
        let generation = op.as_ref().map_or(0, |o| o.generation);
        let mut gate = self.gate.lock().unwrap();
        if self.behaviour.commit_fails {
            return Err(Status::failed_precondition("injected commit failure"));
        }
        if !gate.held || gate.staged != Some(generation) {
            return Err(Status::failed_precondition("not held or not staged"));
        }
        if gate.active != generation {
            gate.previous = gate.active;
            gate.active = generation;
        }
        Ok(self.answer(&gate))
    }

    async fn rollback(
        &self,
        request: Request<pb::RemapStepRequest>,
    ) -> Result<Response<pb::RemapStepResponse>, Status> {
        self.check(request.metadata())?;
        let op = request.into_inner().operation;
        self.log("Rollback", &op);
        let mut gate = self.gate.lock().unwrap();
        if !gate.held {
            return Err(Status::failed_precondition("not held"));
        }
        if gate.staged.is_some() && gate.active == gate.staged.unwrap_or_default() {
            gate.active = gate.previous;
        }
        Ok(self.answer(&gate))
    }

    async fn resume(
        &self,
        request: Request<pb::RemapStepRequest>,
    ) -> Result<Response<pb::RemapStepResponse>, Status> {
        self.check(request.metadata())?;
        let op = request.into_inner().operation;
        self.log("Resume", &op);
        let key = op.as_ref().map(|o| (o.attempt, o.generation));
        let mut gate = self.gate.lock().unwrap();
        if gate.fenced {
            return Err(Status::failed_precondition("fenced"));
        }
        if !gate.held {
            if gate.resumed == key {
                return Ok(self.answer(&gate));
            }
            return Err(Status::failed_precondition("not held"));
        }
        gate.held = false;
        gate.resumed = key;
        Ok(self.answer(&gate))
    }

    async fn fence(
        &self,
        request: Request<pb::RemapStepRequest>,
    ) -> Result<Response<pb::RemapStepResponse>, Status> {
        self.check(request.metadata())?;
        let op = request.into_inner().operation;
        self.log("Fence", &op);
        let mut gate = self.gate.lock().unwrap();
        gate.fenced = true;
        Ok(self.answer(&gate))
    }

    async fn copy_extents(
        &self,
        request: Request<pb::CopyExtentsRequest>,
    ) -> Result<Response<pb::CopyExtentsResponse>, Status> {
        self.check(request.metadata())?;
        let r = request.into_inner();
        self.log("Copy", &r.operation);
        if !self.gate.lock().unwrap().held {
            return Err(Status::failed_precondition("copy outside the hold"));
        }
        Ok(Response::new(pb::CopyExtentsResponse {
            bytes_copied: r.length as u64,
        }))
    }

    async fn get_gate_state(
        &self,
        request: Request<pb::GetGateStateRequest>,
    ) -> Result<Response<pb::GateStateResponse>, Status> {
        self.check(request.metadata())?;
        let gate = self.gate.lock().unwrap();
        let state = if gate.fenced {
            "Fenced"
        } else if gate.held {
            "Held"
        } else {
            "Running"
        };
        Ok(Response::new(pb::GateStateResponse {
            state: state.into(),
            active_generation: gate.active,
            staged_generation: gate.staged.unwrap_or_default(),
            operation_id: String::new(),
            attempt: 0,
        }))
    }
}

/// Starts a fake node plugin and registers it in its Lease. Returns its handle.
async fn start_node(
    cluster: &Cluster,
    name: &str,
    log: &Log,
    active: i64,
    behaviour: Behaviour,
) -> Arc<FakeNode> {
    let node = Arc::new(FakeNode {
        name: name.into(),
        log: Arc::clone(log),
        gate: Mutex::new(Gate {
            active,
            ..Gate::default()
        }),
        behaviour,
        quiesces: Mutex::new(0),
    });
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let addr = incoming.local_addr().unwrap();
    let service = NodeControlServer::new(Served(Arc::clone(&node)));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(format!("tessera-node-{name}")),
            namespace: Some(NS.into()),
            annotations: Some(BTreeMap::from([(
                "tessera.io/control-endpoint".to_string(),
                addr.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: None,
    };
    Api::<Lease>::namespaced(cluster.client.clone(), NS)
        .create(&PostParams::default(), &lease)
        .await
        .expect("node lease");
    node
}

fn config(cluster: &Cluster, identity: &str) -> Config {
    let mut config = cluster.config(identity);
    config.node_token = Some(TOKEN.into());
    config
}

/// The volume as the node agents would show it once staged on `nodes`.
async fn attach(cluster: &Cluster, volume: &VirtualVolume, nodes: &[&str]) {
    let g = generation(volume);
    let attachments: Vec<_> = nodes
        .iter()
        .map(|n| json!({ "node": n, "appliedGeneration": g, "state": "Running" }))
        .collect();
    cluster
        .api::<VirtualVolume>()
        .patch_status(
            &volume.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "attachments": attachments } })),
        )
        .await
        .expect("attachments");
}

async fn create_move(
    cluster: &Cluster,
    name: &str,
    volume: &str,
    extents: i64,
    target: &str,
    policy: serde_json::Value,
) {
    let remap: VolumeRemap = serde_json::from_value(json!({
        "apiVersion": "tessera.io/v1alpha1",
        "kind": "VolumeRemap",
        "metadata": { "name": name },
        "spec": {
            "volumeName": volume,
            "operation": {
                "type": "Move",
                "move": { "ranges": [{ "offset": 0, "length": extents * ES }], "targetAreas": [target] },
            },
            "copy": { "mode": "Online", "chunkBytes": 2 * ES },
            "policy": policy,
        }
    }))
    .unwrap();
    cluster
        .api::<VolumeRemap>()
        .create(&PostParams::default(), &remap)
        .await
        .expect("remap created");
}

async fn finished(cluster: &Cluster, name: &str) -> VolumeRemap {
    wait_for(&cluster.api::<VolumeRemap>(), name, "finished", |r| {
        matches!(
            r.status.as_ref().and_then(|s| s.phase),
            Some(RemapPhase::Succeeded | RemapPhase::Failed | RemapPhase::FailedRecovery)
        )
    })
    .await
}

/// Three nodes, one area each (area-a on node-a holds the volume, area-b is the target).
async fn setup(cluster: &Cluster, extents: i64) -> VirtualVolume {
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 16).await;
    cluster.create_area("area-b", "node-b", "pool", 16).await;
    cluster.create_area("area-c", "node-c", "pool", 16).await;
    cluster
        .create_claim("data", "pool", extents, "standard")
        .await;
    let (_, volume) = cluster.bound("data").await;
    volume
}

fn areas_of(volume: &VirtualVolume) -> Vec<String> {
    let mut areas: Vec<String> = volume
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map(|m| {
            m.extents
                .iter()
                .flat_map(|r| r.replicas.iter().map(|p| p.area.clone()))
                .collect()
        })
        .unwrap_or_default();
    areas.sort();
    areas.dedup();
    areas
}

/// Seed 004 §7.7 (1)/(2) per step generation: no Commit before every active node quiesced in
/// that attempt, no Resume before every active node committed.
fn assert_barriers(log: &[(String, String, u32, i64)], nodes: &[&str], generation: i64) {
    let index = |rpc: &str, node: &str| {
        log.iter()
            .position(|(n, r, _, g)| n == node && r == rpc && *g == generation)
    };
    let last_quiesce = nodes.iter().filter_map(|n| index("Quiesce", n)).max();
    let first_commit = nodes.iter().filter_map(|n| index("Commit", n)).min();
    let last_commit = nodes.iter().filter_map(|n| index("Commit", n)).max();
    let first_resume = nodes.iter().filter_map(|n| index("Resume", n)).min();
    assert!(last_quiesce.is_some() && first_commit.is_some(), "{log:#?}");
    assert!(
        last_quiesce < first_commit,
        "a Commit before every Quiesce: {log:#?}"
    );
    assert!(
        last_commit < first_resume,
        "a Resume before every Commit: {log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as01_as20_move_on_three_nodes_commits_every_cycle_behind_the_barrier() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(config(&cluster, "operator-0"));
    let volume = setup(&cluster, 4).await;
    assert_eq!(areas_of(&volume), vec!["area-a"]);
    let base = generation(&volume);
    let log: Log = Arc::default();
    let mut nodes = Vec::new();
    for n in ["node-a", "node-b", "node-c"] {
        nodes.push(start_node(&cluster, n, &log, base, Behaviour::default()).await);
    }
    attach(&cluster, &volume, &["node-a", "node-b", "node-c"]).await;
    create_move(&cluster, "move", &volume.name_any(), 4, "area-b", json!({})).await;

    let remap = finished(&cluster, "move").await;
    let status = remap.status.clone().unwrap();
    assert_eq!(status.phase, Some(RemapPhase::Succeeded), "{status:#?}");
    assert_eq!(status.message.as_deref(), Some(MSG_SUCCEEDED));
    assert!(status.participants.iter().all(|p| !p.excluded));
    // Two cycles of two extents (chunkBytes = 2 extents): two generations.
    let volume = cluster
        .api::<VirtualVolume>()
        .get(&volume.name_any())
        .await
        .unwrap();
    assert_eq!(generation(&volume), base + 2);
    assert_eq!(areas_of(&volume), vec!["area-b"]);
    let log = log.lock().unwrap().clone();
    for g in [base + 1, base + 2] {
        assert_barriers(&log, &["node-a", "node-b", "node-c"], g);
    }
    // One node copies, extent by extent, inside the hold.
    let copies: Vec<_> = log.iter().filter(|(_, r, _, _)| r == "Copy").collect();
    assert_eq!(copies.len(), 4, "{log:#?}");
    assert!(copies.iter().all(|(n, ..)| n == "node-a"));
    for node in &nodes {
        let gate = node.gate.lock().unwrap();
        assert_eq!(gate.active, base + 2);
        assert!(!gate.held && !gate.fenced);
    }
    assert_eq!(cluster.event("move", "Succeeded").await, MSG_SUCCEEDED);
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as08_node_silent_on_quiesce_is_excluded_and_fenced_while_two_carry_on() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(config(&cluster, "operator-0"));
    let volume = setup(&cluster, 2).await;
    let base = generation(&volume);
    let log: Log = Arc::default();
    start_node(&cluster, "node-a", &log, base, Behaviour::default()).await;
    start_node(&cluster, "node-b", &log, base, Behaviour::default()).await;
    let silent = Behaviour {
        quiesce_hangs: true,
        ..Behaviour::default()
    };
    let c = start_node(&cluster, "node-c", &log, base, silent).await;
    attach(&cluster, &volume, &["node-a", "node-b", "node-c"]).await;
    create_move(
        &cluster,
        "move",
        &volume.name_any(),
        2,
        "area-b",
        json!({ "quiesceTimeoutMs": 500 }),
    )
    .await;

    let remap = finished(&cluster, "move").await;
    let status = remap.status.clone().unwrap();
    assert_eq!(status.phase, Some(RemapPhase::Succeeded), "{status:#?}");
    let message = status.message.clone().unwrap();
    assert!(message.starts_with(MSG_SUCCEEDED) && message.contains(MSG_NODES_STOPPED));
    assert!(message.contains("node-c"), "{message}");
    let excluded: Vec<_> = status
        .participants
        .iter()
        .filter(|p| p.excluded)
        .map(|p| p.node.as_str())
        .collect();
    assert_eq!(excluded, vec!["node-c"]);
    let log = log.lock().unwrap().clone();
    assert_barriers(&log, &["node-a", "node-b"], base + 1);
    // node-c got a Fence and nothing after its Quiesce but the Fence.
    let to_c: Vec<_> = log
        .iter()
        .filter(|(n, ..)| n == "node-c")
        .map(|(_, r, ..)| r.as_str())
        .collect();
    assert!(to_c.contains(&"Fence"), "{to_c:?}");
    assert!(
        !to_c.iter().any(|r| *r == "Commit" || *r == "Resume"),
        "{to_c:?}"
    );
    assert!(c.gate.lock().unwrap().fenced);
    let volume = cluster
        .api::<VirtualVolume>()
        .get(&volume.name_any())
        .await
        .unwrap();
    assert_eq!(generation(&volume), base + 1);
    assert_eq!(areas_of(&volume), vec!["area-b"]);
    let fenced = volume
        .status
        .as_ref()
        .unwrap()
        .attachments
        .iter()
        .find(|a| a.node == "node-c");
    assert_eq!(fenced.map(|a| a.state), Some(AttachmentState::Fenced));
    cluster.event("move", "NodeExcluded").await;
    let events = cluster.events_about("move").await;
    assert!(
        events.iter().any(|(t, reason, note)| t == "Warning"
            && reason == "NodeExcluded"
            && note.contains("node-c")),
        "{events:#?}"
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as12_commit_failure_on_one_node_rolls_back_everywhere() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(config(&cluster, "operator-0"));
    let volume = setup(&cluster, 2).await;
    let before = volume.status.as_ref().unwrap().mapping.clone().unwrap();
    let base = generation(&volume);
    let log: Log = Arc::default();
    let a = start_node(&cluster, "node-a", &log, base, Behaviour::default()).await;
    let failing = Behaviour {
        commit_fails: true,
        ..Behaviour::default()
    };
    let b = start_node(&cluster, "node-b", &log, base, failing).await;
    let c = start_node(&cluster, "node-c", &log, base, Behaviour::default()).await;
    attach(&cluster, &volume, &["node-a", "node-b", "node-c"]).await;
    create_move(&cluster, "move", &volume.name_any(), 2, "area-c", json!({})).await;

    let remap = finished(&cluster, "move").await;
    let status = remap.status.clone().unwrap();
    assert_eq!(status.phase, Some(RemapPhase::Failed), "{status:#?}");
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .starts_with(MSG_CHANGE_FAILED)
    );
    let log = log.lock().unwrap().clone();
    for node in ["node-a", "node-b", "node-c"] {
        let rpcs: Vec<_> = log
            .iter()
            .filter(|(n, ..)| n == node)
            .map(|(_, r, ..)| r.as_str())
            .collect();
        let rollback = rpcs.iter().position(|r| *r == "Rollback");
        let resume = rpcs.iter().rposition(|r| *r == "Resume");
        assert!(rollback.is_some() && rollback < resume, "{node}: {rpcs:?}");
    }
    for node in [&a, &b, &c] {
        let gate = node.gate.lock().unwrap();
        assert_eq!(gate.active, base, "every node back on the old generation");
        assert!(!gate.held && !gate.fenced);
    }
    // The mapping did not change, and the reserved destination is free again.
    let volume = cluster
        .api::<VirtualVolume>()
        .get(&volume.name_any())
        .await
        .unwrap();
    assert_eq!(
        volume.status.as_ref().unwrap().mapping.as_ref(),
        Some(&before)
    );
    assert!(
        cluster
            .event("move", "CommitFailed")
            .await
            .contains("node-b")
    );
    assert!(
        cluster
            .event("move", "Failed")
            .await
            .starts_with(MSG_CHANGE_FAILED)
    );
    cluster.create_claim("after", "pool", 16, "standard").await;
    cluster.bound("after").await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as17_new_leader_finishes_the_remap_the_old_one_started() {
    let cluster = Cluster::start().await;
    let first = cluster.spawn(config(&cluster, "operator-1"));
    let volume = setup(&cluster, 2).await;
    let base = generation(&volume);
    let log: Log = Arc::default();
    // node-a answers its first Quiesce late: the leader dies while it waits.
    let slow = Behaviour {
        first_quiesce_delay: Some(Duration::from_millis(1500)),
        ..Behaviour::default()
    };
    let mut nodes = vec![start_node(&cluster, "node-a", &log, base, slow).await];
    nodes.push(start_node(&cluster, "node-b", &log, base, Behaviour::default()).await);
    attach(&cluster, &volume, &["node-a", "node-b"]).await;
    create_move(
        &cluster,
        "move",
        &volume.name_any(),
        2,
        "area-b",
        json!({ "quiesceTimeoutMs": 20000 }),
    )
    .await;
    wait_for(&cluster.api::<VolumeRemap>(), "move", "quiescing", |r| {
        r.status.as_ref().and_then(|s| s.phase) == Some(RemapPhase::Quiescing)
    })
    .await;
    // node-a has the Quiesce and sits on it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !log
        .lock()
        .unwrap()
        .iter()
        .any(|(n, r, ..)| n == "node-a" && r == "Quiesce")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Quiesce reached node-a"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().await;
    let second = cluster.spawn(config(&cluster, "operator-2"));

    let remap = finished(&cluster, "move").await;
    let status = remap.status.clone().unwrap();
    assert_eq!(status.phase, Some(RemapPhase::Succeeded), "{status:#?}");
    let log = log.lock().unwrap().clone();
    // The new leader sent node-a's Quiesce again (same attempt) and went on from there.
    let quiesces_a = log
        .iter()
        .filter(|(n, r, a, _)| n == "node-a" && r == "Quiesce" && *a == 1)
        .count();
    assert!(quiesces_a >= 2, "{log:#?}");
    assert_barriers(&log, &["node-a", "node-b"], base + 1);
    for node in &nodes {
        assert_eq!(
            node.gate.lock().unwrap().active,
            base + 1,
            "no divergent generation"
        );
    }
    let volume = cluster
        .api::<VirtualVolume>()
        .get(&volume.name_any())
        .await
        .unwrap();
    assert_eq!(generation(&volume), base + 1);
    assert_eq!(areas_of(&volume), vec!["area-b"]);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reclaim_releases_an_attached_victim_under_the_hold_rechecking_usage() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(config(&cluster, "operator-0"));
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 8).await;
    cluster.create_claim("victim", "pool", 6, "standard").await;
    let (_, victim) = cluster.bound("victim").await;
    let name = victim.name_any();
    // As reported before the reclaim: extents 0 and 1 hold data.
    cluster.report_usage(&name, &[(0..2, false)]).await;
    let base = generation(&victim);
    let log: Log = Arc::default();
    start_node(
        &cluster,
        "node-a",
        &log,
        base,
        Behaviour {
            in_use: vec![0, 1],
            ..Behaviour::default()
        },
    )
    .await;
    // node-b wrote extent 4 since its last report: the re-check under the hold must keep it.
    start_node(
        &cluster,
        "node-b",
        &log,
        base,
        Behaviour {
            in_use: vec![0, 1, 4],
            ..Behaviour::default()
        },
    )
    .await;
    attach(&cluster, &victim, &["node-a", "node-b"]).await;

    // 4 extents with 2 free: the victim is asked for its last two (4 and 5).
    let claim = cluster
        .create_claim("newcomer", "pool", 4, "standard")
        .await;
    let step0 = wait_for(
        &cluster.api::<VolumeRemap>(),
        &format!("reclaim-{}-0", claim.uid().unwrap()),
        "finished",
        |r: &VolumeRemap| r.status.as_ref().and_then(|s| s.phase) == Some(RemapPhase::Succeeded),
    )
    .await;
    assert_eq!(
        step0.spec.operation.release_ranges.as_ref().unwrap().ranges,
        vec![VolumeRange {
            offset: 4 * ES,
            length: 2 * ES
        }]
    );
    let victim = cluster.api::<VirtualVolume>().get(&name).await.unwrap();
    assert_eq!(generation(&victim), base + 1);
    let mapping = victim.status.as_ref().unwrap().mapping.clone().unwrap();
    let mapped = |e: i64| {
        mapping
            .extents
            .iter()
            .any(|r| r.offset <= e * ES && e * ES < r.offset + r.length && !r.replicas.is_empty())
    };
    assert!(
        mapped(4),
        "extent 4 was written under the plan's feet and is kept"
    );
    assert!(!mapped(5), "extent 5 is released");
    let log = log.lock().unwrap().clone();
    for node in ["node-a", "node-b"] {
        assert!(log.iter().any(|(n, r, ..)| n == node && r == "ReportUsage"));
    }
    assert_barriers(&log, &["node-a", "node-b"], base + 1);
    let returned = cluster.event("newcomer", "AreaReturned").await;
    assert!(returned.contains("released 1 extents"), "{returned}");
    let claim_events = cluster.events_about("newcomer").await;
    assert!(
        !claim_events.iter().any(|(_, r, _)| r == "VictimSkipped"),
        "{claim_events:#?}"
    );

    // The node's next report shows extent 4: the claim asks for extent 3 and binds.
    cluster
        .report_usage(&name, &[(0..2, false), (4..5, false)])
        .await;
    cluster.bound("newcomer").await;
    let remaps = cluster
        .api::<VolumeRemap>()
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(remaps.items.len() >= 2);
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as09_fewer_than_two_succeeded_resumes_all_retries_then_fails() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(config(&cluster, "operator-0"));
    let volume = setup(&cluster, 2).await;
    let before = volume.status.as_ref().unwrap().mapping.clone().unwrap();
    let base = generation(&volume);
    let log: Log = Arc::default();
    let a = start_node(&cluster, "node-a", &log, base, Behaviour::default()).await;
    let silent = Behaviour {
        quiesce_hangs: true,
        ..Behaviour::default()
    };
    start_node(&cluster, "node-b", &log, base, silent).await;
    attach(&cluster, &volume, &["node-a", "node-b"]).await;
    create_move(
        &cluster,
        "move",
        &volume.name_any(),
        2,
        "area-c",
        json!({ "quiesceTimeoutMs": 400, "maxRetries": 1 }),
    )
    .await;

    let remap = finished(&cluster, "move").await;
    let status = remap.status.clone().unwrap();
    assert_eq!(status.phase, Some(RemapPhase::Failed), "{status:#?}");
    assert_eq!(status.attempt, Some(2));
    let message = status.message.unwrap();
    assert!(message.starts_with(MSG_QUIESCE_FAILED), "{message}");
    assert!(
        status.participants.iter().all(|p| !p.excluded),
        "no exclusion below 2"
    );
    let log = log.lock().unwrap().clone();
    for attempt in [1, 2] {
        let a_quiesce = log
            .iter()
            .position(|(n, r, at, _)| n == "node-a" && r == "Quiesce" && *at == attempt);
        let a_resume = log
            .iter()
            .position(|(n, r, at, _)| n == "node-a" && r == "Resume" && *at == attempt);
        assert!(
            a_quiesce.is_some() && a_quiesce < a_resume,
            "attempt {attempt}: {log:#?}"
        );
    }
    assert!(!log.iter().any(|(_, r, ..)| r == "Commit"), "{log:#?}");
    assert!(
        !a.gate.lock().unwrap().held,
        "node-a resumed on the old map"
    );
    let volume = cluster
        .api::<VirtualVolume>()
        .get(&volume.name_any())
        .await
        .unwrap();
    assert_eq!(
        volume.status.as_ref().unwrap().mapping.as_ref(),
        Some(&before)
    );
    assert!(
        cluster
            .event("move", "QuiesceRetry")
            .await
            .contains("attempt 2")
    );
    operator.stop().await;
}

/// An in-memory [`NodeControl`]: every call answers at once and is logged.
#[derive(Debug, Default)]
struct InMemoryNodes {
    calls: Mutex<Vec<(String, &'static str)>>,
}

impl node_control::NodeControl for InMemoryNodes {
    fn available(&self) -> Result<(), String> {
        Ok(())
    }

    fn call(
        &self,
        node: &str,
        request: node_control::NodeRequest,
        _: Duration,
    ) -> BoxFuture<'static, Result<node_control::StepAnswer, node_control::NodeCallError>> {
        self.calls
            .lock()
            .unwrap()
            .push((node.to_string(), request.name()));
        Box::pin(async { Ok(node_control::StepAnswer::default()) })
    }

    fn gate_state(
        &self,
        _: &str,
        _: &str,
        _: Duration,
    ) -> BoxFuture<'static, Result<node_control::GateState, node_control::NodeCallError>> {
        Box::pin(async { Err(node_control::NodeCallError::Refused("no gate".into())) })
    }

    fn report_usage(
        &self,
        _: &str,
        _: &str,
        _: Duration,
    ) -> BoxFuture<'static, Result<node_control::UsageAnswer, node_control::NodeCallError>> {
        Box::pin(async { Ok(node_control::UsageAnswer::default()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as28_move_of_a_volume_nobody_uses_sends_no_hold_and_records_the_mapping() {
    let cluster = Cluster::start().await;
    let nodes = Arc::new(InMemoryNodes::default());
    let mut config = cluster.config("operator-0");
    config.node_control = Some(Arc::clone(&nodes) as Arc<dyn node_control::NodeControl>);
    let operator = cluster.spawn(config);
    let volume = setup(&cluster, 3).await;
    let base = generation(&volume);
    create_move(&cluster, "move", &volume.name_any(), 3, "area-c", json!({})).await;

    let remap = finished(&cluster, "move").await;
    let status = remap.status.clone().unwrap();
    assert_eq!(status.phase, Some(RemapPhase::Succeeded), "{status:#?}");
    let volume = cluster
        .api::<VirtualVolume>()
        .get(&volume.name_any())
        .await
        .unwrap();
    assert_eq!(areas_of(&volume), vec!["area-c"]);
    // Two cycles (2 + 1 extents), each a generation.
    assert_eq!(generation(&volume), base + 2);
    // No participant: no Stage/Quiesce/Commit/Resume, only the copies, by the source area's node.
    let calls = nodes.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![("node-a".to_string(), "CopyExtents"); 3],
        "{calls:?}"
    );
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_secondary_of_a_mirror_pair_is_not_remapped() {
    let cluster = Cluster::start().await;
    let nodes = Arc::new(InMemoryNodes::default());
    let mut config = cluster.config("operator-0");
    config.node_control = Some(Arc::clone(&nodes) as Arc<dyn node_control::NodeControl>);
    let operator = cluster.spawn(config);
    let volume = setup(&cluster, 3).await;
    let base = generation(&volume);
    // Linked as a secondary (what the mirror controller writes): its primary's nodes write it
    // through its current mapping.
    cluster
        .api::<VirtualVolume>()
        .patch_status(
            &volume.name_any(),
            &Default::default(),
            &kube::api::Patch::Merge(json!({ "status": { "mirror": {
                "pair": "pair-0", "role": "Secondary", "peer": "vol-primary", "leg": "Mirror",
                "writers": ["node-a"],
            }}})),
        )
        .await
        .unwrap();
    wait_for(
        &cluster.api::<VirtualVolume>(),
        &volume.name_any(),
        "linked",
        |v| v.status.as_ref().and_then(|s| s.mirror.as_ref()).is_some(),
    )
    .await;
    create_move(&cluster, "move", &volume.name_any(), 3, "area-c", json!({})).await;

    let remap = finished(&cluster, "move").await;
    let status = remap.status.clone().unwrap();
    assert_eq!(status.phase, Some(RemapPhase::Failed), "{status:#?}");
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("secondary of mirror pair pair-0")),
        "{status:#?}"
    );
    let after = cluster
        .api::<VirtualVolume>()
        .get(&volume.name_any())
        .await
        .unwrap();
    assert_eq!(generation(&after), base, "the mapping changed");
    assert!(nodes.calls.lock().unwrap().is_empty());
    operator.stop().await;
}

/// Seed 001 [0019] duplexed volume: a node reports that it stopped writing one replica (a
/// failed write, the area itself Online again): the volume is Degraded and the operator
/// rebuilds that area's replicas from the surviving ones by an EvacuateArea remap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_a_node_stopped_writing_is_rebuilt_elsewhere() {
    let cluster = Cluster::start().await;
    let nodes = Arc::new(InMemoryNodes::default());
    let mut config = cluster.config("operator-0");
    config.node_control = Some(Arc::clone(&nodes) as Arc<dyn node_control::NodeControl>);
    let operator = cluster.spawn(config);
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 16).await;
    cluster.create_area("area-b", "node-b", "pool", 16).await;
    cluster.create_area("area-c", "node-c", "pool", 16).await;
    let claim: StorageClaim = serde_json::from_value(json!({
        "apiVersion": "tessera.io/v1alpha1",
        "kind": "StorageClaim",
        "metadata": { "name": "duplexed", "namespace": "default" },
        "spec": { "poolName": "pool", "sizeBytes": 2 * ES, "priorityClassName": "standard", "copies": 2 },
    }))
    .unwrap();
    cluster
        .claims()
        .create(&PostParams::default(), &claim)
        .await
        .unwrap();
    let (_, volume) = cluster.bound("duplexed").await;
    let before = areas_of(&volume);
    assert_eq!(before.len(), 2, "two replicas on two areas: {before:?}");
    let failed = before[1].clone();
    attach(&cluster, &volume, &["node-a"]).await;
    let volumes = cluster.api::<VirtualVolume>();
    let current = volumes.get(&volume.name_any()).await.unwrap();
    let mut attachments = current.status.clone().unwrap().attachments;
    attachments[0].unhealthy_areas = vec![failed.clone()];
    volumes
        .patch_status(
            &volume.name_any(),
            &Default::default(),
            &kube::api::Patch::Merge(json!({ "status": { "attachments": attachments } })),
        )
        .await
        .unwrap();

    let rebuilt = wait_for(
        &volumes,
        &volume.name_any(),
        "rebuilt",
        |v: &VirtualVolume| !areas_of(v).contains(&failed) && areas_of(v).len() == 2,
    )
    .await;
    let remaps = cluster
        .api::<VolumeRemap>()
        .list(&Default::default())
        .await
        .unwrap();
    let rebuild = remaps
        .items
        .iter()
        .find(|r| r.name_any().starts_with("rebuild-"))
        .expect("a rebuild remap");
    let evacuated = rebuild
        .spec
        .operation
        .evacuate_area
        .as_ref()
        .expect("an EvacuateArea");
    assert_eq!(evacuated.area, failed);
    assert!(evacuated.other_nodes_only, "{evacuated:?}");
    // Every extent still has two replicas, none on the failed area; copies went through node-a.
    for run in &rebuilt
        .status
        .as_ref()
        .unwrap()
        .mapping
        .as_ref()
        .unwrap()
        .extents
    {
        assert_eq!(run.replicas.len(), 2, "{run:?}");
    }
    let calls = nodes.calls.lock().unwrap().clone();
    assert!(
        calls
            .iter()
            .any(|(n, rpc)| n == "node-a" && *rpc == "CopyExtents"),
        "{calls:?}"
    );
    wait_for(
        &volumes,
        &volume.name_any(),
        "not Degraded",
        |v: &VirtualVolume| {
            v.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Degraded" && c.status == "False")
            })
        },
    )
    .await;
    cluster.assert_no_extent_mapped_twice().await;
    operator.stop().await;
}
