//! The operator's side of the node-control protocol (seed 004 §11.3): one call per remap step
//! to one node. [`NodeControl`] is what the remap coordinator talks to; [`TonicNodeControl`]
//! implements it over the node plugin's gRPC service, finding each node's endpoint in its Lease
//! (`tessera-node-<node>`, annotation `tessera.io/control-endpoint`) and authenticating with the
//! shared node-control token (`authorization: Bearer <token>`).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tessera_api::v1alpha1::VolumeMapping;
use tessera_proto::node_control::v1 as pb;
use tessera_proto::node_control::v1::node_control_client::NodeControlClient;
use tonic::transport::{Channel, Endpoint};

/// Annotation of a node's Lease naming its node-control endpoint (`host:port`).
pub const CONTROL_ENDPOINT_ANNOTATION: &str = "tessera.io/control-endpoint";

/// Name of a node's Lease.
pub fn node_lease_name(node: &str) -> String {
    format!("tessera-node-{node}")
}

/// The fencing token every remap message carries: (volume, operationId, attempt, generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationRef {
    pub volume: String,
    pub operation_id: String,
    pub attempt: u32,
    pub generation: i64,
}

/// One remap step sent to one node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeRequest {
    Stage {
        op: OperationRef,
        mapping: VolumeMapping,
        size_bytes: i64,
    },
    /// `ranges`: byte ranges of the volume (empty: the whole volume).
    Quiesce {
        op: OperationRef,
        ranges: Vec<(i64, i64)>,
        /// The remap's `holdTimeoutMs` (the node's hold timer).
        hold_timeout_ms: u64,
    },
    Commit(OperationRef),
    Rollback(OperationRef),
    Resume(OperationRef),
    Fence(OperationRef),
    /// Copy `[offset, offset + length)` of the volume from its active replicas to
    /// `destination` (area, area offset), one per replica.
    Copy {
        op: OperationRef,
        offset: i64,
        length: i64,
        destination: Vec<(String, i64)>,
    },
}

impl NodeRequest {
    pub fn name(&self) -> &'static str {
        match self {
            NodeRequest::Stage { .. } => "StageMapping",
            NodeRequest::Quiesce { .. } => "Quiesce",
            NodeRequest::Commit(_) => "Commit",
            NodeRequest::Rollback(_) => "Rollback",
            NodeRequest::Resume(_) => "Resume",
            NodeRequest::Fence(_) => "Fence",
            NodeRequest::Copy { .. } => "CopyExtents",
        }
    }
}

/// A node's answer to a step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepAnswer {
    /// Gate state after the step (Running, Held, Draining, Fenced).
    pub state: String,
    pub active_generation: i64,
    pub hold_ms: u64,
    pub bytes_copied: u64,
}

/// A node's gate state of one volume (`GetGateState`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GateState {
    pub state: String,
    pub active_generation: i64,
    pub operation_id: String,
}

/// A node's usage view of a volume (`ReportUsage`), taken under the hold for the re-check of
/// a release (seed 000 D-17).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageAnswer {
    pub generation: i64,
    pub in_use: Vec<u8>,
    pub high_priority: Vec<u8>,
}

/// A node's answer to the seed 003 mount inquiry (`MountInquiry`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountAnswer {
    pub staged: bool,
    pub published: bool,
    pub mounted: bool,
    pub paths: Vec<String>,
    pub detail: String,
}

/// The mirror leg a node is asked to run for a primary (`SetMirrorLeg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegMode {
    None,
    Mirror,
    Track,
}

/// `SetMirrorLeg`: the leg described, not a delta (idempotent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegRequest {
    pub volume: String,
    pub secondary: String,
    pub mode: LegMode,
    /// Restart the dirty bits at this cut (only while the volume is held; once per cut id).
    pub reset_cut: Option<String>,
}

