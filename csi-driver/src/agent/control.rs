//! The node-control gRPC server (`tessera.nodecontrol.v1.NodeControl`): what the operator asks of
//! this node. TCP on `--control-listen`; every call carries `authorization: Bearer <token>`.
//!
//! - **ApplyMapping** applies a committed generation to a staged volume when the change is pure
//!   growth (runs appended past the old end, holes filled: no in-flight I/O can see it, so no
//!   hold is needed); any other change is FAILED_PRECONDITION until the remap protocol (seed 004
//!   quiesce) exists. An older generation is FAILED_PRECONDITION; the same generation and layout
//!   again is success; a repeat of `(volume, operation_id, attempt)` gets the same answer.
//! - **ReportUsage**: the engine's bitmaps 332/334 (seed 000) of a staged volume.
//! - **MountInquiry**: the agent's records and the mount table (seed 003 mount check).

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Resource};
use tessera_api::model::{ByteRange, ExtentMap, Generation, ReplicaLocation};
use tessera_api::v1alpha1::{
    AttachmentState, MappedRun, ReplicaLocation as ApiReplica, VirtualVolume, VolumeMapping,
};
use tessera_proto::node_control::v1::node_control_server::{NodeControl, NodeControlServer};
use tessera_proto::node_control::v1::{
    ApplyMappingRequest, ApplyMappingResponse, CollectDirtyRequest, CollectDirtyResponse,
    CopyExtentsRequest, CopyExtentsResponse, CopyToLegRequest, CopyToLegResponse,
    GateStateResponse, GetGateStateRequest, HoldScope as WireHoldScope, LegMode as WireLegMode,
    Mapping, MirrorLegResponse, MountInquiryRequest, MountInquiryResponse, OperationRef,
    QuiesceRequest, RemapStepRequest, RemapStepResponse, ReportUsageRequest, ReportUsageResponse,
    SetMirrorLegRequest, StageMappingRequest,
};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::mirror::{LegAnswer, LegRequest};
use super::{Agent, AgentError, cache, status};
use crate::engine::gate::{Answer as GateAnswer, Effect, GateState, HoldScope, OpRef, Reply, Span};
use crate::engine::{EngineError, LegMode, Volume, VolumeOptions};

/// `(volume, operation_id, attempt)` of an ApplyMapping.
pub(crate) type AnswerKey = (String, String, u32);
/// The remembered answer: the applied generation, or the refusal.
pub(crate) type Answer = Result<i64, (tonic::Code, String)>;

/// Checks `authorization: Bearer <token>` in constant time.
#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<Vec<u8>>,
}

impl BearerAuth {
    pub fn new(token: Vec<u8>) -> Self {
        BearerAuth {
            token: Arc::new(token),
        }
    }

