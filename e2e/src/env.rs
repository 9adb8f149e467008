//! Where the scenarios run: a kubeconfig, the CSI socket of the controller and of every node,
//! and a work directory for staging and target paths (what kubelet keeps under
//! `/var/lib/kubelet`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{E2eError, Result};

/// One node plugin the harness can call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEndpoint {
    /// Node id (what NodeGetInfo reports and ControllerPublish names).
    pub name: String,
    pub csi_socket: PathBuf,
    /// The node agent's `--state-dir`: its `node.json` and `nbd/<volume>.sock` exports live
    /// there. Unknown for a node whose files the harness cannot see.
    pub state_dir: Option<PathBuf>,
}

/// How scenarios reach a published volume's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPath {
    /// The published block device when the node gave one (a kernel frontend: root and
    /// fuse-loop), else the volume's NBD export.
    Auto,
    /// Always the NBD unix socket `<state-dir>/nbd/<volume>.sock`.
    Nbd,
    /// Always the published block device; a node without a kernel frontend fails the scenario.
    Device,
}

/// Everything a scenario needs to act like csi-provisioner, csi-attacher and kubelet.
#[derive(Clone)]
pub struct Environment {
    pub kube: kube::Client,
    pub kubeconfig: PathBuf,
    pub controller_socket: PathBuf,
    pub nodes: Vec<NodeEndpoint>,
    /// StoragePool the scenarios allocate from (StorageClass parameter `tessera.io/pool`).
    pub pool: String,
    /// Namespace of the PVCs the harness pretends to provision for.
    pub namespace: String,
    /// Parent of the staging and target paths; must be visible to the node plugins.
    pub work_dir: PathBuf,
    pub io_path: IoPath,
    /// Whether the nodes can give a pod a kernel block device (a kernel frontend such as
    /// fuse-loop, which needs root). Without one, NodePublish of a Block volume is refused, so
    /// the harness stops after NodeStage and reaches the volume through its NBD export.
    pub kernel_frontend: bool,
    /// Bound on every wait for the system to converge (claims, counters, attachments).
    pub timeout: Duration,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment")
            .field("kubeconfig", &self.kubeconfig)
            .field("controller_socket", &self.controller_socket)
            .field("nodes", &self.nodes)
            .field("pool", &self.pool)
            .field("namespace", &self.namespace)
            .field("work_dir", &self.work_dir)
            .field("io_path", &self.io_path)
            .field("kernel_frontend", &self.kernel_frontend)
            .finish_non_exhaustive()
    }
}

