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
//! - A **secondary** staged on its own (used while split) has no leg, but its writes are tracked
//!   from its first one: a resync must overwrite what it changed (seed 003 §4.1 step 3), so its
//!   node reports them through CollectDirty like a primary's.
//! - Unacknowledged bits outlive an unstage in `<state-dir>/dirty/<id>.bits`
//!   ([`cache::DirtyFile`]); CollectDirty answers from the file until the operator acknowledges
//!   it, and a new staging reports the file's bits with its own until then.
//! - Answer sequences never repeat across stagings and restarts ([`MirrorBook::base`]): an
//!   acknowledgement of an old answer must not match a new one and drop bits never reported.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use tessera_api::model::AreaId;
use tessera_api::v1alpha1::{MirrorLegMode, MirrorRole, VirtualVolume};

use super::cache;
use super::staging::Registry;
use super::{Agent, AgentError};
use crate::engine::gate::GateState;
use crate::engine::{LegMode, LegView, MirrorLegSpec, Volume};

/// Per staged volume: what the node remembers about its dirty reports.
#[derive(Debug, Default, Clone)]
pub struct MirrorBook {
    /// The last cut applied (its id), so a repeated cut message is a no-op.
    pub last_cut: Option<String>,
    /// The node cannot vouch for its bits (restored after a restart while tracking).
    pub incomplete: bool,
    /// Added to the engine's sequences (which start at 1 with every `Volume`): above every
    /// sequence an earlier staging or process answered, so their acknowledgements match nothing.
    pub base: u64,
    /// The dirty file's bits (an earlier staging's, not acknowledged): reported with the
    /// engine's bits in every answer, dropped with the file once an answer carrying them is
    /// acknowledged. Nothing is lost in between: the file stays on disk until then.
    pub carried: Option<roaring::RoaringBitmap>,
    /// The sequence of the last answer; its acknowledgement clears `incomplete` and `carried`
    /// (both are in every answer while set).
    pub last_answer: Option<u64>,
    /// Staged as the secondary of a pair: tracked without a leg.
    pub secondary: bool,
}

impl MirrorBook {
    /// The book of a volume about to be staged or restored on a node whose state dir is
    /// `state_dir`: the dirty file, if any, carried.
    pub(crate) fn open(state_dir: &Path, volume: &str) -> MirrorBook {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Microsecond-ish steps: a staging would need 1000 answers per millisecond to reach
        // the base of a later one.
        let mut book = MirrorBook {
            base: now.saturating_mul(1000),
            ..Default::default()
        };
        if let Some(file) = cache::load_dirty(state_dir, volume) {
            book.base = book.base.max(file.sequence);
            book.incomplete = !file.complete;
            book.carried = Some(file.extents);
        }
        book
    }
}

