//! Which peer may touch which bytes of which area (ARCHITECTURE §4 "Extent server": a peer may
//! only touch ranges of volumes that are attached to it under the current generation).
//!
//! The control plane keeps, per peer node and volume, the area ranges the volume's current map
//! places on this node ([`ExtentAuthorization::grant_volume`]). Seed 001 records the borrower of
//! each lent volume in the virtual disk management table (§3.1, [0032]) and its agent serves
//! requests along the mounted path (§4.5, [0035]–[0037]); §8.4 infers that the agent refuses
//! requests from nodes that are not the recorded borrower of a currently mounted volume. Here the
//! "mount" is the grant, and it is versioned by the volume's map generation (seed 004 §11.4) so
//! that a delayed, older grant can never widen access again after a remap.
//!
//! The per-request decision is made by [`tessera_nbd::RangeAuthorization`] (principal = peer
//! node, export = area): for every `(peer, area)` it holds the union of that peer's volume grants
//! on the area, recomputed and swapped in with [`RangeAuthorization::set_export`] whenever a
//! grant changes. Each swap is atomic per area, so a request sees either the old or the new
//! ranges of its area, never a mixture; the next request after `grant_volume` returns sees the
//! new ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;
use tessera_api::model::{AreaId, Generation, SECTOR_SIZE};
use tessera_nbd::{Permission, RangeAuthorization};

/// One range of an area a volume grant allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaGrant {
    pub area: AreaId,
    pub range: Range<u64>,
    pub permission: Permission,
}

impl From<(AreaId, Range<u64>, Permission)> for AreaGrant {
    fn from((area, range, permission): (AreaId, Range<u64>, Permission)) -> Self {
        Self {
            area,
            range,
            permission,
        }
    }
}

/// Why the control plane's grant was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The grant is older than the one installed (or revoked) for this peer and volume.
    #[error(
        "grant of volume {volume} to {peer} at generation {offered} is stale: generation {current} is installed"
    )]
    StaleGeneration {
        peer: String,
        volume: String,
        offered: Generation,
        current: Generation,
    },
    #[error("area {area} is not served by this node")]
    UnknownArea { area: AreaId },
    #[error("range {start}..{end} of area {area} is empty, unaligned or outside its {size} bytes")]
    InvalidRange {
        area: AreaId,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("peer and volume names must not be empty")]
    EmptyName,
}

#[derive(Debug, Clone)]
struct VolumeGrant {
    generation: Generation,
    /// Empty after a revocation (kept as a tombstone so that older grants stay refused).
    grants: Vec<AreaGrant>,
}

#[derive(Debug, Default)]
struct Table {
    /// Area name → size in bytes, for the areas this node serves.
    areas: HashMap<AreaId, u64>,
    /// Peer → volume → grant.
    peers: BTreeMap<String, BTreeMap<String, VolumeGrant>>,
}

/// The extent server's authorization table: peer node → volume → allowed area ranges, each
/// volume grant stamped with the map generation it was computed from.
#[derive(Debug, Default)]
pub struct ExtentAuthorization {
    table: Mutex<Table>,
    ranges: Arc<RangeAuthorization>,
}

impl ExtentAuthorization {
    pub fn new() -> Self {
        Self::default()
    }

    /// The per-request table the NBD server consults (principal = peer, export = area).
    pub fn ranges(&self) -> &Arc<RangeAuthorization> {
        &self.ranges
    }

    /// Installs the ranges `peer` may touch on behalf of `volume` under map `generation`,
    /// replacing the volume's previous grant to that peer.
    ///
    /// - An older generation than the installed (or last revoked) one is refused
    ///   ([`GrantError::StaleGeneration`]). The same generation replaces the installed ranges:
    ///   a remap's destinations (`status.incoming`) widen a grant before their generation is
    ///   committed, and the watch that computes grants delivers the volume's versions in order.
    /// - Every range must be non-empty, sector-aligned and inside an area this node serves.
    /// - An empty `grants` list installs the generation with no access (like a revocation).
    ///
    /// When this returns `Ok`, every request decided afterwards sees the new ranges.
    pub fn grant_volume(
        &self,
        peer: &str,
        volume: &str,
        generation: Generation,
        grants: Vec<(AreaId, Range<u64>, Permission)>,
    ) -> Result<(), GrantError> {
        if peer.is_empty() || volume.is_empty() {
            return Err(GrantError::EmptyName);
        }
        let grants: Vec<AreaGrant> = grants.into_iter().map(AreaGrant::from).collect();
        let mut table = self.table.lock();
        for g in &grants {
            let Some(&size) = table.areas.get(&g.area) else {
                return Err(GrantError::UnknownArea {
                    area: g.area.clone(),
                });
            };
            let aligned = g.range.start.is_multiple_of(SECTOR_SIZE)
                && g.range.end.is_multiple_of(SECTOR_SIZE);
            if g.range.start >= g.range.end || g.range.end > size || !aligned {
                return Err(GrantError::InvalidRange {
                    area: g.area.clone(),
                    start: g.range.start,
                    end: g.range.end,
                    size,
                });
            }
        }
        let previous = table.peers.get(peer).and_then(|v| v.get(volume)).cloned();
        if let Some(prev) = &previous
            && generation < prev.generation
        {
            tracing::warn!(peer, volume, offered = %generation, current = %prev.generation,
                "refusing a stale volume grant");
            return Err(GrantError::StaleGeneration {
                peer: peer.to_owned(),
                volume: volume.to_owned(),
                offered: generation,
                current: prev.generation,
            });
        }
        let mut touched: BTreeSet<AreaId> = grants.iter().map(|g| g.area.clone()).collect();
        if let Some(prev) = &previous {
            touched.extend(prev.grants.iter().map(|g| g.area.clone()));
        }
        tracing::info!(peer, volume, %generation, ranges = grants.len(), "volume grant installed");
        table
            .peers
            .entry(peer.to_owned())
            .or_default()
            .insert(volume.to_owned(), VolumeGrant { generation, grants });
        for area in &touched {
            self.publish(&table, peer, area);
        }
        Ok(())
    }