/// The parts of `endpoints.json` (the `tessera local` contract) the harness uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    pub kubeconfig: PathBuf,
    #[serde(default)]
    pub apiserver: String,
    pub controller: ControllerEntry,
    pub nodes: Vec<NodeEntry>,
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerEntry {
    pub csi_socket: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeEntry {
    pub name: String,
    pub csi_socket: PathBuf,
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeEntry {
    pub node: String,
    pub nbd_uri: String,
    #[serde(default)]
    pub device: Option<String>,
}

impl Endpoints {
    pub fn load(path: &Path) -> Result<Self> {
        read_json(path)
    }
}

/// `<state-dir>/node.json`, written by each node agent (contract: "Controller ↔ API ↔ node").
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeFile {
    pub node_id: String,
    #[serde(default)]
    pub volumes: BTreeMap<String, NodeVolume>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeVolume {
    pub nbd_uri: String,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub staging_path: String,
}

impl NodeFile {
    pub fn load(path: &Path) -> Result<Self> {
        read_json(path)
    }
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| E2eError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| E2eError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// `nbd+unix:///<export>?socket=<path>` → the socket path and the export name.
pub fn parse_nbd_unix_uri(uri: &str) -> Result<(PathBuf, String)> {
    let bad = || E2eError::Config(format!("{uri:?} is not nbd+unix:///<export>?socket=<path>"));
    let rest = uri.strip_prefix("nbd+unix://").ok_or_else(bad)?;
    let (path, query) = rest.split_once('?').ok_or_else(bad)?;
    let export = path.strip_prefix('/').unwrap_or(path).to_string();
    let socket = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("socket="))
        .filter(|s| !s.is_empty())
        .ok_or_else(bad)?;
    Ok((PathBuf::from(socket), export))
}

/// Options of an environment that are not in `endpoints.json`.
#[derive(Debug, Clone)]
pub struct Options {
    pub pool: String,
    pub namespace: String,
    pub work_dir: PathBuf,
    pub io_path: IoPath,
    pub kernel_frontend: bool,
    pub timeout: Duration,
}

impl Options {
    /// Defaults matching `tessera local` and `examples/`: pool `default`, namespace `default`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            pool: "default".into(),
            namespace: "default".into(),
            work_dir: work_dir.into(),
            io_path: IoPath::Auto,
            kernel_frontend: true,
            timeout: Duration::from_secs(90),
        }
    }

    /// Overrides from `TESSERA_E2E_POOL`, `TESSERA_E2E_NAMESPACE`, `TESSERA_E2E_WORK_DIR`,
    /// `TESSERA_E2E_IO` (`auto|nbd|device`), `TESSERA_E2E_KERNEL_FRONTEND` (`0|1`) and
    /// `TESSERA_E2E_TIMEOUT_SECONDS`.
    pub fn with_env_overrides(mut self) -> Result<Self> {
        if let Ok(pool) = std::env::var("TESSERA_E2E_POOL") {
            self.pool = pool;
        }
        if let Ok(ns) = std::env::var("TESSERA_E2E_NAMESPACE") {
            self.namespace = ns;
        }
        if let Ok(dir) = std::env::var("TESSERA_E2E_WORK_DIR") {
            self.work_dir = dir.into();
        }
        if let Ok(io) = std::env::var("TESSERA_E2E_IO") {
            self.io_path = match io.as_str() {
                "auto" => IoPath::Auto,
                "nbd" => IoPath::Nbd,
                "device" => IoPath::Device,
                other => {
                    return Err(E2eError::Config(format!(
                        "TESSERA_E2E_IO={other:?}: expected auto, nbd or device"
                    )));
                }
            };
        }
        if let Ok(v) = std::env::var("TESSERA_E2E_KERNEL_FRONTEND") {
            self.kernel_frontend = match v.as_str() {
                "1" | "true" => true,
                "0" | "false" => false,
                other => {
                    return Err(E2eError::Config(format!(
                        "TESSERA_E2E_KERNEL_FRONTEND={other:?}: expected 0 or 1"
                    )));
                }
            };
        }
        if let Ok(secs) = std::env::var("TESSERA_E2E_TIMEOUT_SECONDS") {
            let secs: u64 = secs.parse().map_err(|_| {
                E2eError::Config(format!(
                    "TESSERA_E2E_TIMEOUT_SECONDS={secs:?} is not a number"
                ))
            })?;
            self.timeout = Duration::from_secs(secs);
        }
        Ok(self)
    }
}

impl Environment {
    /// From `endpoints.json` as `tessera local` writes it.
    pub async fn from_endpoints(path: &Path, options: Options) -> Result<Self> {
        let endpoints = Endpoints::load(path)?;
        let nodes = endpoints
            .nodes
            .into_iter()
            .map(|n| NodeEndpoint {
                name: n.name,
                csi_socket: n.csi_socket,
                state_dir: Some(n.state_dir),
            })
            .collect();
        Self::from_parts(
            &endpoints.kubeconfig,
            endpoints.controller.csi_socket,
            nodes,
            options,
        )
        .await
    }

    /// From a kubeconfig and the CSI sockets of the controller and of the nodes (any cluster
    /// whose sockets the harness can reach, e.g. a kind cluster whose plugin directories are
    /// mounted out of the node containers; see `e2e/README.md`).
    pub async fn from_parts(
        kubeconfig: &Path,
        controller_socket: PathBuf,
        nodes: Vec<NodeEndpoint>,
        options: Options,
    ) -> Result<Self> {
        if nodes.len() < 2 {
            return Err(E2eError::Config(format!(
                "the scenarios need at least two nodes (a lender and a borrower); got {}",
                nodes.len()
            )));
        }
        let kube = kube_client(kubeconfig).await?;
        std::fs::create_dir_all(&options.work_dir)
            .map_err(|e| E2eError::io(options.work_dir.display().to_string(), e))?;
        Ok(Self {
            kube,
            kubeconfig: kubeconfig.to_path_buf(),
            controller_socket,
            nodes,
            pool: options.pool,
            namespace: options.namespace,
            work_dir: options.work_dir,
            io_path: options.io_path,
            kernel_frontend: options.kernel_frontend,
            timeout: options.timeout,
        })
    }

    /// From the process environment, or `None` when it names no environment:
    /// - `TESSERA_E2E_ENDPOINTS=<endpoints.json>`, or
    /// - `TESSERA_E2E_KUBECONFIG=<file>` with `TESSERA_E2E_CONTROLLER_SOCKET=<path>` and
    ///   `TESSERA_E2E_NODES=<name>=<csi socket>[=<state dir>],…`.
    pub async fn from_process_env(default_work_dir: &Path) -> Result<Option<Self>> {
        let options = Options::new(default_work_dir).with_env_overrides()?;
        if let Ok(path) = std::env::var("TESSERA_E2E_ENDPOINTS") {
            return Self::from_endpoints(Path::new(&path), options)
                .await
                .map(Some);
        }
        let Ok(kubeconfig) = std::env::var("TESSERA_E2E_KUBECONFIG") else {
            return Ok(None);
        };
        let controller = std::env::var("TESSERA_E2E_CONTROLLER_SOCKET").map_err(|_| {
            E2eError::Config(
                "TESSERA_E2E_KUBECONFIG is set but TESSERA_E2E_CONTROLLER_SOCKET is not: the \
                 scenarios call CSI directly, so they need the controller's and the nodes' CSI \
                 sockets (e2e/README.md says how to expose them on kind)"
                    .into(),
            )
        })?;
        let nodes = std::env::var("TESSERA_E2E_NODES")
            .map_err(|_| {
                E2eError::Config(
                    "TESSERA_E2E_KUBECONFIG is set but TESSERA_E2E_NODES \
                     (<name>=<csi socket>[=<state dir>],…) is not"
                        .into(),
                )
            })
            .and_then(|spec| parse_node_list(&spec))?;
        Self::from_parts(
            Path::new(&kubeconfig),
            PathBuf::from(controller),
            nodes,
            options,
        )
        .await
        .map(Some)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<&NodeEndpoint> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| E2eError::Config(format!("no node {name:?} in the environment")))
    }
}

