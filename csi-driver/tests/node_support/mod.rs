//! Shared harness of the node tests: an embedded API server with the tessera CRDs, node agents
//! with file areas in a temp dir serving the CSI Node service on a unix socket, volumes whose
//! `status.mapping` is written directly (no operator), and cleanup of mounts and loop devices
//! even when a test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tempfile::TempDir;
use tessera_api::v1alpha1::*;
use tessera_apiserver::{ApiServer, RunningServer};
use tessera_csi::agent::{Agent, FrontendChoice};
use tessera_csi::csi::node::{NodeArgs, serve_with_agent};
use tessera_proto::csi::v1::identity_client::IdentityClient;
use tessera_proto::csi::v1::node_client::NodeClient;
use tessera_proto::csi::v1::{VolumeCapability, volume_capability};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// 1 MiB extents: small volumes stay cheap.
pub const ES: u64 = 1 << 20;
pub const POOL: &str = "default";
pub const CLASS: &str = "standard";
pub const TOKEN: &str = "node-test-token";

/// Root-only tests skip with a printed reason.
#[macro_export]
macro_rules! require_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (fuse-loop, loop devices, mount)");
            return;
        }
    };
}

/// Tests that attach loop devices run one at a time: `losetup --find` races between concurrent
/// attaches, and mkfs/mount are slow enough on 2 cores.
pub static KERNEL_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Dropped in field order: mounts and loops first, then the API server, the temp dir last.
pub struct Cluster {
    _cleanup: Cleanup,
    pub server: Option<RunningServer>,
    pub client: kube::Client,
    pub dir: TempDir,
}

impl Cluster {
    /// API server, CRDs, the pool `default` (1 MiB extents) and the class `standard`.
    pub async fn start() -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let server = ApiServer::builder()
            .data_dir(dir.path().join("api"))
            .bind("127.0.0.1:0".parse().expect("addr"))
            .start()
            .await
            .expect("API server starts");
        let client = server.client();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in tessera_api::crds::all() {
            crds.create(&PostParams::default(), &crd)
                .await
                .expect("CRD installs");
        }
        let pool: StoragePool = serde_json::from_value(json!({
            "apiVersion": "tessera.io/v1alpha1",
            "kind": "StoragePool",
            "metadata": {"name": POOL},
            "spec": {"extentSizeBytes": ES},
        }))
        .expect("pool");
        Api::<StoragePool>::all(client.clone())
            .create(&PostParams::default(), &pool)
            .await
            .expect("pool created");
        let class = StoragePriorityClass::new(
            CLASS,
            StoragePriorityClassSpec {
                value: 100,
                data_priority: DataPriority::High,
                reclaimable: Reclaimable::default(),
                description: None,
            },
        );
        Api::<StoragePriorityClass>::all(client.clone())
            .create(&PostParams::default(), &class)
            .await
            .expect("class created");
        let cleanup = Cleanup {
            root: dir.path().to_path_buf(),
        };
        Cluster {
            _cleanup: cleanup,
            server: Some(server),
            client,
            dir,
        }
    }

    pub fn volumes(&self) -> Api<VirtualVolume> {
        Api::all(self.client.clone())
    }

    /// Node args for `node` with `areas` areas of `area_bytes` each (`<node>-area-<i>`).
    pub fn node_args(
        &self,
        node: &str,
        areas: usize,
        area_bytes: u64,
        frontend: FrontendChoice,
    ) -> NodeArgs {
        let base = self.dir.path().join(node);
        std::fs::create_dir_all(&base).expect("node dir");
        let token = base.join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
        let areas_file = base.join("areas.yaml");
        let list: Vec<serde_json::Value> = (0..areas)
            .map(|i| {
                json!({
                    "name": format!("{node}-area-{i}"),
                    "path": base.join("areas").join(format!("area-{i}.img")),
                    "sizeBytes": area_bytes,
                    "mediaType": "ssd",
                    "poolName": POOL,
                })
            })
            .collect();
        std::fs::write(&areas_file, serde_yaml::to_string(&list).expect("yaml"))
            .expect("areas file");
        NodeArgs {
            node_id: Some(node.to_string()),
            state_dir: base.join("state"),
            areas_file: Some(areas_file),
            zone: Some("zone-1".into()),
            extent_listen: "127.0.0.1:0".parse().expect("addr"),
            control_listen: "127.0.0.1:0".parse().expect("addr"),
            advertise_host: None,
            token_file: token,
            max_volumes: 16,
            frontend,
            heartbeat_seconds: 1,
            namespace: "default".into(),
        }
    }

    /// Starts a node agent and its CSI socket.
    pub async fn start_node(&self, args: NodeArgs) -> Node {
        let socket = args.state_dir.parent().expect("node dir").join("csi.sock");
        let config = args.agent_config(&socket).expect("node config");
        let agent = Agent::start(self.client.clone(), config)
            .await
            .expect("agent starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let agent = Arc::clone(&agent);
            let client = self.client.clone();
            let socket = socket.clone();
            let max = args.max_volumes;
            async move {
                serve_with_agent("csi.tessera.io", client, agent, max, socket, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        let channel = connect_unix(&socket).await;
        Node {
            id: args.node_id.clone().unwrap_or_default(),
            args,
            agent,
            socket,
            csi: NodeClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A VirtualVolume of `size` bytes whose mapping (generation `generation`) places
    /// consecutive extents on `extents` (area, area extent index) — `None` is a hole —
    /// published to `access` node.
    pub async fn create_volume(
        &self,
        name: &str,
        size: u64,
        generation: i64,
        extents: &[Option<(&str, u64)>],
        access: Option<&str>,
    ) -> VirtualVolume {
        let replicas: Vec<Vec<(&str, u64)>> = extents
            .iter()
            .map(|e| e.iter().copied().collect())
            .collect();
        self.create_volume_with(name, size, generation, 1, &replicas, access)
            .await
    }

    /// Like [`Cluster::create_volume`] with `copies` replicas per extent (empty: hole).
    pub async fn create_volume_with(
        &self,
        name: &str,
        size: u64,
        generation: i64,
        copies: i32,
        extents: &[Vec<(&str, u64)>],
        access: Option<&str>,
    ) -> VirtualVolume {
        let volume = VirtualVolume::new(
            name,
            VirtualVolumeSpec {
                size_bytes: size as i64,
                pool_name: POOL.into(),
                priority_class_name: CLASS.into(),
                copies,
                layout: Default::default(),
                claim_ref: None,
                access_node: access.map(str::to_string),
                shared_access_nodes: Vec::new(),
            },
        );
        self.volumes()
            .create(&PostParams::default(), &volume)
            .await
            .expect("volume created");
        self.set_mapping_replicas(name, size, generation, extents)
            .await
    }

    /// Writes `status.mapping` (and grows `spec.sizeBytes` to `size` when needed).
    pub async fn set_mapping(
        &self,
        name: &str,
        size: u64,
        generation: i64,
        extents: &[Option<(&str, u64)>],
    ) -> VirtualVolume {
        let replicas: Vec<Vec<(&str, u64)>> = extents
            .iter()
            .map(|e| e.iter().copied().collect())
            .collect();
        self.set_mapping_replicas(name, size, generation, &replicas)
            .await
    }

    pub async fn set_mapping_replicas(
        &self,
        name: &str,
        size: u64,
        generation: i64,
        extents: &[Vec<(&str, u64)>],
    ) -> VirtualVolume {
        let current = self.volumes().get(name).await.expect("volume");
        if current.spec.size_bytes < size as i64 {
            self.volumes()
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"sizeBytes": size}})),
                )
                .await
                .expect("size patched");
        }
        let runs: Vec<MappedRun> = extents
            .iter()
            .enumerate()
            .map(|(i, e)| MappedRun {
                offset: (i as u64 * ES) as i64,
                length: ES.min(size - i as u64 * ES) as i64,
                replicas: e
                    .iter()
                    .map(|(area, index)| ReplicaLocation {
                        area: area.to_string(),
                        area_offset: (index * ES) as i64,
                    })
                    .collect(),
            })
            .collect();
        let mapping = VolumeMapping {
            generation,
            extent_size_bytes: ES as i64,
            extents: runs,
        };
        self.volumes()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Available", "mapping": mapping}})),
            )
            .await
            .expect("mapping written")
    }

    /// Sets `spec.accessNode` (ControllerPublish) or clears it.
    pub async fn set_access_node(&self, name: &str, node: Option<&str>) {
        self.volumes()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"accessNode": node}})),
            )
            .await
            .expect("access node patched");
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

