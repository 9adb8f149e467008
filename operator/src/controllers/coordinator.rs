//! The remap coordinator wired to the cluster: drives [`planners::remap::step`] for one
//! VolumeRemap of a volume nodes use (seed 004 §6, §7.3, §11.3; docs/remap.md §2).
//!
//! One reconcile runs the whole operation: the persisted state is loaded (or the operation is
//! planned and recorded), then events (node answers, timers, copy results) are fed to `step`
//! until the operation ends. **Every state `step` returns is written before its commands are
//! carried out** (annotation [`STATE_ANNOTATION`] with the full coordinator record, conditional
//! on the resourceVersion, then `status` for people), so a new leader resumes from the last
//! written state with `Event::Restarted`. The reconcile future owns every task it spawns (a
//! `JoinSet`), so losing the Lease (the controllers are aborted) stops them all.
//!
//! Every operation runs in copy mode of the planner (the cycle's map is staged inside the hold):
//! - **Move / EvacuateArea**: the destination extents are planned with the placement planner
//!   under the [`Allocator`](super::Allocator) lock and reserved (in process, and durably in the
//!   record, re-reserved by a new leader before any controller runs); each cycle copies a chunk
//!   with `CopyExtents` on one node, driven by [`planners::migration`].
//! - **ReleaseRanges** (reclaim): the "copy" is the re-check under the hold: the nodes' usage
//!   views are read with `ReportUsage` while held, and only extents still in the tier's state
//!   are unmapped (D-17).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_api::model::{ByteRange, Edit, ExtentMap, Generation, ReplicaLocation as ModelReplica};
use tessera_api::v1alpha1::{
    AreaRange, AttachmentState, IncomingExtents, ReclaimTier, RemapOperationType, RemapPhase,
    ReplicaLocation, VirtualVolume, VolumeLayout, VolumeMapping, VolumeRemap,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::allocator::AllocatorState;
use super::node_control::{NodeCallError, NodeRequest, OperationRef};
use super::support::{
    claim_reference_from_labels, field_manager, human_bytes, now, patch_status, reference,
};
use super::usage::{UsageReport, extent_states};
use super::view::{PoolView, attached_nodes, extent_size};
use super::{Context, Error, Result, Stores};
use crate::planners::allocation::{mapped_named, recheck_under_hold};
use crate::planners::migration::{CopyAction, CopyState, Migration};
use crate::planners::placement::{PlacementRequest, PlacementRules, plan_placement};
use crate::planners::remap::{
    Command, CopyOutcome, Event, NodeMessage, NodeOutcome, NodeStep, Policy, RemapState, step,
};
use crate::planners::{ExtentRange, coalesce, total_len};

/// The coordinator's write-ahead record on the VolumeRemap.
pub const STATE_ANNOTATION: &str = "tessera.io/remap-state";

/// The state a node reports for a step on a volume it has not staged (nothing in flight, so
/// the step is done at once; `tessera_csi::agent::control::ABSENT`).
pub const ABSENT_STATE: &str = "Absent";

/// What the operation does, planned once before it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Plan {
    /// Virtual extent → its destination replicas (one per replica of the volume).
    Move {
        moves: BTreeMap<u64, Vec<ReplicaLocation>>,
        chunk_extents: u64,
    },
    /// Named extents and the tier to release.
    Release {
        extents: Vec<(u64, u64)>,
        tier: ReclaimTier,
        released: Option<u64>,
        /// `releaseRanges.discard`: no re-check, every named mapped extent goes.
        #[serde(default)]
        discard: bool,
    },
}

/// Everything the coordinator needs to resume: the planner state, the plan, and every map it
/// staged (by generation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub state: RemapState,
    pub volume: String,
    pub pool: String,
    pub size_bytes: i64,
    pub base: VolumeMapping,
    pub plan: Plan,
    /// Maps of the generations this operation stages (written before they are staged).
    pub maps: BTreeMap<i64, VolumeMapping>,
    /// The extents held in the current cycle.
    pub chunk: Vec<u64>,
    /// The last progress message (`status.message` until the outcome is known).
    pub progress: Option<String>,
    /// The node that copies for a move of a volume nobody uses (chosen once, published in
    /// `status.incoming.copier` so the lenders grant it the ranges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copier: Option<String>,
}

impl Record {
    fn extent_size(&self) -> u64 {
        self.base.extent_size_bytes.max(1) as u64
    }

    /// The mapping every participant runs now.
    fn committed(&self) -> VolumeMapping {
        let g = self.state.committed_generation.get() as i64;
        self.maps
            .get(&g)
            .cloned()
            .unwrap_or_else(|| self.base.clone())
    }

    /// The byte ranges the current cycle holds.
    fn scope(&self) -> Vec<(i64, i64)> {
        let es = self.extent_size();
        let ranges = coalesce(self.chunk.iter().map(|&e| ExtentRange::new(e, 1)).collect());
        ranges
            .into_iter()
            .map(|r| {
                let offset = r.start * es;
                let end = (r.end() * es).min(self.size_bytes.max(0) as u64);
                (offset as i64, end.saturating_sub(offset) as i64)
            })
            .filter(|(_, len)| *len > 0)
            .collect()
    }

    /// The extents of the next cycle: moves not yet on their destination in the committed map.
    fn next_chunk(&self) -> Vec<u64> {
        match &self.plan {
            Plan::Move {
                moves,
                chunk_extents,
            } => {
                let committed = self.committed();
                moves
                    .iter()
                    .filter(|(e, to)| replicas_at(&committed, **e) != **to)
                    .map(|(e, _)| *e)
                    .take((*chunk_extents).max(1) as usize)
                    .collect()
            }
            Plan::Release { extents, .. } => extents.iter().flat_map(|&(s, l)| s..s + l).collect(),
        }
    }
}

