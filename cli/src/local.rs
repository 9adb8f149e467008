//! `tessera local`: the whole system on one machine (ARCHITECTURE §9). The embedded API server,
//! the operator, the CSI controller and N node agents run as separate child processes of one
//! executable (`<exe> component …`), with file-backed areas and all state under one data
//! directory, so a second start resumes where the first stopped.
//!
//! Layout of the data directory:
//! ```text
//! kubeconfig            endpoints.json        token (extent-server shared token)
//! apiserver/            (the API server's persisted state)
//! controller/csi.sock
//! node-a/               (the node's --state-dir: csi.sock, areas.yaml, areas/, nbd/, node.json)
//! logs/<component>.log  (apiserver, operator, controller, node-a, …)
//! run/                  (ready files)
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use nix::sys::signal::Signal;
use serde::Serialize;
use tessera_api::v1alpha1::{
    StorageArea, StorageClaim, StoragePool, StoragePriorityClass, VirtualVolume,
};
use tokio::sync::{mpsc, watch};

use crate::endpoints::{ControllerEndpoint, Endpoints, EndpointsError, NodeEndpoint, NodeFile};

/// The pool every local area belongs to (as in `examples/`).
pub const POOL: &str = "default";
/// The pool and priority classes a fresh local cluster gets (the repository's examples).
const EXAMPLE_POOL: &str = include_str!("../../examples/00-pool.yaml");
const EXAMPLE_CLASSES: &str = include_str!("../../examples/02-priority-classes.yaml");
/// The operator's leader Lease identity: stable across runs, so a restarted operator takes its
/// own Lease back at once even when the previous run could not release it.
const OPERATOR_IDENTITY: &str = "tessera-local-operator";
const FIELD_MANAGER: &str = "tessera-local";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// How to run a local cluster.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Where all state lives (created if missing).
    pub data_dir: PathBuf,
    /// Number of node agents (`node-a`, `node-b`, …).
    pub nodes: usize,
    /// Size of each area file (created sparse by the node agent).
    pub area_size_bytes: u64,
    /// The executable whose `component` subcommand runs the children (default: this one).
    pub exe: Option<PathBuf>,
    /// `--frontend` of the node agents (default: theirs, `auto`).
    pub frontend: Option<String>,
    /// Heartbeat interval of the node agents.
    pub heartbeat_seconds: u64,
    /// How long each component may take to become ready.
    pub ready_timeout: Duration,
    /// Show a progress line on stderr while starting.
    pub progress: bool,
    /// Extra environment of every child (tests: `FAILPOINTS` of a build with fail points).
    pub env: Vec<(String, String)>,
}

