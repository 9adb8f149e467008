//! What the scenarios read from the API: volumes and their mappings, areas, the pool's
//! counters, claims. Waits poll, because the operator and the nodes converge asynchronously.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{ListParams, PostParams};
use tessera_api::v1alpha1::{
    DataPriority, Reclaimable, StorageArea, StorageClaim, StoragePool, StoragePriorityClass,
    StoragePriorityClassSpec, VirtualVolume,
};

use crate::env::Environment;
use crate::error::{E2eError, Result};

const POLL: Duration = Duration::from_millis(250);
/// Longer than the operator's counter debounce (500 ms), so two equal readings mean settled.
const SETTLE: Duration = Duration::from_millis(1500);

/// Polls `probe` until it answers [`Poll::Ready`], for at most `timeout`; on timeout the error
/// carries what the last [`Poll::Pending`] saw.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>>>,
{
    let start = Instant::now();
    loop {
        let last = match probe().await? {
            Poll::Ready(v) => return Ok(v),
            Poll::Pending(last) => last,
        };
        if start.elapsed() >= timeout {
            return Err(E2eError::Timeout {
                what: what.to_string(),
                seconds: timeout.as_secs(),
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One look at the state a wait is for: done, or not yet (with what was seen).
pub enum Poll<T> {
    Ready(T),
    Pending(String),
}

pub async fn volume(env: &Environment, id: &str) -> Result<Option<VirtualVolume>> {
    Api::<VirtualVolume>::all(env.kube.clone())
        .get_opt(id)
        .await
        .map_err(|e| E2eError::kube(format!("get VirtualVolume {id}"), e))
}

pub async fn existing_volume(env: &Environment, id: &str) -> Result<VirtualVolume> {
    volume(env, id)
        .await?
        .ok_or_else(|| E2eError::Check(format!("VirtualVolume {id} does not exist")))
}

pub async fn claim(env: &Environment, namespace: &str, name: &str) -> Result<Option<StorageClaim>> {
    Api::<StorageClaim>::namespaced(env.kube.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| E2eError::kube(format!("get StorageClaim {namespace}/{name}"), e))
}

/// Claims labelled with the CSI name the controller derived them from.
pub async fn claims_for_csi_name(env: &Environment, csi_name: &str) -> Result<Vec<StorageClaim>> {
    let lp = ListParams::default().labels(&format!("tessera.io/csi-name={csi_name}"));
    Api::<StorageClaim>::all(env.kube.clone())
        .list(&lp)
        .await
        .map(|l| l.items)
        .map_err(|e| E2eError::kube(format!("list StorageClaims of {csi_name}"), e))
}

/// VirtualVolumes whose `spec.claimRef` names the claim.
pub async fn volumes_for_claim(
    env: &Environment,
    namespace: &str,
    name: &str,
) -> Result<Vec<String>> {
    let volumes = Api::<VirtualVolume>::all(env.kube.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| E2eError::kube("list VirtualVolumes", e))?;
    Ok(volumes
        .items
        .into_iter()
        .filter(|v| {
            v.spec
                .claim_ref
                .as_ref()
                .is_some_and(|r| r.namespace == namespace && r.name == name)
        })
        .filter_map(|v| v.metadata.name)
        .collect())
}

pub async fn pool(env: &Environment) -> Result<StoragePool> {
    Api::<StoragePool>::all(env.kube.clone())
        .get(&env.pool)
        .await
        .map_err(|e| E2eError::kube(format!("get StoragePool {}", env.pool), e))
}

/// The pool's extent size (the unit of allocation and of every size in the scenarios).
pub async fn extent_size(env: &Environment) -> Result<u64> {
    let pool = pool(env).await?;
    u64::try_from(pool.spec.extent_size_bytes)
        .map_err(|_| E2eError::Check("the pool's extentSizeBytes is negative".into()))
}

/// `status.unallocatedBytes` and `status.totalBytes` of the pool.
pub async fn pool_bytes(env: &Environment) -> Result<(i64, i64)> {
    let pool = pool(env).await?;
    let status = pool.status.unwrap_or_default();
    Ok((status.unallocated_bytes, status.total_bytes))
}

/// Waits until the pool reports its areas (the operator writes the counters a moment after
/// the areas come Online) and returns `(unallocated, total)` once two readings a debounce
/// apart agree, so a scenario starts from settled counters.
pub async fn wait_pool_settled(env: &Environment) -> Result<(i64, i64)> {
    let start = Instant::now();
    let mut previous = None;
    loop {
        let status = pool(env).await?.status.unwrap_or_default();
        let reading = (status.unallocated_bytes, status.total_bytes);
        let ready = status.total_bytes > 0
            && status.online_areas > 0
            && status.online_areas == status.areas;
        if ready && previous == Some(reading) {
            return Ok(reading);
        }
        previous = ready.then_some(reading);
        if start.elapsed() >= env.timeout {
            return Err(E2eError::Timeout {
                what: format!(
                    "pool {} to report Online areas and settled counters",
                    env.pool
                ),
                seconds: env.timeout.as_secs(),
                last: format!(
                    "total {} unallocated {} areas {}/{} Online",
                    status.total_bytes, status.unallocated_bytes, status.online_areas, status.areas
                ),
            });
        }
        tokio::time::sleep(SETTLE).await;
    }
}

/// Waits until the pool's unallocated bytes equal `expected` (counters are debounced).
pub async fn wait_pool_unallocated(env: &Environment, expected: i64, why: &str) -> Result<()> {
    wait_for(
        &format!("pool {} unallocatedBytes = {expected} ({why})", env.pool),
        env.timeout,
        || async {
            let (unallocated, total) = pool_bytes(env).await?;
            Ok(if unallocated == expected {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("unallocated {unallocated} of {total}"))
            })
        },
    )
    .await
}

/// Area name → the node that owns it (`spec.nodeName`).
pub async fn area_nodes(env: &Environment) -> Result<BTreeMap<String, String>> {
    let areas = Api::<StorageArea>::all(env.kube.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| E2eError::kube("list StorageAreas", e))?;
    Ok(areas
        .items
        .into_iter()
        .filter_map(|a| Some((a.metadata.name?, a.spec.node_name)))
        .collect())
}

/// The nodes holding at least one replica of the volume's mapped extents, by mapped bytes.
pub async fn holder_nodes(env: &Environment, vol: &VirtualVolume) -> Result<BTreeMap<String, i64>> {
    let areas = area_nodes(env).await?;
    let mut nodes = BTreeMap::new();
    let runs = vol
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map(|m| m.extents.as_slice())
        .unwrap_or_default();
    for run in runs {
        for replica in &run.replicas {
            let node = areas.get(&replica.area).cloned().ok_or_else(|| {
                E2eError::Check(format!(
                    "volume maps to area {} which does not exist",
                    replica.area
                ))
            })?;
            *nodes.entry(node).or_insert(0) += run.length;
        }
    }
    Ok(nodes)
}

/// Every replica extent of the volume's mapping as `(area, byte offset in the area)`.
pub fn extent_locations(vol: &VirtualVolume, extent: u64) -> BTreeSet<(String, i64)> {
    let extent = extent as i64;
    let mut out = BTreeSet::new();
    let runs = vol
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map(|m| m.extents.as_slice())
        .unwrap_or_default();
    for run in runs {
        for replica in &run.replicas {
            for k in 0..run.length / extent {
                out.insert((replica.area.clone(), replica.area_offset + k * extent));
            }
        }
    }
    out
}

/// Bytes of the volume that its committed mapping backs with extents (holes excluded).
pub fn mapped_bytes(vol: &VirtualVolume) -> i64 {
    vol.status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map(|m| {
            m.extents
                .iter()
                .filter(|r| !r.replicas.is_empty())
                .map(|r| r.length)
                .sum()
        })
        .unwrap_or(0)
}

/// Whether `[offset, offset + len)` of the volume is entirely backed by extents.
pub fn range_mapped(vol: &VirtualVolume, offset: i64, len: i64) -> bool {
    let Some(mapping) = vol.status.as_ref().and_then(|s| s.mapping.as_ref()) else {
        return false;
    };
    let mut covered = 0;
    for run in &mapping.extents {
        let start = run.offset.max(offset);
        let end = (run.offset + run.length).min(offset + len);
        if end > start {
            if run.replicas.is_empty() {
                return false;
            }
            covered += end - start;
        }
    }
    covered == len
}

pub fn mapping_generation(vol: &VirtualVolume) -> Option<i64> {
    vol.status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map(|m| m.generation)
}

/// Creates the priority classes of `examples/02-priority-classes.yaml` when they are missing
/// (`tessera local` and the chart install them; a bare cluster may not have them).
pub async fn ensure_priority_classes(env: &Environment) -> Result<()> {
    let api = Api::<StoragePriorityClass>::all(env.kube.clone());
    for (name, value, data_priority, low_data) in [
        ("high", 1000, DataPriority::High, false),
        ("low", 100, DataPriority::Low, true),
    ] {
        if api
            .get_opt(name)
            .await
            .map_err(|e| E2eError::kube(format!("get StoragePriorityClass {name}"), e))?
            .is_some()
        {
            continue;
        }
        let class = StoragePriorityClass::new(
            name,
            StoragePriorityClassSpec {
                value,
                data_priority,
                reclaimable: Reclaimable {
                    unused: true,
                    low_priority_data: low_data,
                },
                description: Some("created by the tessera end-to-end scenarios".into()),
            },
        );
        match api.create(&PostParams::default(), &class).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                return Err(E2eError::kube(
                    format!("create StoragePriorityClass {name}"),
                    e,
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::v1alpha1::{
        MappedRun, ReplicaLocation, VirtualVolumeSpec, VirtualVolumeStatus, VolumeMapping,
    };

    const MIB4: i64 = 4 << 20;

    fn volume(runs: Vec<MappedRun>) -> VirtualVolume {
        let mut v = VirtualVolume::new(
            "vol-1",
            VirtualVolumeSpec {
                size_bytes: 3 * MIB4,
                pool_name: "default".into(),
                priority_class_name: "high".into(),
                copies: 1,
                layout: Default::default(),
                claim_ref: None,
                access_node: None,
                shared_access_nodes: Vec::new(),
            },
        );
        v.status = Some(VirtualVolumeStatus {
            mapping: Some(VolumeMapping {
                generation: 2,
                extent_size_bytes: MIB4,
                extents: runs,
            }),
            ..Default::default()
        });
        v
    }

    fn run(offset: i64, length: i64, area: Option<(&str, i64)>) -> MappedRun {
        MappedRun {
            offset,
            length,
            replicas: area
                .map(|(a, o)| {
                    vec![ReplicaLocation {
                        area: a.into(),
                        area_offset: o,
                    }]
                })
                .unwrap_or_default(),
        }
    }

    #[test]
    fn holes_are_neither_mapped_nor_locations() {
        // Two extents on area-0, a hole where reclaim released the third.
        let v = volume(vec![
            run(0, 2 * MIB4, Some(("area-0", 8 * MIB4))),
            run(2 * MIB4, MIB4, None),
        ]);
        assert_eq!(mapped_bytes(&v), 2 * MIB4);
        assert!(range_mapped(&v, 0, 2 * MIB4));
        assert!(range_mapped(&v, MIB4, MIB4));
        assert!(!range_mapped(&v, MIB4, 2 * MIB4));
        assert!(
            !range_mapped(&v, 0, 4 * MIB4),
            "beyond the mapping is not mapped"
        );
        let locations = extent_locations(&v, MIB4 as u64);
        assert_eq!(
            locations.into_iter().collect::<Vec<_>>(),
            vec![
                ("area-0".to_string(), 8 * MIB4),
                ("area-0".to_string(), 9 * MIB4)
            ]
        );
        assert_eq!(mapping_generation(&v), Some(2));
    }
}
