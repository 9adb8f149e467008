//! The node agent (seed 001 agent, seed 002 manager): registers this node's StorageAreas and
//! heartbeats them, runs the extent server for peers, serves node-control, and keeps the
//! mapping cache on local disk.
//!
//! - [`areas`]: the areas file, opening the area files/devices, the StorageArea objects and
//!   their status (seed 001 registration [0022]–[0023]).
//! - [`grants`]: the lender side of seed 001 §4.5 — a VirtualVolume watch keeps the extent
//!   server's grants equal to "the volume's borrowers may touch its ranges on my areas at the
//!   committed generation" (one borrower at a time, seed 001 [0028]; several only for
//!   multi-writer Block volumes).
//! - [`ownership`]: the lender's ledger of which volume each extent of its areas was last
//!   handed to; an extent is zeroed before it changes owner (before any grant or local open).
//! - [`staging`]: the borrower side — the staged-volume registry (engine volumes, frontends,
//!   NBD exports, mounts) behind the CSI Node service.
//! - [`cache`]: the mapping cache `<state-dir>/mappings/<id>.json` and `<state-dir>/node.json`.
//! - [`control`]: the node-control gRPC server the operator calls.
//! - [`status`]: the node Lease, `status.attachments` and the usage-report annotation.

pub mod areas;
pub mod cache;
pub mod control;
pub mod grants;
pub mod mirror;
pub mod mounts;
pub mod ownership;
pub mod staging;
pub mod status;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tessera_api::model::{AreaId, Generation};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::backend::AreaRegistry;
use crate::engine::EngineError;
use crate::extent_server::{ExtentServer, ExtentServerConfig, ExtentServerHandle};
use crate::frontend::FrontendError;

pub use areas::AreaConfig;
pub use staging::{Capability, StagedVolume};

/// Which kernel frontend staged volumes get (the NBD unix export is always there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FrontendChoice {
    /// fuse-loop when this node can use it (root, /dev/fuse, loop), otherwise NBD only.
    #[default]
    Auto,
    /// fuse-loop, or fail staging.
    FuseLoop,
    /// No kernel device: the NBD unix export only (Mount volumes cannot be staged).
    Nbd,
}

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: String,
    /// Namespace of the node Lease.
    pub namespace: String,
    pub state_dir: PathBuf,
    pub areas: Vec<AreaConfig>,
    pub zone: Option<String>,
    pub extent_listen: SocketAddr,
    pub control_listen: SocketAddr,
    /// Host peers and the operator use to reach this node.
    pub advertise_host: String,
    /// The shared token: extent server peers and node-control callers present it.
    pub token: Vec<u8>,
    pub frontend: FrontendChoice,
    pub heartbeat: Duration,
    /// The CSI socket (written to node.json).
    pub csi_socket: PathBuf,
}

/// Why an agent operation failed. Turned into gRPC codes in one place, `csi::node::status_of`.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    #[error("volume {volume} is not published to node {node} (access nodes: {access:?})")]
    NotAccessNode {
        volume: String,
        node: String,
        access: Vec<String>,
    },
    #[error("volume {0} has no committed mapping yet")]
    NotMapped(String),
    #[error("volume {volume}: invalid mapping: {reason}")]
    InvalidMapping { volume: String, reason: String },
    #[error("volume {volume} is already staged differently: {detail}")]
    AlreadyStaged { volume: String, detail: String },
    #[error("volume {volume} is already published at {path} with another capability")]
    AlreadyPublished { volume: String, path: String },
    #[error("volume {0} is not staged on this node")]
    NotStaged(String),
    #[error("volume {volume} is staged at {staged}, not at {requested}")]
    WrongStagingPath {
        volume: String,
        staged: String,
        requested: String,
    },
    #[error(
        "volume {volume} needs a kernel block device ({need}) but this node has none: {reason} \
         (fuse-loop needs root, /dev/fuse, /dev/loop-control and losetup)"
    )]
    NoKernelDevice {
        volume: String,
        need: &'static str,
        reason: String,
    },
    #[error("volume {volume} is not at {path} on this node")]
    PathNotFound { volume: String, path: String },
    #[error("area {area} of volume {volume} is unreachable: {reason}")]
    AreaUnreachable {
        volume: String,
        area: String,
        reason: String,
    },
    #[error("volume {volume}: generation {offered} is stale: generation {current} is applied")]
    StaleGeneration {
        volume: String,
        offered: Generation,
        current: Generation,
    },
    #[error("volume {volume}: mapping change needs a hold (not supported yet): {detail}")]
    NotGrowth { volume: String, detail: String },
    #[error(
        "volume {volume}: remap {remap} is in flight; this node can stage the volume once it \
         ends (seed 004 AS-19)"
    )]
    RemapInFlight { volume: String, remap: String },
    #[error(
        "volume {volume}: the formation copy or resync of mirror pair {pair} is running; this \
         node can stage the volume once it ends"
    )]
    MirrorCopyInFlight { volume: String, pair: String },
    #[error(
        "volume {volume}: the dirty bits are reset only at a split cut, while the volume is held \
         (its gate is {gate})"
    )]
    NotHeldForCut { volume: String, gate: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("volume {volume}: {source}")]
    Engine {
        volume: String,
        #[source]
        source: EngineError,
    },
    #[error("volume {volume}: {source}")]
    Frontend {
        volume: String,
        #[source]
        source: FrontendError,
    },
    #[error("{0}")]
    Mount(#[from] mounts::MountError),
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    pub(crate) fn api(what: impl Into<String>, source: kube::Error) -> Self {
        AgentError::Api {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            op: op.into(),
            source,
        }
    }
}