impl LocalConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        LocalConfig {
            data_dir: data_dir.into(),
            nodes: 3,
            area_size_bytes: 1 << 30,
            exe: None,
            frontend: None,
            heartbeat_seconds: 5,
            ready_timeout: Duration::from_secs(60),
            progress: false,
            env: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another `tessera local` is running on {0}")]
    Locked(PathBuf),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot start {component} ({exe}): {source}")]
    Spawn {
        component: String,
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{component} exited ({status}) while {doing}; log {log}:\n{tail}")]
    ChildExited {
        component: String,
        status: String,
        doing: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{component} did not become ready within {timeout:?} ({what}); log {log}:\n{tail}")]
    Timeout {
        component: String,
        what: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("interrupted while starting")]
    Interrupted,
    #[error(transparent)]
    Endpoints(#[from] EndpointsError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalError {
    let what = what.into();
    move |source| LocalError::Io { what, source }
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> LocalError {
    let what = what.into();
    move |source| LocalError::Api { what, source }
}

/// A child that exited while nobody asked it to.
#[derive(Debug, Clone)]
pub struct ChildDeath {
    pub component: String,
    pub status: String,
    pub log: PathBuf,
    /// The last lines of its log.
    pub tail: String,
}

impl std::fmt::Display for ChildDeath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exited unexpectedly ({}); log {}:\n{}",
            self.component,
            self.status,
            self.log.display(),
            self.tail
        )
    }
}

/// How each child ended when the cluster was stopped.
#[derive(Debug, Clone)]
pub struct StoppedChild {
    pub component: String,
    pub status: String,
    /// SIGTERM was not enough: it had to be killed.
    pub killed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StopReport {
    pub children: Vec<StoppedChild>,
}

impl StopReport {
    /// Every child stopped on SIGTERM, none had to be killed.
    pub fn clean(&self) -> bool {
        self.children.iter().all(|c| !c.killed)
    }
}

/// One supervised child process.
struct Child {
    component: String,
    log: PathBuf,
    pid: u32,
    signals: mpsc::UnboundedSender<Signal>,
    exit: watch::Receiver<Option<String>>,
}

impl Child {
    fn exited(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Sends `signal` (only while the process has not been reaped, so never to a reused pid).
    fn signal(&self, signal: Signal) {
        let _ = self.signals.send(signal);
    }

    async fn wait_exit(&self, timeout: Duration) -> Option<String> {
        let mut exit = self.exit.clone();
        tokio::time::timeout(timeout, exit.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|s| s.clone()))
    }
}

/// A running local cluster.
pub struct LocalCluster {
    config: LocalConfig,
    data_dir: PathBuf,
    client: kube::Client,
    endpoints: Arc<Mutex<Endpoints>>,
    children: Vec<Child>,
    stopping: Arc<AtomicBool>,
    deaths: tokio::sync::Mutex<mpsc::UnboundedReceiver<ChildDeath>>,
    refresher: Option<tokio::task::JoinHandle<()>>,
    _lock: nix::fcntl::Flock<File>,
}

/// Node ids in local mode: `node-a`, `node-b`, …, `node-z`, `node-aa`, ….
pub fn node_name(index: usize) -> String {
    let mut n = index;
    let mut letters = Vec::new();
    loop {
        letters.push((b'a' + (n % 26) as u8) as char);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("node-{}", letters.into_iter().collect::<String>())
}

/// The failure domain of a local node: `zone-a` for `node-a` (as in `examples/01-areas.yaml`).
pub fn node_zone(node: &str) -> String {
    format!("zone-{}", node.trim_start_matches("node-"))
}

/// One entry of a node agent's `--areas-file`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AreaFileEntry {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub media_type: String,
    pub pool_name: String,
    pub domain: String,
}

/// The areas of a local node: `<node>-area-0` (ssd) and `<node>-area-1` (hdd), files under
/// `<state-dir>/areas/`, pool `default` (the shape of `examples/01-areas.yaml`).
pub fn node_areas(node: &str, state_dir: &Path, size_bytes: u64) -> Vec<AreaFileEntry> {
    ["ssd", "hdd"]
        .iter()
        .enumerate()
        .map(|(i, media)| AreaFileEntry {
            name: format!("{node}-area-{i}"),
            path: state_dir.join("areas").join(format!("area-{i}.img")),
            size_bytes,
            media_type: media.to_string(),
            pool_name: POOL.into(),
            domain: node_zone(node),
        })
        .collect()
}

/// The client of a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, LocalError> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| LocalError::Config(format!("reading kubeconfig {}: {e}", path.display())))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| LocalError::Config(format!("loading kubeconfig {}: {e}", path.display())))?;
    kube::Client::try_from(config).map_err(api("building the API client"))
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl LocalCluster {
    /// Starts every component and waits until each is ready; on any failure the children
    /// already started are stopped again.
    pub async fn start(config: LocalConfig) -> Result<LocalCluster, LocalError> {
        Self::start_interruptible(config, watch::channel(false).1).await
    }

    /// [`start`](Self::start) that gives up with [`LocalError::Interrupted`] (stopping what it
    /// started, cleanly) as soon as `interrupt` turns true — a Ctrl-C while starting.
    pub async fn start_interruptible(
        config: LocalConfig,
        interrupt: watch::Receiver<bool>,
    ) -> Result<LocalCluster, LocalError> {
        if config.nodes == 0 {
            return Err(LocalError::Config("at least one node is needed".into()));
        }
        if config.area_size_bytes == 0 || !config.area_size_bytes.is_multiple_of(4096) {
            return Err(LocalError::Config(format!(
                "the area size must be a positive multiple of 4096 bytes, not {}",
                config.area_size_bytes
            )));
        }
        std::fs::create_dir_all(&config.data_dir)
            .map_err(io(format!("creating {}", config.data_dir.display())))?;
        // Areas and CRD paths must be absolute (StorageArea.spec.path).
        let data_dir = std::fs::canonicalize(&config.data_dir)
            .map_err(io(format!("resolving {}", config.data_dir.display())))?;
        // The longest unix socket path: a node's NBD export `<dd>/<node>/nbd/vol-<uuid>.sock`.
        let longest = data_dir.as_os_str().len()
            + format!(
                "/{}/nbd/vol-{}.sock",
                node_name(config.nodes - 1),
                "0".repeat(36)
            )
            .len();
        if longest > MAX_UNIX_SOCKET_PATH {
            return Err(LocalError::Config(format!(
                "the data directory {} is too long: its unix sockets would exceed {} bytes \
                 (use a shorter --data-dir)",
                data_dir.display(),
                MAX_UNIX_SOCKET_PATH
            )));
        }
        let lock = lock_data_dir(&data_dir)?;
        for dir in ["logs", "run", "controller"] {
            std::fs::create_dir_all(data_dir.join(dir))
                .map_err(io(format!("creating {}/{dir}", data_dir.display())))?;
        }
        let exe = match &config.exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().map_err(io("finding the current executable"))?,
        };
        let progress = Progress::new(config.progress, config.nodes);
        let (death_tx, deaths) = mpsc::unbounded_channel();
        let mut starting = Starting {
            exe,
            data_dir: data_dir.clone(),
            children: Vec::new(),
            stopping: Arc::new(AtomicBool::new(false)),
            death_tx,
            timeout: config.ready_timeout,
            interrupt,
            env: config.env.clone(),
        };
        match starting.run(&config, &progress).await {
            Ok((client, endpoints)) => {
                progress.finish(None);
                let endpoints = Arc::new(Mutex::new(endpoints));
                let mut cluster = LocalCluster {
                    config,
                    data_dir,
                    client,
                    endpoints,
                    children: std::mem::take(&mut starting.children),
                    stopping: starting.stopping.clone(),
                    deaths: tokio::sync::Mutex::new(deaths),
                    refresher: None,
                    _lock: lock,
                };
                cluster.refresh_endpoints()?;
                cluster.refresher = Some(spawn_refresher(
                    cluster.data_dir.clone(),
                    cluster.endpoints.clone(),
                ));
                Ok(cluster)
            }
            Err(e) => {
                progress.finish(Some(&e.to_string()));
                starting.stopping.store(true, Ordering::SeqCst);
                stop_children(&starting.children, Duration::from_secs(10)).await;
                Err(e)
            }
        }
    }

