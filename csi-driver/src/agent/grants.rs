//! The lender side of seed 001 §4.5: the borrower reaches the lender's area through the lender's
//! agent. A VirtualVolume watch keeps the extent server's authorization table equal to: every
//! node in `spec.access_nodes()` other than this one may read and write the ranges the volume's
//! committed mapping places on this node's areas, at that mapping generation. A node that leaves
//! `access_nodes()` (ControllerUnpublish) loses its ranges at once (seed 001 §8.4: only the
//! recorded borrower of a mounted volume is served).
//!
//! Before granting, every range of this node's areas the mapping hands to a new owner is zeroed
//! and recorded ([`super::ownership`]); only ranges the ledger records as the volume's are
//! granted, so a borrower never reads a previous tenant's bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tessera_api::model::{AreaId, Generation};
use tessera_api::v1alpha1::{AttachmentState, VirtualVolume};
use tessera_nbd::Permission;
use tokio::sync::watch;

use super::Agent;
use crate::extent_server::ExtentAuthorization;

/// What one volume grants on this node: generation and ranges, per borrower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeGrants {
    pub generation: Generation,
    pub peers: BTreeSet<String>,
    pub ranges: Vec<(AreaId, Range<u64>, Permission)>,
}

/// The grants a volume implies on this node, `None` when it implies none (not mapped, not
/// published, or nothing of it on this node's areas).
pub fn grants_of(volume: &VirtualVolume, node: &str, local: &[AreaId]) -> Option<VolumeGrants> {
    let mapping = volume.status.as_ref()?.mapping.as_ref()?;
    // A node the remap coordinator fenced loses its grants here (seed 004 611/617: an excluded
    // node that is alive but unreachable must not write the areas any more).
    let fenced: BTreeSet<&str> = volume
        .status
        .as_ref()
        .map(|s| {
            s.attachments
                .iter()
                .filter(|a| a.state == AttachmentState::Fenced)
                .map(|a| a.node.as_str())
                .collect()
        })
        .unwrap_or_default();
    // A move of a volume nobody uses is copied by `status.incoming.copier`.
    let copier = volume
        .status
        .as_ref()
        .and_then(|s| s.incoming.as_ref())
        .and_then(|i| i.copier.as_deref());
    // The secondary of a mirror pair is written by the nodes of its primary (docs/mirror.md §7).
    let writers = volume
        .status
        .as_ref()
        .and_then(|s| s.mirror.as_ref())
        .map(|m| m.writers.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap_or_default();
    let peers: BTreeSet<String> = volume
        .spec
        .access_nodes()
        .into_iter()
        .chain(copier)
        .chain(writers)
        .filter(|n| *n != node && !fenced.contains(n))
        .map(str::to_string)
        .collect();
    if peers.is_empty() {
        return None;
    }
    let map = match mapping.to_model_committed(volume.spec.size_bytes) {
        Ok(map) => map,
        Err(error) => {
            tracing::warn!(volume = %volume.name_any(), %error, "unusable mapping; nothing granted");
            return None;
        }
    };
    let mut ranges = Vec::new();
    for run in map.runs().iter().filter(|r| !r.is_hole()) {
        for replica in run.replicas.iter().filter(|r| local.contains(&r.area)) {
            ranges.push((
                replica.area.clone(),
                replica.area_offset..replica.area_offset + run.length,
                Permission::ReadWrite,
            ));
        }
    }
    // An unfinished remap's destinations: the copy and the staged map write them before the
    // commit records them (docs/remap.md §5a "Grants").
    for (area, range) in incoming_ranges(volume) {
        if local.contains(&area) {
            ranges.push((area, range, Permission::ReadWrite));
        }
    }
    if ranges.is_empty() {
        return None;
    }
    Some(VolumeGrants {
        generation: map.generation(),
        peers,
        ranges,
    })
}

/// `status.incoming` as area ranges (invalid entries are skipped: nothing is granted for them).
pub fn incoming_ranges(volume: &VirtualVolume) -> Vec<(AreaId, Range<u64>)> {
    let Some(incoming) = volume.status.as_ref().and_then(|s| s.incoming.as_ref()) else {
        return Vec::new();
    };
    incoming
        .ranges
        .iter()
        .filter_map(|r| {
            let start = u64::try_from(r.area_offset).ok()?;
            let length = u64::try_from(r.length).ok().filter(|l| *l > 0)?;
            Some((
                AreaId::new(r.area.as_str()),
                start..start.checked_add(length)?,
            ))
        })
        .collect()
}

/// The ownership step, then the grants: ranges whose zeroing or recording failed (or that a
/// stale event names but the volume no longer maps) are not granted.
async fn settled_grants(agent: &Agent, volume: &VirtualVolume, node: &str) -> Option<VolumeGrants> {
    match agent
        .ownership
        .settle_committed(&agent.client, volume)
        .await
    {
        Ok(0) => {}
        Ok(zeroed) => tracing::info!(volume = %volume.name_any(), zeroed,
            "extents zeroed for their new owner before granting"),
        Err(error) => tracing::warn!(volume = %volume.name_any(), %error,
            "ownership step failed; the ranges it did not settle are not granted"),
    }
    let mut grants = grants_of(volume, node, &agent.local_areas)?;
    let uid = volume.uid()?;
    grants.ranges = agent.ownership.owned_only(&uid, grants.ranges).await;
    (!grants.ranges.is_empty()).then_some(grants)
}

/// The grant table's view: volume → peers currently granted.
#[derive(Default)]
struct Granted {
    volumes: BTreeMap<String, BTreeSet<String>>,
}

impl Granted {
    fn apply(&mut self, auth: &ExtentAuthorization, name: &str, grants: Option<VolumeGrants>) {
        let before = self.volumes.remove(name).unwrap_or_default();
        let after = grants.as_ref().map(|g| g.peers.clone()).unwrap_or_default();
        for peer in before.difference(&after) {
            auth.revoke_volume(peer, name);
        }
        if let Some(grants) = grants {
            let mut installed = BTreeSet::new();
            for peer in &grants.peers {
                match auth.grant_volume(peer, name, grants.generation, grants.ranges.clone()) {
                    Ok(()) => {
                        installed.insert(peer.clone());
                    }
                    Err(error) => {
                        tracing::warn!(volume = name, %peer, %error, "grant refused");
                    }
                }
            }
            if !installed.is_empty() {
                self.volumes.insert(name.to_string(), installed);
            }
        }
    }
}

/// Runs the watch until `stopped`.
pub(crate) async fn run(agent: Arc<Agent>, mut stopped: watch::Receiver<bool>) {
    let Some(auth) = agent
        .extent_server
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| Arc::clone(s.authorization()))
    else {
        return;
    };
    if agent.local_areas.is_empty() {
        // Nothing to lend.
        return;
    }
    let api: Api<VirtualVolume> = Api::all(agent.client.clone());
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut granted = Granted::default();
    let mut listed: Option<BTreeSet<String>> = None;
    let node = agent.config.node_id.clone();
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = stopped.changed() => return,
        };
        let Some(event) = event else { return };
        match event {
            Ok(Event::Apply(volume)) => {
                let name = volume.name_any();
                let grants = settled_grants(&agent, &volume, &node).await;
                granted.apply(&auth, &name, grants);
            }
            Ok(Event::Delete(volume)) => granted.apply(&auth, &volume.name_any(), None),
            Ok(Event::Init) => listed = Some(BTreeSet::new()),
            Ok(Event::InitApply(volume)) => {
                let name = volume.name_any();
                let grants = settled_grants(&agent, &volume, &node).await;
                granted.apply(&auth, &name, grants);
                if let Some(listed) = listed.as_mut() {
                    listed.insert(name);
                }
            }
            Ok(Event::InitDone) => {
                // Volumes deleted while the watch was down.
                if let Some(listed) = listed.take() {
                    let gone: Vec<String> = granted
                        .volumes
                        .keys()
                        .filter(|v| !listed.contains(*v))
                        .cloned()
                        .collect();
                    for volume in gone {
                        granted.apply(&auth, &volume, None);
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "VirtualVolume watch"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::v1alpha1::{
        MappedRun, MirrorLegMode, MirrorLink, MirrorRole, ReplicaLocation, VirtualVolumeSpec,
        VirtualVolumeStatus, VolumeMapping,
    };

    /// vol-1, 2 extents of 4 MiB on node-b's area, not published anywhere.
    fn secondary(mirror: Option<MirrorLink>) -> VirtualVolume {
        let mut volume = VirtualVolume::new(
            "vol-1",
            VirtualVolumeSpec {
                size_bytes: 8 << 20,
                pool_name: "pool".into(),
                priority_class_name: String::new(),
                copies: 1,
                layout: Default::default(),
                claim_ref: None,
                access_node: None,
                shared_access_nodes: Vec::new(),
            },
        );
        volume.status = Some(VirtualVolumeStatus {
            mapping: Some(VolumeMapping {
                generation: 3,
                extent_size_bytes: 4 << 20,
                extents: vec![MappedRun {
                    offset: 0,
                    length: 8 << 20,
                    replicas: vec![ReplicaLocation {
                        area: "node-b-area-0".into(),
                        area_offset: 0,
                    }],
                }],
            }),
            mirror,
            ..Default::default()
        });
        volume
    }

    #[test]
    fn a_secondary_is_granted_to_the_writers_of_its_primary_and_to_nobody_else() {
        let local = [AreaId::new("node-b-area-0")];
        assert_eq!(grants_of(&secondary(None), "node-b", &local), None);
        let link = MirrorLink {
            pair: "pair".into(),
            role: MirrorRole::Secondary,
            peer: "vol-0".into(),
            leg: MirrorLegMode::Mirror,
            writers: vec!["node-a".into(), "node-b".into()],
            copying: false,
        };
        let grants = grants_of(&secondary(Some(link)), "node-b", &local).expect("granted");
        // This node's own engine needs no grant.
        assert_eq!(grants.peers, BTreeSet::from(["node-a".to_string()]));
        assert_eq!(
            grants.ranges,
            vec![(local[0].clone(), 0..8 << 20, Permission::ReadWrite)]
        );
    }
}
