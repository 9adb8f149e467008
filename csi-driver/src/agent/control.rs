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

use tessera_api::model::{ExtentMap, ExtentSize, Generation, ReplicaLocation, Run};
use tessera_proto::node_control::v1::node_control_server::{NodeControl, NodeControlServer};
use tessera_proto::node_control::v1::{
    ApplyMappingRequest, ApplyMappingResponse, Mapping, MountInquiryRequest, MountInquiryResponse,
    ReportUsageRequest, ReportUsageResponse,
};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::{Agent, AgentError, status};

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

/// The model map of a wire mapping.
fn to_model(mapping: &Mapping) -> Result<ExtentMap, String> {
    let non_negative =
        |field: &str, v: i64| u64::try_from(v).map_err(|_| format!("{field} {v} is negative"));
    let extent_size = ExtentSize::new(non_negative("extentSizeBytes", mapping.extent_size_bytes)?)
        .map_err(|e| e.to_string())?;
    let mut runs = Vec::with_capacity(mapping.runs.len());
    for run in &mapping.runs {
        let replicas = run
            .replicas
            .iter()
            .map(|r| {
                Ok(ReplicaLocation::new(
                    r.area.as_str(),
                    non_negative("areaOffset", r.area_offset)?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        runs.push(Run::new(
            non_negative("offset", run.offset)?,
            non_negative("length", run.length)?,
            replicas,
        ));
    }
    ExtentMap::from_runs(
        non_negative("sizeBytes", mapping.size_bytes)?,
        extent_size,
        Generation(non_negative("generation", mapping.generation)?),
        runs,
    )
    .map_err(|e| e.to_string())
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

    // The remap steps (seed 004) are wired to the engine's I/O gate by the remap issue; until
    // then they are refused explicitly rather than pretended.
    async fn stage_mapping(
        &self,
        _: Request<tessera_proto::node_control::v1::StageMappingRequest>,
    ) -> Result<Response<tessera_proto::node_control::v1::RemapStepResponse>, Status> {
        Err(remap_not_wired())
    }

    async fn quiesce(
        &self,
        _: Request<tessera_proto::node_control::v1::QuiesceRequest>,
    ) -> Result<Response<tessera_proto::node_control::v1::RemapStepResponse>, Status> {
        Err(remap_not_wired())
    }

    async fn commit(
        &self,
        _: Request<tessera_proto::node_control::v1::RemapStepRequest>,
    ) -> Result<Response<tessera_proto::node_control::v1::RemapStepResponse>, Status> {
        Err(remap_not_wired())
    }

    async fn rollback(
        &self,
        _: Request<tessera_proto::node_control::v1::RemapStepRequest>,
    ) -> Result<Response<tessera_proto::node_control::v1::RemapStepResponse>, Status> {
        Err(remap_not_wired())
    }

    async fn resume(
        &self,
        _: Request<tessera_proto::node_control::v1::RemapStepRequest>,
    ) -> Result<Response<tessera_proto::node_control::v1::RemapStepResponse>, Status> {
        Err(remap_not_wired())
    }

    async fn fence(
        &self,
        _: Request<tessera_proto::node_control::v1::RemapStepRequest>,
    ) -> Result<Response<tessera_proto::node_control::v1::RemapStepResponse>, Status> {
        Err(remap_not_wired())
    }

    async fn copy_extents(
        &self,
        _: Request<tessera_proto::node_control::v1::CopyExtentsRequest>,
    ) -> Result<Response<tessera_proto::node_control::v1::CopyExtentsResponse>, Status> {
        Err(remap_not_wired())
    }

    async fn get_gate_state(
        &self,
        _: Request<tessera_proto::node_control::v1::GetGateStateRequest>,
    ) -> Result<Response<tessera_proto::node_control::v1::GateStateResponse>, Status> {
        Err(remap_not_wired())
    }
}

fn remap_not_wired() -> Status {
    Status::unimplemented("the remap steps are not wired to the I/O gate yet (docs/remap.md)")
}

/// The gRPC status of an agent error on the node-control side (the CSI side has its own in
/// `csi::node`, where the codes differ: an unknown volume is NOT_FOUND for both).
fn control_status(error: &AgentError) -> Status {
    crate::csi::node::status_of(error)
}

/// Serves node-control on `listener` until `stopped`.
pub(crate) async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    mut stopped: watch::Receiver<bool>,
) {
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
}