    #[allow(clippy::result_large_err)]
    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        match presented {
            Some(token) if constant_time_eq(token, &self.token) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid node-control token")),
            None => Err(Status::unauthenticated(
                "node-control needs `authorization: Bearer <token>`",
            )),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The model map of a wire mapping: the same fields as the API's `VolumeMapping`, so it is
/// validated by the one conversion the API crate owns.
fn to_model(mapping: &Mapping) -> Result<ExtentMap, String> {
    let api = VolumeMapping {
        generation: mapping.generation,
        extent_size_bytes: mapping.extent_size_bytes,
        extents: mapping
            .runs
            .iter()
            .map(|run| MappedRun {
                offset: run.offset,
                length: run.length,
                replicas: run
                    .replicas
                    .iter()
                    .map(|r| ApiReplica {
                        area: r.area.clone(),
                        area_offset: r.area_offset,
                    })
                    .collect(),
            })
            .collect(),
    };
    api.to_model(mapping.size_bytes).map_err(|e| e.to_string())
}

struct Service {
    agent: Arc<Agent>,
}

#[tonic::async_trait]
impl NodeControl for Service {
    async fn apply_mapping(
        &self,
        request: Request<ApplyMappingRequest>,
    ) -> Result<Response<ApplyMappingResponse>, Status> {
        let request = request.into_inner();
        let operation = request
            .operation
            .ok_or_else(|| Status::invalid_argument("operation is required"))?;
        if operation.volume.is_empty() {
            return Err(Status::invalid_argument("operation.volume is required"));
        }
        let mapping = request
            .mapping
            .ok_or_else(|| Status::invalid_argument("mapping is required"))?;
        if operation.generation != mapping.generation {
            return Err(Status::invalid_argument(format!(
                "operation generation {} differs from the mapping's {}",
                operation.generation, mapping.generation
            )));
        }
        let key = (
            operation.volume.clone(),
            operation.operation_id.clone(),
            operation.attempt,
        );
        if !operation.operation_id.is_empty()
            && let Some(answer) = self
                .agent
                .control_answers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned()
        {
            return match answer {
                Ok(applied_generation) => {
                    Ok(Response::new(ApplyMappingResponse { applied_generation }))
                }
                Err((code, message)) => Err(Status::new(code, message)),
            };
        }
        let map =
            to_model(&mapping).map_err(|e| Status::invalid_argument(format!("mapping: {e}")))?;
        let result = {
            let mut registry = self.agent.staged.lock().await;
            self.agent
                .apply_growth(&mut registry, &operation.volume, map)
                .await
        };
        let answer = result.map_err(|e| {
            let status = control_status(&e);
            (status.code(), status.message().to_string())
        });
        if !operation.operation_id.is_empty() {
            let mut answers = self
                .agent
                .control_answers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Bounded: old answers go first (keys sort by volume, which is good enough here).
            if answers.len() > 4096 {
                answers.clear();
            }
            answers.insert(key, answer.clone());
        }
        match answer {
            Ok(applied_generation) => {
                Ok(Response::new(ApplyMappingResponse { applied_generation }))
            }
            Err((code, message)) => Err(Status::new(code, message)),
        }
    }

    async fn report_usage(
        &self,
        request: Request<ReportUsageRequest>,
    ) -> Result<Response<ReportUsageResponse>, Status> {
        let volume_id = request.into_inner().volume;
        if volume_id.is_empty() {
            return Err(Status::invalid_argument("volume is required"));
        }
        let volume = {
            let registry = self.agent.staged.lock().await;
            registry
                .volumes
                .get(&volume_id)
                .map(|v| Arc::clone(&v.volume))
                .ok_or_else(|| control_status(&AgentError::NotStaged(volume_id.clone())))?
        };
        Ok(Response::new(ReportUsageResponse {
            generation: volume.generation().get() as i64,
            in_use_extents: status::bitmap_bytes(&volume.in_use_extents()),
            high_priority_extents: status::bitmap_bytes(&volume.high_priority_extents()),
            sequence: self.agent.next_usage_sequence(),
        }))
    }

    async fn mount_inquiry(
        &self,
        request: Request<MountInquiryRequest>,
    ) -> Result<Response<MountInquiryResponse>, Status> {
        let volume_id = request.into_inner().volume;
        if volume_id.is_empty() {
            return Err(Status::invalid_argument("volume is required"));
        }
        let inquiry = self.agent.mount_inquiry(&volume_id).await;
        Ok(Response::new(MountInquiryResponse {
            staged: inquiry.staged,
            published: inquiry.published,
            mounted: inquiry.mounted,
            paths: inquiry.paths,
            detail: inquiry.detail,
        }))
    }

    async fn set_mirror_leg(
        &self,
        request: Request<SetMirrorLegRequest>,
    ) -> Result<Response<MirrorLegResponse>, Status> {
        let request = request.into_inner();
        if request.volume.is_empty() {
            return Err(Status::invalid_argument("volume is required"));
        }
        let mode = match WireLegMode::try_from(request.mode) {
            Ok(WireLegMode::LegNone) => None,
            Ok(WireLegMode::LegMirror) => Some(LegMode::Mirror),
            Ok(WireLegMode::LegTrack) => Some(LegMode::Track),
            Err(_) => return Err(Status::invalid_argument("unknown leg mode")),
        };
        if mode.is_some() && request.secondary.is_empty() {
            return Err(Status::invalid_argument("secondary is required"));
        }
        if request.reset_dirty && request.cut.is_empty() {
            return Err(Status::invalid_argument("a reset needs its cut id"));
        }
        let answer = self
            .agent
            .set_mirror_leg(LegRequest {
                volume: request.volume,
                secondary: request.secondary,
                mode,
                reset_dirty: request.reset_dirty,
                cut: request.cut,
            })
            .await
            .map_err(|e| control_status(&e))?;
        Ok(Response::new(leg_response(answer.as_ref())))
    }

    async fn collect_dirty(
        &self,
        request: Request<CollectDirtyRequest>,
    ) -> Result<Response<CollectDirtyResponse>, Status> {
        let request = request.into_inner();
        if request.volume.is_empty() {
            return Err(Status::invalid_argument("volume is required"));
        }
        let answer = self
            .agent
            .collect_dirty(&request.volume, request.acknowledge)
            .await
            .map_err(|e| control_status(&e))?;
        Ok(Response::new(match answer {
            Some(answer) => CollectDirtyResponse {
                // Bits kept in the dirty file of a volume not staged here: state Absent.
                leg: Some(leg_response(answer.staged.then_some(&answer.leg))),
                sequence: answer.sequence,
                extents: status::bitmap_bytes(&answer.extents),
                complete: answer.complete,
            },
            // Not staged here: this node wrote nothing to it, so it has nothing to report.
            None => CollectDirtyResponse {
                leg: Some(leg_response(None)),
                sequence: 0,
                extents: status::bitmap_bytes(&roaring::RoaringBitmap::new()),
                complete: true,
            },
        }))
    }

    async fn copy_to_leg(
        &self,
        request: Request<CopyToLegRequest>,
    ) -> Result<Response<CopyToLegResponse>, Status> {
        let request = request.into_inner();
        if request.volume.is_empty() {
            return Err(Status::invalid_argument("volume is required"));
        }
        let extents = roaring::RoaringBitmap::deserialize_from(&request.extents[..])
            .map_err(|e| Status::invalid_argument(format!("extents: {e}")))?;
        match self
            .agent
            .copy_to_leg(&request.volume, &extents, request.held)
            .await
            .map_err(|e| control_status(&e))?
        {
            Some(bytes_copied) => Ok(Response::new(CopyToLegResponse { bytes_copied })),
            None => Err(control_status(&AgentError::NotStaged(request.volume))),
        }
    }

    async fn stage_mapping(
        &self,
        request: Request<StageMappingRequest>,
    ) -> Result<Response<RemapStepResponse>, Status> {
        let request = request.into_inner();
        let (volume_id, op) = op_ref(request.operation)?;
        let mapping = request
            .mapping
            .ok_or_else(|| Status::invalid_argument("mapping is required"))?;
        let map =
            to_model(&mapping).map_err(|e| Status::invalid_argument(format!("mapping: {e}")))?;
        let map = Arc::new(map);
        // Remote areas of the staged map are connected now, outside any hold (531: staging has
        // no I/O impact, so the hold later covers only the pointer swap).
        let volume = {
            let mut registry = self.agent.staged.lock().await;
            if !registry.volumes.contains_key(&volume_id) {
                return absent_step(&mut registry, &volume_id, &op, AbsentStep::Other);
            }
            let remote = self
                .agent
                .connect_remote_areas(&registry, &volume_id, &map, false)
                .await
                .map_err(|e| control_status(&e))?;
            let Some(entry) = registry.volumes.get_mut(&volume_id) else {
                return absent_step(&mut registry, &volume_id, &op, AbsentStep::Other);
            };
            entry.remote_areas.extend(remote);
            Arc::clone(&entry.volume)
        };
        let effects = volume
            .stage(op, map)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        self.finish_step(&volume, effects).await
    }

    async fn quiesce(
        &self,
        request: Request<QuiesceRequest>,
    ) -> Result<Response<RemapStepResponse>, Status> {
        let request = request.into_inner();
        let (volume_id, op) = op_ref(request.operation)?;
        let volume = match self
            .staged_or_absent(&volume_id, &op, AbsentStep::Quiesce)
            .await
        {
            Ok(volume) => volume,
            Err(answer) => return answer,
        };
        let scope = hold_scope(request.scope.as_ref(), &volume)?;
        if request.hold_timeout_ms > 0 {
            volume.set_hold_timeout(request.hold_timeout_ms);
        }
        let name = volume_id.clone();
        let (first, rest) = {
            let op = op.clone();
            let scope = scope.clone();
            let effects = volume.gate_control(|gate, _| gate.quiesce(&name, op, scope));
            split_answer(effects)
        };
        // The hold record is on disk before anything is answered (§11.4).
        self.carry_out(&volume, rest).await?;
        if injected("tessera-node-quiesce-crash", &self.agent.config.node_id) {
            tracing::error!(volume = %volume_id, "crashing inside the quiesce (fail point)");
            std::process::abort();
        }
        if let Some(answer) = first {
            return self.respond(&volume, answer);
        }
        // Draining: the completion that drains the hold records the answer; a repeated Quiesce
        // for the same step replays it and otherwise changes nothing.
        let effects = volume
            .gate_wait(|gate, _| gate.quiesce(&name, op.clone(), scope.clone()))
            .await;
        let (answer, rest) = split_answer(effects);
        self.carry_out(&volume, rest).await?;
        match answer {
            Some(answer) => self.respond(&volume, answer),
            None => Err(Status::internal(
                "the gate ended the quiesce without an answer",
            )),
        }
    }

    async fn commit(
        &self,
        request: Request<RemapStepRequest>,
    ) -> Result<Response<RemapStepResponse>, Status> {
        let (volume_id, op) = op_ref(request.into_inner().operation)?;
        let volume = match self
            .staged_or_absent(&volume_id, &op, AbsentStep::Other)
            .await
        {
            Ok(volume) => volume,
            Err(answer) => return answer,
        };
        if injected("tessera-node-commit", &self.agent.config.node_id) {
            return Err(Status::failed_precondition(
                "commit failed: injected fault (fail point tessera-node-commit)",
            ));
        }
        let effects = volume.gate_control(|gate, _| gate.commit(&volume_id, op));
        self.finish_step(&volume, effects).await
    }

    async fn rollback(
        &self,
        request: Request<RemapStepRequest>,
    ) -> Result<Response<RemapStepResponse>, Status> {
        let (volume_id, op) = op_ref(request.into_inner().operation)?;
        let volume = match self
            .staged_or_absent(&volume_id, &op, AbsentStep::Other)
            .await
        {
            Ok(volume) => volume,
            Err(answer) => return answer,
        };
        let effects = volume.gate_control(|gate, _| gate.rollback(&volume_id, op));
        self.finish_step(&volume, effects).await
    }

    async fn resume(
        &self,
        request: Request<RemapStepRequest>,
    ) -> Result<Response<RemapStepResponse>, Status> {
        let (volume_id, op) = op_ref(request.into_inner().operation)?;
        let volume = match self
            .staged_or_absent(&volume_id, &op, AbsentStep::Resume)
            .await
        {
            Ok(volume) => volume,
            Err(answer) => return answer,
        };
        let held = volume.held_for();
        let effects = volume.gate_control(|gate, _| gate.resume(&volume_id, op));
        let response = self.finish_step(&volume, effects).await?;
        if let Some(held) = held {
            // docs/benchmarks/remap.md reads the hold windows from this line.
            tracing::info!(volume = %volume_id, hold_us = held.as_micros() as u64, "hold released");
        }
        Ok(response)
    }

    async fn fence(
        &self,
        request: Request<RemapStepRequest>,
    ) -> Result<Response<RemapStepResponse>, Status> {
        let (volume_id, op) = op_ref(request.into_inner().operation)?;
        let volume = match self
            .staged_or_absent(&volume_id, &op, AbsentStep::Resume)
            .await
        {
            Ok(volume) => volume,
            Err(answer) => return answer,
        };
        let effects = volume.gate_control(|gate, _| gate.fence(&volume_id, op));
        let fenced = effects.iter().any(|e| {
            matches!(
                e,
                Effect::Answer(GateAnswer {
                    result: Ok(Reply::Fenced),
                    ..
                })
            )
        });
        let response = self.finish_step(&volume, effects).await?;
        if fenced {
            // Seed 004 611/617: the excluded node stops reaching peers' areas for this volume.
            // Its connections to areas no other staged volume uses are closed; the lenders'
            // grants are revoked by the operator (the volume's access nodes).
            let mut registry = self.agent.staged.lock().await;
            let areas = registry
                .volumes
                .get_mut(&volume_id)
                .map(|entry| std::mem::take(&mut entry.remote_areas))
                .unwrap_or_default();
            self.agent.release_remote_areas(&registry, &areas).await;
            tracing::warn!(volume = %volume_id, ?areas, "fenced: I/O refused, remote areas closed");
        }
        Ok(response)
    }

    async fn copy_extents(
        &self,
        request: Request<CopyExtentsRequest>,
    ) -> Result<Response<CopyExtentsResponse>, Status> {
        let request = request.into_inner();
        let (volume_id, op) = op_ref(request.operation)?;
        let (offset, length) = match (u64::try_from(request.offset), u64::try_from(request.length))
        {
            (Ok(o), Ok(l)) => (o, l),
            _ => {
                return Err(Status::invalid_argument(
                    "offset and length must not be negative",
                ));
            }
        };
        if request.destination.is_empty() {
            return Err(Status::invalid_argument("destination is required"));
        }
        let destination = request
            .destination
            .iter()
            .map(|r| {
                u64::try_from(r.area_offset)
                    .map(|o| ReplicaLocation::new(r.area.as_str(), o))
                    .map_err(|_| Status::invalid_argument("destination areaOffset is negative"))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let staged = {
            let registry = self.agent.staged.lock().await;
            registry
                .volumes
                .get(&volume_id)
                .map(|v| Arc::clone(&v.volume))
        };
        let Some(volume) = staged else {
            let copied = self
                .copy_unused(&volume_id, &op, offset, length, &destination)
                .await?;
            return Ok(Response::new(CopyExtentsResponse {
                bytes_copied: copied,
            }));
        };
        // The operator sequences the copy inside the hold of this operation: a copy of a range
        // writes may still reach would copy a moving target.
        match volume.hold_state() {
            (GateState::Held, Some(hold)) if hold.operation_id == op.operation_id => {}
            (state, hold) => {
                return Err(Status::failed_precondition(format!(
                    "copy needs the volume held and drained for operation {} (state {state:?}, \
                     hold {:?})",
                    op.operation_id,
                    hold.map(|h| h.operation_id)
                )));
            }
        }
        // Destinations: claimed for the volume (local) or granted by their lender (remote)
        // before the first byte is written.
        {
            let mut registry = self.agent.staged.lock().await;
            let remote = self
                .agent
                .prepare_copy_destinations(
                    &registry,
                    &volume_id,
                    &destination,
                    length,
                    op.generation,
                )
                .await
                .map_err(|e| control_status(&e))?;
            if let Some(entry) = registry.volumes.get_mut(&volume_id) {
                entry.remote_areas.extend(remote);
            }
        }
        let started = std::time::Instant::now();
        let copied = volume
            .copy_range(offset, length, &destination, op.generation, COPY_CHUNK)
            .await
            .map_err(|e| match e {
                EngineError::UnknownArea { .. } => Status::failed_precondition(format!(
                    "{e} (destinations must be areas this node reaches)"
                )),
                EngineError::OutOfRange { .. } | EngineError::Unaligned { .. } => {
                    Status::invalid_argument(e.to_string())
                }
                _ => Status::internal(e.to_string()),
            })?;
        // docs/benchmarks/remap.md reads the copy throughput from this line.
        tracing::info!(volume = %volume_id, offset, length, copied,
            copy_us = started.elapsed().as_micros() as u64, "extents copied");
        Ok(Response::new(CopyExtentsResponse {
            bytes_copied: copied,
        }))
    }

    async fn get_gate_state(
        &self,
        request: Request<GetGateStateRequest>,
    ) -> Result<Response<GateStateResponse>, Status> {
        let volume_id = request.into_inner().volume;
        if volume_id.is_empty() {
            return Err(Status::invalid_argument("volume is required"));
        }
        let volume = self.volume(&volume_id).await?;
        let view = volume.gate_view();
        Ok(Response::new(GateStateResponse {
            state: state_name(view.state).into(),
            active_generation: view.active.get() as i64,
            staged_generation: view.staged.map_or(0, |g| g.get() as i64),
            operation_id: view.operation_id.unwrap_or_default(),
            attempt: view.attempt,
        }))
    }
}

/// Whether fail point `name` is armed for this node: `FAILPOINTS="<name>=return(<node>)"`
/// (`1*return(<node>)` fires once). Always false without the `failpoints` feature.
fn injected(name: &str, node: &str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |arg| arg.as_deref() == Some(node)).unwrap_or(false)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = (name, node);
        false
    }
}

/// How long the attachment update waits before it reads the gate's state.
const ATTACHMENT_SETTLE: Duration = Duration::from_millis(250);

/// Bytes per COPY I/O of CopyExtents.
const COPY_CHUNK: u64 = 1 << 20;

/// How often the hold timers of staged volumes are checked.
const HOLD_TICK: Duration = Duration::from_millis(250);

fn state_name(state: GateState) -> &'static str {
    match state {
        GateState::Running => "Running",
        GateState::Draining => "Draining",
        GateState::Held => "Held",
        GateState::Fenced => "Fenced",
    }
}

/// The volume and gate reference of a remap message.
#[allow(clippy::result_large_err)]
fn op_ref(operation: Option<OperationRef>) -> Result<(String, OpRef), Status> {
    let operation = operation.ok_or_else(|| Status::invalid_argument("operation is required"))?;
    if operation.volume.is_empty() {
        return Err(Status::invalid_argument("operation.volume is required"));
    }
    if operation.operation_id.is_empty() {
        return Err(Status::invalid_argument(
            "operation.operationId is required",
        ));
    }
    let generation = u64::try_from(operation.generation)
        .map_err(|_| Status::invalid_argument("operation.generation is negative"))?;
    Ok((
        operation.volume,
        OpRef::new(
            operation.operation_id,
            operation.attempt,
            Generation(generation),
        ),
    ))
}

/// The hold scope of a Quiesce: empty = the whole volume; byte ranges widened to whole extents.
#[allow(clippy::result_large_err)]
fn hold_scope(scope: Option<&WireHoldScope>, volume: &Volume) -> Result<HoldScope, Status> {
    let ranges = scope.map(|s| s.ranges.as_slice()).unwrap_or_default();
    if ranges.is_empty() {
        return Ok(HoldScope::WholeVolume);
    }
    let extent_size = volume.map().extent_size();
    let mut extents = Vec::with_capacity(ranges.len());
    for r in ranges {
        let range = match (u64::try_from(r.offset), u64::try_from(r.length)) {
            (Ok(o), Ok(l)) => {
                ByteRange::new(o, l).map_err(|e| Status::invalid_argument(e.to_string()))?
            }
            _ => {
                return Err(Status::invalid_argument(
                    "scope ranges must not be negative",
                ));
            }
        };
        if let Span::Extents(e) = Span::of_bytes(range, extent_size) {
            extents.push(e);
        }
    }
    Ok(HoldScope::extents(extents))
}

/// The gate's answer among `effects`, and the rest.
fn split_answer(effects: Vec<Effect>) -> (Option<GateAnswer>, Vec<Effect>) {
    let mut answer = None;
    let mut rest = Vec::new();
    for effect in effects {
        match effect {
            Effect::Answer(a) if answer.is_none() => answer = Some(a),
            other => rest.push(other),
        }
    }
    (answer, rest)
}

/// What a remap step does to a volume that is not staged here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AbsentStep {
    /// Sets the absent hold: NodeStage of the volume waits for the Resume (AS-19).
    Quiesce,
    /// Resume or Fence: the absent hold of this operation ends.
    Resume,
    /// Stage, Commit, Rollback: nothing to do.
    Other,
}

