//! The borrower side: volumes staged on this node (seed 001 §4: the borrower mounts the lent
//! volume and reaches the lender's area through the lender's agent; one borrower at a time,
//! [0028]).
//!
//! A staged volume is an engine [`Volume`] at the committed mapping generation, with local
//! backends for this node's areas and [`RemoteArea`]s for other nodes' areas, always exported
//! over NBD on `<state-dir>/nbd/<id>.sock`, and — when the node has one — attached to a kernel
//! device (fuse-loop), formatted and mounted at the staging path for Mount volumes.
//!
//! Every operation runs under one lock of the registry: CSI calls for one node are few and the
//! slow ones (mkfs) must not interleave with an unstage of the same volume.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::Api;
use serde::{Deserialize, Serialize};
use tessera_api::model::{AreaId, ExtentMap, Generation, Placement, ReplicaLocation, diff};
use tessera_api::v1alpha1::{
    DataPriority, RemapPhase, StorageArea, StoragePriorityClass, VirtualVolume, VolumeMapping,
    VolumeRemap,
};
use tessera_nbd::Credentials;

use super::cache::{self, CachedVolume, NodeJsonVolume};
use super::mounts;
use super::{Agent, AgentError, FrontendChoice, status};
use crate::backend::remote::{RemoteArea, RemoteAreaConfig};
use crate::engine::{HealthState, UsageInit, Volume, VolumeOptions};
use crate::frontend::fuse_loop::FuseLoopFrontend;
use crate::frontend::nbd::{NbdUnixFrontend, NbdUnixHandle};
use crate::frontend::{AttachTarget, Attachment, Frontend, FrontendKind, detect_available};

/// How long staging waits for a lender to grant this node its ranges (the lender's watch runs
/// independently of the controller's publish).
const GRANT_WAIT: Duration = Duration::from_secs(20);
/// How long NodeStage waits for an in-flight remap of the volume before answering UNAVAILABLE.
const REMAP_WAIT: Duration = Duration::from_secs(20);

/// How the CO uses a staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Capability {
    Block {
        access_mode: i32,
    },
    Mount {
        /// `ext4` or `xfs` (empty in the request means ext4).
        fs_type: String,
        #[serde(default)]
        mount_flags: Vec<String>,
        access_mode: i32,
    },
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self, Capability::Block { .. })
    }
}

/// One staged volume.
pub struct StagedVolume {
    pub volume: Arc<Volume>,
    pub size_spec: i64,
    pub capability: Capability,
    pub staging_path: PathBuf,
    pub nbd: Option<NbdUnixHandle>,
    /// The kernel-device attachment (behind a lock only so that the registry is `Sync`).
    pub kernel: Option<parking_lot::Mutex<Attachment>>,
    /// The kernel device node of `kernel`.
    pub device: Option<PathBuf>,
    /// Target path → read-only.
    pub published: BTreeMap<PathBuf, bool>,
    /// Remote areas this volume uses.
    pub remote_areas: BTreeSet<AreaId>,
    /// The bitmaps of the last usage report written.
    pub last_report: Option<status::UsageView>,
    /// The unhealthy areas last reported in `status.attachments`.
    pub last_health: Option<Vec<String>>,
    /// Brought back from the mapping cache after a restart (no kernel device yet).
    pub restored: bool,
    /// Dirty-report bookkeeping of a mirror primary or secondary (`agent::mirror`).
    pub mirror: super::mirror::MirrorBook,
}

impl StagedVolume {
    pub fn device(&self) -> Option<PathBuf> {
        self.device.clone()
    }

    fn set_kernel(&mut self, attachment: Attachment) {
        self.device = match attachment.target() {
            AttachTarget::Device(path) => Some(path.clone()),
            AttachTarget::NbdSocket { .. } => None,
        };
        self.kernel = Some(parking_lot::Mutex::new(attachment));
    }

    fn take_kernel(&mut self) -> Option<Attachment> {
        self.device = None;
        self.kernel.take().map(parking_lot::Mutex::into_inner)
    }

    pub(crate) fn cached(&self) -> Result<CachedVolume, AgentError> {
        let mapping = VolumeMapping::from_model(&self.volume.map()).map_err(|e| {
            AgentError::InvalidMapping {
                volume: self.volume.name().into(),
                reason: e.to_string(),
            }
        })?;
        // The hold record goes with every cache write, so a stage or publish during a hold
        // does not drop it (seed 004 §11.4).
        let hold = self
            .volume
            .hold_record()
            .map(|record| cache::CachedHold::from_record(&record))
            .transpose()
            .map_err(|reason| AgentError::InvalidMapping {
                volume: self.volume.name().into(),
                reason,
            })?;
        Ok(CachedVolume {
            volume_id: self.volume.name().into(),
            size_bytes: self.size_spec.max(self.volume.size() as i64),
            mapping,
            staging_path: self.staging_path.clone(),
            capability: self.capability.clone(),
            published: self.published.keys().cloned().collect(),
            hold,
            mirror_primary: self.volume.mirror_leg().is_some(),
            mirror_secondary: self.mirror.secondary,
        })
    }
}

/// The staged volumes and which remote areas they share.
#[derive(Default)]
pub struct Registry {
    pub volumes: BTreeMap<String, StagedVolume>,
    /// Volumes a remap holds while they are not staged here: the node answered the remap's
    /// steps for them vacuously (nothing in flight), so it must not stage them before the
    /// operation resumes (volume → operation id). In memory only: after a restart the
    /// VolumeRemap's phase says the same ([`Agent::wait_for_remaps`]).
    pub absent_holds: BTreeMap<String, String>,
}

impl Registry {
    pub(crate) fn node_json_volumes(&self) -> BTreeMap<String, NodeJsonVolume> {
        self.volumes
            .iter()
            .map(|(id, v)| {
                (
                    id.clone(),
                    NodeJsonVolume {
                        nbd_uri: v.nbd.as_ref().map(NbdUnixHandle::uri).unwrap_or_default(),
                        device: v.device().map(|d| d.display().to_string()),
                        staging_path: v.staging_path.display().to_string(),
                    },
                )
            })
            .collect()
    }

