//! CSI Node service (node mode) and the node agent it runs.
//!
//! Request fields are validated here (INVALID_ARGUMENT per the CSI spec and the csi-test sanity
//! suite); the work is done by [`crate::agent::Agent`]; every [`AgentError`] becomes a gRPC code
//! in one place, [`status_of`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tessera_proto::csi::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology, VolumeCapability,
    VolumeCondition, VolumeUsage, identity_server::IdentityServer, node_server,
    node_server::NodeServer, node_service_capability, volume_capability, volume_usage,
};
use tonic::{Request, Response, Status};

use super::identity::{IdentityService, Readiness};
use super::{PUBLISH_GENERATION, TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};
use crate::agent::staging::{PublishRequest, StageRequest};
use crate::agent::{Agent, AgentConfig, AgentError, Capability, FrontendChoice, areas};

/// Node-mode options. Node-only options are optional here (the struct is flattened into the
/// controller's command line too) and checked by [`serve`].
#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {
    /// This node's name (the Kubernetes node name).
    #[arg(long, env = "NODE_NAME")]
    pub node_id: Option<String>,
    /// Mapping cache, NBD sockets, node.json.
    #[arg(long, default_value = "/var/lib/tessera")]
    pub state_dir: PathBuf,
    /// YAML list of this node's areas: `{name, path, sizeBytes, mediaType, poolName, domain?}`.
    #[arg(long)]
    pub areas_file: Option<PathBuf>,
    /// The node's zone (topology `topology.kubernetes.io/zone`).
    #[arg(long)]
    pub zone: Option<String>,
    /// Extent server address (peers reach this node's areas here).
    #[arg(long, default_value = "0.0.0.0:7400")]
    pub extent_listen: SocketAddr,
    /// Node-control gRPC address (the operator calls it).
    #[arg(long, default_value = "0.0.0.0:7401")]
    pub control_listen: SocketAddr,
    /// Host peers and the operator use for this node; default: the host of --extent-listen.
    #[arg(long, env = "POD_IP")]
    pub advertise_host: Option<String>,
    /// The shared token of extent servers and node-control.
    #[arg(long, default_value = "/etc/tessera/token")]
    pub token_file: PathBuf,
    /// NodeGetInfo's max_volumes_per_node.
    #[arg(long, default_value_t = 64)]
    pub max_volumes: i64,
    /// Kernel frontend of staged volumes.
    #[arg(long, value_enum, default_value_t = FrontendChoice::Auto)]
    pub frontend: FrontendChoice,
    /// Seconds between heartbeats (areas, Lease, usage reports).
    #[arg(long, default_value_t = 10)]
    pub heartbeat_seconds: u64,
    /// Namespace of the node Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
}

impl NodeArgs {
    /// The agent configuration these options describe (reads the token and areas files).
    pub fn agent_config(&self, socket: &Path) -> Result<AgentConfig> {
        let node_id = self
            .node_id
            .clone()
            .filter(|n| !n.is_empty())
            .context("--node-id (or NODE_NAME) is required in node mode")?;
        let token = std::fs::read(&self.token_file)
            .with_context(|| format!("reading the token file {}", self.token_file.display()))?;
        let token = String::from_utf8_lossy(&token).trim().as_bytes().to_vec();
        anyhow::ensure!(
            !token.is_empty(),
            "the token file {} is empty",
            self.token_file.display()
        );
        let areas = match &self.areas_file {
            Some(path) => areas::load_areas_file(path)?,
            None => Vec::new(),
        };
        anyhow::ensure!(self.max_volumes >= 0, "--max-volumes must not be negative");
        let advertise_host = match &self.advertise_host {
            Some(host) if !host.is_empty() => host.clone(),
            _ if self.extent_listen.ip().is_unspecified() => {
                tracing::warn!(listen = %self.extent_listen,
                    "--extent-listen is a wildcard and no --advertise-host given; advertising 127.0.0.1");
                "127.0.0.1".into()
            }
            _ => self.extent_listen.ip().to_string(),
        };
        Ok(AgentConfig {
            node_id,
            namespace: self.namespace.clone(),
            state_dir: self.state_dir.clone(),
            areas,
            zone: self.zone.clone().filter(|z| !z.is_empty()),
            extent_listen: self.extent_listen,
            control_listen: self.control_listen,
            advertise_host,
            token,
            frontend: self.frontend,
            heartbeat: Duration::from_secs(self.heartbeat_seconds.max(1)),
            csi_socket: socket.to_path_buf(),
        })
    }
}