    /// What `endpoints.json` says now.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints.lock().expect("endpoints lock").clone()
    }

    /// A client of the embedded API server.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The (absolute) data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    /// Process ids of the children, by component name.
    pub fn pids(&self) -> BTreeMap<String, u32> {
        self.children
            .iter()
            .map(|c| (c.component.clone(), c.pid))
            .collect()
    }

    /// Re-reads every node's `node.json` and rewrites `endpoints.json` when something changed
    /// (a background task also does this every second).
    pub fn refresh_endpoints(&self) -> Result<Endpoints, LocalError> {
        let mut endpoints = self.endpoints.lock().expect("endpoints lock");
        refresh(&self.data_dir, &mut endpoints)?;
        Ok(endpoints.clone())
    }

    /// Resolves when a child exits without having been asked to.
    pub async fn unexpected_exit(&self) -> ChildDeath {
        match self.deaths.lock().await.recv().await {
            Some(death) => death,
            // Every monitor holds a sender until its child is gone; with none left and no
            // report, nothing can die any more.
            None => std::future::pending().await,
        }
    }

    /// Stops every child: node agents first, then the CSI controller, the operator and the API
    /// server last (so the others can still write their final state), each with SIGTERM, then
    /// SIGKILL if it has not exited within 15 s.
    pub async fn stop(mut self) -> StopReport {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(task) = self.refresher.take() {
            task.abort();
        }
        let report = stop_children(&self.children, Duration::from_secs(15)).await;
        // The nodes cleared their node.json as they unstaged: endpoints.json says so too.
        let _ = self.refresh_endpoints();
        report
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Some(task) = self.refresher.take() {
            task.abort();
        }
        // Not stopped through `stop`: do not leave processes behind.
        self.stopping.store(true, Ordering::SeqCst);
        for child in &self.children {
            if child.exited().is_none() {
                child.signal(Signal::SIGKILL);
            }
        }
    }
}