/// Seed 004's participants are the nodes the volume is published to. One that has not staged
/// it (published, NodeStage not run yet, or already unstaged) has no I/O of it in flight and
/// no map to switch, so each step is done at once; the answer's state is `Absent`. Called
/// under the registry lock, so a NodeStage either ran before (and the volume is staged) or
/// sees the absent hold.
fn absent_step(
    registry: &mut super::staging::Registry,
    volume_id: &str,
    op: &OpRef,
    step: AbsentStep,
) -> Result<Response<RemapStepResponse>, Status> {
    match step {
        AbsentStep::Quiesce => {
            registry
                .absent_holds
                .insert(volume_id.to_string(), op.operation_id.clone());
        }
        AbsentStep::Resume => {
            if registry.absent_holds.get(volume_id) == Some(&op.operation_id) {
                registry.absent_holds.remove(volume_id);
            }
        }
        AbsentStep::Other => {}
    }
    tracing::debug!(volume = volume_id, operation = %op.operation_id, ?step,
        "remap step for a volume not staged here: done (nothing in flight)");
    Ok(Response::new(RemapStepResponse {
        state: ABSENT.into(),
        active_generation: 0,
        redispatched: 0,
        hold_ms: 0,
    }))
}

/// The state a remap step reports for a volume this node has not staged.
pub const ABSENT: &str = "Absent";