/// Serves Identity + Node and runs the node agent until `shutdown`.
pub async fn serve(
    driver_name: &str,
    client: kube::Client,
    args: NodeArgs,
    socket: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let config = args.agent_config(&socket)?;
    let agent = Agent::start(client.clone(), config)
        .await
        .context("starting the node agent")?;
    let result = serve_with_agent(
        driver_name,
        client,
        Arc::clone(&agent),
        args.max_volumes,
        socket,
        shutdown,
    )
    .await;
    agent.shutdown().await;
    result
}

/// Serves Identity + Node for a running agent until `shutdown` (the agent keeps running).
pub async fn serve_with_agent(
    driver_name: &str,
    client: kube::Client,
    agent: Arc<Agent>,
    max_volumes: i64,
    socket: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let readiness: Readiness = Arc::new(move || {
        let client = client.clone();
        Box::pin(async move {
            client
                .apiserver_version()
                .await
                .map(|_| ())
                .map_err(|e| format!("the API server does not answer: {e}"))
        })
    });
    let identity = IdentityService::new(driver_name, false, readiness);
    let node = NodeService { agent, max_volumes };
    let incoming = super::bind_unix(&socket)?;
    tracing::info!(socket = %socket.display(), "CSI node service listening");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving the CSI node service")?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// The one place agent errors become gRPC codes (CSI spec v1.12 error tables).
pub fn status_of(error: &AgentError) -> Status {
    let message = error.to_string();
    match error {
        AgentError::InvalidConfig(_) | AgentError::InvalidMapping { .. } => {
            Status::internal(message)
        }
        AgentError::Api { source, .. } => match source {
            kube::Error::Api(e) if e.code == 404 => Status::not_found(message),
            _ => Status::unavailable(message),
        },
        AgentError::VolumeNotFound(_) | AgentError::PathNotFound { .. } => {
            Status::not_found(message)
        }
        AgentError::NotAccessNode { .. }
        | AgentError::NotMapped(_)
        | AgentError::NotStaged(_)
        | AgentError::WrongStagingPath { .. }
        | AgentError::NoKernelDevice { .. }
        | AgentError::StaleGeneration { .. }
        | AgentError::NotHeldForCut { .. }
        | AgentError::NotGrowth { .. } => Status::failed_precondition(message),
        AgentError::AlreadyStaged { .. } | AgentError::AlreadyPublished { .. } => {
            Status::already_exists(message)
        }
        AgentError::AreaUnreachable { .. }
        | AgentError::RemapInFlight { .. }
        | AgentError::MirrorCopyInFlight { .. } => Status::unavailable(message),
        AgentError::Unsupported(_) => Status::internal(message),
        AgentError::Mount(crate::agent::mounts::MountError::UnsupportedFs(_)) => {
            Status::invalid_argument(message)
        }
        AgentError::Engine { .. }
        | AgentError::Frontend { .. }
        | AgentError::Mount(_)
        | AgentError::Io { .. } => Status::internal(message),
    }
}

fn required<'a>(value: &'a str, what: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{what} is required")))
    } else {
        Ok(value)
    }
}

fn capability(cap: Option<&VolumeCapability>) -> Result<Capability, Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    let access_mode = cap.access_mode.as_ref().map(|m| m.mode).unwrap_or_default();
    match &cap.access_type {
        Some(volume_capability::AccessType::Block(_)) => Ok(Capability::Block { access_mode }),
        Some(volume_capability::AccessType::Mount(mount)) => Ok(Capability::Mount {
            fs_type: if mount.fs_type.is_empty() {
                "ext4".into()
            } else {
                mount.fs_type.clone()
            },
            mount_flags: mount.mount_flags.clone(),
            access_mode,
        }),
        None => Err(Status::invalid_argument(
            "volume_capability needs an access type (block or mount)",
        )),
    }
}