/// `<name>=<socket>[=<state dir>]`, comma separated.
pub fn parse_node_list(spec: &str) -> Result<Vec<NodeEndpoint>> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|entry| {
            let mut parts = entry.trim().splitn(3, '=');
            let name = parts.next().unwrap_or_default();
            let socket = parts.next().unwrap_or_default();
            if name.is_empty() || socket.is_empty() {
                return Err(E2eError::Config(format!(
                    "node entry {entry:?} is not <name>=<csi socket>[=<state dir>]"
                )));
            }
            Ok(NodeEndpoint {
                name: name.to_string(),
                csi_socket: PathBuf::from(socket),
                state_dir: parts.next().map(PathBuf::from),
            })
        })
        .collect()
}

async fn kube_client(path: &Path) -> Result<kube::Client> {
    let bad = |message: String| E2eError::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| E2eError::kube("building the client", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_lists() {
        let nodes = parse_node_list("a=/run/a.sock=/var/lib/a, b=/run/b.sock").unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].state_dir.as_deref(), Some(Path::new("/var/lib/a")));
        assert_eq!(nodes[1].name, "b");
        assert_eq!(nodes[1].state_dir, None);
        assert!(parse_node_list("a").is_err());
        assert!(parse_node_list("=/x").is_err());
    }

    #[test]
    fn parses_nbd_unix_uris() {
        let (socket, export) =
            parse_nbd_unix_uri("nbd+unix:///vol-1?socket=/s/nbd/vol-1.sock").unwrap();
        assert_eq!(socket, PathBuf::from("/s/nbd/vol-1.sock"));
        assert_eq!(export, "vol-1");
        assert!(parse_nbd_unix_uri("nbd://h/v").is_err());
        assert!(parse_nbd_unix_uri("nbd+unix:///v").is_err());
    }

    #[test]
    fn reads_the_endpoints_contract() {
        let dir = std::env::temp_dir().join(format!("e2e-endpoints-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("endpoints.json");
        std::fs::write(
            &path,
            r#"{"kubeconfig": "/d/kubeconfig", "apiserver": "http://127.0.0.1:1",
                "controller": {"csiSocket": "/d/controller/csi.sock"},
                "nodes": [{"name": "node-a", "csiSocket": "/d/a.sock", "stateDir": "/d/a",
                           "extentServer": "127.0.0.1:2", "controlEndpoint": "127.0.0.1:3"}],
                "volumes": {"vol-1": {"node": "node-a", "nbdUri": "nbd+unix:///vol-1?socket=/s"}}}"#,
        )
        .unwrap();
        let e = Endpoints::load(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            e.controller.csi_socket,
            PathBuf::from("/d/controller/csi.sock")
        );
        assert_eq!(e.nodes[0].state_dir, PathBuf::from("/d/a"));
        assert_eq!(e.volumes["vol-1"].node, "node-a");
    }
}