fn lock_data_dir(data_dir: &Path) -> Result<nix::fcntl::Flock<File>, LocalError> {
    let path = data_dir.join(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| LocalError::Locked(data_dir.to_path_buf()))
}

/// Stops children in the reverse order of their start.
async fn stop_children(children: &[Child], grace: Duration) -> StopReport {
    let mut report = StopReport::default();
    // Node agents together, then the rest one by one.
    let mut groups: Vec<Vec<&Child>> = Vec::new();
    let nodes: Vec<&Child> = children
        .iter()
        .filter(|c| c.component.starts_with("node-"))
        .collect();
    if !nodes.is_empty() {
        groups.push(nodes);
    }
    for child in children.iter().rev() {
        if !child.component.starts_with("node-") {
            groups.push(vec![child]);
        }
    }
    for group in groups {
        for child in &group {
            child.signal(Signal::SIGTERM);
        }
        let results = futures::future::join_all(group.iter().map(|child| async move {
            match child.wait_exit(grace).await {
                Some(status) => StoppedChild {
                    component: child.component.clone(),
                    status,
                    killed: false,
                },
                None => {
                    child.signal(Signal::SIGKILL);
                    let status = child
                        .wait_exit(Duration::from_secs(5))
                        .await
                        .unwrap_or_else(|| "did not exit after SIGKILL".into());
                    StoppedChild {
                        component: child.component.clone(),
                        status,
                        killed: true,
                    }
                }
            }
        }))
        .await;
        report.children.extend(results);
    }
    report
}

fn refresh(data_dir: &Path, endpoints: &mut Endpoints) -> Result<bool, LocalError> {
    let files: Vec<NodeFile> = endpoints
        .nodes
        .iter()
        .filter_map(|n| NodeFile::load(&n.state_dir.join("node.json")).ok())
        .collect();
    let changed = endpoints.merge_node_files(&files);
    let path = data_dir.join("endpoints.json");
    if changed || !path.exists() {
        endpoints.write(&path)?;
    }
    Ok(changed)
}

fn spawn_refresher(
    data_dir: PathBuf,
    endpoints: Arc<Mutex<Endpoints>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let mut e = endpoints.lock().expect("endpoints lock");
            if let Err(err) = refresh(&data_dir, &mut e) {
                tracing::warn!(%err, "refreshing endpoints.json");
            }
        }
    })
}

/// State while starting: the children so far, so a failure can stop them.
struct Starting {
    exe: PathBuf,
    data_dir: PathBuf,
    children: Vec<Child>,
    stopping: Arc<AtomicBool>,
    death_tx: mpsc::UnboundedSender<ChildDeath>,
    timeout: Duration,
    interrupt: watch::Receiver<bool>,
    env: Vec<(String, String)>,
}