/// Whether `object` is the secondary of a mirror pair (its writes are tracked).
pub(crate) fn is_secondary(object: &VirtualVolume) -> bool {
    object
        .status
        .as_ref()
        .and_then(|s| s.mirror.as_ref())
        .is_some_and(|m| m.role == MirrorRole::Secondary)
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
    /// False: not staged here, answered from the dirty file (`leg.gate` means nothing then).
    pub staged: bool,
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
            MirrorLegMode::Unpaired => return Ok(None),
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

    /// The private copy of an unused primary: its map and its secondary's from the API, both
    /// granted to this node through `status.mirror.writers`. Under the registry lock, so this
    /// node does not stage it meanwhile; other nodes wait for `status.mirror.copying` (M-26).
    async fn copy_unused_to_leg(
        &self,
        volume_id: &str,
        extents: &roaring::RoaringBitmap,
    ) -> Result<Option<u64>, AgentError> {
        let object = self.get_volume(volume_id).await?;
        if !object.spec.access_nodes().is_empty() {
            return Ok(None);
        }
        // Not a primary: nothing to copy here (answered as "not staged").
        let Some(link) = object
            .status
            .as_ref()
            .and_then(|s| s.mirror.as_ref())
            .filter(|l| l.role == MirrorRole::Primary)
        else {
            return Ok(None);
        };
        let map = Arc::new(Self::model_map(&object)?);
        let registry = self.staged.lock().await;
        if registry.volumes.contains_key(volume_id) {
            return Ok(None);
        }
        let mut connected = self.ensure_remote_areas(&registry, volume_id, &map).await?;
        let result = async {
            let (leg, areas) = self
                .open_leg(&registry, &link.peer, LegMode::Mirror)
                .await?;
            connected.extend(areas);
            let engine = crate::engine::Volume::open(
                volume_id,
                map,
                Arc::clone(&self.registry),
                Default::default(),
            )
            .and_then(|engine| engine.set_mirror_leg(Some(leg), false).map(|()| engine))
            .map_err(|source| AgentError::Engine {
                volume: volume_id.into(),
                source,
            })?;
            engine
                .copy_to_leg(extents, true)
                .await
                .map_err(|source| AgentError::Engine {
                    volume: volume_id.into(),
                    source,
                })
        }
        .await;
        // Connections only this copy used are closed again.
        self.release_remote_areas(&registry, &connected).await;
        result.map(Some)
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
        let mut drop_file = false;
        if reset {
            entry.mirror.last_cut = Some(request.cut.clone());
            // The cut starts the bits afresh: what a restart or an earlier staging left is
            // irrelevant from here on (the pair is equal at the cut).
            entry.mirror.incomplete = false;
            drop_file = entry.mirror.carried.take().is_some();
        }
        if request.mode.is_none() {
            // No pair any more: its bits are moot. The base stays, sequences keep rising.
            drop_file |= entry.mirror.carried.is_some();
            entry.mirror = MirrorBook {
                base: entry.mirror.base,
                last_answer: entry.mirror.last_answer,
                ..Default::default()
            };
        }
        if drop_file {
            self.forget_dirty_file(&request.volume);
        }
        Ok(Some(LegAnswer {
            gate,
            leg: entry.volume.mirror_leg(),
        }))
    }

    /// CollectDirty. A volume not staged here answers from its dirty file (`None` without one).
    pub async fn collect_dirty(
        &self,
        volume_id: &str,
        acknowledge: u64,
    ) -> Result<Option<DirtyAnswer>, AgentError> {
        let mut registry = self.staged.lock().await;
        let Some(entry) = registry.volumes.get_mut(volume_id) else {
            // Under the registry lock: a concurrent stage reads the same file.
            return Ok(self.collect_unstaged(volume_id, acknowledge));
        };
        let book = &mut entry.mirror;
        if acknowledge != 0 && book.last_answer == Some(acknowledge) {
            book.incomplete = false;
            if book.carried.take().is_some() {
                self.forget_dirty_file(volume_id);
            }
        }
        // An acknowledgement at or below the base names an earlier staging's answer: nothing
        // of this engine's.
        let engine_ack = acknowledge.saturating_sub(book.base);
        let (engine_sequence, mut extents) = entry.volume.collect_dirty(engine_ack);
        let sequence = book.base + engine_sequence;
        if let Some(carried) = &book.carried {
            extents |= carried;
        }
        book.last_answer = Some(sequence);
        let complete = !book.incomplete;
        let (gate, _) = entry.volume.hold_state();
        Ok(Some(DirtyAnswer {
            leg: LegAnswer {
                gate,
                leg: entry.volume.mirror_leg(),
            },
            sequence,
            extents,
            complete,
            staged: true,
        }))
    }

    /// CollectDirty of a volume not staged here: the dirty file's answer, repeated until the
    /// operator acknowledges its sequence, which deletes the file.
    fn collect_unstaged(&self, volume_id: &str, acknowledge: u64) -> Option<DirtyAnswer> {
        let file = cache::load_dirty(&self.config.state_dir, volume_id)?;
        if acknowledge == file.sequence {
            self.forget_dirty_file(volume_id);
            return None;
        }
        Some(DirtyAnswer {
            leg: LegAnswer {
                gate: GateState::Running,
                leg: None,
            },
            sequence: file.sequence,
            extents: file.extents,
            complete: file.complete,
            staged: false,
        })
    }

    /// NodeUnstage of a tracked volume (primary or secondary), after its frontends stopped:
    /// every bit not acknowledged yet goes to the dirty file, or the file goes when there is
    /// none. Call under the registry lock.
    pub(crate) fn persist_dirty(
        &self,
        volume_id: &str,
        volume: &Volume,
        book: &MirrorBook,
    ) -> Result<(), AgentError> {
        if !volume.dirty_tracking_enabled() && book.carried.is_none() && !book.incomplete {
            return Ok(());
        }
        // Acknowledging nothing: the pending bits of the last answer are kept as well.
        let (engine_sequence, mut extents) = volume.collect_dirty(0);
        if let Some(carried) = &book.carried {
            extents |= carried;
        }
        let file = cache::DirtyFile {
            sequence: book.base + engine_sequence,
            complete: !book.incomplete,
            extents,
        };
        if file.complete && file.extents.is_empty() {
            return cache::remove_dirty(&self.config.state_dir, volume_id);
        }
        cache::store_dirty(&self.config.state_dir, volume_id, &file)?;
        tracing::info!(
            volume = volume_id,
            sequence = file.sequence,
            extents = file.extents.len(),
            complete = file.complete,
            "unacknowledged dirty bits kept for CollectDirty"
        );
        Ok(())
    }

    /// Deletes the dirty file once its bits are acknowledged or moot. A failure only logs: the
    /// file is then reported again, which costs a resync of extents, never a lost one.
    fn forget_dirty_file(&self, volume_id: &str) {
        if let Err(error) = cache::remove_dirty(&self.config.state_dir, volume_id) {
            tracing::warn!(volume = volume_id, %error, "dirty-bits file not removed");
        }
    }

    /// CopyToLeg. A primary not staged here is copied through a private engine, but only when
    /// no node may write it (no access node): the formation of an unused primary, whose copy
    /// needs no dirty bits (docs/mirror.md M-23). `None`: not staged here and in use elsewhere.
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
                None => {
                    drop(registry);
                    return self.copy_unused_to_leg(volume_id, extents).await;
                }
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