impl Service {
    /// CopyExtents of a volume no node uses (seed 004 AS-28: the move needs no hold): the
    /// copier named in `status.incoming` opens the committed mapping in a private engine
    /// (no frontend), copies, and closes it. Refused when the volume is published anywhere:
    /// then the copy must run inside a participant's hold.
    async fn copy_unused(
        &self,
        volume_id: &str,
        op: &OpRef,
        offset: u64,
        length: u64,
        destination: &[ReplicaLocation],
    ) -> Result<u64, Status> {
        let object = self
            .agent
            .get_volume(volume_id)
            .await
            .map_err(|e| control_status(&e))?;
        let access = object.spec.access_nodes();
        if !access.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {volume_id} is published to {access:?} but not staged here: its copy \
                 runs inside the hold of a node that has it staged"
            )));
        }
        let map = Agent::model_map(&object).map_err(|e| control_status(&e))?;
        let registry = self.agent.staged.lock().await;
        if registry.volumes.contains_key(volume_id) {
            return Err(Status::failed_precondition(format!(
                "volume {volume_id} was staged here meanwhile; retry the copy under its hold"
            )));
        }
        let mut connected = self
            .agent
            .ensure_remote_areas(&registry, volume_id, &map)
            .await
            .map_err(|e| control_status(&e))?;
        let result = async {
            connected.extend(
                self.agent
                    .prepare_copy_destinations(
                        &registry,
                        volume_id,
                        destination,
                        length,
                        op.generation,
                    )
                    .await
                    .map_err(|e| control_status(&e))?,
            );
            let engine = Volume::open(
                volume_id,
                Arc::new(map),
                Arc::clone(&self.agent.registry),
                VolumeOptions::default(),
            )
            .map_err(|e| Status::internal(e.to_string()))?;
            engine
                .copy_range(offset, length, destination, op.generation, COPY_CHUNK)
                .await
                .map_err(|e| Status::internal(e.to_string()))
        }
        .await;
        // Connections only this copy used are closed again.
        self.agent.release_remote_areas(&registry, &connected).await;
        let copied = result?;
        tracing::info!(
            volume = volume_id,
            offset,
            length,
            copied,
            "extents copied (volume not staged on any node)"
        );
        Ok(copied)
    }

    /// The staged volume, or the answer of [`absent_step`] when it is not staged here.
    #[allow(clippy::result_large_err)]
    async fn staged_or_absent(
        &self,
        volume_id: &str,
        op: &OpRef,
        step: AbsentStep,
    ) -> Result<Arc<Volume>, Result<Response<RemapStepResponse>, Status>> {
        let mut registry = self.agent.staged.lock().await;
        match registry.volumes.get(volume_id) {
            Some(v) => Ok(Arc::clone(&v.volume)),
            None => Err(absent_step(&mut registry, volume_id, op, step)),
        }
    }

    #[allow(clippy::result_large_err)]
    async fn volume(&self, volume_id: &str) -> Result<Arc<Volume>, Status> {
        let registry = self.agent.staged.lock().await;
        registry
            .volumes
            .get(volume_id)
            .map(|v| Arc::clone(&v.volume))
            .ok_or_else(|| control_status(&AgentError::NotStaged(volume_id.into())))
    }

    /// Carries out a control call's effects and answers it.
    async fn finish_step(
        &self,
        volume: &Volume,
        effects: Vec<Effect>,
    ) -> Result<Response<RemapStepResponse>, Status> {
        let (answer, rest) = split_answer(effects);
        self.carry_out(volume, rest).await?;
        match answer {
            Some(answer) => self.respond(volume, answer),
            None => Err(Status::internal("the gate gave no answer")),
        }
    }

    /// Persists the hold record (or its removal) before the answer goes out, and records the
    /// gate's state in the volume's attachment (in the background: the API must not lengthen
    /// the hold).
    #[allow(clippy::result_large_err)]
    async fn carry_out(&self, volume: &Volume, effects: Vec<Effect>) -> Result<(), Status> {
        let persist = effects
            .iter()
            .any(|e| matches!(e, Effect::PersistHold(_) | Effect::ClearHold));
        for effect in &effects {
            if let Effect::HoldTimeout { op, held_since } = effect {
                tracing::warn!(volume = %volume.name(), operation = %op.operation_id,
                    held_since, "hold timeout");
            }
        }
        if persist {
            persist_hold(&self.agent, volume.name())
                .await
                .map_err(|e| Status::internal(format!("persisting the hold record: {e}")))?;
            spawn_attachment_update(Arc::clone(&self.agent), volume.name().to_string());
        }
        Ok(())
    }

    #[allow(clippy::result_large_err)]
    fn respond(
        &self,
        volume: &Volume,
        answer: GateAnswer,
    ) -> Result<Response<RemapStepResponse>, Status> {
        let reply = answer
            .result
            .map_err(|refusal| Status::failed_precondition(refusal.to_string()))?;
        let view = volume.gate_view();
        let redispatched = match reply {
            Reply::Resumed { redispatched, .. } => redispatched as u64,
            _ => 0,
        };
        Ok(Response::new(RemapStepResponse {
            state: state_name(view.state).into(),
            active_generation: view.active.get() as i64,
            redispatched,
            hold_ms: volume.held_for_ms().unwrap_or(0),
        }))
    }
}