impl Starting {
    async fn run(
        &mut self,
        config: &LocalConfig,
        progress: &Progress,
    ) -> Result<(kube::Client, Endpoints), LocalError> {
        let dd = self.data_dir.clone();
        let kubeconfig = dd.join("kubeconfig");
        let token_file = ensure_token(&dd)?;

        // 1. The API server, on a free port: it tells where through its ready file.
        progress.set("API server", Step::Starting);
        let ready_file = dd.join("run").join("apiserver.ready");
        let _ = std::fs::remove_file(&ready_file);
        let apiserver = self.spawn(
            "apiserver",
            &[
                "apiserver".into(),
                "--data-dir".into(),
                dd.join("apiserver").display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
                "--ready-file".into(),
                ready_file.display().to_string(),
            ],
        )?;
        let ready: tessera_apiserver::cli::ReadyFile = self
            .wait(apiserver, "writing its ready file", || {
                let ready_file = ready_file.clone();
                async move {
                    let bytes = std::fs::read(&ready_file).ok()?;
                    serde_json::from_slice(&bytes).ok()
                }
            })
            .await?;
        let client = client_from_kubeconfig(&kubeconfig).await?;
        progress.set("API server", Step::Ready);

        // 2. CRDs, and the pool and priority classes of the examples when absent.
        progress.set("CRDs", Step::Starting);
        apply_crds(&client).await?;
        self.wait(apiserver, "serving the tessera kinds", || {
            let client = client.clone();
            async move { kinds_served(&client).await.then_some(()) }
        })
        .await?;
        ensure_examples(&client).await?;
        progress.set("CRDs", Step::Ready);

        // 3. The operator: ready once it holds its leader Lease.
        progress.set("operator", Step::Starting);
        let operator = self.spawn(
            "operator",
            &[
                "operator".into(),
                "run".into(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
                "--metrics-addr".into(),
                "127.0.0.1:0".into(),
                "--identity".into(),
                OPERATOR_IDENTITY.into(),
                "--lease-namespace".into(),
                "default".into(),
                // The node-control token: the coordinator quiesces the nodes that use a volume
                // before it changes the volume's mapping (seed 004).
                "--token-file".into(),
                token_file.display().to_string(),
                // Eight missed heartbeats make an area Offline (the operator's default is 40 s
                // for the nodes' default 5 s).
                "--area-heartbeat-timeout-seconds".into(),
                (config.heartbeat_seconds.max(1) * 8).to_string(),
            ],
        )?;
        self.wait(operator, "taking its leader Lease", || {
            let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
            async move {
                let lease = leases.get_opt("tessera-operator").await.ok()??;
                (lease.spec?.holder_identity?.as_str() == OPERATOR_IDENTITY).then_some(())
            }
        })
        .await?;
        progress.set("operator", Step::Ready);

        // 4. The CSI controller.
        progress.set("CSI controller", Step::Starting);
        let controller_socket = dd.join("controller").join("csi.sock");
        let _ = std::fs::remove_file(&controller_socket);
        let controller = self.spawn(
            "controller",
            &[
                "csi".into(),
                "--mode".into(),
                "controller".into(),
                "--endpoint".into(),
                format!("unix://{}", controller_socket.display()),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
            ],
        )?;
        self.wait(controller, "answering Probe on its CSI socket", || {
            let socket = controller_socket.clone();
            async move { crate::csi_client::probe(&socket).await.then_some(()) }
        })
        .await?;
        progress.set("CSI controller", Step::Ready);

        // 5. The node agents, all at once.
        let mut nodes = Vec::new();
        for i in 0..config.nodes {
            let name = node_name(i);
            let state_dir = dd.join(&name);
            std::fs::create_dir_all(state_dir.join("areas"))
                .map_err(io(format!("creating {}", state_dir.display())))?;
            let areas_file = state_dir.join("areas.yaml");
            let areas = node_areas(&name, &state_dir, config.area_size_bytes);
            let yaml = serde_yaml::to_string(&areas).expect("areas serialize");
            std::fs::write(&areas_file, yaml)
                .map_err(io(format!("writing {}", areas_file.display())))?;
            let socket = state_dir.join("csi.sock");
            let _ = std::fs::remove_file(&socket);
            let mut args: Vec<String> = vec![
                "csi".into(),
                "--mode".into(),
                "node".into(),
                "--endpoint".into(),
                format!("unix://{}", socket.display()),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
                "--node-id".into(),
                name.clone(),
                "--state-dir".into(),
                state_dir.display().to_string(),
                "--areas-file".into(),
                areas_file.display().to_string(),
                "--zone".into(),
                node_zone(&name),
                "--extent-listen".into(),
                "127.0.0.1:0".into(),
                "--control-listen".into(),
                "127.0.0.1:0".into(),
                "--advertise-host".into(),
                "127.0.0.1".into(),
                "--token-file".into(),
                token_file.display().to_string(),
                "--heartbeat-seconds".into(),
                config.heartbeat_seconds.to_string(),
                "--namespace".into(),
                "default".into(),
            ];
            if let Some(frontend) = &config.frontend {
                args.push("--frontend".into());
                args.push(frontend.clone());
            }
            progress.set(&name, Step::Starting);
            let started = SystemTime::now();
            let child = self.spawn(&name, &args)?;
            nodes.push((name, state_dir, socket, child, started));
        }
        let mut endpoints = Endpoints {
            kubeconfig: kubeconfig.clone(),
            apiserver: ready.url.clone(),
            controller: ControllerEndpoint {
                csi_socket: controller_socket.clone(),
            },
            nodes: Vec::new(),
            volumes: Default::default(),
        };
        for (name, state_dir, socket, child, started) in nodes {
            self.wait(child, "answering Probe on its CSI socket", || {
                let socket = socket.clone();
                async move { crate::csi_client::probe(&socket).await.then_some(()) }
            })
            .await?;
            // node.json from this run (not a leftover of the previous one) gives the extent
            // server and control endpoints.
            let node_json = state_dir.join("node.json");
            self.wait(child, "writing node.json", || {
                let node_json = node_json.clone();
                async move {
                    let modified = std::fs::metadata(&node_json).ok()?.modified().ok()?;
                    (modified >= started).then_some(())
                }
            })
            .await?;
            progress.set(&name, Step::Ready);
            endpoints.nodes.push(NodeEndpoint {
                name,
                csi_socket: socket,
                state_dir,
                extent_server: String::new(),
                control_endpoint: String::new(),
            });
        }
        refresh(&dd, &mut endpoints)?;
        Ok((client, endpoints))
    }

    /// Starts `<exe> component <args…>` as `component`, logging to `logs/<component>.log`.
    fn spawn(&mut self, component: &str, args: &[String]) -> Result<usize, LocalError> {
        let log = self.data_dir.join("logs").join(format!("{component}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        let mut header = out.try_clone().map_err(io("duplicating the log handle"))?;
        let _ = writeln!(
            header,
            "---- tessera local: starting {component} at {} ----",
            chrono_now()
        );
        let err = out.try_clone().map_err(io("duplicating the log handle"))?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("component")
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Environment that would override the explicit flags of the components.
            .env_remove("KUBECONFIG")
            .env_remove("NODE_NAME")
            .env_remove("POD_IP")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("CSI_ENDPOINT")
            .env_remove("TESSERA_APISERVER_DATA_DIR")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // Own process group: a Ctrl-C in the terminal reaches `tessera local` only, which
            // then stops the children in order.
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only sets a flag on the new process.
        unsafe {
            cmd.pre_exec(|| {
                // If `tessera local` dies without stopping us (SIGKILL), we get SIGTERM.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| LocalError::Spawn {
            component: component.into(),
            exe: self.exe.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or_default();
        let (signals, mut signal_rx) = mpsc::unbounded_channel::<Signal>();
        let (exit_tx, exit) = watch::channel(None);
        let stopping = self.stopping.clone();
        let death_tx = self.death_tx.clone();
        let name = component.to_string();
        let log_path = log.clone();
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    Some(signal) = signal_rx.recv() => {
                        // `id()` is None once reaped: the pid cannot have been reused.
                        if let Some(pid) = child.id() {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid as i32),
                                signal,
                            );
                        }
                    }
                }
            };
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(Some(status.clone()));
            if !stopping.load(Ordering::SeqCst) {
                let _ = death_tx.send(ChildDeath {
                    component: name,
                    status,
                    tail: log_tail(&log_path, 20),
                    log: log_path,
                });
            }
        });
        self.children.push(Child {
            component: component.into(),
            log,
            pid,
            signals,
            exit,
        });
        Ok(self.children.len() - 1)
    }

