//! The node side of mirror pairs (seed 003; docs/mirror.md §7): the mirror leg of a staged
//! primary, set from `status.mirror` when the volume is staged or restored and changed by the
//! operator's SetMirrorLeg; dirty collection; the formation/resync copy (CopyToLeg).
//!
//! - The leg is opened like a staged volume's own map: local extents are claimed for the
//!   **secondary** (it owns them; nothing is zeroed when it already does), remote areas are
//!   connected and probed until their lenders grant them (they grant `status.mirror.writers`).
//! - A node that restarts while a primary is mirrored lost its unreported dirty bits: it says so
//!   (`complete: false`) until the operator acknowledges an answer that said so, and the
//!   operator then treats every extent as dirty.
//! - `reset_dirty` (the split cut) takes effect once per cut id and only while the volume is
//!   held: a repeated cut message arriving after the resume must not drop the bits of writes
//!   made since.

use std::collections::BTreeSet;
use std::sync::Arc;

use tessera_api::model::AreaId;
use tessera_api::v1alpha1::{MirrorLegMode, MirrorRole, VirtualVolume};

use super::staging::Registry;
use super::{Agent, AgentError};
use crate::engine::gate::GateState;
use crate::engine::{LegMode, LegView, MirrorLegSpec};

/// Per staged primary: what the node remembers about its dirty reports.
#[derive(Debug, Default, Clone)]
pub struct MirrorBook {
    /// The last cut applied (its id), so a repeated cut message is a no-op.
    pub last_cut: Option<String>,
    /// The node cannot vouch for its bits (restored after a restart while a leg was set).
    pub incomplete: bool,
    /// The sequence of the answer that reported `incomplete`; its acknowledgement clears it.
    pub incomplete_reported: Option<u64>,
}

/// The leg as the operator asked for it.
#[derive(Debug, Clone)]
pub struct LegRequest {
    pub volume: String,
    pub secondary: String,
    /// `None`: remove the leg.
    pub mode: Option<LegMode>,
    pub reset_dirty: bool,
    /// Identifies the cut `reset_dirty` belongs to.
    pub cut: String,
}

/// The answer to SetMirrorLeg and CollectDirty: `None` when the volume is not staged here.
#[derive(Debug, Clone)]
pub struct LegAnswer {
    pub gate: GateState,
    pub leg: Option<LegView>,
}

/// CollectDirty's answer.
#[derive(Debug, Clone)]
pub struct DirtyAnswer {
    pub leg: LegAnswer,
    pub sequence: u64,
    pub extents: roaring::RoaringBitmap,
    pub complete: bool,
}

impl Agent {
    /// The leg `object` (a volume about to be staged or restored) asks for, opened: its areas
    /// connected. `None` unless its `status.mirror` makes it a primary.
    pub(crate) async fn leg_of(
        &self,
        registry: &Registry,
        object: &VirtualVolume,
    ) -> Result<Option<(MirrorLegSpec, BTreeSet<AreaId>)>, AgentError> {
        let Some(link) = object.status.as_ref().and_then(|s| s.mirror.as_ref()) else {
            return Ok(None);
        };
        if link.role != MirrorRole::Primary {
            return Ok(None);
        }
        let mode = match link.leg {
            MirrorLegMode::Mirror => LegMode::Mirror,
            MirrorLegMode::Track => LegMode::Track,
        };
        self.open_leg(registry, &link.peer, mode).await.map(Some)
    }

    async fn open_leg(
        &self,
        registry: &Registry,
        secondary: &str,
        mode: LegMode,
    ) -> Result<(MirrorLegSpec, BTreeSet<AreaId>), AgentError> {
        let object = self.get_volume(secondary).await?;
        let map = Arc::new(Self::model_map(&object)?);
        let areas = self.ensure_remote_areas(registry, secondary, &map).await?;
        Ok((
            MirrorLegSpec {
                secondary: secondary.to_string(),
                map,
                mode,
            },
            areas,
        ))
    }

    /// SetMirrorLeg. Idempotent: the request describes the leg.
    pub async fn set_mirror_leg(
        &self,
        request: LegRequest,
    ) -> Result<Option<LegAnswer>, AgentError> {
        let mut registry = self.staged.lock().await;
        if !registry.volumes.contains_key(&request.volume) {
            return Ok(None);
        }
        let opened = match request.mode {
            Some(mode) => Some(self.open_leg(&registry, &request.secondary, mode).await?),
            None => None,
        };
        let entry = registry
            .volumes
            .get_mut(&request.volume)
            .ok_or_else(|| AgentError::NotStaged(request.volume.clone()))?;
        let (gate, _) = entry.volume.hold_state();
        let mut reset = false;
        if request.reset_dirty && entry.mirror.last_cut.as_deref() != Some(request.cut.as_str()) {
            if gate != GateState::Held {
                return Err(AgentError::NotHeldForCut {
                    volume: request.volume.clone(),
                    gate: format!("{gate:?}"),
                });
            }
            reset = true;
        }
        let spec = match opened {
            Some((spec, areas)) => {
                entry.remote_areas.extend(areas);
                Some(spec)
            }
            None => None,
        };
        entry
            .volume
            .set_mirror_leg(spec, reset)
            .map_err(|source| AgentError::Engine {
                volume: request.volume.clone(),
                source,
            })?;
        if reset {
            entry.mirror.last_cut = Some(request.cut.clone());
            // The cut starts the bits afresh: what a restart lost is irrelevant from here on.
            entry.mirror.incomplete = false;
            entry.mirror.incomplete_reported = None;
        }
        if request.mode.is_none() {
            entry.mirror = MirrorBook::default();
        }
        Ok(Some(LegAnswer {
            gate,
            leg: entry.volume.mirror_leg(),
        }))
    }

    /// CollectDirty.
    pub async fn collect_dirty(
        &self,
        volume_id: &str,
        acknowledge: u64,
    ) -> Result<Option<DirtyAnswer>, AgentError> {
        let mut registry = self.staged.lock().await;
        let Some(entry) = registry.volumes.get_mut(volume_id) else {
            return Ok(None);
        };
        if entry.mirror.incomplete_reported == Some(acknowledge) {
            entry.mirror.incomplete = false;
            entry.mirror.incomplete_reported = None;
        }
        let (sequence, extents) = entry.volume.collect_dirty(acknowledge);
        if entry.mirror.incomplete {
            entry.mirror.incomplete_reported = Some(sequence);
        }
        let (gate, _) = entry.volume.hold_state();
        Ok(Some(DirtyAnswer {
            leg: LegAnswer {
                gate,
                leg: entry.volume.mirror_leg(),
            },
            sequence,
            extents,
            complete: !entry.mirror.incomplete,
        }))
    }

    /// CopyToLeg: `None` when the volume is not staged here.
    pub async fn copy_to_leg(
        &self,
        volume_id: &str,
        extents: &roaring::RoaringBitmap,
        held: bool,
    ) -> Result<Option<u64>, AgentError> {
        // Not under the registry lock: a copy takes long and the gate steps need the lock.
        let volume = {
            let registry = self.staged.lock().await;
            match registry.volumes.get(volume_id) {
                Some(entry) => Arc::clone(&entry.volume),
                None => return Ok(None),
            }
        };
        volume
            .copy_to_leg(extents, !held)
            .await
            .map(Some)
            .map_err(|source| AgentError::Engine {
                volume: volume_id.to_string(),
                source,
            })
    }
}