/// Rewrites the volume's mapping cache entry (it carries the gate's hold record).
pub(crate) async fn persist_hold(agent: &Agent, volume_id: &str) -> Result<(), AgentError> {
    let registry = agent.staged.lock().await;
    let entry = registry
        .volumes
        .get(volume_id)
        .ok_or_else(|| AgentError::NotStaged(volume_id.into()))?;
    cache::store(&agent.config.state_dir, &entry.cached()?)
}

/// Records the gate's current state in `status.attachments` (Held while held, Fenced once
/// excluded, Running otherwise); reads the state when it runs, so racing updates converge.
pub(crate) fn spawn_attachment_update(agent: Arc<Agent>, volume_id: String) {
    let queued = agent
        .attachment_updates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(volume_id.clone());
    if !queued {
        // The update already waiting reads the state when it runs.
        return;
    }
    tokio::spawn(async move {
        // Coalesced: a remap cycle holds for tens of ms, and writing Held then Running for
        // each of them (every node, every cycle) loaded the API server with thousands of
        // VirtualVolume writes per move. A hold still set after this delay is recorded; a
        // restarted node's restored hold and a fence are recorded the same way.
        tokio::time::sleep(ATTACHMENT_SETTLE).await;
        agent
            .attachment_updates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&volume_id);
        let view = {
            let registry = agent.staged.lock().await;
            match registry.volumes.get(&volume_id) {
                Some(entry) => entry.volume.gate_view(),
                None => return,
            }
        };
        let state = match view.state {
            GateState::Running => AttachmentState::Running,
            GateState::Draining | GateState::Held => AttachmentState::Held,
            GateState::Fenced => AttachmentState::Fenced,
        };
        if let Err(error) =
            status::set_attachment_state(&agent, &volume_id, Some(view.active.get() as i64), state)
                .await
        {
            tracing::warn!(volume = %volume_id, %error, "attachment state not recorded");
        }
    });
}