    /// Withdraws every range `peer` holds for `volume` (detach). The generation is remembered,
    /// so an older grant arriving late stays refused. Returns whether the peer had any range.
    pub fn revoke_volume(&self, peer: &str, volume: &str) -> bool {
        let mut table = self.table.lock();
        let Some(grant) = table.peers.get_mut(peer).and_then(|v| v.get_mut(volume)) else {
            return false;
        };
        let old = std::mem::take(&mut grant.grants);
        let had = !old.is_empty();
        let touched: BTreeSet<AreaId> = old.into_iter().map(|g| g.area).collect();
        for area in &touched {
            self.publish(&table, peer, area);
        }
        tracing::info!(peer, volume, "volume grant revoked");
        had
    }

    /// Withdraws every grant of `peer` (a node removed from the cluster). Unlike
    /// [`ExtentAuthorization::revoke_volume`] nothing is remembered.
    pub fn revoke_peer(&self, peer: &str) {
        let mut table = self.table.lock();
        table.peers.remove(peer);
        self.ranges.revoke_principal(peer);
        tracing::info!(peer, "every grant of the peer revoked");
    }

    /// The installed generation of `volume`'s grant to `peer` (also after a revocation).
    pub fn generation(&self, peer: &str, volume: &str) -> Option<Generation> {
        let table = self.table.lock();
        table
            .peers
            .get(peer)
            .and_then(|v| v.get(volume))
            .map(|g| g.generation)
    }

    /// The ranges of `area` that `peer` may currently `(read, write)`, over all its volumes.
    pub fn area_ranges(&self, peer: &str, area: &str) -> (Vec<Range<u64>>, Vec<Range<u64>>) {
        self.ranges.ranges(peer, area)
    }

    /// Registers an area this node serves (ranges already granted on it become effective).
    pub(crate) fn add_area(&self, area: &AreaId, size_bytes: u64) {
        let mut table = self.table.lock();
        table.areas.insert(area.clone(), size_bytes);
        let peers: Vec<String> = table.peers.keys().cloned().collect();
        for peer in &peers {
            self.publish(&table, peer, area);
        }
    }

    /// Stops serving an area: every peer's ranges on it are withdrawn (the volume grants stay, and
    /// take effect again if the area comes back).
    pub(crate) fn remove_area(&self, area: &AreaId) {
        let mut table = self.table.lock();
        table.areas.remove(area);
        self.ranges.revoke_export(area.as_str());
    }