    /// Polls `check` until it yields, failing when the child exits or the timeout passes.
    async fn wait<T, F, Fut>(&self, child: usize, what: &str, check: F) -> Result<T, LocalError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let child = &self.children[child];
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(status) = child.exited() {
                return Err(LocalError::ChildExited {
                    component: child.component.clone(),
                    status,
                    doing: format!("starting ({what})"),
                    log: child.log.clone(),
                    tail: log_tail(&child.log, 20),
                });
            }
            if *self.interrupt.borrow() {
                return Err(LocalError::Interrupted);
            }
            if let Some(value) = check().await {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(LocalError::Timeout {
                    component: child.component.clone(),
                    what: what.into(),
                    timeout: self.timeout,
                    log: child.log.clone(),
                    tail: log_tail(&child.log, 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The shared token of the extent servers (created once, kept across runs).
fn ensure_token(data_dir: &Path) -> Result<PathBuf, LocalError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("token");
    if path.exists() {
        return Ok(path);
    }
    let token: String = (0..32)
        .map(|_| char::from(b"0123456789abcdef"[fastrand::usize(..16)]))
        .collect();
    let mut f = File::options()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("creating {}", path.display())))?;
    f.write_all(token.as_bytes())
        .map_err(io(format!("writing {}", path.display())))?;
    Ok(path)
}

/// Server-side applies every tessera CRD (`tessera_api::crds::all()`).
pub async fn apply_crds(client: &kube::Client) -> Result<(), LocalError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for crd in tessera_api::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .map_err(api(format!("applying CRD {name}")))?;
    }
    Ok(())
}