/// The hold timer 215 of every staged volume (seed 004 820 → 718): a HoldTimeout is logged and
/// published as a Warning Event on the VirtualVolume. The gate keeps holding (§7.2).
async fn hold_timer(agent: Arc<Agent>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(HOLD_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let recorder = Recorder::new(
        agent.client.clone(),
        Reporter {
            controller: "tessera-csi-node".into(),
            instance: Some(agent.config.node_id.clone()),
        },
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        let volumes: Vec<Arc<Volume>> = {
            let registry = agent.staged.lock().await;
            registry
                .volumes
                .values()
                .map(|v| Arc::clone(&v.volume))
                .collect()
        };
        for volume in volumes {
            let effects = volume.gate_control(|gate, now| gate.tick(now));
            for effect in effects {
                if let Effect::HoldTimeout { op, held_since } = effect {
                    let waited = volume.now_ms().saturating_sub(held_since);
                    let note = format!(
                        "node {}: I/O of volume {} held for operation {} (attempt {}, generation \
                         {}) for {waited} ms, beyond the hold timeout; still held until the \
                         operator resumes or fences",
                        agent.config.node_id,
                        volume.name(),
                        op.operation_id,
                        op.attempt,
                        op.generation
                    );
                    tracing::warn!(volume = %volume.name(), operation = %op.operation_id,
                        waited, "hold timeout");
                    publish_warning(&agent, &recorder, volume.name(), "HoldTimeout", note).await;
                }
            }
        }
    }
}

/// A Warning Event regarding the VirtualVolume; failures are logged only.
pub(crate) async fn publish_warning(
    agent: &Agent,
    recorder: &Recorder,
    volume_id: &str,
    reason: &str,
    note: String,
) {
    let api: Api<VirtualVolume> = Api::all(agent.client.clone());
    let object = match api.get_opt(volume_id).await {
        Ok(Some(object)) => object,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(volume = volume_id, %error, "event not published");
            return;
        }
    };
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Hold".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(volume = volume_id, %error, "event not published");
    }
}

