//! The pool as the planners see it, built from the caches: areas with their free extents
//! (placement), volumes with their usage (reclaim) and the counters 316–324 (pool status).
//! No I/O: the controllers pass in what they read.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tessera_api::model::ExtentSize;
use tessera_api::v1alpha1::{
    AreaPhase, StorageArea, StoragePool, StoragePriorityClass, VirtualVolume, VolumeMapping,
};

use super::allocator::Reservation;
use super::support::PLANNED_MAPPING_ANNOTATION;
use super::usage::{allocated_extent_ranges, area_pieces};
use super::{Error, Result};
use crate::planners::accounting::{PoolCounters, VolumeUsage};
use crate::planners::allocation::{VictimClass, VolumeCandidate};
use crate::planners::placement::{AreaCandidate, free_extents};
use crate::planners::{ExtentRange, total_len};

/// The mapping that owns a volume's extents: the committed `status.mapping`, or, for a volume
/// created a moment ago, the planned mapping it was created with.
pub fn effective_mapping(volume: &VirtualVolume) -> Option<VolumeMapping> {
    if let Some(mapping) = volume.status.as_ref().and_then(|s| s.mapping.clone()) {
        return Some(mapping);
    }
    planned_mapping(volume)
}

/// The planned mapping annotation of a volume, if present and well-formed.
pub fn planned_mapping(volume: &VirtualVolume) -> Option<VolumeMapping> {
    volume
        .annotations()
        .get(PLANNED_MAPPING_ANNOTATION)
        .and_then(|text| serde_json::from_str(text).ok())
}

/// Whether a node uses the volume: an access node is set or a node reported an attachment.
pub fn is_attached(volume: &VirtualVolume) -> bool {
    !volume.spec.access_nodes().is_empty()
        || volume
            .status
            .as_ref()
            .is_some_and(|s| !s.attachments.is_empty())
}

/// The nodes using a volume, for messages.
pub fn attached_nodes(volume: &VirtualVolume) -> Vec<String> {
    let mut nodes: Vec<String> = volume
        .spec
        .access_nodes()
        .into_iter()
        .map(str::to_string)
        .collect();
    if let Some(status) = &volume.status {
        for a in &status.attachments {
            if !nodes.contains(&a.node) {
                nodes.push(a.node.clone());
            }
        }
    }
    nodes
}

/// The pool's extent size.
pub fn extent_size(pool: &StoragePool) -> Result<ExtentSize> {
    u64::try_from(pool.spec.extent_size_bytes)
        .ok()
        .and_then(|es| ExtentSize::new(es).ok())
        .ok_or(Error::MissingField("a valid spec.extentSizeBytes"))
}

/// One area of the pool.
#[derive(Debug, Clone)]
pub struct AreaView {
    pub area: Arc<StorageArea>,
    /// Whole extents the area can hold (`status.capacityBytes`, else `spec.sizeBytes`).
    pub capacity: u64,
    pub online: bool,
    /// Area extents used by volumes of the pool.
    pub used: Vec<ExtentRange>,
}

impl AreaView {
    pub fn used_extents(&self) -> u64 {
        total_len(&crate::planners::coalesce(self.used.clone()))
    }
}

/// One volume of the pool.
#[derive(Debug, Clone)]
pub struct VolumeView {
    pub name: String,
    /// `None` for a volume only this process knows about yet (a reservation).
    pub volume: Option<Arc<VirtualVolume>>,
    pub mapping: Option<VolumeMapping>,
    pub copies: u8,
    /// Virtual extents backed by storage.
    pub allocated: u64,
}

impl VolumeView {
    /// Counters 307/308/310 in virtual extents: allocated from the mapping, in use and high
    /// priority from `status.usage` (written from the node's report), clamped so that a report
    /// older than a release can never make in-use exceed allocated.
    pub fn usage(&self, extent_size: ExtentSize) -> VolumeUsage {
        let es = extent_size.get();
        let reported = self
            .volume
            .as_ref()
            .and_then(|v| v.status.as_ref())
            .and_then(|s| s.usage.as_ref());
        let in_use = reported
            .map_or(0, |u| u.in_use_bytes.max(0) as u64 / es)
            .min(self.allocated);
        let high = reported
            .map_or(0, |u| u.high_priority_bytes.max(0) as u64 / es)
            .min(in_use);
        VolumeUsage::new(self.allocated, in_use, high).unwrap_or(VolumeUsage::ZERO)
    }

    pub fn attached(&self) -> bool {
        self.volume.as_deref().is_some_and(is_attached)
    }

    pub fn class_name(&self) -> Option<&str> {
        self.volume
            .as_ref()
            .map(|v| v.spec.priority_class_name.as_str())
    }
}

/// Totals for `StoragePool.status`, in pool extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolTotals {
    /// Capacity of the Online areas (316 as the API defines `totalBytes`).
    pub online_capacity: u64,
    /// 318, 322, 324 summed over the volumes (× copies); `unallocated()` is the free space of
    /// the Online areas.
    pub counters: PoolCounters,
    /// Extents allocated on areas that are not Online (they count as allocated, not as total).
    pub allocated_elsewhere: u64,
    pub areas: usize,
    pub online_areas: usize,
    pub volumes: usize,
}

/// The pool, its areas and its volumes.
#[derive(Debug, Clone)]
pub struct PoolView {
    pub pool: Arc<StoragePool>,
    pub extent_size: ExtentSize,
    pub areas: BTreeMap<String, AreaView>,
    pub volumes: Vec<VolumeView>,
}