struct NodeService {
    agent: Arc<Agent>,
    max_volumes: i64,
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let staging = required(&req.staging_target_path, "staging_target_path")?;
        let capability = capability(req.volume_capability.as_ref())?;
        let publish_generation = match req.publish_context.get(PUBLISH_GENERATION) {
            Some(g) => Some(g.parse::<i64>().map_err(|_| {
                Status::invalid_argument(format!(
                    "publish_context {PUBLISH_GENERATION}={g:?} is not a number"
                ))
            })?),
            None => None,
        };
        self.agent
            .stage(StageRequest {
                volume_id: volume_id.into(),
                staging_path: PathBuf::from(staging),
                capability,
                publish_generation,
            })
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let staging = required(&req.staging_target_path, "staging_target_path")?;
        self.agent
            .unstage(volume_id, Path::new(staging))
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let target = required(&req.target_path, "target_path")?;
        let capability = capability(req.volume_capability.as_ref())?;
        // STAGE_UNSTAGE_VOLUME is advertised, so the CO must pass the staging path.
        let staging = required(&req.staging_target_path, "staging_target_path")?;
        // Reader-only access modes are published read-only whatever `readonly` says.
        let reader_only = req
            .volume_capability
            .as_ref()
            .and_then(|c| c.access_mode.as_ref())
            .is_some_and(|m| {
                use volume_capability::access_mode::Mode;
                m.mode == Mode::SingleNodeReaderOnly as i32
                    || m.mode == Mode::MultiNodeReaderOnly as i32
            });
        self.agent
            .publish(PublishRequest {
                volume_id: volume_id.into(),
                staging_path: PathBuf::from(staging),
                target_path: PathBuf::from(target),
                capability,
                readonly: req.readonly || reader_only,
            })
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let target = required(&req.target_path, "target_path")?;
        self.agent
            .unpublish(volume_id, Path::new(target))
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let path = required(&req.volume_path, "volume_path")?;
        let stats = self
            .agent
            .volume_stats(volume_id, Path::new(path))
            .await
            .map_err(|e| status_of(&e))?;
        let usage = |[total, available, used]: [u64; 3], unit: volume_usage::Unit| VolumeUsage {
            total: total as i64,
            available: available as i64,
            used: used as i64,
            unit: unit as i32,
        };
        let mut usages = vec![usage(stats.bytes, volume_usage::Unit::Bytes)];
        if let Some(inodes) = stats.inodes {
            usages.push(usage(inodes, volume_usage::Unit::Inodes));
        }
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage: usages,
            volume_condition: Some(VolumeCondition {
                abnormal: stats.abnormal.is_some(),
                message: stats.abnormal.unwrap_or_else(|| "healthy".into()),
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let path = required(&req.volume_path, "volume_path")?;
        if let Some(cap) = req.volume_capability.as_ref() {
            capability(Some(cap))?;
        }
        let size = self
            .agent
            .expand(volume_id, Path::new(path))
            .await
            .map_err(|e| status_of(&e))?;
        if let Some(range) = &req.capacity_range
            && range.required_bytes > 0
            && (size as i64) < range.required_bytes
        {
            return Err(Status::failed_precondition(format!(
                "volume {volume_id} is {size} bytes after applying its mapping; {} requested (the controller has not grown it yet)",
                range.required_bytes
            )));
        }
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        let rpc = |t: Type| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc(Type::StageUnstageVolume),
                rpc(Type::GetVolumeStats),
                rpc(Type::ExpandVolume),
                rpc(Type::VolumeCondition),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let config = self.agent.config();
        let mut segments = std::collections::HashMap::new();
        segments.insert(TOPOLOGY_NODE_KEY.to_string(), config.node_id.clone());
        if let Some(zone) = &config.zone {
            segments.insert(TOPOLOGY_ZONE_KEY.to_string(), zone.clone());
        }
        Ok(Response::new(NodeGetInfoResponse {
            node_id: config.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(Topology { segments }),
        }))
    }
}