/// The gRPC status of an agent error on the node-control side (the CSI side has its own in
/// `csi::node`, where the codes differ: an unknown volume is NOT_FOUND for both).
/// A leg answer on the wire; `None`: the volume is not staged here (state `Absent`).
fn leg_response(answer: Option<&LegAnswer>) -> MirrorLegResponse {
    let Some(answer) = answer else {
        return MirrorLegResponse {
            state: "Absent".into(),
            ..Default::default()
        };
    };
    let leg = answer.leg.as_ref();
    MirrorLegResponse {
        state: format!("{:?}", answer.gate),
        mode: match leg.map(|l| l.mode) {
            None => WireLegMode::LegNone,
            Some(LegMode::Mirror) => WireLegMode::LegMirror,
            Some(LegMode::Track) => WireLegMode::LegTrack,
        } as i32,
        secondary_generation: leg.map_or(0, |l| l.secondary_generation.get() as i64),
        failure: leg.and_then(|l| l.failure.clone()).unwrap_or_default(),
    }
}

fn control_status(error: &AgentError) -> Status {
    crate::csi::node::status_of(error)
}

/// Serves node-control on `listener` until `stopped`.
pub(crate) async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    mut stopped: watch::Receiver<bool>,
) {
    let timer = tokio::spawn(hold_timer(Arc::clone(&agent), stopped.clone()));
    let auth = BearerAuth::new(agent.config.token.clone());
    let service = NodeControlServer::with_interceptor(Service { agent }, move |r| auth.check(r));
    let result = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = stopped.changed().await;
        })
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "node-control server failed");
    }
    timer.abort();
}