    fn remote_in_use(&self, area: &AreaId) -> bool {
        self.volumes.values().any(|v| v.remote_areas.contains(area))
    }
}

/// NodeStage's inputs, validated by the CSI layer.
#[derive(Debug, Clone)]
pub struct StageRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
    /// `tessera.io/generation` of the publish_context, when present.
    pub publish_generation: Option<i64>,
}

/// NodePublish's inputs.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub capability: Capability,
    pub readonly: bool,
}

/// NodeGetVolumeStats' answer.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeStats {
    /// (total, available, used) bytes.
    pub bytes: [u64; 3],
    /// (total, available, used) inodes, for Mount volumes.
    pub inodes: Option<[u64; 3]>,
    /// `Some(message)` when a replica is unreachable.
    pub abnormal: Option<String>,
}

/// MountInquiry's answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Inquiry {
    pub staged: bool,
    pub published: bool,
    pub mounted: bool,
    pub paths: Vec<String>,
    pub detail: String,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Unsupported(format!("blocking task failed: {e}")))?
}

/// Growth only (ARCHITECTURE §6: runs appended past the old end or holes filled): no byte that
/// was mapped moves, so no in-flight I/O can observe the change and no hold is needed.
pub(crate) fn check_growth(
    volume: &str,
    old: &ExtentMap,
    new: &ExtentMap,
) -> Result<(), AgentError> {
    let changes = diff(old, new).map_err(|e| AgentError::InvalidMapping {
        volume: volume.into(),
        reason: e.to_string(),
    })?;
    for change in changes.changes() {
        if matches!(change.old, Placement::Mapped(_)) {
            return Err(AgentError::NotGrowth {
                volume: volume.into(),
                detail: format!("{} is mapped and would change", change.range),
            });
        }
    }
    Ok(())
}

impl Agent {
    fn kernel_frontend(&self) -> Result<Option<FuseLoopFrontend>, String> {
        let fuse = || {
            FuseLoopFrontend::new(
                tokio::runtime::Handle::current(),
                self.config.state_dir.join("fuse"),
            )
        };
        match self.config.frontend {
            FrontendChoice::Nbd => Err("--frontend nbd: NBD export only".into()),
            FrontendChoice::FuseLoop => Ok(Some(fuse())),
            FrontendChoice::Auto => {
                let fuse_loop = detect_available()
                    .into_iter()
                    .find(|a| a.kind == FrontendKind::FuseLoop);
                match fuse_loop {
                    Some(a) if a.available && nix::unistd::geteuid().is_root() => Ok(Some(fuse())),
                    Some(a) if !a.available => Err(a.reason),
                    _ => Err("fuse-loop needs root".into()),
                }
            }
        }
    }

    pub(crate) async fn get_volume(&self, volume_id: &str) -> Result<VirtualVolume, AgentError> {
        let api: Api<VirtualVolume> = Api::all(self.client.clone());
        api.get_opt(volume_id)
            .await
            .map_err(|e| AgentError::api(format!("get VirtualVolume {volume_id}"), e))?
            .ok_or_else(|| AgentError::VolumeNotFound(volume_id.into()))
    }

    /// The committed mapping of `volume` as a model map.
    pub(crate) fn model_map(volume: &VirtualVolume) -> Result<ExtentMap, AgentError> {
        let name = volume.name_any();
        let mapping = volume
            .status
            .as_ref()
            .and_then(|s| s.mapping.as_ref())
            .ok_or_else(|| AgentError::NotMapped(name.clone()))?;
        mapping
            .to_model_committed(volume.spec.size_bytes)
            .map_err(|e| AgentError::InvalidMapping {
                volume: name,
                reason: e.to_string(),
            })
    }

    async fn data_priority(&self, class: &str) -> DataPriority {
        let api: Api<StoragePriorityClass> = Api::all(self.client.clone());
        match api.get_opt(class).await {
            Ok(Some(class)) => class.spec.data_priority,
            _ => DataPriority::default(),
        }
    }

    /// Connects the remote areas `map` names that are not connected yet, and waits until every
    /// remote area serves this volume's ranges (the lender's grant may lag the publish).
    pub(crate) async fn ensure_remote_areas(
        &self,
        registry: &Registry,
        volume: &str,
        map: &ExtentMap,
    ) -> Result<BTreeSet<AreaId>, AgentError> {
        self.connect_remote_areas(registry, volume, map, true).await
    }