/// A node's mirror leg of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LegAnswer {
    /// The primary's gate state, or `Absent` when the node has not staged it.
    pub state: String,
    pub mode: Option<LegMode>,
    /// Why the leg was suspended (the secondary failed a write).
    pub failure: String,
}

/// `CollectDirty`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyAnswer {
    pub leg: LegAnswer,
    pub sequence: u64,
    /// Portable roaring bitmap of extent indices.
    pub extents: Vec<u8>,
    /// False: the node lost bits (it restarted); treat every extent as dirty.
    pub complete: bool,
}

/// Why a call did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeCallError {
    /// The node refused the step (the gate's refusal: not held, stale attempt, …).
    #[error("{0}")]
    Refused(String),
    /// No answer: the node is unreachable, unknown or too slow. The coordinator treats it as
    /// a missing answer (its deadline turns it into a timeout).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// This operator cannot talk to nodes at all (no token configured).
    #[error("{0}")]
    NotConfigured(String),
}

/// The node-control calls the coordinator makes. Implemented over gRPC by
/// [`TonicNodeControl`]; tests may use an in-memory fake.
pub trait NodeControl: Send + Sync + fmt::Debug {
    /// `Err` with the reason when this operator cannot reach nodes at all (e.g. no token):
    /// remaps of attached volumes are refused up front.
    fn available(&self) -> Result<(), String>;
    fn call(
        &self,
        node: &str,
        request: NodeRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<StepAnswer, NodeCallError>>;
    fn gate_state(
        &self,
        node: &str,
        volume: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<GateState, NodeCallError>>;
    fn report_usage(
        &self,
        node: &str,
        volume: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<UsageAnswer, NodeCallError>>;

    // Mirror pairs (seed 003). Fakes that do not model them answer NotConfigured.

    fn mount_inquiry(
        &self,
        node: &str,
        volume: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<MountAnswer, NodeCallError>> {
        let _ = (node, volume, timeout);
        Box::pin(async { Err(NodeCallError::NotConfigured(NO_MIRROR.into())) })
    }

    fn set_mirror_leg(
        &self,
        node: &str,
        request: LegRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<LegAnswer, NodeCallError>> {
        let _ = (node, request, timeout);
        Box::pin(async { Err(NodeCallError::NotConfigured(NO_MIRROR.into())) })
    }

    fn collect_dirty(
        &self,
        node: &str,
        volume: &str,
        acknowledge: u64,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<DirtyAnswer, NodeCallError>> {
        let _ = (node, volume, acknowledge, timeout);
        Box::pin(async { Err(NodeCallError::NotConfigured(NO_MIRROR.into())) })
    }

    /// Copies `extents` (portable roaring) of the primary to its leg; the bytes copied.
    fn copy_to_leg(
        &self,
        node: &str,
        volume: &str,
        extents: Vec<u8>,
        held: bool,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<u64, NodeCallError>> {
        let _ = (node, volume, extents, held, timeout);
        Box::pin(async { Err(NodeCallError::NotConfigured(NO_MIRROR.into())) })
    }
}

const NO_MIRROR: &str = "this node-control client does not implement the mirror calls";

fn wire_leg_mode(mode: LegMode) -> i32 {
    (match mode {
        LegMode::None => pb::LegMode::LegNone,
        LegMode::Mirror => pb::LegMode::LegMirror,
        LegMode::Track => pb::LegMode::LegTrack,
    }) as i32
}

fn leg_answer(r: Option<pb::MirrorLegResponse>) -> LegAnswer {
    let r = r.unwrap_or_default();
    LegAnswer {
        state: r.state,
        mode: match pb::LegMode::try_from(r.mode) {
            Ok(pb::LegMode::LegMirror) => Some(LegMode::Mirror),
            Ok(pb::LegMode::LegTrack) => Some(LegMode::Track),
            _ => None,
        },
        failure: r.failure,
    }
}

/// [`NodeControl`] over the node plugins' gRPC service.
#[derive(Clone)]
pub struct TonicNodeControl {
    client: kube::Client,
    namespace: String,
    token: Option<Arc<str>>,
    /// Channels by endpoint (tonic channels reconnect by themselves).
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl fmt::Debug for TonicNodeControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TonicNodeControl")
            .field("namespace", &self.namespace)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl TonicNodeControl {
    pub fn new(client: kube::Client, namespace: impl Into<String>, token: Option<String>) -> Self {
        TonicNodeControl {
            client,
            namespace: namespace.into(),
            token: token.map(|t| Arc::from(t.trim())),
            channels: Arc::default(),
        }
    }

    /// The node's client: endpoint from its Lease, a cached channel, the token.
    async fn connect(
        client: kube::Client,
        namespace: String,
        channels: Arc<Mutex<HashMap<String, Channel>>>,
        node: String,
    ) -> Result<NodeControlClient<Channel>, NodeCallError> {
        let leases: Api<Lease> = Api::namespaced(client, &namespace);
        let lease = leases
            .get_opt(&node_lease_name(&node))
            .await
            .map_err(|e| NodeCallError::Unreachable(format!("reading the Lease of {node}: {e}")))?
            .ok_or_else(|| {
                NodeCallError::Unreachable(format!(
                    "node {node} has no Lease {} in namespace {namespace}",
                    node_lease_name(&node)
                ))
            })?;
        let endpoint = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CONTROL_ENDPOINT_ANNOTATION))
            .cloned()
            .ok_or_else(|| {
                NodeCallError::Unreachable(format!(
                    "the Lease of node {node} has no {CONTROL_ENDPOINT_ANNOTATION}"
                ))
            })?;
        let cached = channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&endpoint)
            .cloned();
        let channel = match cached {
            Some(c) => c,
            None => {
                let channel = Endpoint::from_shared(format!("http://{endpoint}"))
                    .map_err(|e| NodeCallError::Unreachable(format!("endpoint {endpoint}: {e}")))?
                    .connect_timeout(Duration::from_secs(2))
                    .connect_lazy();
                channels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(endpoint, channel.clone());
                channel
            }
        };
        Ok(NodeControlClient::new(channel))
    }

    async fn client_for(&self, node: &str) -> Result<NodeControlClient<Channel>, NodeCallError> {
        TonicNodeControl::connect(
            self.client.clone(),
            self.namespace.clone(),
            Arc::clone(&self.channels),
            node.to_string(),
        )
        .await
    }

    fn request<T>(
        &self,
        message: T,
        timeout: Duration,
    ) -> Result<tonic::Request<T>, NodeCallError> {
        let token = self
            .token
            .as_ref()
            .ok_or_else(|| NodeCallError::NotConfigured(NO_TOKEN.to_string()))?;
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        let value = format!("Bearer {token}").parse().map_err(|_| {
            NodeCallError::NotConfigured(
                "the node-control token is not a valid header value".into(),
            )
        })?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

const NO_TOKEN: &str = "the operator has no node-control token (--token-file), so it cannot \
                        quiesce nodes: remaps of attached volumes are refused";

fn op_ref(op: &OperationRef) -> Option<pb::OperationRef> {
    Some(pb::OperationRef {
        volume: op.volume.clone(),
        operation_id: op.operation_id.clone(),
        attempt: op.attempt,
        generation: op.generation,
    })
}

fn wire_mapping(mapping: &VolumeMapping, size_bytes: i64) -> pb::Mapping {
    pb::Mapping {
        generation: mapping.generation,
        extent_size_bytes: mapping.extent_size_bytes,
        size_bytes,
        runs: mapping
            .extents
            .iter()
            .map(|r| pb::MappedRun {
                offset: r.offset,
                length: r.length,
                replicas: r
                    .replicas
                    .iter()
                    .map(|p| pb::Replica {
                        area: p.area.clone(),
                        area_offset: p.area_offset,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// gRPC status → [`NodeCallError`]: refusals are the gate's answers, everything else is a
/// missing answer.
fn from_status(node: &str, status: tonic::Status) -> NodeCallError {
    use tonic::Code;
    match status.code() {
        Code::FailedPrecondition | Code::InvalidArgument | Code::NotFound | Code::Aborted => {
            NodeCallError::Refused(status.message().to_string())
        }
        Code::Unauthenticated | Code::PermissionDenied => NodeCallError::Refused(format!(
            "node {node} rejected the node-control token: {}",
            status.message()
        )),
        _ => NodeCallError::Unreachable(format!("node {node}: {}", status.message())),
    }
}

fn step_answer(r: pb::RemapStepResponse) -> StepAnswer {
    StepAnswer {
        state: r.state,
        active_generation: r.active_generation,
        hold_ms: r.hold_ms,
        bytes_copied: 0,
    }
}

impl NodeControl for TonicNodeControl {
    fn available(&self) -> Result<(), String> {
        match self.token {
            Some(_) => Ok(()),
            None => Err(NO_TOKEN.to_string()),
        }
    }

    fn call(
        &self,
        node: &str,
        request: NodeRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<StepAnswer, NodeCallError>> {
        let this = self.clone();
        let node = node.to_string();
        Box::pin(async move {
            let mut client = this.client_for(&node).await?;
            let status = |s| from_status(&node, s);
            // Commit, Rollback, Resume and Fence carry nothing but the operation.
            let step = |op: &OperationRef| {
                this.request(
                    pb::RemapStepRequest {
                        operation: op_ref(op),
                    },
                    timeout,
                )
            };
            match request {
                NodeRequest::Stage {
                    op,
                    mapping,
                    size_bytes,
                } => {
                    let message = pb::StageMappingRequest {
                        operation: op_ref(&op),
                        mapping: Some(wire_mapping(&mapping, size_bytes)),
                    };
                    let r = client
                        .stage_mapping(this.request(message, timeout)?)
                        .await
                        .map_err(status)?;
                    Ok(step_answer(r.into_inner()))
                }
                NodeRequest::Quiesce {
                    op,
                    ranges,
                    hold_timeout_ms,
                } => {
                    let message = pb::QuiesceRequest {
                        hold_timeout_ms,
                        operation: op_ref(&op),
                        scope: Some(pb::HoldScope {
                            ranges: ranges
                                .into_iter()
                                .map(|(offset, length)| pb::ByteRange { offset, length })
                                .collect(),
                        }),
                    };
                    let r = client
                        .quiesce(this.request(message, timeout)?)
                        .await
                        .map_err(status)?;
                    Ok(step_answer(r.into_inner()))
                }
                NodeRequest::Commit(op) => {
                    let r = client.commit(step(&op)?).await.map_err(status)?;
                    Ok(step_answer(r.into_inner()))
                }
                NodeRequest::Rollback(op) => {
                    let r = client.rollback(step(&op)?).await.map_err(status)?;
                    Ok(step_answer(r.into_inner()))
                }
                NodeRequest::Resume(op) => {
                    let r = client.resume(step(&op)?).await.map_err(status)?;
                    Ok(step_answer(r.into_inner()))
                }
                NodeRequest::Fence(op) => {
                    let r = client.fence(step(&op)?).await.map_err(status)?;
                    Ok(step_answer(r.into_inner()))
                }
                NodeRequest::Copy {
                    op,
                    offset,
                    length,
                    destination,
                } => {
                    let message = pb::CopyExtentsRequest {
                        operation: op_ref(&op),
                        offset,
                        length,
                        destination: destination
                            .into_iter()
                            .map(|(area, area_offset)| pb::Replica { area, area_offset })
                            .collect(),
                    };
                    let r = client
                        .copy_extents(this.request(message, timeout)?)
                        .await
                        .map_err(status)?;
                    Ok(StepAnswer {
                        bytes_copied: r.into_inner().bytes_copied,
                        ..StepAnswer::default()
                    })
                }
            }
        })
    }

    fn gate_state(
        &self,
        node: &str,
        volume: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<GateState, NodeCallError>> {
        let this = self.clone();
        let node = node.to_string();
        let volume = volume.to_string();
        Box::pin(async move {
            let mut client = this.client_for(&node).await?;
            let r = client
                .get_gate_state(this.request(pb::GetGateStateRequest { volume }, timeout)?)
                .await
                .map_err(|s| from_status(&node, s))?
                .into_inner();
            Ok(GateState {
                state: r.state,
                active_generation: r.active_generation,
                operation_id: r.operation_id,
            })
        })
    }

    fn report_usage(
        &self,
        node: &str,
        volume: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<UsageAnswer, NodeCallError>> {
        let this = self.clone();
        let node = node.to_string();
        let volume = volume.to_string();
        Box::pin(async move {
            let mut client = this.client_for(&node).await?;
            let r = client
                .report_usage(this.request(pb::ReportUsageRequest { volume }, timeout)?)
                .await
                .map_err(|s| from_status(&node, s))?
                .into_inner();
            Ok(UsageAnswer {
                generation: r.generation,
                in_use: r.in_use_extents,
                high_priority: r.high_priority_extents,
            })
        })
    }

    fn mount_inquiry(
        &self,
        node: &str,
        volume: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<MountAnswer, NodeCallError>> {
        let this = self.clone();
        let node = node.to_string();
        let volume = volume.to_string();
        Box::pin(async move {
            let mut client = this.client_for(&node).await?;
            let r = client
                .mount_inquiry(this.request(pb::MountInquiryRequest { volume }, timeout)?)
                .await
                .map_err(|s| from_status(&node, s))?
                .into_inner();
            Ok(MountAnswer {
                staged: r.staged,
                published: r.published,
                mounted: r.mounted,
                paths: r.paths,
                detail: r.detail,
            })
        })
    }

    fn set_mirror_leg(
        &self,
        node: &str,
        request: LegRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<LegAnswer, NodeCallError>> {
        let this = self.clone();
        let node = node.to_string();
        Box::pin(async move {
            let mut client = this.client_for(&node).await?;
            let message = pb::SetMirrorLegRequest {
                volume: request.volume,
                secondary: request.secondary,
                mode: wire_leg_mode(request.mode),
                reset_dirty: request.reset_cut.is_some(),
                cut: request.reset_cut.unwrap_or_default(),
            };
            let r = client
                .set_mirror_leg(this.request(message, timeout)?)
                .await
                .map_err(|s| from_status(&node, s))?
                .into_inner();
            Ok(leg_answer(Some(r)))
        })
    }

    fn collect_dirty(
        &self,
        node: &str,
        volume: &str,
        acknowledge: u64,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<DirtyAnswer, NodeCallError>> {
        let this = self.clone();
        let node = node.to_string();
        let volume = volume.to_string();
        Box::pin(async move {
            let mut client = this.client_for(&node).await?;
            let message = pb::CollectDirtyRequest {
                volume,
                acknowledge,
            };
            let r = client
                .collect_dirty(this.request(message, timeout)?)
                .await
                .map_err(|s| from_status(&node, s))?
                .into_inner();
            Ok(DirtyAnswer {
                leg: leg_answer(r.leg),
                sequence: r.sequence,
                extents: r.extents,
                complete: r.complete,
            })
        })
    }

    fn copy_to_leg(
        &self,
        node: &str,
        volume: &str,
        extents: Vec<u8>,
        held: bool,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<u64, NodeCallError>> {
        let this = self.clone();
        let node = node.to_string();
        let volume = volume.to_string();
        Box::pin(async move {
            let mut client = this.client_for(&node).await?;
            let message = pb::CopyToLegRequest {
                volume,
                extents,
                held,
            };
            let r = client
                .copy_to_leg(this.request(message, timeout)?)
                .await
                .map_err(|s| from_status(&node, s))?
                .into_inner();
            Ok(r.bytes_copied)
        })
    }
}