pub struct Node {
    pub id: String,
    pub args: NodeArgs,
    pub agent: Arc<Agent>,
    pub socket: PathBuf,
    pub csi: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Node {
    /// Stops the CSI service and the agent (frontends detached, mapping cache kept).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.agent.shutdown().await;
    }

    pub fn state_dir(&self) -> &Path {
        &self.args.state_dir
    }
}

/// A tonic channel over a unix socket.
pub async fn connect_unix(path: &Path) -> Channel {
    let path = path.to_path_buf();
    for _ in 0..100 {
        if path.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tessera_csi::csi::connect_unix(&path)
        .await
        .expect("connects to the CSI socket")
}

pub fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: fs.into(),
                mount_flags: Vec::new(),
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Loop devices whose backing file is under `root`.
fn loops_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.starts_with("loop") {
                continue;
            }
            if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file"))
                && Path::new(backing.trim()).starts_with(root)
            {
                out.push(format!("/dev/{name}"));
            }
        }
    }
    out
}

/// Mount points under `root`, deepest first.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = tessera_csi::agent::mounts::mount_table()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(root))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Whether anything of the test (mounts, loop devices) is left under `root`.
pub fn leftovers(root: &Path) -> (Vec<PathBuf>, Vec<String>) {
    (mounts_under(root), loops_under(root))
}

/// Unmounts (lazily) and detaches whatever a failed test left under its temp dir.
struct Cleanup {
    root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let fs_mounts: Vec<PathBuf> = mounts_under(&self.root)
            .into_iter()
            .filter(|m| !m.ends_with("mnt"))
            .collect();
        for m in fs_mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for dev in loops_under(&self.root) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &dev])
                .status();
        }
        for m in mounts_under(&self.root) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

use tessera_proto::csi::v1::{
    NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest,
};

impl Node {
    pub async fn stage(
        &self,
        volume: &str,
        staging: &Path,
        cap: VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.csi
            .clone()
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: volume.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn publish(
        &self,
        volume: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.csi
            .clone()
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: volume.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn unpublish(&self, volume: &str, target: &Path) -> Result<(), tonic::Status> {
        self.csi
            .clone()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(|_| ())
    }

    pub async fn unstage(&self, volume: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.csi
            .clone()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .map(|_| ())
    }

    /// node.json as JSON.
    pub fn node_json(&self) -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(self.state_dir().join("node.json")).expect("node.json"),
        )
        .expect("node.json parses")
    }

    /// An NBD client of a staged volume's export.
    pub async fn nbd(&self, volume: &str) -> tessera_nbd::NbdClient {
        tessera_nbd::NbdClient::connect_unix(
            self.state_dir().join(format!("nbd/{volume}.sock")),
            volume,
        )
        .await
        .expect("NBD export of the staged volume")
    }
}

/// A deterministic pattern of `len` bytes for `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