/// The replicas of virtual extent `e` in `mapping` (shifted to the extent).
fn replicas_at(mapping: &VolumeMapping, e: u64) -> Vec<ReplicaLocation> {
    let es = mapping.extent_size_bytes.max(1);
    let offset = e as i64 * es;
    mapping
        .extents
        .iter()
        .find(|r| r.offset <= offset && offset < r.offset + r.length)
        .map(|r| {
            r.replicas
                .iter()
                .map(|p| ReplicaLocation {
                    area: p.area.clone(),
                    area_offset: p.area_offset + (offset - r.offset),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn parse_record(remap: &VolumeRemap) -> Option<Record> {
    remap
        .annotations()
        .get(STATE_ANNOTATION)
        .and_then(|s| serde_json::from_str(s).ok())
}

/// The in-process reservation key of a remap's destination extents (not a valid volume name,
/// so the allocator's cache cleanup never drops it).
pub fn reservation_key(remap: &str) -> String {
    format!("remap:{remap}")
}

/// The destination extents of a move as a mapping (for the allocator's reservations).
fn destination_mapping(record: &Record) -> Option<VolumeMapping> {
    let Plan::Move { moves, .. } = &record.plan else {
        return None;
    };
    let es = record.extent_size() as i64;
    Some(VolumeMapping {
        generation: 0,
        extent_size_bytes: es,
        extents: moves
            .iter()
            .map(|(e, to)| tessera_api::v1alpha1::MappedRun {
                offset: *e as i64 * es,
                length: es,
                replicas: to.clone(),
            })
            .collect(),
    })
}

/// Re-reserves the destinations of every unfinished move (a new leader, before any controller
/// allocates; docs/remap.md "coordinator wiring").
pub fn restore_reservations(stores: &Stores, book: &mut AllocatorState) {
    for remap in stores.remaps.state() {
        if super::claim::is_final(&remap) {
            continue;
        }
        if let Some(record) = parse_record(&remap)
            && !record.state.is_finished()
            && let Some(mapping) = destination_mapping(&record)
        {
            book.reserve(&reservation_key(&remap.name_any()), &record.pool, mapping);
        }
    }
}

/// What the drive loop reacts to.
enum Input {
    Planner(Event),
    /// The copy (or the re-check) of a cycle ended: the cycle's map, or why it failed.
    CopyDone {
        cycle: u32,
        result: std::result::Result<(VolumeMapping, bool, u64), String>,
    },
    /// The coordinator's own hold timer of (attempt, cycle) expired.
    HoldTimer {
        attempt: u32,
        cycle: u32,
    },
}

/// Entry from the remap controller for a remap the coordinator drives.
pub async fn reconcile(remap: Arc<VolumeRemap>, ctx: Arc<Context>) -> Result<Action> {
    let (record, resource_version, restarted) = match parse_record(&remap) {
        Some(record) => (record, remap.resource_version(), true),
        None => match start(&remap, &ctx).await? {
            Ok((record, rv)) => (record, rv, false),
            Err(action) => return Ok(action),
        },
    };
    if record.state.is_finished() {
        // Ended before a restart (the status may lag in the cache): nothing is in flight.
        let mut book = ctx.allocator.lock().await;
        book.release(&reservation_key(&remap.name_any()));
        return Ok(Action::await_change());
    }
    let mut driver = Driver::new(remap, ctx, record);
    // Every later write is conditional on the version this driver read or wrote: a second
    // writer (an old leader that has not noticed it lost the Lease) makes this one stop.
    driver.resource_version = resource_version;
    driver.prepare().await?;
    if restarted {
        driver.resume_reservation().await;
        driver.input(Input::Planner(Event::Restarted)).await?;
    } else {
        driver.input(Input::Planner(Event::Start)).await?;
    }
    driver.run().await
}

/// Plans the operation and writes its record. `Err(action)`: not started (waiting, or failed
/// before anything happened).
/// The record and the resourceVersion written.
type Started = (Record, Option<String>);

async fn start(remap: &VolumeRemap, ctx: &Context) -> Result<std::result::Result<Started, Action>> {
    let name = remap.name_any();
    let remaps: Api<VolumeRemap> = Api::all(ctx.client.clone());
    let volumes: Api<VirtualVolume> = Api::all(ctx.client.clone());
    // One active remap per volume: the oldest unfinished one goes first.
    let key = |r: &VolumeRemap| {
        (
            r.metadata.creation_timestamp.clone().map(|t| t.0),
            r.name_any(),
        )
    };
    let ahead = ctx
        .stores
        .remaps
        .state()
        .iter()
        .filter(|r| {
            r.spec.volume_name == remap.spec.volume_name
                && r.name_any() != name
                && !super::claim::is_final(r)
                && (r.annotations().contains_key(STATE_ANNOTATION) || key(r) < key(remap))
        })
        .map(|r| r.name_any())
        .next();
    if let Some(other) = ahead {
        let message = format!(
            "waiting: remap {other} of volume {} runs first (one remap per volume)",
            remap.spec.volume_name
        );
        if remap.status.as_ref().and_then(|s| s.message.as_deref()) != Some(message.as_str()) {
            patch_status(
                &remaps,
                &name,
                json!({ "phase": RemapPhase::Pending, "message": message }),
                None,
            )
            .await?;
            ctx.publish(
                &reference(remap),
                EventType::Warning,
                "MasterConflict",
                "Remap",
                message,
                None,
            )
            .await;
        }
        return Ok(Err(Action::requeue(ctx.config.wait_retry)));
    }
    let Some(volume) = volumes.get_opt(&remap.spec.volume_name).await? else {
        return fail_early(
            ctx,
            remap,
            format!("volume {} does not exist", remap.spec.volume_name),
        )
        .await;
    };
    let Some(mapping) = volume.status.as_ref().and_then(|s| s.mapping.clone()) else {
        return Ok(Err(Action::requeue(ctx.config.wait_retry)));
    };
    let participants = attached_nodes(&volume);
    if !participants.is_empty()
        && let Err(reason) = ctx.node_control.available()
    {
        let message = format!(
            "volume {} is attached to {}: {reason}",
            volume.name_any(),
            participants.join(", ")
        );
        if let Some(claim) = claim_reference_from_labels(remap) {
            ctx.publish(
                &claim,
                EventType::Warning,
                "VictimSkipped",
                "Reclaim",
                message.clone(),
                Some(reference(&volume)),
            )
            .await;
            return fail_early(ctx, remap, message).await;
        }
        if remap.status.as_ref().and_then(|s| s.message.as_deref()) != Some(message.as_str()) {
            patch_status(
                &remaps,
                &name,
                json!({ "phase": RemapPhase::Pending, "message": message }),
                None,
            )
            .await?;
        }
        return Ok(Err(Action::requeue(ctx.config.resync)));
    }
    let Some(pool) = ctx
        .stores
        .pools
        .get(&ObjectRef::new(&volume.spec.pool_name))
    else {
        return fail_early(
            ctx,
            remap,
            format!("pool {} does not exist", volume.spec.pool_name),
        )
        .await;
    };
    let es = extent_size(&pool)?;
    let size = volume.spec.size_bytes.max(0) as u64;
    let extents = es.extents_for(size);
    let op = &remap.spec.operation;

    let mut book = ctx.allocator.lock().await;
    let plan = match op.type_ {
        RemapOperationType::ReleaseRanges => {
            let Some(release) = &op.release_ranges else {
                return fail_early(ctx, remap, "releaseRanges is not set".into()).await;
            };
            let mut named = Vec::new();
            for range in &release.ranges {
                let (offset, length) = (range.offset.max(0) as u64, range.length.max(0) as u64);
                let end = offset + length;
                if !es.is_aligned(offset) || !(es.is_aligned(end) || end == size) || end > size {
                    drop(book);
                    return fail_early(
                        ctx,
                        remap,
                        format!(
                            "range [{offset}, {end}) is not aligned to the pool's {} byte \
                             extents or is outside the volume",
                            es.get()
                        ),
                    )
                    .await;
                }
                named.push(ExtentRange::new(offset / es.get(), es.extents_for(length)));
            }
            Plan::Release {
                extents: coalesce(named).iter().map(|r| (r.start, r.len)).collect(),
                tier: release.tier,
                released: None,
                discard: release.discard,
            }
        }
        RemapOperationType::Move | RemapOperationType::EvacuateArea => {
            // Which virtual extents move, and the areas they may not go to.
            let mut moved: Vec<u64> = Vec::new();
            let mut excluded_areas: BTreeSet<String> = BTreeSet::new();
            let mut allowed: Option<BTreeSet<String>> = None;
            if let Some(m) = &op.r#move {
                for range in &m.ranges {
                    let start = range.offset.max(0) as u64 / es.get();
                    let end = es
                        .extents_for((range.offset + range.length).max(0) as u64)
                        .min(extents);
                    moved.extend(start..end);
                }
                if !m.target_areas.is_empty() {
                    allowed = Some(m.target_areas.iter().cloned().collect());
                }
                moved.retain(|&e| !replicas_at(&mapping, e).is_empty());
                for &e in &moved {
                    excluded_areas.extend(replicas_at(&mapping, e).into_iter().map(|r| r.area));
                }
            } else if let Some(ev) = &op.evacuate_area {
                moved = (0..extents)
                    .filter(|&e| replicas_at(&mapping, e).iter().any(|r| r.area == ev.area))
                    .collect();
                excluded_areas.insert(ev.area.clone());
                if ev.other_nodes_only {
                    let node = ctx
                        .stores
                        .areas
                        .get(&ObjectRef::new(&ev.area))
                        .map(|a| a.spec.node_name.clone());
                    for area in ctx.stores.areas.state() {
                        if Some(&area.spec.node_name) == node.as_ref() {
                            excluded_areas.insert(area.name_any());
                        }
                    }
                }
            }
            moved.sort_unstable();
            moved.dedup();
            if moved.is_empty() {
                drop(book);
                return fail_early(ctx, remap, "no mapped extent to move".into()).await;
            }
            let copies = replicas_at(&mapping, moved[0]).len().clamp(1, 3) as u8;
            let stores = &ctx.stores;
            book.forget_cached(|v| stores.volumes.get(&ObjectRef::new(v)).is_some());
            let view = PoolView::build(
                Arc::clone(&pool),
                &stores.areas.state(),
                &stores.volumes.state(),
                book.reservations(&volume.spec.pool_name),
            )?;
            let candidates: Vec<_> = view
                .area_candidates()
                .into_iter()
                .filter(|c| !excluded_areas.contains(c.area.as_str()))
                .filter(|c| allowed.as_ref().is_none_or(|a| a.contains(c.area.as_str())))
                .collect();
            let request = PlacementRequest {
                extents: moved.len() as u64,
                copies,
                layout: VolumeLayout::Concatenated,
                media_type: None,
                preferred_node: None,
            };
            let placement = match plan_placement(
                &candidates,
                &request,
                &PlacementRules::from(&pool.spec.placement),
            ) {
                Ok(p) => p,
                Err(e) => {
                    drop(book);
                    return fail_early(
                        ctx,
                        remap,
                        format!("no room for the moved extents: {}: {e}", e.reason()),
                    )
                    .await;
                }
            };
            // Per replica, the destination of the i-th moved extent.
            let mut per_replica: Vec<Vec<ReplicaLocation>> = Vec::new();
            for replica in &placement.replicas {
                let mut flat = Vec::new();
                for piece in &replica.pieces {
                    for k in 0..piece.len {
                        flat.push(ReplicaLocation {
                            area: piece.area.as_str().to_string(),
                            area_offset: ((piece.area_offset + k) * es.get()) as i64,
                        });
                    }
                }
                per_replica.push(flat);
            }
            let moves = moved
                .iter()
                .enumerate()
                .map(|(i, &e)| (e, per_replica.iter().map(|r| r[i].clone()).collect()))
                .collect();
            Plan::Move {
                moves,
                chunk_extents: es
                    .extents_for(remap.spec.copy.chunk_bytes.max(1) as u64)
                    .max(1),
            }
        }
    };
    let state = RemapState::new(
        remap.uid().unwrap_or_else(|| name.clone()),
        participants,
        Generation(mapping.generation.max(0) as u64),
        Policy::from(&remap.spec.policy),
        true,
    );
    let mut record = Record {
        state,
        volume: volume.name_any(),
        pool: volume.spec.pool_name.clone(),
        size_bytes: volume.spec.size_bytes,
        base: mapping,
        plan,
        maps: BTreeMap::new(),
        chunk: Vec::new(),
        progress: None,
        copier: None,
    };
    record.chunk = record.next_chunk();
    // Intent: the record (with the reserved destinations) is in the API before the lock is
    // released, so nobody else can plan the same extents.
    let text = serde_json::to_string(&record)?;
    let written = remaps
        .patch(
            &name,
            &field_manager(),
            &Patch::Merge(json!({
                "metadata": {
                    "resourceVersion": remap.resource_version(),
                    "annotations": { STATE_ANNOTATION: text },
                }
            })),
        )
        .await?;
    if let Some(dest) = destination_mapping(&record) {
        book.reserve(&reservation_key(&name), &record.pool, dest);
    }
    drop(book);
    Ok(Ok((record, written.resource_version())))
}

async fn fail_early<T>(
    ctx: &Context,
    remap: &VolumeRemap,
    message: String,
) -> Result<std::result::Result<T, Action>> {
    let remaps: Api<VolumeRemap> = Api::all(ctx.client.clone());
    patch_status(
        &remaps,
        &remap.name_any(),
        json!({
            "phase": RemapPhase::Failed,
            "completionTime": Time(now()),
            "message": message,
            "observedGeneration": remap.metadata.generation,
        }),
        None,
    )
    .await?;
    ctx.publish(
        &reference(remap),
        EventType::Warning,
        "Failed",
        "Remap",
        message,
        None,
    )
    .await;
    Ok(Err(Action::await_change()))
}

struct Driver {
    remap: Arc<VolumeRemap>,
    ctx: Arc<Context>,
    record: Record,
    resource_version: Option<String>,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
    tasks: JoinSet<()>,
    suspend: Option<Arc<AtomicBool>>,
    hold_timer: Option<(u32, u32)>,
    /// The status this driver wrote last (without its times): an unchanged one is not
    /// written again.
    last_status: Option<serde_json::Value>,
}

impl Driver {
    fn new(remap: Arc<VolumeRemap>, ctx: Arc<Context>, record: Record) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Driver {
            resource_version: None,
            remap,
            ctx,
            record,
            tx,
            rx,
            tasks: JoinSet::new(),
            suspend: None,
            hold_timer: None,
            last_status: None,
        }
    }

    fn name(&self) -> String {
        self.remap.name_any()
    }

    async fn resume_reservation(&self) {
        if let Some(dest) = destination_mapping(&self.record) {
            let mut book = self.ctx.allocator.lock().await;
            book.reserve(&reservation_key(&self.name()), &self.record.pool, dest);
        }
    }

    /// Before the first step of this drive: the copier of a move nobody uses, and the move's
    /// destinations published for the lenders (`status.incoming`) before anything is copied.
    async fn prepare(&mut self) -> Result<()> {
        if !self.record.state.is_finished() {
            // Nobody uses the volume: one node copies every chunk, the node of the first
            // moved extent's source (it reads that much locally); recorded before use.
            if self.record.state.active_nodes().is_empty()
                && self.record.copier.is_none()
                && let Plan::Move { moves, .. } = &self.record.plan
                && let Some(first) = moves.keys().next()
            {
                let committed = self.record.committed();
                self.record.copier = replicas_at(&committed, *first).iter().find_map(|r| {
                    self.ctx
                        .stores
                        .areas
                        .get(&ObjectRef::new(&r.area))
                        .map(|a| a.spec.node_name.clone())
                });
                if self.record.copier.is_some() {
                    self.persist().await?;
                }
            }
            self.set_incoming().await?;
        }
        Ok(())
    }

    async fn run(mut self) -> Result<Action> {
        while !self.record.state.is_finished() {
            tokio::select! {
                input = self.rx.recv() => match input {
                    Some(input) => self.input(input).await?,
                    None => break,
                },
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
        self.tasks.abort_all();
        self.finish().await?;
        Ok(Action::await_change())
    }

    /// One input: into the planner, write the new state, then carry out the commands.
    async fn input(&mut self, input: Input) -> Result<()> {
        let event = match input {
            Input::Planner(event) => event,
            Input::CopyDone { cycle, result } => {
                if cycle != self.record.state.cycle
                    || self.record.state.phase != RemapPhase::Copying
                {
                    return Ok(());
                }
                match result {
                    Ok((map, more, released)) => {
                        self.record.maps.insert(map.generation, map);
                        if let Plan::Release { released: r, .. } = &mut self.record.plan {
                            *r = Some(released);
                        }
                        Event::CopyFinished {
                            cycle,
                            result: Ok(CopyOutcome { more }),
                        }
                    }
                    Err(cause) => Event::CopyFinished {
                        cycle,
                        result: Err(cause),
                    },
                }
            }
            Input::HoldTimer { attempt, cycle } => {
                let s = &self.record.state;
                if attempt != s.attempt
                    || cycle != s.cycle
                    || !matches!(s.phase, RemapPhase::Quiescing | RemapPhase::Copying)
                {
                    return Ok(());
                }
                let Some(node) = s.active_nodes().into_iter().next() else {
                    return Ok(());
                };
                Event::HoldTimeout { node, attempt }
            }
        };
        let before = self.record.state.clone();
        let event_name = format!("{event:?}");
        let (next, commands) = step(before.clone(), event);
        tracing::debug!(remap = %self.name(), event = %event_name.chars().take(120).collect::<String>(),
            from = ?before.phase, to = ?next.phase, commands = commands.len(), "coordinator step");
        self.record.state = next;
        let s = &self.record.state;
        // A new hold (cycle or attempt): decide what it holds before anything is sent. With no
        // participants the planner passes Quiescing within one step, so the cycle counts too.
        if before.cycle != s.cycle
            || before.attempt != s.attempt
            || (s.phase == RemapPhase::Quiescing && before.phase != RemapPhase::Quiescing)
        {
            self.record.chunk = self.record.next_chunk();
        }
        // Maps older than the committed one are never staged or recorded again.
        let committed = s.committed_generation.get() as i64;
        self.record.maps.retain(|g, _| *g >= committed);
        // 635: the restore map is the last committed layout at a new generation (the copied
        // extents hold the newest data; see docs/remap.md).
        if let Some(restore) = self.record.state.restore_generation {
            let g = restore.get() as i64;
            if !self.record.maps.contains_key(&g) {
                let mut map = self.record.committed();
                map.generation = g;
                self.record.maps.insert(g, map);
            }
        }
        for c in &commands {
            if let Command::Report { message, .. } = c {
                self.record.progress = Some(message.clone());
            }
        }
        if self.record.state.is_finished() {
            // The last state is only written once its effects are done: a finished record is
            // never resumed, so a crash in between must leave the previous state, which
            // re-issues them (RecordMapping, fences are idempotent).
            let (reports, effects): (Vec<_>, Vec<_>) = commands
                .into_iter()
                .partition(|c| matches!(c, Command::Report { .. }));
            for command in effects {
                self.execute(command).await?;
            }
            self.persist().await?;
            for command in reports {
                self.execute(command).await?;
            }
        } else {
            // Write-ahead only where something is about to happen: a step that only records
            // an answer (the others are still awaited) acts on nothing, and a restart from the
            // previous record re-sends that message, which the node answers again from its
            // record (idempotent steps). Timers and events need no record either. Nor does
            // entering Copying: the copy only writes reserved destinations and is repeated
            // whole by a restart from the Quiescing record (whose re-sent quiesces the nodes
            // answer again), so that write would only lengthen the hold. Inside a hold this
            // more than halves the API writes (docs/benchmarks/remap.md).
            let acts = commands.iter().any(|c| {
                !matches!(
                    c,
                    Command::StartTimer { .. } | Command::Report { .. } | Command::Copy { .. }
                )
            });
            let entered = self.record.state.phase != before.phase
                && self.record.state.phase != RemapPhase::Copying;
            if acts || entered {
                self.persist().await?;
            }
            for command in commands {
                self.execute(command).await?;
            }
        }
        self.arm_hold_timer();
        Ok(())
    }

    /// The coordinator's own hold timer (the node's HoldTimeout report has no channel to the
    /// operator; a timer started when the quiesce is sent expires no later than the node's,
    /// which starts at the first parked request).
    fn arm_hold_timer(&mut self) {
        let s = &self.record.state;
        if s.phase != RemapPhase::Quiescing || s.active_nodes().is_empty() {
            return;
        }
        let key = (s.attempt, s.cycle);
        if self.hold_timer == Some(key) {
            return;
        }
        self.hold_timer = Some(key);
        let after = Duration::from_millis(self.remap.spec.policy.hold_timeout_ms.max(1) as u64);
        let tx = self.tx.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Input::HoldTimer {
                attempt: key.0,
                cycle: key.1,
            });
        });
    }

    /// Write-ahead: the record (conditional on the resourceVersion this driver wrote last),
    /// then the status.
    async fn persist(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        let result = self.persist_record().await;
        tracing::debug!(remap = %self.name(), phase = ?self.record.state.phase,
            persist_us = started.elapsed().as_micros() as u64, "record written");
        result
    }

    async fn persist_record(&mut self) -> Result<()> {
        let remaps: Api<VolumeRemap> = Api::all(self.ctx.client.clone());
        let name = self.name();
        let text = serde_json::to_string(&self.record)?;
        let mut meta = json!({ "annotations": { STATE_ANNOTATION: text } });
        if let Some(rv) = &self.resource_version {
            meta["resourceVersion"] = json!(rv);
        }
        let written = remaps
            .patch(
                &name,
                &field_manager(),
                &Patch::Merge(json!({ "metadata": meta })),
            )
            .await?;
        let s = &self.record.state;
        let message = s.message.clone().or_else(|| self.record.progress.clone());
        let mut status = json!({
            "phase": s.phase,
            "attempt": s.attempt,
            "targetGeneration": if s.is_finished() { s.committed_generation.get() } else { s.target_generation.get() },
            "participants": s.participants_status(),
            "message": message,
            "observedGeneration": self.remap.metadata.generation,
        });
        if !s.is_finished() && self.last_status.as_ref() == Some(&status) {
            self.resource_version = written.resource_version();
            return Ok(());
        }
        // startTime once: the object read at the start of this reconcile has none, and no
        // status was written by this driver yet.
        if self.last_status.is_none()
            && self
                .remap
                .status
                .as_ref()
                .and_then(|st| st.start_time.as_ref())
                .is_none()
        {
            status["startTime"] = json!(Time(now()));
        }
        self.last_status = Some(status.clone());
        if s.is_finished() {
            status["completionTime"] = json!(Time(now()));
        }
        let written = patch_status(
            &remaps,
            &name,
            status,
            written.resource_version().as_deref(),
        )
        .await?;
        self.resource_version = written.resource_version();
        Ok(())
    }

    fn op(&self, attempt: u32, generation: Generation) -> OperationRef {
        OperationRef {
            volume: self.record.volume.clone(),
            operation_id: self.record.state.operation_id.clone(),
            attempt,
            generation: generation.get() as i64,
        }
    }

    async fn execute(&mut self, command: Command) -> Result<()> {
        match command {
            Command::Send(message) => self.send(message),
            Command::StartTimer {
                round,
                kind,
                after_ms,
            } => {
                let tx = self.tx.clone();
                self.tasks.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    let _ = tx.send(Input::Planner(Event::Timer { round, kind }));
                });
            }
            Command::Fence { node, cause } => self.fence(&node, &cause).await?,
            Command::RecordMapping { generation } => self.record_mapping(generation).await?,
            Command::Copy { cycle } => self.copy(cycle),
            Command::SuspendCopy { .. } => {
                if let Some(flag) = &self.suspend {
                    flag.store(true, Ordering::SeqCst);
                }
            }
            Command::Report { reason, message } => {
                let warning = matches!(
                    reason,
                    "QuiesceFailed"
                        | "NodeExcluded"
                        | "HoldTimeout"
                        | "CommitFailed"
                        | "Failed"
                        | "RecoveryFailed"
                        | "CopyFailed"
                        | "QuiesceRetry"
                );
                let type_ = if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                };
                let volume = ObjectRef::<VirtualVolume>::new(&self.record.volume);
                let related = self
                    .ctx
                    .stores
                    .volumes
                    .get(&volume)
                    .map(|v| reference(v.as_ref()));
                self.ctx
                    .publish(
                        &reference(self.remap.as_ref()),
                        type_,
                        reason,
                        "Remap",
                        message,
                        related,
                    )
                    .await;
            }
        }
        Ok(())
    }

    fn send(&mut self, message: NodeMessage) {
        let op = self.op(message.attempt, message.generation);
        let policy = &self.remap.spec.policy;
        let (request, timeout_ms) = match message.step {
            NodeStep::Stage => {
                let g = message.generation.get() as i64;
                let mapping = self.record.maps.get(&g).cloned().unwrap_or_else(|| {
                    let mut m = self.record.committed();
                    m.generation = g;
                    m
                });
                (
                    NodeRequest::Stage {
                        op,
                        mapping,
                        size_bytes: self.record.size_bytes,
                    },
                    policy.commit_timeout_ms,
                )
            }
            NodeStep::Quiesce => (
                NodeRequest::Quiesce {
                    op,
                    ranges: self.record.scope(),
                    hold_timeout_ms: policy.hold_timeout_ms.max(0) as u64,
                },
                policy.quiesce_timeout_ms,
            ),
            NodeStep::Commit => (NodeRequest::Commit(op), policy.commit_timeout_ms),
            NodeStep::Rollback => (NodeRequest::Rollback(op), policy.commit_timeout_ms),
            NodeStep::Resume => (NodeRequest::Resume(op), policy.commit_timeout_ms),
        };
        let control = Arc::clone(&self.ctx.node_control);
        let tx = self.tx.clone();
        let timeout = Duration::from_millis(timeout_ms.max(1) as u64);
        let volume = self.record.volume.clone();
        self.tasks.spawn(async move {
            let outcome = match control.call(&message.node, request, timeout).await {
                Ok(answer) => NodeOutcome::Done {
                    active: Generation(answer.active_generation.max(0) as u64),
                },
                Err(NodeCallError::Refused(cause)) | Err(NodeCallError::NotConfigured(cause)) => {
                    // A Resume refused by a node that runs again (it restarted after resuming
                    // and lost its answer) counts as done when it runs the expected map.
                    let not_held_active = if message.step == NodeStep::Resume {
                        match control.gate_state(&message.node, &volume, timeout).await {
                            Ok(g) if g.state == "Running" => {
                                Some(Generation(g.active_generation.max(0) as u64))
                            }
                            _ => None,
                        }
                    } else {
                        None
                    };
                    NodeOutcome::Refused {
                        cause,
                        not_held_active,
                    }
                }
                // No answer: the phase deadline turns it into a timeout.
                Err(NodeCallError::Unreachable(e)) => {
                    tracing::debug!(node = %message.node, step = %message.step, error = %e, "no answer");
                    return;
                }
            };
            let _ = tx.send(Input::Planner(Event::Reply {
                node: message.node,
                step: message.step,
                attempt: message.attempt,
                generation: message.generation,
                outcome,
            }));
        });
    }

    /// Exclusion (611/617): a best-effort Fence to the node, and its attachment marked Fenced,
    /// before the next command is carried out.
    async fn fence(&mut self, node: &str, cause: &str) -> Result<()> {
        let s = &self.record.state;
        let op = self.op(s.attempt, s.target_generation);
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            self.ctx
                .node_control
                .call(node, NodeRequest::Fence(op), Duration::from_secs(2)),
        )
        .await;
        match &answer {
            // The node has not staged the volume: nothing to cut, and no attachment to mark
            // (one would keep the volume "attached" to a node that never used it).
            Ok(Ok(a)) if a.state == ABSENT_STATE => return Ok(()),
            Ok(Ok(_)) => {}
            _ => tracing::warn!(
                node,
                cause,
                "fence not acknowledged by the node; marked Fenced"
            ),
        }
        let applied = self.record.state.committed_generation.get() as i64;
        update_volume_status(&self.ctx, &self.record.volume, |volume| {
            let mut attachments = volume
                .status
                .as_ref()
                .map(|s| s.attachments.clone())
                .unwrap_or_default();
            match attachments.iter_mut().find(|a| a.node == node) {
                Some(a) if a.state == AttachmentState::Fenced => return None,
                Some(a) => a.state = AttachmentState::Fenced,
                None => attachments.push(tessera_api::v1alpha1::VolumeAttachment {
                    node: node.to_string(),
                    applied_generation: applied,
                    state: AttachmentState::Fenced,
                    unhealthy_areas: Vec::new(),
                }),
            }
            Some(json!({ "attachments": attachments }))
        })
        .await
    }

    /// `VirtualVolume.status.mapping` := the map of `generation`, conditional on the version
    /// read, and only forwards.
    async fn record_mapping(&mut self, generation: Generation) -> Result<()> {
        let g = generation.get() as i64;
        let Some(map) = self.record.maps.get(&g).cloned() else {
            return Err(Error::MissingField("the map of the committed generation"));
        };
        update_volume_status(&self.ctx, &self.record.volume, |volume| {
            let current = volume
                .status
                .as_ref()
                .and_then(|s| s.mapping.as_ref())
                .map_or(0, |m| m.generation);
            (current < g).then(|| json!({ "mapping": map }))
        })
        .await
    }

    /// 631/632: the cycle's copy (moves) or re-check (release), in a task; the result comes
    /// back as [`Input::CopyDone`].
    fn copy(&mut self, cycle: u32) {
        let flag = Arc::new(AtomicBool::new(false));
        self.suspend = Some(Arc::clone(&flag));
        let record = self.record.clone();
        let ctx = Arc::clone(&self.ctx);
        let tx = self.tx.clone();
        let timeout = Duration::from_millis(self.remap.spec.policy.commit_timeout_ms.max(1) as u64);
        self.tasks.spawn(async move {
            let result = match &record.plan {
                Plan::Release {
                    extents,
                    tier,
                    discard,
                    ..
                } => recheck(&record, &ctx, extents, *tier, *discard, timeout).await,
                Plan::Move { moves, .. } => copy_chunk(&record, &ctx, moves, &flag, timeout).await,
            };
            let _ = tx.send(Input::CopyDone { cycle, result });
        });
    }

    /// `VirtualVolume.status.incoming` := this move's destinations, before anything is copied:
    /// their lenders zero them for the volume and grant them to its access nodes ahead of the
    /// commit (docs/remap.md §5a "Grants"). Idempotent; a release has no destinations.
    async fn set_incoming(&self) -> Result<()> {
        let Some(dest) = destination_mapping(&self.record) else {
            return Ok(());
        };
        // Contiguous destinations of one area are merged: every VirtualVolume write carries
        // this list for as long as the move runs.
        let mut pieces: Vec<(String, i64, i64)> = dest
            .extents
            .iter()
            .flat_map(|run| {
                run.replicas
                    .iter()
                    .map(|r| (r.area.clone(), r.area_offset, run.length))
            })
            .collect();
        pieces.sort();
        let mut ranges: Vec<AreaRange> = Vec::new();
        for (area, area_offset, length) in pieces {
            match ranges.last_mut() {
                Some(last)
                    if last.area == area && last.area_offset + last.length == area_offset =>
                {
                    last.length += length;
                }
                _ => ranges.push(AreaRange {
                    area,
                    area_offset,
                    length,
                }),
            }
        }
        let incoming = IncomingExtents {
            remap: self.name(),
            ranges,
            copier: self.record.copier.clone(),
        };
        let volumes: Api<VirtualVolume> = Api::all(self.ctx.client.clone());
        patch_status(
            &volumes,
            &self.record.volume,
            json!({ "incoming": incoming }),
            None,
        )
        .await?;
        Ok(())
    }

    /// Removes `status.incoming` if this operation wrote it: destinations that go back to the
    /// pool must not stay granted to the volume's nodes. Errors propagate (the reconcile retries
    /// `finish`), and the reservation is released only afterwards.
    async fn clear_incoming(&self) -> Result<()> {
        let name = self.name();
        update_volume_status(&self.ctx, &self.record.volume, |volume| {
            let ours = volume
                .status
                .as_ref()
                .and_then(|s| s.incoming.as_ref())
                .is_some_and(|i| i.remap == name);
            ours.then(|| json!({ "incoming": null }))
        })
        .await
    }

    /// The operation ended: reservations, claim events, metrics.
    async fn finish(&mut self) -> Result<()> {
        let s = self.record.state.clone();
        let name = self.name();
        self.clear_incoming().await?;
        {
            let mut book = self.ctx.allocator.lock().await;
            if s.phase == RemapPhase::Succeeded {
                wait_for_generation(
                    &self.ctx,
                    &self.record.volume,
                    s.committed_generation.get() as i64,
                )
                .await;
            }
            book.release(&reservation_key(&name));
        }
        let Plan::Release { tier, released, .. } = &self.record.plan else {
            return Ok(());
        };
        let claim = claim_reference_from_labels(self.remap.as_ref());
        if s.phase != RemapPhase::Succeeded {
            return Ok(());
        }
        let released = released.unwrap_or(0);
        let es = self.record.extent_size();
        let volume = self
            .ctx
            .stores
            .volumes
            .get(&ObjectRef::new(&self.record.volume));
        let copies = volume
            .as_ref()
            .map_or(1, |v| v.spec.copies.clamp(1, 3) as u64);
        let tier_name = match tier {
            ReclaimTier::Unused => "Unused",
            ReclaimTier::LowPriority => "LowPriority",
        };
        self.ctx
            .metrics
            .count_reclaim(&self.record.pool, tier_name, released * copies * es);
        let message = format!(
            "released {released} extents ({}) of tier {tier_name} from attached volume {} under \
             a quiesce, mapping generation {} → {}",
            human_bytes(released * es),
            self.record.volume,
            s.base_generation,
            s.committed_generation,
        );
        if let Some(v) = &volume {
            let (reason, type_) = match tier {
                ReclaimTier::Unused => ("RangesReleased", EventType::Normal),
                ReclaimTier::LowPriority => ("LowPriorityDataReleased", EventType::Warning),
            };
            self.ctx
                .publish(
                    &reference(v.as_ref()),
                    type_,
                    reason,
                    "Reclaim",
                    message.clone(),
                    claim.clone(),
                )
                .await;
        }
        if let Some(claim) = &claim {
            self.ctx
                .publish(
                    claim,
                    EventType::Normal,
                    "AreaReturned",
                    &format!("Returned{tier_name}"),
                    message,
                    volume.as_ref().map(|v| reference(v.as_ref())),
                )
                .await;
        }
        Ok(())
    }
}