impl PoolView {
    /// Builds the view from every area and volume (those of other pools are skipped) and this
    /// process's reservations of the pool (volumes the cache does not show yet).
    pub fn build<'a>(
        pool: Arc<StoragePool>,
        areas: &[Arc<StorageArea>],
        volumes: &[Arc<VirtualVolume>],
        reservations: impl IntoIterator<Item = (&'a str, &'a Reservation)>,
    ) -> Result<Self> {
        let name = pool.name_any();
        let extent_size = extent_size(&pool)?;
        let es = extent_size.get();
        let mut area_views: BTreeMap<String, AreaView> = areas
            .iter()
            .filter(|a| a.spec.pool_name == name)
            .map(|a| {
                let status = a.status.as_ref();
                let bytes = status
                    .and_then(|s| s.capacity_bytes)
                    .or(a.spec.size_bytes)
                    .unwrap_or(0)
                    .max(0) as u64;
                let view = AreaView {
                    area: Arc::clone(a),
                    capacity: bytes / es,
                    // An area being deleted takes no new extents.
                    online: status.and_then(|s| s.phase) == Some(AreaPhase::Online)
                        && a.metadata.deletion_timestamp.is_none(),
                    used: Vec::new(),
                };
                (a.name_any(), view)
            })
            .collect();
        let mut volume_views: Vec<VolumeView> = Vec::new();
        for v in volumes.iter().filter(|v| v.spec.pool_name == name) {
            let mapping = effective_mapping(v);
            volume_views.push(VolumeView {
                name: v.name_any(),
                volume: Some(Arc::clone(v)),
                allocated: mapping
                    .as_ref()
                    .map_or(0, |m| total_len(&allocated_extent_ranges(m))),
                mapping,
                copies: u8::try_from(v.spec.copies.clamp(1, 3)).unwrap_or(1),
            });
        }
        for (volume, reservation) in reservations {
            if volume_views.iter().any(|v| v.name == volume) {
                continue;
            }
            let copies = reservation
                .mapping
                .extents
                .iter()
                .map(|r| r.replicas.len())
                .max()
                .unwrap_or(1)
                .clamp(1, 3) as u8;
            volume_views.push(VolumeView {
                name: volume.to_owned(),
                volume: None,
                allocated: total_len(&allocated_extent_ranges(&reservation.mapping)),
                mapping: Some(reservation.mapping.clone()),
                copies,
            });
        }
        for v in &volume_views {
            if let Some(mapping) = &v.mapping {
                for (area, range) in area_pieces(mapping) {
                    if let Some(view) = area_views.get_mut(area) {
                        view.used.push(range);
                    }
                }
            }
        }
        Ok(PoolView {
            pool,
            extent_size,
            areas: area_views,
            volumes: volume_views,
        })
    }

    pub fn name(&self) -> String {
        self.pool.name_any()
    }

    /// Placement's view of the Online areas (seed 002 real volume information, Fig. 3).
    pub fn area_candidates(&self) -> Vec<AreaCandidate> {
        self.areas
            .values()
            .filter(|a| a.online)
            .map(|a| AreaCandidate {
                area: a.area.name_any().into(),
                node: a.area.spec.node_name.clone(),
                domain: a.area.spec.domain.clone().unwrap_or_default(),
                media_type: a.area.spec.media_type.clone(),
                free: free_extents(a.capacity, a.used.iter().copied()),
            })
            .collect()
    }

    /// U: free extents of the Online areas (unallocated block count 320).
    pub fn unallocated(&self) -> u64 {
        self.areas
            .values()
            .filter(|a| a.online)
            .map(|a| a.capacity.saturating_sub(a.used_extents()))
            .sum()
    }

    /// Reclaim's view of the volumes (entry 300, [0023]). A volume whose class is missing is
    /// protected (never a victim).
    pub fn victim_candidates(&self, classes: &Store<StoragePriorityClass>) -> Vec<VolumeCandidate> {
        self.volumes
            .iter()
            .map(|v| {
                let class = v
                    .class_name()
                    .and_then(|c| classes.get(&ObjectRef::new(c)))
                    .map(|c| VictimClass::from(&c.spec))
                    .unwrap_or(VictimClass {
                        value: i32::MAX,
                        unused: false,
                        low_priority_data: false,
                    });
                VolumeCandidate {
                    name: v.name.clone(),
                    usage: v.usage(self.extent_size),
                    copies: v.copies,
                    class,
                }
            })
            .collect()
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeView> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// The counters of `StoragePool.status` (seed 000 §8.6 scenario 15: the sums of per-volume
    /// counters equal the pool counters).
    pub fn totals(&self) -> PoolTotals {
        let online_capacity: u64 = self
            .areas
            .values()
            .filter(|a| a.online)
            .map(|a| a.capacity)
            .sum();
        let on_online: u64 = self
            .areas
            .values()
            .filter(|a| a.online)
            .map(|a| a.used_extents().min(a.capacity))
            .sum();
        let allocated: u64 = self
            .volumes
            .iter()
            .map(|v| v.allocated * u64::from(v.copies))
            .sum();
        let allocated_elsewhere = allocated.saturating_sub(on_online);
        let counters = PoolCounters::from_volumes(
            online_capacity + allocated_elsewhere,
            self.volumes
                .iter()
                .map(|v| (v.usage(self.extent_size), v.copies)),
        )
        .unwrap_or_else(|_| PoolCounters::empty(online_capacity));
        PoolTotals {
            online_capacity,
            counters,
            allocated_elsewhere,
            areas: self.areas.len(),
            online_areas: self.areas.values().filter(|a| a.online).count(),
            volumes: self.volumes.iter().filter(|v| v.volume.is_some()).count(),
        }
    }
}