async fn kinds_served(client: &kube::Client) -> bool {
    let lp = ListParams::default().limit(1);
    Api::<StoragePool>::all(client.clone())
        .list(&lp)
        .await
        .is_ok()
        && Api::<StorageArea>::all(client.clone())
            .list(&lp)
            .await
            .is_ok()
        && Api::<StoragePriorityClass>::all(client.clone())
            .list(&lp)
            .await
            .is_ok()
        && Api::<StorageClaim>::all(client.clone())
            .list(&lp)
            .await
            .is_ok()
        && Api::<VirtualVolume>::all(client.clone())
            .list(&lp)
            .await
            .is_ok()
}

/// Creates the pool `default` and the priority classes `high` and `low` of `examples/` when
/// they do not exist (never overwriting what someone changed): the node agents' areas belong to
/// pool `default`, and a cluster without it could not place anything.
pub async fn ensure_examples(client: &kube::Client) -> Result<(), LocalError> {
    let pool: StoragePool = serde_yaml::from_str(EXAMPLE_POOL)
        .map_err(|e| LocalError::Config(format!("examples/00-pool.yaml: {e}")))?;
    create_if_absent(&Api::<StoragePool>::all(client.clone()), &pool).await?;
    for doc in serde_yaml::Deserializer::from_str(EXAMPLE_CLASSES) {
        let class: StoragePriorityClass = serde::Deserialize::deserialize(doc)
            .map_err(|e| LocalError::Config(format!("examples/02-priority-classes.yaml: {e}")))?;
        create_if_absent(&Api::<StoragePriorityClass>::all(client.clone()), &class).await?;
    }
    Ok(())
}

async fn create_if_absent<K>(api_: &Api<K>, obj: &K) -> Result<(), LocalError>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    match api_.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(LocalError::Api {
            what: format!(
                "creating {} {}",
                K::kind(&Default::default()),
                obj.meta().name.as_deref().unwrap_or("")
            ),
            source: e,
        }),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Starting,
    Ready,
}