    /// Connects the remote areas `map` names; with `probe`, also waits until the lender's grant
    /// covers the first range of each (a committed map). A staged map (seed 004 StageMapping)
    /// is not probed: the lenders grant its new ranges only once it is recorded as committed.
    pub(crate) async fn connect_remote_areas(
        &self,
        registry: &Registry,
        volume: &str,
        map: &ExtentMap,
        probe: bool,
    ) -> Result<BTreeSet<AreaId>, AgentError> {
        // Extents of this node's areas that change owner are zeroed before the engine opens
        // them: local I/O bypasses the extent server's grants (agent/ownership.rs).
        self.claim_local_extents(volume, map, probe).await?;
        let mut first_range: BTreeMap<AreaId, u64> = BTreeMap::new();
        for run in map.runs().iter().filter(|r| !r.is_hole()) {
            for replica in &run.replicas {
                if !self.local_areas.contains(&replica.area) {
                    first_range
                        .entry(replica.area.clone())
                        .or_insert(replica.area_offset);
                }
            }
        }
        let deadline = Instant::now() + GRANT_WAIT;
        for (area, offset) in &first_range {
            let unreachable = |reason: String| AgentError::AreaUnreachable {
                volume: volume.into(),
                area: area.to_string(),
                reason,
            };
            self.connect_remote_area(registry, volume, area, deadline)
                .await?;
            if !probe {
                continue;
            }
            // The pool may be shared with another volume: probe one sector of this volume's
            // range until the lender's grant covers it.
            let backend = self
                .registry
                .get(area)
                .ok_or_else(|| unreachable("not registered".into()))?;
            loop {
                match backend.read(map.generation(), *offset, 512).await {
                    Ok(_) => break,
                    Err(error) if Instant::now() < deadline => {
                        tracing::debug!(%area, %error, "range not granted yet; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(error) => return Err(unreachable(error.to_string())),
                }
            }
        }
        Ok(first_range.into_keys().collect())
    }

    /// Connects remote `area` unless a staged volume already uses its connection (retrying
    /// until `deadline`: the lender may not show the area to this node before its grant).
    async fn connect_remote_area(
        &self,
        registry: &Registry,
        volume: &str,
        area: &AreaId,
        deadline: Instant,
    ) -> Result<(), AgentError> {
        let unreachable = |reason: String| AgentError::AreaUnreachable {
            volume: volume.into(),
            area: area.to_string(),
            reason,
        };
        let areas: Api<StorageArea> = Api::all(self.client.clone());
        if !registry.remote_in_use(area) || !self.registry.contains(area) {
            let object = areas
                .get_opt(area.as_str())
                .await
                .map_err(|e| AgentError::api(format!("get StorageArea {area}"), e))?
                .ok_or_else(|| unreachable("no such StorageArea".into()))?;
            let endpoint = object
                .status
                .as_ref()
                .and_then(|s| s.extent_server.clone())
                .ok_or_else(|| unreachable("its node published no extent server".into()))?;
            let remote = loop {
                match RemoteArea::connect(
                    area.clone(),
                    endpoint.clone(),
                    Credentials::new(self.config.node_id.clone(), self.config.token.clone()),
                    RemoteAreaConfig::default(),
                )
                .await
                {
                    Ok(remote) => break remote,
                    Err(error) if Instant::now() < deadline => {
                        tracing::debug!(%area, %error, "remote area not granted yet; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(error) => return Err(unreachable(error.to_string())),
                }
            };
            if let Some(old) = self.registry.insert(Arc::new(remote)) {
                tracing::debug!(%area, ?old, "remote area reconnected");
            }
        }
        Ok(())
    }

    /// Before CopyExtents writes `length` bytes of `volume` to `destinations`: local ranges are
    /// claimed for the volume (zeroed first if another volume owned them), remote areas are
    /// connected and probed until their lender grants the range (its watch installs
    /// `status.incoming` independently of this call). Returns the remote areas connected.
    pub(crate) async fn prepare_copy_destinations(
        &self,
        registry: &Registry,
        volume: &str,
        destinations: &[ReplicaLocation],
        length: u64,
        generation: Generation,
    ) -> Result<BTreeSet<AreaId>, AgentError> {
        let ranges = destinations
            .iter()
            .map(|d| (d.area.clone(), d.area_offset..d.area_offset + length))
            .collect();
        let zeroed = self
            .ownership
            .claim_destinations(&self.client, volume, ranges, generation)
            .await?;
        if zeroed > 0 {
            tracing::info!(
                volume,
                zeroed,
                "copy destinations zeroed for their new owner"
            );
        }
        let mut remote = BTreeSet::new();
        let deadline = Instant::now() + GRANT_WAIT;
        for d in destinations
            .iter()
            .filter(|d| !self.local_areas.contains(&d.area))
        {
            self.connect_remote_area(registry, volume, &d.area, deadline)
                .await?;
            let backend =
                self.registry
                    .get(&d.area)
                    .ok_or_else(|| AgentError::AreaUnreachable {
                        volume: volume.into(),
                        area: d.area.to_string(),
                        reason: "not registered".into(),
                    })?;
            loop {
                match backend.read(generation, d.area_offset, 512).await {
                    Ok(_) => break,
                    Err(error) if Instant::now() < deadline => {
                        tracing::debug!(area = %d.area, %error, "copy destination not granted yet");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(error) => {
                        return Err(AgentError::AreaUnreachable {
                            volume: volume.into(),
                            area: d.area.to_string(),
                            reason: format!("copy destination not granted: {error}"),
                        });
                    }
                }
            }
            remote.insert(d.area.clone());
        }
        Ok(remote)
    }

    /// Disconnects remote areas no staged volume uses any more.
    pub(crate) async fn release_remote_areas(&self, registry: &Registry, areas: &BTreeSet<AreaId>) {
        for area in areas {
            if registry.remote_in_use(area) || self.local_areas.contains(area) {
                continue;
            }
            if let Some(backend) = self.registry.remove(area) {
                tracing::debug!(%area, ?backend, "remote area released");
            }
        }
    }

    /// How a freshly staged volume's usage bitmaps start.
    fn usage_init(volume: &VirtualVolume) -> UsageInit {
        if let Some((in_use, high_priority)) = volume
            .annotations()
            .get(status::USAGE_REPORT_ANNOTATION)
            .and_then(|v| status::parse_usage_report(v))
        {
            return UsageInit::Restored {
                in_use,
                high_priority,
            };
        }
        let status = volume.status.as_ref();
        let never_used = status.is_none_or(|s| {
            s.attachments.is_empty() && s.usage.as_ref().is_none_or(|u| u.in_use_bytes == 0)
        });
        if never_used {
            UsageInit::Empty
        } else {
            UsageInit::AllMapped
        }
    }

    /// Seed 004 AS-19: a remap's participants are fixed when it starts, so a node that stages
    /// the volume meanwhile would serve a mapping the remap then changes without it. NodeStage
    /// waits (up to [`REMAP_WAIT`]) until no VolumeRemap of the volume is in flight, then
    /// reads the committed mapping; after that it answers UNAVAILABLE and the CO retries.
    /// Returns the operation ids (uids) of the volume's remaps that have ended.
    pub(crate) async fn wait_for_remaps(
        &self,
        volume: &str,
    ) -> Result<BTreeSet<String>, AgentError> {
        let api: Api<VolumeRemap> = Api::all(self.client.clone());
        let deadline = Instant::now() + REMAP_WAIT;
        loop {
            let remaps = api
                .list(&Default::default())
                .await
                .map_err(|e| AgentError::api("list VolumeRemaps", e))?;
            let in_flight = remaps.items.iter().find(|r| {
                r.spec.volume_name == volume
                    && r.status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_some_and(RemapPhase::in_flight)
            });
            let Some(remap) = in_flight else {
                return Ok(remaps
                    .items
                    .iter()
                    .filter(|r| {
                        r.spec.volume_name == volume
                            && r.status
                                .as_ref()
                                .and_then(|s| s.phase)
                                .is_some_and(RemapPhase::is_final)
                    })
                    .filter_map(|r| r.uid())
                    .collect());
            };
            if Instant::now() >= deadline {
                return Err(AgentError::RemapInFlight {
                    volume: volume.into(),
                    remap: remap.name_any(),
                });
            }
            tracing::info!(volume, remap = %remap.name_any(), "NodeStage waits for the remap to end");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// NodeStage of a primary waits while its mirror copy runs (`status.mirror.copying`): the
    /// copy's final pass holds the nodes that could write it when it started.
    pub(crate) async fn wait_for_mirror_copy(&self, volume: &str) -> Result<(), AgentError> {
        let deadline = Instant::now() + REMAP_WAIT;
        loop {
            let object = self.get_volume(volume).await?;
            let Some(link) = object
                .status
                .as_ref()
                .and_then(|s| s.mirror.as_ref())
                .filter(|l| l.copying)
            else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(AgentError::MirrorCopyInFlight {
                    volume: volume.into(),
                    pair: link.pair.clone(),
                });
            }
            tracing::info!(volume, pair = %link.pair, "NodeStage waits for the mirror copy to end");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// NodeStageVolume.
    pub async fn stage(&self, req: StageRequest) -> Result<(), AgentError> {
        // Not under the registry lock: the wait must not stall the other volumes' remap steps.
        let already = self
            .staged
            .lock()
            .await
            .volumes
            .contains_key(&req.volume_id);
        let ended = if already {
            BTreeSet::new()
        } else {
            self.wait_for_mirror_copy(&req.volume_id).await?;
            self.wait_for_remaps(&req.volume_id).await?
        };
        let mut registry = self.staged.lock().await;
        if !registry.volumes.contains_key(&req.volume_id)
            && let Some(operation) = registry.absent_holds.get(&req.volume_id).cloned()
        {
            // A hold whose remap has ended was left by a Resume that never came (the node
            // was excluded, or the operator gave up); one of a remap started since the read
            // above is not in `ended` and still counts.
            if !ended.contains(&operation) {
                return Err(AgentError::RemapInFlight {
                    volume: req.volume_id.clone(),
                    remap: operation,
                });
            }
            registry.absent_holds.remove(&req.volume_id);
        }
        if let Some(existing) = registry.volumes.get(&req.volume_id) {
            if existing.staging_path != req.staging_path {
                return Err(AgentError::AlreadyStaged {
                    volume: req.volume_id,
                    detail: format!("staged at {}", existing.staging_path.display()),
                });
            }
            if existing.capability != req.capability {
                return Err(AgentError::AlreadyStaged {
                    volume: req.volume_id,
                    detail: format!("staged with {:?}", existing.capability),
                });
            }
            let needs_kernel = !existing.capability.is_block() || existing.restored;
            if existing.kernel.is_some() || !needs_kernel {
                return Ok(());
            }
            // Restored from the cache after a restart: the kernel side is gone; rebuild it.
            let entry = registry
                .volumes
                .get_mut(&req.volume_id)
                .ok_or_else(|| AgentError::NotStaged(req.volume_id.clone()))?;
            let path = entry.staging_path.clone();
            blocking(move || mounts::unmount_all(&path).map_err(AgentError::from)).await?;
            self.attach_kernel(entry).await?;
            entry.restored = false;
            drop(registry);
            cache::write_node_json(self).await?;
            return Ok(());
        }

        let object = self.get_volume(&req.volume_id).await?;
        let access: Vec<String> = object
            .spec
            .access_nodes()
            .iter()
            .map(|s| s.to_string())
            .collect();
        if !access.iter().any(|n| n == &self.config.node_id) {
            return Err(AgentError::NotAccessNode {
                volume: req.volume_id,
                node: self.config.node_id.clone(),
                access,
            });
        }
        let map = Self::model_map(&object)?;
        if let Some(published) = req.publish_generation
            && (map.generation().get() as i64) < published
        {
            return Err(AgentError::StaleGeneration {
                volume: req.volume_id,
                offered: map.generation(),
                current: tessera_api::model::Generation(published as u64),
            });
        }
        if let Capability::Mount { fs_type, .. } = &req.capability {
            mounts::fs_type_or_default(fs_type)?;
        }
        // A Mount volume needs a kernel device: refuse before touching anything.
        let kernel = self.kernel_frontend();
        if let (Err(reason), Capability::Mount { .. }) = (&kernel, &req.capability) {
            return Err(AgentError::NoKernelDevice {
                volume: req.volume_id,
                need: "a filesystem is mounted on it",
                reason: reason.clone(),
            });
        }
        let remote_areas = self
            .ensure_remote_areas(&registry, &req.volume_id, &map)
            .await?;
        let priority = self.data_priority(&object.spec.priority_class_name).await;
        let volume = Volume::open(
            req.volume_id.clone(),
            Arc::new(map),
            Arc::clone(&self.registry),
            VolumeOptions {
                priority,
                usage: Self::usage_init(&object),
            },
        )
        .map_err(|source| AgentError::Engine {
            volume: req.volume_id.clone(),
            source,
        })?;
        // A primary of a mirror pair mirrors (or tracks) from its first write (seed 003 claim 1).
        let mut remote_areas = remote_areas;
        if let Some((leg, areas)) = self.leg_of(&registry, &object).await? {
            remote_areas.extend(areas);
            volume
                .set_mirror_leg(Some(leg), false)
                .map_err(|source| AgentError::Engine {
                    volume: req.volume_id.clone(),
                    source,
                })?;
        }
        // A secondary's own writes are tracked before it serves any (seed 003 §4.1 step 3).
        let mut mirror = super::mirror::MirrorBook::open(&self.config.state_dir, &req.volume_id);
        if super::mirror::is_secondary(&object) {
            volume.enable_dirty_tracking();
            mirror.secondary = true;
        }
        let volume = Arc::new(volume);
        let mut entry = StagedVolume {
            volume: Arc::clone(&volume),
            size_spec: object.spec.size_bytes,
            capability: req.capability.clone(),
            staging_path: req.staging_path.clone(),
            nbd: None,
            kernel: None,
            device: None,
            published: BTreeMap::new(),
            remote_areas,
            last_report: None,
            last_health: None,
            restored: false,
            mirror,
        };
        let result = async {
            self.start_nbd(&mut entry)?;
            if kernel.is_ok() {
                self.attach_kernel(&mut entry).await?;
            }
            cache::store(&self.config.state_dir, &entry.cached()?)?;
            Ok::<(), AgentError>(())
        }
        .await;
        if let Err(error) = result {
            let areas = entry.remote_areas.clone();
            self.teardown(entry).await;
            self.release_remote_areas(&registry, &areas).await;
            return Err(error);
        }
        let generation = volume.generation().get() as i64;
        registry.volumes.insert(req.volume_id.clone(), entry);
        let volumes = registry.node_json_volumes();
        drop(registry);
        cache::write_node_json_with(self, volumes)?;
        status::set_attachment(self, &req.volume_id, Some(generation)).await?;
        tracing::info!(volume = %req.volume_id, %generation, "volume staged");
        Ok(())
    }

    fn start_nbd(&self, entry: &mut StagedVolume) -> Result<(), AgentError> {
        let name = entry.volume.name().to_string();
        let socket = self
            .config
            .state_dir
            .join("nbd")
            .join(format!("{name}.sock"));
        let handle =
            NbdUnixFrontend::start(Arc::clone(&entry.volume), &socket).map_err(|source| {
                AgentError::Frontend {
                    volume: name,
                    source,
                }
            })?;
        entry.nbd = Some(handle);
        Ok(())
    }

    /// Attaches the kernel device; for Mount volumes formats a blank device and mounts it at
    /// the staging path.
    async fn attach_kernel(&self, entry: &mut StagedVolume) -> Result<(), AgentError> {
        let name = entry.volume.name().to_string();
        let frontend = match self.kernel_frontend() {
            Ok(Some(frontend)) => frontend,
            Ok(None) => return Ok(()),
            Err(reason) if entry.capability.is_block() => {
                tracing::info!(volume = %name, %reason, "no kernel frontend; NBD export only");
                return Ok(());
            }
            Err(reason) => {
                return Err(AgentError::NoKernelDevice {
                    volume: name,
                    need: "a filesystem is mounted on it",
                    reason,
                });
            }
        };
        let volume = Arc::clone(&entry.volume);
        let attachment = blocking({
            let name = name.clone();
            move || {
                frontend
                    .attach(volume)
                    .map_err(|source| AgentError::Frontend {
                        volume: name,
                        source,
                    })
            }
        })
        .await?;
        entry.set_kernel(attachment);
        let Some(device) = entry.device() else {
            return Ok(());
        };
        if let Capability::Mount {
            fs_type,
            mount_flags,
            ..
        } = &entry.capability
        {
            let fs_type = mounts::fs_type_or_default(fs_type)?.to_string();
            let flags = mount_flags.clone();
            let target = entry.staging_path.clone();
            let size = entry.volume.size();
            blocking(move || {
                match mounts::probe_fs(&device)? {
                    None => mounts::mkfs(&device, &fs_type)?,
                    Some(found) if found != fs_type => {
                        tracing::warn!(device = %device.display(), %found, wanted = %fs_type,
                            "volume already holds another filesystem; mounting as requested");
                    }
                    // The volume grew while the filesystem could not follow online (or while
                    // the volume was not staged): grow it now, unmounted.
                    // (A tail under 1 MiB is not worth an fsck at every stage.)
                    Some(_) if fs_type == "ext4" && mounts::ext4_size(&device)? + (1 << 20) <= size => {
                        tracing::info!(device = %device.display(), size, "growing ext4 before mounting");
                        mounts::grow_ext4_offline(&device)?;
                    }
                    Some(_) => {}
                }
                mounts::mount_fs(&device, &target, &fs_type, &flags)?;
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Undoes a staged volume's kernel and NBD side (the mapping cache is left alone).
    async fn teardown(&self, mut entry: StagedVolume) -> Vec<AgentError> {
        let mut errors = Vec::new();
        let name = entry.volume.name().to_string();
        let mut paths: Vec<PathBuf> = entry.published.keys().cloned().collect();
        if !entry.capability.is_block() {
            paths.push(entry.staging_path.clone());
        }
        let unmounted = blocking(move || {
            for path in &paths {
                mounts::unmount_all(path)?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = unmounted {
            errors.push(e);
        }
        // Inside a remap hold a gated flush would park until the operator resumes.
        let flushed = if entry.volume.hold_record().is_some() {
            entry.volume.flush_ungated().await
        } else {
            entry.volume.flush().await
        };
        if let Err(source) = flushed {
            tracing::warn!(volume = %name, %source, "flush before detach failed");
        }
        if let Some(attachment) = entry.take_kernel() {
            let volume = name.clone();
            if let Err(e) = blocking(move || {
                attachment
                    .detach()
                    .map_err(|source| AgentError::Frontend { volume, source })
            })
            .await
            {
                errors.push(e);
            }
        }
        if let Some(nbd) = entry.nbd.take()
            && let Err(source) = nbd.stop().await
        {
            errors.push(AgentError::Frontend {
                volume: name.clone(),
                source,
            });
        }
        for error in &errors {
            tracing::warn!(volume = %name, %error, "teardown step failed");
        }
        errors
    }

    /// NodeUnstageVolume: idempotent; an unknown volume is already unstaged.
    pub async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<(), AgentError> {
        let mut registry = self.staged.lock().await;
        let Some(entry) = registry.volumes.remove(volume_id) else {
            drop(registry);
            // Nothing recorded: still make sure nothing of ours is mounted there.
            let path = staging_path.to_path_buf();
            return blocking(move || mounts::unmount_all(&path).map_err(AgentError::from)).await;
        };
        let areas = entry.remote_areas.clone();
        let (volume, book) = (Arc::clone(&entry.volume), entry.mirror.clone());
        let mut errors = self.teardown(entry).await;
        self.release_remote_areas(&registry, &areas).await;
        // After the teardown, so no write can follow; still under the lock (CollectDirty reads
        // the file under it).
        if let Err(error) = self.persist_dirty(volume_id, &volume, &book) {
            errors.insert(0, error);
        }
        let volumes = registry.node_json_volumes();
        drop(registry);
        if !errors.is_empty() {
            return Err(errors.remove(0));
        }
        cache::remove(&self.config.state_dir, volume_id)?;
        cache::write_node_json_with(self, volumes)?;
        status::set_attachment(self, volume_id, None).await?;
        tracing::info!(volume = volume_id, "volume unstaged");
        Ok(())
    }

    /// NodePublishVolume.
    pub async fn publish(&self, req: PublishRequest) -> Result<(), AgentError> {
        let mut registry = self.staged.lock().await;
        let Some(entry) = registry.volumes.get_mut(&req.volume_id) else {
            drop(registry);
            // Unknown here: NOT_FOUND when the volume does not exist at all.
            self.get_volume(&req.volume_id).await?;
            return Err(AgentError::NotStaged(req.volume_id));
        };
        if entry.staging_path != req.staging_path {
            return Err(AgentError::WrongStagingPath {
                volume: req.volume_id,
                staged: entry.staging_path.display().to_string(),
                requested: req.staging_path.display().to_string(),
            });
        }
        if entry.capability.is_block() != req.capability.is_block() {
            return Err(AgentError::AlreadyStaged {
                volume: req.volume_id,
                detail: format!("staged with {:?}", entry.capability),
            });
        }
        if let Some(&readonly) = entry.published.get(&req.target_path) {
            let target = req.target_path.clone();
            if readonly != req.readonly {
                return Err(AgentError::AlreadyPublished {
                    volume: req.volume_id,
                    path: target.display().to_string(),
                });
            }
            if blocking(move || Ok(mounts::is_mount_point(&target))).await? {
                return Ok(());
            }
        }
        let source = if entry.capability.is_block() {
            entry.device().ok_or_else(|| AgentError::NoKernelDevice {
                volume: req.volume_id.clone(),
                need: "a Block volume is published as a device node",
                reason: match self.kernel_frontend() {
                    Err(reason) => reason,
                    Ok(_) => "the kernel device was not attached (restart?)".into(),
                },
            })?
        } else {
            if entry.kernel.is_none() {
                return Err(AgentError::NoKernelDevice {
                    volume: req.volume_id.clone(),
                    need: "a filesystem is mounted on it",
                    reason: "the kernel device is gone (plugin restarted); stage again".into(),
                });
            }
            entry.staging_path.clone()
        };
        let target = req.target_path.clone();
        let is_file = entry.capability.is_block();
        let readonly = req.readonly;
        blocking(move || {
            mounts::bind_mount(&source, &target, is_file, readonly).map_err(Into::into)
        })
        .await?;
        entry
            .published
            .insert(req.target_path.clone(), req.readonly);
        let cached = entry.cached()?;
        drop(registry);
        cache::store(&self.config.state_dir, &cached)?;
        Ok(())
    }

    /// NodeUnpublishVolume: idempotent; unmounts and removes the target.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), AgentError> {
        let mut registry = self.staged.lock().await;
        let path = target.to_path_buf();
        blocking(move || {
            mounts::unmount_all(&path)?;
            mounts::remove_path(&path)?;
            Ok(())
        })
        .await?;
        if let Some(entry) = registry.volumes.get_mut(volume_id)
            && entry.published.remove(target).is_some()
        {
            let cached = entry.cached()?;
            drop(registry);
            cache::store(&self.config.state_dir, &cached)?;
        }
        Ok(())
    }

    /// NodeGetVolumeStats.
    pub async fn volume_stats(
        &self,
        volume_id: &str,
        path: &Path,
    ) -> Result<VolumeStats, AgentError> {
        let registry = self.staged.lock().await;
        let entry = registry
            .volumes
            .get(volume_id)
            .ok_or_else(|| AgentError::VolumeNotFound(volume_id.into()))?;
        let known = entry.staging_path == path || entry.published.contains_key(path);
        if !known || !path.exists() {
            return Err(AgentError::PathNotFound {
                volume: volume_id.into(),
                path: path.display().to_string(),
            });
        }
        let health = entry.volume.health();
        let abnormal = (health.state != HealthState::Healthy).then(|| {
            format!(
                "{:?}: unreachable or failed replicas on {:?} ({} bytes degraded, {} failed)",
                health.state, health.unhealthy_areas, health.degraded_bytes, health.failed_bytes
            )
        });
        if entry.capability.is_block() {
            let size = entry.volume.size();
            return Ok(VolumeStats {
                bytes: [size, 0, 0],
                inodes: None,
                abnormal,
            });
        }
        let path = path.to_path_buf();
        drop(registry);
        let (bytes, inodes) = blocking(move || mounts::fs_stats(&path).map_err(Into::into)).await?;
        Ok(VolumeStats {
            bytes,
            inodes: Some(inodes),
            abnormal,
        })
    }

    /// Applies a newer committed map that only grows the volume (NodeExpandVolume and
    /// node-control ApplyMapping): remote areas first, then the engine, the kernel device, the
    /// cache and the attachment record. Returns the applied generation.
    pub(crate) async fn apply_growth(
        &self,
        registry: &mut Registry,
        volume_id: &str,
        new: ExtentMap,
    ) -> Result<i64, AgentError> {
        let entry = registry
            .volumes
            .get(volume_id)
            .ok_or_else(|| AgentError::NotStaged(volume_id.into()))?;
        let current = entry.volume.map();
        if new.generation() < current.generation() {
            return Err(AgentError::StaleGeneration {
                volume: volume_id.into(),
                offered: new.generation(),
                current: current.generation(),
            });
        }
        if new.generation() == current.generation() {
            if new.same_layout(&current) {
                return Ok(current.generation().get() as i64);
            }
            return Err(AgentError::NotGrowth {
                volume: volume_id.into(),
                detail: format!(
                    "generation {} is applied with another layout",
                    current.generation()
                ),
            });
        }
        check_growth(volume_id, &current, &new)?;
        let remote = self.ensure_remote_areas(registry, volume_id, &new).await?;
        let entry = registry
            .volumes
            .get_mut(volume_id)
            .ok_or_else(|| AgentError::NotStaged(volume_id.into()))?;
        entry.remote_areas.extend(remote);
        let generation = new.generation().get() as i64;
        let new_size = new.size_bytes() as i64;
        entry
            .volume
            .swap_map(Arc::new(new))
            .map_err(|source| AgentError::Engine {
                volume: volume_id.into(),
                source,
            })?;
        entry.size_spec = entry.size_spec.max(new_size);
        if let Some(mut attachment) = entry.take_kernel() {
            let volume = volume_id.to_string();
            let (attachment, result) = tokio::task::spawn_blocking(move || {
                let result = attachment.refresh_size();
                (attachment, result)
            })
            .await
            .map_err(|e| AgentError::Unsupported(format!("blocking task failed: {e}")))?;
            entry.set_kernel(attachment);
            result.map_err(|source| AgentError::Frontend { volume, source })?;
        }
        cache::store(&self.config.state_dir, &entry.cached()?)?;
        status::set_attachment(self, volume_id, Some(generation)).await?;
        tracing::info!(
            volume = volume_id,
            generation,
            size = new_size,
            "mapping grown"
        );
        Ok(generation)
    }

    /// NodeExpandVolume: the committed mapping, applied; the filesystem grown. Returns the size.
    pub async fn expand(&self, volume_id: &str, path: &Path) -> Result<u64, AgentError> {
        let mut registry = self.staged.lock().await;
        let entry = registry
            .volumes
            .get(volume_id)
            .ok_or_else(|| AgentError::VolumeNotFound(volume_id.into()))?;
        if entry.staging_path != path && !entry.published.contains_key(path) {
            return Err(AgentError::PathNotFound {
                volume: volume_id.into(),
                path: path.display().to_string(),
            });
        }
        let object = self.get_volume(volume_id).await?;
        let map = Self::model_map(&object)?;
        self.apply_growth(&mut registry, volume_id, map).await?;
        let entry = registry
            .volumes
            .get(volume_id)
            .ok_or_else(|| AgentError::NotStaged(volume_id.into()))?;
        let size = entry.volume.size();
        if let (Capability::Mount { fs_type, .. }, Some(device)) =
            (&entry.capability, entry.device())
        {
            let fs_type = mounts::fs_type_or_default(fs_type)?.to_string();
            let mount_point = entry.staging_path.clone();
            blocking(move || mounts::grow_fs(&device, &mount_point, &fs_type).map_err(Into::into))
                .await?;
        }
        Ok(size)
    }

    /// MountInquiry: from the records and the mount table.
    pub async fn mount_inquiry(&self, volume_id: &str) -> Inquiry {
        let registry = self.staged.lock().await;
        let Some(entry) = registry.volumes.get(volume_id) else {
            return Inquiry {
                detail: "not staged on this node".into(),
                ..Default::default()
            };
        };
        let mut paths = vec![entry.staging_path.display().to_string()];
        paths.extend(entry.published.keys().map(|p| p.display().to_string()));
        let device = entry.device();
        if let Some(device) = &device {
            paths.push(device.display().to_string());
        }
        let watched: Vec<PathBuf> = std::iter::once(entry.staging_path.clone())
            .chain(entry.published.keys().cloned())
            .collect();
        let table = mounts::mount_table();
        let mounted = table.iter().any(|m| {
            watched.contains(&m.mount_point)
                || device
                    .as_ref()
                    .is_some_and(|d| m.source == d.display().to_string())
        });
        Inquiry {
            staged: true,
            published: !entry.published.is_empty(),
            mounted,
            paths,
            detail: format!(
                "generation {}, {}{}",
                entry.volume.generation(),
                match &device {
                    Some(d) => format!("device {}", d.display()),
                    None => "NBD export only".into(),
                },
                if entry.restored {
                    ", restored from the mapping cache"
                } else {
                    ""
                }
            ),
        }
    }

    /// Brings the cached volumes back as NBD exports at the cached generation (their kernel
    /// devices died with the previous process).
    pub(crate) async fn restore_from_cache(self: &Arc<Self>) {
        let mut held_volumes = Vec::new();
        let mut registry = self.staged.lock().await;
        for cached in cache::load_all(&self.config.state_dir) {
            let id = cached.volume_id.clone();
            let restored = async {
                let map = cached.mapping.to_model(cached.size_bytes).map_err(|e| {
                    AgentError::InvalidMapping {
                        volume: id.clone(),
                        reason: e.to_string(),
                    }
                })?;
                let map = Arc::new(map);
                let hold = cached
                    .hold
                    .as_ref()
                    .map(|h| h.to_record(&id, Arc::clone(&map)))
                    .transpose()
                    .map_err(|reason| AgentError::InvalidMapping {
                        volume: id.clone(),
                        reason,
                    })?;
                let mut remote_areas = self.ensure_remote_areas(&registry, &id, &map).await?;
                // The hold's other maps (rollback target, staged) may name other remote areas.
                if let Some(record) = &hold {
                    for other in [&record.previous, &record.staged].into_iter().flatten() {
                        remote_areas.extend(
                            self.connect_remote_areas(&registry, &id, other, false)
                                .await?,
                        );
                    }
                }
                // The data priority and the usage bitmaps as a fresh stage would set them (the
                // last usage report, else all mapped extents in use); without the API, the
                // conservative default (high priority, all mapped extents in use) keeps reclaim
                // from taking anything this volume may hold.
                let object = Api::<VirtualVolume>::all(self.client.clone())
                    .get_opt(&id)
                    .await;
                let options = match &object {
                    Ok(Some(object)) => VolumeOptions {
                        priority: self.data_priority(&object.spec.priority_class_name).await,
                        usage: Self::usage_init(object),
                    },
                    _ => VolumeOptions::default(),
                };
                // A mirrored primary must not serve a write it does not mirror: without its
                // VirtualVolume (and so its secondary) it is not restored at all.
                let leg = match &object {
                    Ok(Some(object)) => self.leg_of(&registry, object).await?,
                    _ if cached.mirror_primary => {
                        return Err(AgentError::Unsupported(format!(
                            "volume {id} was a mirrored primary and its VirtualVolume cannot be \
                             read now, so its mirror leg cannot be set up"
                        )));
                    }
                    _ => None,
                };
                let volume = Volume::open(
                    id.clone(),
                    Arc::clone(&map),
                    Arc::clone(&self.registry),
                    options,
                )
                .map_err(|source| AgentError::Engine {
                    volume: id.clone(),
                    source,
                })?;
                let mut mirror = super::mirror::MirrorBook::open(&self.config.state_dir, &id);
                // A secondary (as its status says, or as cached when the API cannot say) tracks
                // again; the bits of its writes before the restart are gone.
                let secondary = match &object {
                    Ok(Some(object)) => super::mirror::is_secondary(object),
                    _ => cached.mirror_secondary,
                };
                if secondary {
                    volume.enable_dirty_tracking();
                    mirror.secondary = true;
                    mirror.incomplete = true;
                }
                if let Some((leg, areas)) = leg {
                    remote_areas.extend(areas);
                    volume.set_mirror_leg(Some(leg), false).map_err(|source| {
                        AgentError::Engine {
                            volume: id.clone(),
                            source,
                        }
                    })?;
                    // The bits of writes before the restart are gone (agent::mirror).
                    mirror.incomplete = true;
                }
                if let Some(record) = hold {
                    // Seed 004 §11.4, AS-18: back held, never resumed by this process; the
                    // operator re-sends what it still wants (Commit, Rollback, Resume).
                    let effects =
                        volume
                            .restore_hold(record)
                            .map_err(|source| AgentError::Engine {
                                volume: id.clone(),
                                source,
                            })?;
                    for effect in effects {
                        if let crate::engine::gate::Effect::AskOperator { op } = effect {
                            tracing::warn!(volume = %id, operation = %op.operation_id,
                                attempt = op.attempt, generation = %op.generation,
                                "restarted inside a hold: I/O stays held until the operator \
                                 resumes, rolls back or fences");
                        }
                    }
                }
                let mut entry = StagedVolume {
                    volume: Arc::new(volume),
                    size_spec: cached.size_bytes,
                    capability: cached.capability.clone(),
                    staging_path: cached.staging_path.clone(),
                    nbd: None,
                    kernel: None,
                    device: None,
                    published: cached
                        .published
                        .iter()
                        .map(|p| (p.clone(), false))
                        .collect(),
                    remote_areas,
                    last_report: None,
                    last_health: None,
                    restored: true,
                    mirror,
                };
                self.start_nbd(&mut entry)?;
                Ok::<StagedVolume, AgentError>(entry)
            }
            .await;
            match restored {
                Ok(entry) => {
                    tracing::info!(volume = %id, generation = %entry.volume.generation(),
                        "volume restored from the mapping cache (NBD export only)");
                    let held = entry.volume.hold_record().is_some();
                    registry.volumes.insert(id.clone(), entry);
                    if held {
                        held_volumes.push(id);
                    }
                }
                Err(error) => tracing::warn!(volume = %id, %error, "cached volume not restored"),
            }
        }
        drop(registry);
        // `status.attachments[].state: Held` tells the operator this node waits for it.
        for id in held_volumes {
            super::control::spawn_attachment_update(Arc::clone(self), id);
        }
    }

    /// Shutdown: every frontend detached cleanly; the cache stays.
    pub(crate) async fn release_all(&self) {
        let mut registry = self.staged.lock().await;
        let volumes = std::mem::take(&mut registry.volumes);
        for (_, entry) in volumes {
            let areas = entry.remote_areas.clone();
            self.teardown(entry).await;
            self.release_remote_areas(&registry, &areas).await;
        }
        let _ = cache::write_node_json_with(self, BTreeMap::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::model::{ExtentSize, Generation, ReplicaLocation, Run};

    const ES: u64 = 1 << 20;

    fn map(generation: u64, extents: &[Option<u64>]) -> ExtentMap {
        let runs = extents
            .iter()
            .enumerate()
            .map(|(i, e)| match e {
                Some(slot) => Run::new(
                    i as u64 * ES,
                    ES,
                    vec![ReplicaLocation::new("a", slot * ES)],
                ),
                None => Run::hole(i as u64 * ES, ES),
            })
            .collect();
        ExtentMap::from_runs(
            extents.len() as u64 * ES,
            ExtentSize::new(ES).expect("extent size"),
            Generation(generation),
            runs,
        )
        .expect("valid map")
    }

    #[test]
    fn growth_is_appending_or_filling_holes() {
        let old = map(1, &[Some(0), None]);
        assert!(check_growth("v", &old, &map(2, &[Some(0), Some(1)])).is_ok());
        assert!(check_growth("v", &old, &map(2, &[Some(0), None, Some(5)])).is_ok());
        assert!(check_growth("v", &old, &map(2, &[Some(0), None])).is_ok());
    }

    #[test]
    fn moving_or_releasing_a_mapped_extent_is_not_growth() {
        let old = map(1, &[Some(0), Some(1)]);
        let moved = check_growth("v", &old, &map(2, &[Some(3), Some(1)]));
        assert!(
            matches!(moved, Err(AgentError::NotGrowth { .. })),
            "{moved:?}"
        );
        let released = check_growth("v", &old, &map(2, &[Some(0), None]));
        assert!(
            matches!(released, Err(AgentError::NotGrowth { .. })),
            "{released:?}"
        );
    }
}