/// A read-modify-write of `VirtualVolume.status`, conditional on the version read and retried
/// on conflict (10 times): `change` gives the merge patch of the status, or `None` when there
/// is nothing to write. A volume that is gone needs nothing.
pub(crate) async fn update_volume_status(
    ctx: &Context,
    volume: &str,
    change: impl Fn(&VirtualVolume) -> Option<serde_json::Value>,
) -> Result<()> {
    let volumes: Api<VirtualVolume> = Api::all(ctx.client.clone());
    for _ in 0..10 {
        let Some(current) = volumes.get_opt(volume).await? else {
            return Ok(());
        };
        let Some(patch) = change(&current) else {
            return Ok(());
        };
        match patch_status(
            &volumes,
            volume,
            patch,
            current.resource_version().as_deref(),
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Stale(format!(
        "VirtualVolume {volume}: status kept conflicting"
    )))
}

/// Polls the volume cache until it shows `generation` (5 s at most).
async fn wait_for_generation(ctx: &Context, volume: &str, generation: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let cached = ctx
            .stores
            .volumes
            .get(&ObjectRef::new(volume))
            .and_then(|v| {
                v.status
                    .as_ref()
                    .and_then(|s| s.mapping.as_ref())
                    .map(|m| m.generation)
            });
        if cached.is_some_and(|g| g >= generation) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The release's re-check under the hold: the participants' usage views (read while held, so
/// no write to the held extents is in flight), or the volume's last report when no node uses
/// it; only extents still in the tier's state are unmapped.
async fn recheck(
    record: &Record,
    ctx: &Context,
    extents: &[(u64, u64)],
    tier: ReclaimTier,
    discard: bool,
    timeout: Duration,
) -> std::result::Result<(VolumeMapping, bool, u64), String> {
    let nodes = record.state.active_nodes();
    let mut report = UsageReport::default();
    if nodes.is_empty() {
        let volumes: Api<VirtualVolume> = Api::all(ctx.client.clone());
        let volume = volumes
            .get(&record.volume)
            .await
            .map_err(|e| format!("reading volume {}: {e}", record.volume))?;
        if let Ok(Some(r)) = UsageReport::of_volume(&volume) {
            report = r;
        }
    }
    for node in &nodes {
        let answer = ctx
            .node_control
            .report_usage(node, &record.volume, timeout)
            .await
            .map_err(|e| format!("usage of node {node} under the hold: {e}"))?;
        let decode = |bytes: &[u8]| {
            if bytes.is_empty() {
                Ok(RoaringBitmap::new())
            } else {
                RoaringBitmap::deserialize_from(bytes)
                    .map_err(|e| format!("usage bitmap of node {node}: {e}"))
            }
        };
        report.in_use |= decode(&answer.in_use)?;
        report.high_priority |= decode(&answer.high_priority)?;
    }
    let committed = record.committed();
    let states = extent_states(&committed, record.size_bytes, Some(&report));
    let named: Vec<ExtentRange> = extents
        .iter()
        .map(|&(s, l)| ExtentRange::new(s, l))
        .collect();
    let kept = if discard {
        mapped_named(&states, &named)
    } else {
        recheck_under_hold(&states, &named, tier)
    };
    let released = total_len(&kept);
    let target = record.state.target_generation.get();
    let map = edit_map(
        record,
        &committed,
        |es, size| {
            let mut edits = Vec::new();
            for r in &kept {
                let offset = r.start * es;
                let end = (r.end() * es).min(size);
                edits.push(Edit::PunchHole {
                    range: ByteRange::new(offset, end - offset).map_err(|e| e.to_string())?,
                });
            }
            Ok(edits)
        },
        target,
    )?;
    Ok((map, false, released))
}

/// `committed` with `edits`, at generation `target`, validated through the model.
fn edit_map(
    record: &Record,
    committed: &VolumeMapping,
    edits: impl FnOnce(u64, u64) -> std::result::Result<Vec<Edit>, String>,
    target: u64,
) -> std::result::Result<VolumeMapping, String> {
    let model: ExtentMap = committed
        .to_model(record.size_bytes)
        .map_err(|e| format!("mapping of {}: {e}", record.volume))?;
    let es = model.extent_size().get();
    let next = model
        .edit(edits(es, model.size_bytes())?)
        .map_err(|e| e.to_string())?
        .with_generation(Generation(target));
    VolumeMapping::from_model(&next).map_err(|e| e.to_string())
}

/// One cycle of the online migration (seed 004 fourth embodiment, Figs. 22/25): the chunk's
/// extents are copied one COPY I/O at a time by one node ([`Migration`] decides the order and
/// reacts to a suspend); the cycle's map points the copied extents at their destination.
async fn copy_chunk(
    record: &Record,
    ctx: &Context,
    moves: &BTreeMap<u64, Vec<ReplicaLocation>>,
    suspend: &AtomicBool,
    timeout: Duration,
) -> std::result::Result<(VolumeMapping, bool, u64), String> {
    let chunk = record.chunk.clone();
    if chunk.is_empty() {
        // Nothing left to move (a restart after the last cycle's copy): an empty cycle.
        let mut map = record.committed();
        map.generation = record.state.target_generation.get() as i64;
        return Ok((map, false, 0));
    }
    let copier = copier_node(record, ctx)?;
    let es = record.extent_size();
    let mut migration = Migration::new(chunk.len() as u64);
    let mut actions = migration.copy_range(0..chunk.len() as u64);
    let mut suspended = false;
    while let Some(action) = actions.pop() {
        match action {
            CopyAction::CopyExtent(i) => {
                if !suspended && suspend.load(Ordering::SeqCst) {
                    suspended = true;
                    migration.suspend();
                }
                let e = chunk[i as usize];
                let offset = e * es;
                let length = es.min((record.size_bytes.max(0) as u64).saturating_sub(offset));
                let destination = moves
                    .get(&e)
                    .map(|to| to.iter().map(|r| (r.area.clone(), r.area_offset)).collect())
                    .unwrap_or_default();
                let s = &record.state;
                let op = OperationRef {
                    volume: record.volume.clone(),
                    operation_id: s.operation_id.clone(),
                    attempt: s.attempt,
                    generation: s.target_generation.get() as i64,
                };
                let result = ctx
                    .node_control
                    .call(
                        &copier,
                        NodeRequest::Copy {
                            op,
                            offset: offset as i64,
                            length: length as i64,
                            destination,
                        },
                        timeout,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|err| format!("copy of extent {e} on node {copier}: {err}"));
                if !suspended && suspend.load(Ordering::SeqCst) {
                    suspended = true;
                    migration.suspend();
                }
                actions = migration.copy_done(i, result);
            }
            CopyAction::ChunkDone => break,
            CopyAction::ChunkFailed { cause, .. } => return Err(cause),
            CopyAction::RequestSuspend => {
                suspended = true;
                migration.suspend();
            }
        }
    }
    let copied: Vec<u64> = migration
        .states()
        .iter()
        .enumerate()
        .filter(|(_, s)| **s == CopyState::Copied)
        .map(|(i, _)| chunk[i])
        .collect();
    let committed = record.committed();
    let remaining = moves
        .iter()
        .filter(|(e, to)| !copied.contains(e) && replicas_at(&committed, **e) != **to)
        .count();
    let target = record.state.target_generation.get();
    let map = edit_map(
        record,
        &committed,
        |es, size| {
            let mut edits = Vec::new();
            for e in &copied {
                let offset = e * es;
                let end = (offset + es).min(size);
                edits.push(Edit::Assign {
                    range: ByteRange::new(offset, end - offset).map_err(|x| x.to_string())?,
                    replicas: moves[e]
                        .iter()
                        .map(|r| ModelReplica::new(r.area.clone(), r.area_offset.max(0) as u64))
                        .collect(),
                });
            }
            Ok(edits)
        },
        target,
    )?;
    Ok((map, remaining > 0, copied.len() as u64))
}

/// The node that copies: the first active participant, else the node of a source area (a
/// volume no node uses still needs a node agent to move its bytes).
fn copier_node(record: &Record, ctx: &Context) -> std::result::Result<String, String> {
    if let Some(node) = record.state.active_nodes().into_iter().next() {
        return Ok(node);
    }
    if let Some(node) = &record.copier {
        return Ok(node.clone());
    }
    let committed = record.committed();
    for e in &record.chunk {
        for r in replicas_at(&committed, *e) {
            if let Some(area) = ctx.stores.areas.get(&ObjectRef::new(&r.area)) {
                return Ok(area.spec.node_name.clone());
            }
        }
    }
    Err("no node can copy the chunk (no participant and no source area)".into())
}
