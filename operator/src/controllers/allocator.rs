//! The allocation critical section.
//!
//! Which area extents are used is recorded in one place only: the mappings of the
//! VirtualVolumes (`status.mapping`, or the planned mapping annotation of a volume created a
//! moment ago). Claims are placed one at a time by the leader, under [`Allocator::lock`]: read
//! every mapping of the pool → plan → reserve. The reflector caches lag the operator's own
//! writes by a few milliseconds, so a mapping this process has decided but the cache does not
//! show yet is kept here as a [`Reservation`] and counted as allocated until the cache has the
//! volume. Mapping changes of existing volumes (the release of reclaimed ranges) take the same
//! lock, so no two changes of extent ownership interleave (seed 000 §5.6 item 6: concurrent
//! allocations competing for freed blocks).
//!
//! The reservations only bridge the cache lag of this process's own writes. A restarted or new
//! leader starts with none: its caches are fully listed before it allocates, and everything an
//! earlier leader decided is in the API by then (the volume is created *with* its mapping).

use std::collections::BTreeMap;

use tessera_api::v1alpha1::VolumeMapping;
use tokio::sync::{Mutex, MutexGuard};

/// A mapping decided by this process for a volume the cache does not show yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub pool: String,
    pub mapping: VolumeMapping,
}

/// What the lock guards.
#[derive(Debug, Default)]
pub struct AllocatorState {
    reservations: BTreeMap<String, Reservation>,
    /// Claims this process decided to reclaim for, by `namespace/name`: (pool, pool extents
    /// needed). The cache shows them as `Reclaiming` a moment later; until then this keeps a
    /// second claim of the pool from starting a reclaim of its own.
    reclaims: BTreeMap<String, (String, u64)>,
}

impl AllocatorState {
    /// Records that `volume` is being created with `mapping`.
    pub fn reserve(&mut self, volume: &str, pool: &str, mapping: VolumeMapping) {
        self.reservations.insert(
            volume.to_owned(),
            Reservation {
                pool: pool.to_owned(),
                mapping,
            },
        );
    }

    /// Forgets the reservation of `volume` (its creation failed, or the cache has it).
    pub fn release(&mut self, volume: &str) {
        self.reservations.remove(volume);
    }

    /// Drops the reservations of volumes the cache now shows (`cached`).
    pub fn forget_cached(&mut self, cached: impl Fn(&str) -> bool) {
        self.reservations.retain(|name, _| !cached(name));
    }

    /// Records that `claim` reclaims `extents` pool extents in `pool`.
    pub fn note_reclaim(&mut self, claim: &str, pool: &str, extents: u64) {
        self.reclaims
            .insert(claim.to_owned(), (pool.to_owned(), extents));
    }

    /// `claim` no longer reclaims (bound, rejected or deleted).
    pub fn forget_reclaim(&mut self, claim: &str) {
        self.reclaims.remove(claim);
    }

    /// The reclaims this process decided in `pool`: claim → pool extents needed.
    pub fn reclaims(&self, pool: &str) -> BTreeMap<String, u64> {
        self.reclaims
            .iter()
            .filter(|(_, (p, _))| p == pool)
            .map(|(claim, (_, extents))| (claim.clone(), *extents))
            .collect()
    }

    /// The reservations of one pool.
    pub fn reservations<'a>(
        &'a self,
        pool: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Reservation)> + 'a {
        self.reservations
            .iter()
            .filter(move |(_, r)| r.pool == pool)
            .map(|(name, r)| (name.as_str(), r))
    }
}

/// The lock around every change of extent ownership (see the module docs).
#[derive(Debug, Default)]
pub struct Allocator {
    state: Mutex<AllocatorState>,
}

impl Allocator {
    pub async fn lock(&self) -> MutexGuard<'_, AllocatorState> {
        self.state.lock().await
    }
}