/// Each step shown in the progress line, and how far it is.
type ProgressItems = Vec<(String, Option<Step>)>;

/// The progress line on stderr: `⠹ starting  API server ✓  CRDs ✓  operator …  node-a · …`.
/// On a terminal it redraws in place; otherwise each step that becomes ready is one line.
struct Progress {
    enabled: bool,
    tty: bool,
    state: Arc<Mutex<ProgressItems>>,
    ticker: Option<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl Progress {
    fn new(enabled: bool, nodes: usize) -> Self {
        let mut items: Vec<(String, Option<Step>)> =
            ["API server", "CRDs", "operator", "CSI controller"]
                .iter()
                .map(|s| (s.to_string(), None))
                .collect();
        items.extend((0..nodes).map(|i| (node_name(i), None)));
        let state = Arc::new(Mutex::new(items));
        let tty = std::io::stderr().is_terminal();
        let ticker = (enabled && tty).then(|| {
            let state = state.clone();
            tokio::spawn(async move {
                const SPIN: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
                let mut i = 0usize;
                loop {
                    let line = render_progress(&state.lock().expect("progress lock"), SPIN[i % 10]);
                    eprint!("\r\x1b[2K{line}");
                    let _ = std::io::stderr().flush();
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        Progress {
            enabled,
            tty,
            state,
            ticker,
            started: Instant::now(),
        }
    }

    fn set(&self, item: &str, step: Step) {
        if !self.enabled {
            return;
        }
        let mut state = self.state.lock().expect("progress lock");
        if let Some(entry) = state.iter_mut().find(|(n, _)| n == item) {
            entry.1 = Some(step);
        }
        if !self.tty {
            match step {
                Step::Starting => eprintln!("tessera local: starting {item}…"),
                Step::Ready => eprintln!("tessera local: {item} ready"),
            }
        }
    }

    fn finish(&self, error: Option<&str>) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
        if !self.enabled {
            return;
        }
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        let secs = self.started.elapsed().as_secs_f64();
        match error {
            None => {
                let state = self.state.lock().expect("progress lock");
                let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
                eprintln!("✓ started {} in {secs:.1}s", names.join(", "));
            }
            Some(e) if e == LocalError::Interrupted.to_string() => {
                eprintln!("interrupted after {secs:.1}s: stopping what has started")
            }
            Some(_) => eprintln!("✗ tessera local failed to start after {secs:.1}s"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
    }
}

fn render_progress(items: &[(String, Option<Step>)], spin: char) -> String {
    let mut line = format!("{spin} starting ");
    for (name, step) in items {
        let mark = match step {
            Some(Step::Ready) => "✓",
            Some(Step::Starting) => "…",
            None => "·",
        };
        line.push_str(&format!(" {name} {mark} "));
    }
    line.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_the_contract() {
        assert_eq!(node_name(0), "node-a");
        assert_eq!(node_name(2), "node-c");
        assert_eq!(node_name(25), "node-z");
        assert_eq!(node_name(26), "node-aa");
        assert_eq!(node_zone("node-b"), "zone-b");
    }

    #[test]
    fn areas_match_the_examples_shape() {
        let areas = node_areas("node-b", Path::new("/d/node-b"), 1 << 30);
        assert_eq!(areas.len(), 2);
        assert_eq!(areas[0].name, "node-b-area-0");
        assert_eq!(areas[1].name, "node-b-area-1");
        assert_eq!(areas[1].path, Path::new("/d/node-b/areas/area-1.img"));
        assert!(
            areas
                .iter()
                .all(|a| a.pool_name == "default" && a.domain == "zone-b")
        );
        let yaml = serde_yaml::to_string(&areas).unwrap();
        assert!(yaml.contains("sizeBytes: 1073741824"), "{yaml}");
        assert!(yaml.contains("poolName: default"), "{yaml}");
        assert!(yaml.contains("mediaType: ssd"), "{yaml}");
    }
}
