//! Replica health of one volume (ARCHITECTURE §4 "Mirrored writes", §8 "reading from the healthy
//! replica").
//!
//! Health is kept per `(volume, area)`: once a replica on an area missed a write, every extent of
//! this volume on that area may be stale, so the area stops serving this volume's reads and
//! writes until the operator resyncs it and calls [`crate::engine::Volume::restore_replica`].
//!
//! Rule: **a replica is marked unhealthy only when another replica of the same piece succeeded**,
//! i.e. when the data is known to live elsewhere. When every healthy replica of a piece fails,
//! nothing is marked and the request fails with EIO; the contents of that piece are then
//! undefined until it is rewritten (as after a disk's write error), but no acknowledged data is
//! ever read from a replica that missed it.

use std::collections::BTreeSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tessera_api::model::{AreaId, ExtentMap};

/// The overall state of a volume's replicas under its active map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Every mapped byte has all its replicas healthy.
    Healthy,
    /// Some mapped bytes have lost a replica but keep at least one healthy one.
    Degraded,
    /// Some mapped bytes have no healthy replica left: I/O to them fails with EIO.
    Failed,
}

/// What [`crate::engine::Volume::health`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHealth {
    pub state: HealthState,
    /// Areas whose replicas of this volume are unhealthy.
    pub unhealthy_areas: Vec<AreaId>,
    /// Mapped bytes with at least one unhealthy replica.
    pub degraded_bytes: u64,
    /// Mapped bytes with no healthy replica.
    pub failed_bytes: u64,
}

#[derive(Default)]
pub(crate) struct ReplicaHealth {
    unhealthy: ArcSwap<BTreeSet<AreaId>>,
}

impl ReplicaHealth {
    pub(crate) fn is_healthy(&self, area: &AreaId) -> bool {
        !self.unhealthy.load().contains(area)
    }

    pub(crate) fn mark_unhealthy<'a>(&self, areas: impl IntoIterator<Item = &'a AreaId> + Clone) {
        self.unhealthy.rcu(|current| {
            let mut next = BTreeSet::clone(current);
            next.extend(areas.clone().into_iter().cloned());
            next
        });
    }

    /// Returns whether the area was unhealthy.
    pub(crate) fn restore(&self, area: &AreaId) -> bool {
        let mut was = false;
        self.unhealthy.rcu(|current| {
            let mut next = BTreeSet::clone(current);
            was = next.remove(area);
            next
        });
        was
    }

    pub(crate) fn report(&self, map: &ExtentMap) -> VolumeHealth {
        let unhealthy: Arc<BTreeSet<AreaId>> = self.unhealthy.load_full();
        let mut degraded_bytes = 0;
        let mut failed_bytes = 0;
        for run in map.runs().iter().filter(|r| !r.is_hole()) {
            let bad = run
                .replicas
                .iter()
                .filter(|r| unhealthy.contains(&r.area))
                .count();
            if bad == run.replicas.len() {
                failed_bytes += run.length;
            } else if bad > 0 {
                degraded_bytes += run.length;
            }
        }
        let state = if failed_bytes > 0 {
            HealthState::Failed
        } else if degraded_bytes > 0 {
            HealthState::Degraded
        } else {
            HealthState::Healthy
        };
        VolumeHealth {
            state,
            unhealthy_areas: unhealthy.iter().cloned().collect(),
            degraded_bytes,
            failed_bytes,
        }
    }
}