/// The running node agent.
pub struct Agent {
    pub(crate) client: kube::Client,
    pub(crate) config: AgentConfig,
    /// Local and remote areas, shared by every staged volume.
    pub(crate) registry: Arc<AreaRegistry>,
    /// This node's own areas.
    pub(crate) local_areas: Vec<AreaId>,
    pub(crate) extent_server: std::sync::Mutex<Option<ExtentServerHandle>>,
    pub(crate) extent_addr: SocketAddr,
    pub(crate) control_addr: SocketAddr,
    pub(crate) staged: Mutex<staging::Registry>,
    /// Last owner of every range of this node's areas (zeroing on owner change).
    pub(crate) ownership: ownership::Ownership,
    /// Increases with every usage report of this node (seeded from the clock so that it keeps
    /// increasing across restarts).
    pub(crate) usage_sequence: AtomicU64,
    /// Idempotent answers of node-control calls, by (volume, operation, attempt).
    pub(crate) control_answers: std::sync::Mutex<BTreeMap<control::AnswerKey, control::Answer>>,
    /// Volumes with an attachment update waiting to run (one at a time per volume).
    pub(crate) attachment_updates: std::sync::Mutex<std::collections::BTreeSet<String>>,
    stop: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.config.node_id)
            .field("extent_server", &self.extent_addr)
            .field("control", &self.control_addr)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens the areas, registers them, starts the extent server, the node-control server, the
    /// grant watch and the heartbeat, and restores the volumes of the mapping cache.
    pub async fn start(
        client: kube::Client,
        config: AgentConfig,
    ) -> Result<Arc<Agent>, AgentError> {
        if config.node_id.is_empty() {
            return Err(AgentError::InvalidConfig("the node id is empty".into()));
        }
        if config.token.is_empty() {
            return Err(AgentError::InvalidConfig(
                "the shared token is empty".into(),
            ));
        }
        for dir in ["mappings", "nbd", "fuse", "areas"] {
            let path = config.state_dir.join(dir);
            std::fs::create_dir_all(&path)
                .map_err(|e| AgentError::io(format!("create {}", path.display()), e))?;
        }
        // A killed predecessor's kernel side is dead weight: its FUSE server is gone.
        let fuse_dir = config.state_dir.join("fuse");
        tokio::task::spawn_blocking(move || mounts::sweep_stale_fuse(&fuse_dir))
            .await
            .map_err(|e| AgentError::Unsupported(format!("sweeping stale devices: {e}")))?;
        let registry = Arc::new(AreaRegistry::new());
        let opened = areas::open_all(&config).await?;
        let ownership = ownership::Ownership::open(&config.state_dir, &opened)?;
        let mut local_areas = Vec::new();
        let mut backends = Vec::new();
        for area in &opened {
            registry.insert(Arc::clone(&area.backend));
            local_areas.push(area.id.clone());
            backends.push(Arc::clone(&area.backend));
        }
        let extent_server = ExtentServer::start(
            config.extent_listen,
            backends,
            ExtentServerConfig::new().with_shared_token(config.token.clone()),
        )
        .await
        .map_err(|e| AgentError::InvalidConfig(format!("extent server: {e}")))?;
        let extent_addr = extent_server.addr();
        let control_listener = tokio::net::TcpListener::bind(config.control_listen)
            .await
            .map_err(|e| AgentError::io(format!("bind {}", config.control_listen), e))?;
        let control_addr = control_listener
            .local_addr()
            .map_err(|e| AgentError::io("node-control address", e))?;
        let seq_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let (stop, stopped) = watch::channel(false);
        let agent = Arc::new(Agent {
            client,
            config,
            registry,
            local_areas,
            extent_server: std::sync::Mutex::new(Some(extent_server)),
            extent_addr,
            control_addr,
            staged: Mutex::new(staging::Registry::default()),
            ownership,
            usage_sequence: AtomicU64::new(seq_seed),
            control_answers: std::sync::Mutex::new(BTreeMap::new()),
            attachment_updates: std::sync::Mutex::default(),
            stop,
            tasks: std::sync::Mutex::new(Vec::new()),
        });
        // Register before anything can be granted or staged: the areas exist with an endpoint.
        areas::register_all(&agent, &opened).await?;
        // Owners of areas that lost (or never had) a ledger, before anything is granted or
        // opened: adopted from the mappings, never zeroed.
        agent.ownership.adopt(&agent.client).await?;
        status::renew_lease(&agent).await?;
        agent.restore_from_cache().await;
        cache::write_node_json(&agent).await?;

        let tasks = vec![
            tokio::spawn(control::serve(
                Arc::clone(&agent),
                control_listener,
                stopped.clone(),
            )),
            tokio::spawn(grants::run(Arc::clone(&agent), stopped.clone())),
            tokio::spawn(heartbeat_loop(Arc::clone(&agent), opened, stopped)),
        ];
        *agent.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        tracing::info!(node = %agent.config.node_id, extent_server = %extent_addr,
            control = %control_addr, "node agent started");
        Ok(agent)
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// `host:port` peers reach the extent server at.
    pub fn extent_endpoint(&self) -> String {
        format!("{}:{}", self.config.advertise_host, self.extent_addr.port())
    }

    /// `host:port` the operator reaches node-control at.
    pub fn control_endpoint(&self) -> String {
        format!(
            "{}:{}",
            self.config.advertise_host,
            self.control_addr.port()
        )
    }

    pub fn extent_addr(&self) -> SocketAddr {
        self.extent_addr
    }

    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// The extent server's grant table (what peers may touch on this node's areas).
    pub fn extent_authorization(&self) -> Option<Arc<crate::extent_server::ExtentAuthorization>> {
        self.extent_server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| Arc::clone(s.authorization()))
    }

    pub(crate) fn next_usage_sequence(&self) -> u64 {
        self.usage_sequence.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Stops the background tasks and the servers, and detaches every frontend (kernel devices,
    /// mounts of the staging paths, NBD exports). The mapping cache stays, so the next start
    /// brings the volumes back as NBD exports. The `status.attachments` records stay too: the
    /// node still has the volumes staged from the CO's point of view.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.release_all().await;
        let server = self
            .extent_server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(server) = server
            && let Err(error) = server.stop().await
        {
            tracing::warn!(%error, "extent server stop");
        }
        tracing::info!(node = %self.config.node_id, "node agent stopped");
    }
}

/// Every heartbeat: the areas' status, the Lease, changed usage reports.
async fn heartbeat_loop(
    agent: Arc<Agent>,
    areas: Vec<areas::OpenedArea>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(agent.config.heartbeat.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        for area in &areas {
            if let Err(error) = areas::heartbeat(&agent, area).await {
                tracing::warn!(area = %area.id, %error, "area heartbeat failed");
            }
        }
        if let Err(error) = status::renew_lease(&agent).await {
            tracing::warn!(%error, "lease renewal failed");
        }
        status::report_usage_all(&agent).await;
        status::report_health_all(&agent).await;
    }
}