    /// Recomputes `peer`'s ranges on `area` from all its volume grants and swaps them in.
    fn publish(&self, table: &Table, peer: &str, area: &AreaId) {
        let ranges: Vec<(Range<u64>, Permission)> = if table.areas.contains_key(area) {
            table
                .peers
                .get(peer)
                .into_iter()
                .flat_map(|volumes| volumes.values())
                .flat_map(|v| v.grants.iter())
                .filter(|g| &g.area == area)
                .map(|g| (g.range.clone(), g.permission))
                .collect()
        } else {
            Vec::new()
        };
        self.ranges.set_export(peer, area.as_str(), ranges);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_nbd::{Access, AccessKind, Principal};

    const MIB: u64 = 1 << 20;

    fn table() -> ExtentAuthorization {
        let t = ExtentAuthorization::new();
        t.add_area(&AreaId::new("b1"), 16 * MIB);
        t.add_area(&AreaId::new("b2"), 16 * MIB);
        t
    }

    fn may(t: &ExtentAuthorization, peer: &str, area: &str, kind: AccessKind, at: u64) -> bool {
        let access = Access {
            kind,
            offset: at,
            len: 4096,
        };
        t.ranges().check(&Principal::new(peer), area, &access)
    }

    fn g(area: &str, range: Range<u64>, p: Permission) -> (AreaId, Range<u64>, Permission) {
        (AreaId::new(area), range, p)
    }

    #[test]
    fn newer_generation_replaces_and_stale_is_refused() {
        let t = table();
        let rw = Permission::ReadWrite;
        t.grant_volume("node-a", "v", Generation(1), vec![g("b1", 0..MIB, rw)])
            .expect("grant");
        assert!(may(&t, "node-a", "b1", AccessKind::Write, 0));
        assert!(!may(&t, "node-b", "b1", AccessKind::Read, 0));
        t.grant_volume(
            "node-a",
            "v",
            Generation(2),
            vec![g("b2", MIB..2 * MIB, rw)],
        )
        .expect("newer");
        assert!(!may(&t, "node-a", "b1", AccessKind::Read, 0));
        assert!(may(&t, "node-a", "b2", AccessKind::Write, MIB));
        let stale = t.grant_volume("node-a", "v", Generation(1), vec![g("b1", 0..MIB, rw)]);
        assert!(matches!(stale, Err(GrantError::StaleGeneration { .. })));
        // The same generation replaces the ranges (a remap's destinations join before their
        // generation is committed, then the source ranges leave).
        t.grant_volume(
            "node-a",
            "v",
            Generation(2),
            vec![g("b2", MIB..2 * MIB, rw), g("b1", 0..MIB, rw)],
        )
        .expect("widened at the same generation");
        assert!(may(&t, "node-a", "b1", AccessKind::Write, 0));
        t.grant_volume("node-a", "v", Generation(2), vec![g("b1", 0..MIB, rw)])
            .expect("narrowed at the same generation");
        assert!(!may(&t, "node-a", "b2", AccessKind::Read, MIB));
        assert!(may(&t, "node-a", "b1", AccessKind::Read, 0));
        assert_eq!(t.generation("node-a", "v"), Some(Generation(2)));
    }

    #[test]
    fn volumes_sharing_an_area_are_unioned_and_revoked_separately() {
        let t = table();
        t.grant_volume(
            "node-a",
            "v1",
            Generation(3),
            vec![g("b1", 0..MIB, Permission::ReadWrite)],
        )
        .expect("v1");
        t.grant_volume(
            "node-a",
            "v2",
            Generation(1),
            vec![g("b1", 4 * MIB..5 * MIB, Permission::Read)],
        )
        .expect("v2");
        assert!(may(&t, "node-a", "b1", AccessKind::Write, 0));
        assert!(may(&t, "node-a", "b1", AccessKind::Read, 4 * MIB));
        assert!(!may(&t, "node-a", "b1", AccessKind::Write, 4 * MIB));
        assert!(t.revoke_volume("node-a", "v1"));
        assert!(!may(&t, "node-a", "b1", AccessKind::Read, 0));
        assert!(may(&t, "node-a", "b1", AccessKind::Read, 4 * MIB));
        // The tombstone keeps older grants out; the same generation may re-attach.
        let late = t.grant_volume(
            "node-a",
            "v1",
            Generation(2),
            vec![g("b1", 0..MIB, Permission::ReadWrite)],
        );
        assert!(matches!(late, Err(GrantError::StaleGeneration { .. })));
        t.grant_volume(
            "node-a",
            "v1",
            Generation(3),
            vec![g("b1", 0..MIB, Permission::Read)],
        )
        .expect("re-attach");
        assert!(may(&t, "node-a", "b1", AccessKind::Read, 0));
        t.revoke_peer("node-a");
        assert!(!may(&t, "node-a", "b1", AccessKind::Read, 4 * MIB));
    }

    #[test]
    fn invalid_grants_are_refused_whole() {
        let t = table();
        let rw = Permission::ReadWrite;
        let bad = [
            vec![g("zz", 0..MIB, rw)],
            vec![g("b1", 0..MIB, rw), g("b1", 0..17 * MIB, rw)],
            vec![g("b1", 100..MIB, rw)],
            vec![g("b1", MIB..MIB, rw)],
        ];
        for grants in bad {
            assert!(
                t.grant_volume("node-a", "v", Generation(1), grants)
                    .is_err()
            );
        }
        assert!(!may(&t, "node-a", "b1", AccessKind::Read, 0));
        assert_eq!(t.generation("node-a", "v"), None);
        assert_eq!(
            t.grant_volume("", "v", Generation(1), vec![]),
            Err(GrantError::EmptyName)
        );
    }

    #[test]
    fn removed_area_loses_its_ranges_and_regains_them() {
        let t = table();
        let b1 = AreaId::new("b1");
        t.grant_volume(
            "node-a",
            "v",
            Generation(1),
            vec![g("b1", 0..MIB, Permission::ReadWrite)],
        )
        .expect("grant");
        t.remove_area(&b1);
        assert!(!may(&t, "node-a", "b1", AccessKind::Read, 0));
        t.add_area(&b1, 16 * MIB);
        assert!(may(&t, "node-a", "b1", AccessKind::Read, 0));
    }
}
