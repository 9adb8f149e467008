//! One virtual volume on this node: translation through the active extent map, replicas, usage
//! and dirty tracking. See the module documentation of [`crate::engine`] for the guarantees.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::join_all;
use parking_lot::Mutex;
use roaring::RoaringBitmap;
use tessera_api::model::{
    AreaId, ByteRange, ExtentMap, ExtentSize, Generation, Placement, ReplicaLocation, SECTOR_SIZE,
    Segment, diff,
};
use tessera_api::v1alpha1::DataPriority;

use super::dirty::DirtyTracker;
use super::error::EngineError;
use super::gate::{
    Admission, Effect, GateState, HoldRecord, IoGate, Millis, OpRef, Refusal, RequestId, Span,
};
use super::health::{ReplicaHealth, VolumeHealth};
use super::mirror::{DirtyReports, LegMode, LegView, MirrorLegSpec};
use super::usage::{UsageDelta, UsageTracker};
use crate::backend::{AreaBackend, AreaRegistry, BackendError};

/// Most extents a volume may have: usage and dirty reports index extents with `u32`.
pub const MAX_EXTENTS: u64 = 1 << 32;

/// How the usage bitmaps start when a volume is opened.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum UsageInit {
    /// Every mapped extent in use, at the volume's priority. The safe choice when the history is
    /// unknown (a node plugin restart): nothing is reported unused that might hold data.
    #[default]
    AllMapped,
    /// Nothing in use (a volume created just now).
    Empty,
    /// Bits restored from elsewhere (for example the operator's last applied report). Bits of
    /// holes are dropped.
    Restored {
        in_use: RoaringBitmap,
        high_priority: RoaringBitmap,
    },
}

/// Options of [`Volume::open`].
#[derive(Debug, Clone, Default)]
pub struct VolumeOptions {
    /// The data priority from the volume's priority class (seed 000 data priority 424).
    pub priority: DataPriority,
    pub usage: UsageInit,
}

/// A data-changing request, issued to every healthy replica of a piece.
#[derive(Clone)]
enum Mutation {
    Write { data: Bytes, fua: bool },
    WriteZeroes { fua: bool },
    Trim,
}

/// COPY I/Os [`Volume::copy_range`] keeps in flight.
const COPY_DEPTH: usize = 4;

/// Default hold timer 215 (`holdTimeoutMs` of the CRD).
pub const DEFAULT_HOLD_TIMEOUT_MS: Millis = 30_000;

/// A snapshot of a volume's I/O gate.
#[derive(Debug, Clone, PartialEq)]
pub struct GateView {
    pub state: GateState,
    pub active: Generation,
    pub staged: Option<Generation>,
    pub operation_id: Option<String>,
    pub attempt: u32,
    pub in_flight: usize,
    pub parked: usize,
}

/// What a parked request is woken with: the map to translate with, or the fence refusal.
type Wakeup = tokio::sync::oneshot::Sender<Result<Arc<ExtentMap>, Refusal>>;

/// The I/O gate of the volume and the parked requests waiting on it.
struct GateCell {
    gate: IoGate,
    parked: HashMap<RequestId, Wakeup>,
    /// Timer 215, kept for a gate rebuilt by `restore_hold`.
    hold_timeout: Millis,
}

/// A volume is fenced: its requests fail (EIO).
fn fenced(volume: &str, refusal: Refusal) -> EngineError {
    EngineError::Fenced {
        volume: volume.to_string(),
        reason: refusal.to_string(),
    }
}

/// A request counted in flight by the gate; dropping it completes the request (also when its
/// future is dropped half-way), which may finish a drain.
struct InFlight<'a> {
    volume: &'a Volume,
    id: RequestId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let effects = self.volume.gate.lock().gate.complete(self.id);
        if !effects.is_empty() {
            // A quiesce answer became available (the gate recorded it): wake its waiters.
            self.volume.gate_changed.notify_waiters();
        }
    }
}

/// A virtual volume served by this node.
pub struct Volume {
    name: String,
    /// The active map (seed 004 plane 221a), mirrored from the gate for readers outside the
    /// data path (size, generation, health, usage). Requests take their map from the gate.
    map: ArcSwap<ExtentMap>,
    /// Serialises `swap_map` calls (check-then-store).
    swap_lock: Mutex<()>,
    /// The node I/O gate (seed 004 §7.1/§11.4, `engine::gate`): every request is admitted here.
    gate: Mutex<GateCell>,
    /// Signalled whenever the gate may have a new answer (a drain finished, a control call).
    gate_changed: tokio::sync::Notify,
    /// The gate's clock origin (monotonic).
    epoch: Instant,
    /// When the current hold was set (gate clock), for the hold window reported at resume.
    hold_since: Mutex<Option<std::time::Instant>>,
    areas: Arc<AreaRegistry>,
    health: ReplicaHealth,
    usage: UsageTracker,
    dirty: DirtyTracker,
    /// The secondary of a mirror pair this volume is the primary of (`engine::mirror`).
    leg: ArcSwapOption<MirrorLegSpec>,
    /// Why the leg was suspended (M-18), until it is set again.
    leg_failure: Mutex<Option<String>>,
    /// Dirty bits handed to the operator and not acknowledged yet.
    dirty_reports: Mutex<DirtyReports>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.map.load();
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("size_bytes", &map.size_bytes())
            .field("generation", &map.generation())
            .finish_non_exhaustive()
    }
}

impl Volume {
    /// Opens a volume with its current map. Every area the map names must be registered.
    pub fn open(
        name: impl Into<String>,
        map: Arc<ExtentMap>,
        areas: Arc<AreaRegistry>,
        options: VolumeOptions,
    ) -> Result<Volume, EngineError> {
        check_extent_count(&map)?;
        check_areas(&map, &areas)?;
        let extents = map.extent_count();
        let usage = UsageTracker::new(map.extent_size().get(), extents, options.priority);
        match options.usage {
            UsageInit::Empty => {}
            UsageInit::AllMapped => {
                for run in map.runs().iter().filter(|r| !r.is_hole()) {
                    usage.mark_written(extent_span(map.extent_size(), run.offset, run.end()));
                }
            }
            UsageInit::Restored {
                in_use,
                high_priority,
            } => {
                let mapped = |index: u32| {
                    map.extent_size()
                        .start_of(u64::from(index))
                        .and_then(|start| map.run_at(start))
                        .is_some_and(|run| !run.is_hole())
                };
                for index in in_use.iter().filter(|&i| mapped(i)) {
                    let priority = if high_priority.contains(index) {
                        DataPriority::High
                    } else {
                        DataPriority::Low
                    };
                    usage.set_priority(priority);
                    usage.mark_written(u64::from(index)..u64::from(index) + 1);
                }
                usage.set_priority(options.priority);
            }
        }
        let name = name.into();
        let gate = IoGate::new(name.clone(), Arc::clone(&map), DEFAULT_HOLD_TIMEOUT_MS);
        Ok(Volume {
            name,
            map: ArcSwap::new(map),
            swap_lock: Mutex::new(()),
            gate: Mutex::new(GateCell {
                gate,
                parked: HashMap::new(),
                hold_timeout: DEFAULT_HOLD_TIMEOUT_MS,
            }),
            gate_changed: tokio::sync::Notify::new(),
            epoch: Instant::now(),
            hold_since: Mutex::new(None),
            areas,
            health: ReplicaHealth::default(),
            usage,
            dirty: DirtyTracker::new(extents),
            leg: ArcSwapOption::empty(),
            leg_failure: Mutex::new(None),
            dirty_reports: Mutex::new(DirtyReports::default()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume's size in bytes under the active map.
    pub fn size(&self) -> u64 {
        self.map.load().size_bytes()
    }

    /// The active map's generation.
    pub fn generation(&self) -> Generation {
        self.map.load().generation()
    }

    /// The active map.
    pub fn map(&self) -> Arc<ExtentMap> {
        self.map.load_full()
    }

    /// Milliseconds on the gate's clock.
    pub fn now_ms(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    /// Admits a request through the I/O gate (seed 004 801–805', ARCHITECTURE §4 "I/O gate") and
    /// pins the map it is translated with: at once when its extents are not held (an
    /// uncontended lock and a counter), otherwise parked in arrival order until a Resume
    /// dispatches it on the then-active map, or failed when the volume is fenced. The returned
    /// guard keeps it counted in flight until the request ends.
    async fn pin(&self, span: Span) -> Result<(Arc<ExtentMap>, InFlight<'_>), EngineError> {
        let waiting = {
            let mut cell = self.gate.lock();
            match cell.gate.submit_span(span, self.now_ms()) {
                Admission::Admitted { id, map } => {
                    return Ok((map, InFlight { volume: self, id }));
                }
                Admission::Refused(refusal) => return Err(fenced(&self.name, refusal)),
                Admission::Parked { id } => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    cell.parked.insert(id, tx);
                    (id, rx)
                }
            }
        };
        let (id, rx) = waiting;
        match rx.await {
            Ok(Ok(map)) => Ok((map, InFlight { volume: self, id })),
            Ok(Err(refusal)) => Err(fenced(&self.name, refusal)),
            Err(_) => Err(EngineError::Fenced {
                volume: self.name.clone(),
                reason: "the gate was replaced while the request was parked".into(),
            }),
        }
    }

    /// The span of a byte request, for admission; `None` when the range overflows.
    fn span_of(&self, offset: u64, length: u64) -> Result<Span, EngineError> {
        if !offset.is_multiple_of(SECTOR_SIZE) || !length.is_multiple_of(SECTOR_SIZE) {
            return Err(EngineError::Unaligned { offset, length });
        }
        let range = ByteRange::new(offset, length).map_err(|_| EngineError::OutOfRange {
            offset,
            length,
            size_bytes: self.size(),
        })?;
        Ok(Span::of_bytes(range, self.map.load().extent_size()))
    }

    /// Runs a control call on the gate and carries out its data-path effects: dispatched
    /// requests are woken with their map, failed ones with the fence refusal, and the mirrored
    /// active map follows the gate (usage and dirty bitmaps grown first, released extents
    /// unmarked). The other effects (answers, hold records, timeouts) are returned.
    pub fn gate_control(&self, f: impl FnOnce(&mut IoGate, Millis) -> Vec<Effect>) -> Vec<Effect> {
        let now = self.now_ms();
        let mut out = Vec::new();
        let changed;
        {
            let mut cell = self.gate.lock();
            let effects = f(&mut cell.gate, now);
            // Only a call that did something wakes the waiters: a poll of `gate_wait` with
            // nothing to say must not wake itself (it would spin).
            changed = !effects.is_empty();
            let mut abandoned = Vec::new();
            for effect in effects {
                match effect {
                    Effect::Dispatch { id, map } => {
                        let delivered = cell
                            .parked
                            .remove(&id)
                            .is_some_and(|tx| tx.send(Ok(map)).is_ok());
                        // Its future was dropped while parked: it is in flight for the gate
                        // now, so complete it at once.
                        if !delivered {
                            abandoned.push(id);
                        }
                    }
                    Effect::Fail { id, cause } => {
                        if let Some(tx) = cell.parked.remove(&id) {
                            let _ = tx.send(Err(cause));
                        }
                    }
                    other => out.push(other),
                }
            }
            for id in abandoned {
                out.extend(cell.gate.complete(id));
            }
            self.follow_gate(&cell.gate);
            let mut since = self.hold_since.lock();
            match (cell.gate.state(), *since) {
                (GateState::Running, _) => *since = None,
                (_, None) => *since = Some(std::time::Instant::now()),
                _ => {}
            }
        }
        if changed {
            self.gate_changed.notify_waiters();
        }
        out
    }

    /// Mirrors the gate's active map into `self.map` (under the gate lock).
    fn follow_gate(&self, gate: &IoGate) {
        let current = self.map.load_full();
        let active = gate.active();
        if Arc::ptr_eq(&current, active) {
            return;
        }
        self.usage.grow(active.extent_count());
        self.dirty.grow(active.extent_count());
        self.map.store(Arc::clone(active));
        if let Ok(changes) = diff(&current, active) {
            let extent_size = active.extent_size();
            for change in changes.changes() {
                if matches!(change.new, Placement::Hole) && change.old.is_mapped() {
                    self.usage.mark_unused(extent_span(
                        extent_size,
                        change.range.offset(),
                        change.range.end(),
                    ));
                }
            }
        }
        tracing::debug!(volume = %self.name, from = %current.generation(),
            to = %active.generation(), "active mapping changed by the gate");
    }

    /// `StageMapping`: checks that the engine can serve `map` (extent count, every area
    /// registered) and stages it in the gate. Returns the gate's effects (its answer).
    pub fn stage(&self, op: OpRef, map: Arc<ExtentMap>) -> Result<Vec<Effect>, EngineError> {
        check_extent_count(&map)?;
        check_areas(&map, &self.areas)?;
        let volume = self.name.clone();
        Ok(self.gate_control(|gate, _| gate.stage(&volume, op, map)))
    }

    /// Waits until `poll` (run on the gate) yields effects: used by Quiesce, whose answer comes
    /// from the request completion that drains the hold. `poll` must not change the gate when it
    /// has nothing to say (a repeated Quiesce while draining does not).
    pub async fn gate_wait(
        &self,
        mut poll: impl FnMut(&mut IoGate, Millis) -> Vec<Effect>,
    ) -> Vec<Effect> {
        loop {
            let notified = self.gate_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let effects = self.gate_control(&mut poll);
            if !effects.is_empty() {
                return effects;
            }
            notified.await;
        }
    }

    /// The gate's hold record, while a hold is set (what the mapping cache keeps).
    pub fn hold_record(&self) -> Option<HoldRecord> {
        self.gate.lock().gate.hold_record()
    }

    /// A node plugin restarted inside a hold: the gate comes back held from `record` (seed 004
    /// §11.4, AS-18) and never resumes by itself. Returns the gate's effects (`AskOperator`).
    pub fn restore_hold(&self, record: HoldRecord) -> Result<Vec<Effect>, EngineError> {
        for map in [
            Some(&record.active),
            record.previous.as_ref(),
            record.staged.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            check_extent_count(map)?;
            check_areas(map, &self.areas)?;
        }
        let hold_timeout = self.gate.lock().hold_timeout;
        Ok(self.gate_control(|gate, now| {
            let (restored, effects) = IoGate::restore(record, hold_timeout, now);
            *gate = restored;
            effects
        }))
    }

    /// Copies `[offset, offset + length)` of the volume from the active map's replicas (first
    /// healthy one per piece, as a read) to `destination` — the destination's location of
    /// `offset`, the range laid out contiguously after it — in chunks of `chunk` bytes (seed 004
    /// fourth embodiment, COPY I/O 904). Bypasses the gate: the caller holds the range (a request
    /// admitted through the gate would park behind that very hold). Holes are written as zeros.
    /// Returns the bytes copied (per destination).
    pub async fn copy_range(
        &self,
        offset: u64,
        length: u64,
        destination: &[ReplicaLocation],
        generation: Generation,
        chunk: u64,
    ) -> Result<u64, EngineError> {
        let map = self.map.load_full();
        let range = self.request_range(&map, offset, length)?;
        let targets = destination
            .iter()
            .map(|d| {
                Ok((
                    self.backend(&d.area)
                        .map_err(|_| EngineError::UnknownArea {
                            area: d.area.clone(),
                        })?,
                    d,
                ))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let chunk = chunk.max(SECTOR_SIZE) / SECTOR_SIZE * SECTOR_SIZE;
        let source_generation = map.generation();
        // COPY I/Os of disjoint pieces, COPY_DEPTH of them in flight (one read, then the
        // writes to every destination): the pieces never overlap, so their order does not
        // matter, and one at a time left the source and destination idle half of the time.
        let pieces: Vec<u64> = (0..range.length()).step_by(chunk as usize).collect();
        let results: Vec<Result<u64, EngineError>> = futures::stream::iter(pieces)
            .map(|at| {
                let map = &map;
                let targets = &targets;
                async move {
                    let piece = ByteRange::new(offset + at, chunk.min(range.length() - at))?;
                    let segments: Vec<Segment<'_>> = map.translate(piece)?.collect();
                    let mut data = BytesMut::with_capacity(piece.length() as usize);
                    for segment in &segments {
                        data.extend_from_slice(&self.read_piece(source_generation, segment).await?);
                    }
                    let data = data.freeze();
                    let writes = join_all(targets.iter().map(|(backend, location)| {
                        let data = data.clone();
                        let area_offset = location.area_offset + at;
                        async move {
                            backend
                                .write(generation, area_offset, data, false)
                                .await
                                .map_err(|e| match e {
                                    BackendError::Io(source) => EngineError::Io {
                                        area: location.area.clone(),
                                        source,
                                    },
                                    BackendError::StaleGeneration { sent, current } => {
                                        EngineError::StaleGeneration {
                                            area: location.area.clone(),
                                            sent,
                                            current,
                                        }
                                    }
                                })
                        }
                    }))
                    .await;
                    first_error(writes)?;
                    Ok(piece.length())
                }
            })
            .buffer_unordered(COPY_DEPTH)
            .collect()
            .await;
        let mut copied = 0;
        for result in results {
            copied += result?;
        }
        // Durable before the caller commits a map that reads from the destination.
        let flushes = join_all(targets.iter().map(|(backend, location)| async move {
            backend
                .flush(generation)
                .await
                .map_err(|e| EngineError::Io {
                    area: location.area.clone(),
                    source: match e {
                        BackendError::Io(source) => source,
                        other => io::Error::other(other.to_string()),
                    },
                })
        }))
        .await;
        first_error(flushes)?;
        Ok(copied)
    }

    /// A snapshot of the gate for status reports (GetGateState, attachments).
    pub fn gate_view(&self) -> GateView {
        let cell = self.gate.lock();
        let gate = &cell.gate;
        let (operation_id, attempt) = match gate.operation() {
            Some((id, attempt)) => (Some(id.to_string()), attempt),
            None => (None, 0),
        };
        GateView {
            state: gate.state(),
            active: gate.active().generation(),
            staged: gate.staged().map(|m| m.generation()),
            operation_id,
            attempt,
            in_flight: gate.in_flight(),
            parked: gate.parked().len(),
        }
    }

    /// The gate's state and the step its hold is set for.
    pub fn hold_state(&self) -> (GateState, Option<OpRef>) {
        let cell = self.gate.lock();
        (cell.gate.state(), cell.gate.hold_op().cloned())
    }

    /// How long the current hold has been set, in ms (None when not held).
    pub fn held_for_ms(&self) -> Option<u64> {
        self.held_for().map(|d| d.as_millis() as u64)
    }

    /// How long the current hold has been set (None when not held): the hold window the
    /// benchmark reports, from the Quiesce that set it to the Resume that clears it.
    pub fn held_for(&self) -> Option<std::time::Duration> {
        Some((*self.hold_since.lock())?.elapsed())
    }

    /// Sets the hold timer 215 of the volume's gate.
    pub fn set_hold_timeout(&self, ms: Millis) {
        let mut cell = self.gate.lock();
        cell.hold_timeout = ms;
        cell.gate.set_hold_timeout(ms);
    }

    /// Replaces the active map (seed 004 "Commit": 706–708). Only a newer generation of the same
    /// pool (extent size) and at least the same size is accepted, and every area it names must be
    /// registered. Requests already running finish on the map they pinned; later requests use the
    /// new one. Extents that are holes in the new map but were mapped before lose their usage bits
    /// (seed 000 Fig. 9 release). Without the gate this does not wait for in-flight requests.
    pub fn swap_map(&self, new: Arc<ExtentMap>) -> Result<(), EngineError> {
        let _serial = self.swap_lock.lock();
        let current = self.map.load_full();
        if new.generation() <= current.generation() {
            return Err(EngineError::GenerationNotNewer {
                active: current.generation(),
                offered: new.generation(),
            });
        }
        if new.extent_size() != current.extent_size() {
            return Err(EngineError::IncompatibleMap {
                reason: format!(
                    "extent size {} differs from the volume's {}",
                    new.extent_size(),
                    current.extent_size()
                ),
            });
        }
        if new.size_bytes() < current.size_bytes() {
            return Err(EngineError::IncompatibleMap {
                reason: format!(
                    "size {} is smaller than the volume's {} (volumes only grow)",
                    new.size_bytes(),
                    current.size_bytes()
                ),
            });
        }
        check_extent_count(&new)?;
        check_areas(&new, &self.areas)?;
        diff(&current, &new)?;
        // Through the gate: refused while a remap holds the volume (the remap owns the map);
        // `follow_gate` grows the bitmaps before the new map is published to readers.
        let mut cell = self.gate.lock();
        cell.gate.apply_growth(Arc::clone(&new))?;
        self.follow_gate(&cell.gate);
        Ok(())
    }

    /// Validates a request against the pinned map: 512-byte granularity, inside the volume.
    fn request_range(
        &self,
        map: &ExtentMap,
        offset: u64,
        length: u64,
    ) -> Result<ByteRange, EngineError> {
        if !offset.is_multiple_of(SECTOR_SIZE) || !length.is_multiple_of(SECTOR_SIZE) {
            return Err(EngineError::Unaligned { offset, length });
        }
        let out_of_range = EngineError::OutOfRange {
            offset,
            length,
            size_bytes: map.size_bytes(),
        };
        match ByteRange::new(offset, length) {
            Ok(range) if range.end() <= map.size_bytes() => Ok(range),
            _ => Err(out_of_range),
        }
    }

    /// Reads `length` bytes at `offset`. Holes read as zeros. Each piece is read from its first
    /// healthy replica, falling back to the next on an error.
    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes, EngineError> {
        let (map, _in_flight) = self.pin(self.span_of(offset, length)?).await?;
        let range = self.request_range(&map, offset, length)?;
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let generation = map.generation();
        let segments: Vec<Segment<'_>> = map.translate(range)?.collect();
        let pieces = join_all(
            segments
                .iter()
                .map(|segment| self.read_piece(generation, segment)),
        )
        .await;
        if pieces.len() == 1 {
            return pieces.into_iter().next().unwrap_or(Ok(Bytes::new()));
        }
        let mut out = BytesMut::with_capacity(range.length() as usize);
        for piece in pieces {
            out.extend_from_slice(&piece?);
        }
        Ok(out.freeze())
    }

    async fn read_piece(
        &self,
        generation: Generation,
        segment: &Segment<'_>,
    ) -> Result<Bytes, EngineError> {
        let length = segment.length() as usize;
        if segment.is_hole() {
            return Ok(Bytes::from(vec![0u8; length]));
        }
        let mut failed: Vec<(AreaId, io::Error)> = Vec::new();
        for location in segment.replicas() {
            if !self.health.is_healthy(location.area) {
                continue;
            }
            let result = match self.backend(location.area) {
                Ok(backend) => backend.read(generation, location.area_offset, length).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(data) if data.len() == length => {
                    self.mark_failed(segment.range(), &failed);
                    return Ok(data);
                }
                Ok(data) => failed.push((
                    location.area.clone(),
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("short read: {} of {length} bytes", data.len()),
                    ),
                )),
                Err(BackendError::StaleGeneration { sent, current }) => {
                    return Err(EngineError::StaleGeneration {
                        area: location.area.clone(),
                        sent,
                        current,
                    });
                }
                Err(BackendError::Io(e)) => failed.push((location.area.clone(), e)),
            }
        }
        Err(all_failed(segment.range(), failed))
    }

    /// Writes `data` at `offset`; with `fua`, the data is durable on every replica that took it
    /// when this returns. A write touching a hole fails with [`EngineError::NeedsAllocation`]
    /// before anything is written.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let (map, _in_flight) = self.pin(self.span_of(offset, data.len() as u64)?).await?;
        let range = self.request_range(&map, offset, data.len() as u64)?;
        if range.is_empty() {
            return Ok(());
        }
        let segments: Vec<Segment<'_>> = map.translate(range)?.collect();
        if let Some(holes) = hole_span(&map, &segments) {
            return Err(EngineError::NeedsAllocation { range: holes });
        }
        let extents = range.extent_indices(map.extent_size());
        self.dirty.mark(extents.clone());
        // Seed 000 Fig. 8 steps 804–812, before the data is issued (see `usage`).
        self.usage.mark_written(extents.clone());
        let mutation = |segment: &Segment<'_>| {
            let start = (segment.offset() - offset) as usize;
            let end = start + segment.length() as usize;
            Mutation::Write {
                data: data.slice(start..end),
                fua,
            }
        };
        let (results, ()) = tokio::join!(
            self.mutate(&map, &segments, mutation),
            self.mirror(range, mutation)
        );
        self.dirty.mark(extents);
        first_error(results)
    }

    /// Makes `[offset, offset + length)` read back as zeros. Holes already do and are skipped.
    /// Whole extents it covers are no longer in use (usage bit cleared, like a trim).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> Result<(), EngineError> {
        self.discard(offset, length, Mutation::WriteZeroes { fua })
            .await
    }

    /// Discards `[offset, offset + length)`. Advisory for the data: a trimmed byte reads back as
    /// its old value or as zero (the local backend punches a hole, so in practice zero). Whole
    /// extents it covers are no longer in use (seed 000 usage bit 332 cleared); a partial extent
    /// keeps its bit.
    pub async fn trim(&self, offset: u64, length: u64) -> Result<(), EngineError> {
        self.discard(offset, length, Mutation::Trim).await
    }

    async fn discard(
        &self,
        offset: u64,
        length: u64,
        mutation: Mutation,
    ) -> Result<(), EngineError> {
        let (map, _in_flight) = self.pin(self.span_of(offset, length)?).await?;
        let range = self.request_range(&map, offset, length)?;
        if range.is_empty() {
            return Ok(());
        }
        let segments: Vec<Segment<'_>> = map.translate(range)?.collect();
        let extents = range.extent_indices(map.extent_size());
        self.dirty.mark(extents.clone());
        let (results, ()) = tokio::join!(
            self.mutate(&map, &segments, |_| mutation.clone()),
            self.mirror(range, |_| mutation.clone())
        );
        self.dirty.mark(extents);
        // Clear the usage of whole extents whose piece succeeded (holes trivially did).
        let whole = segments
            .iter()
            .zip(&results)
            .filter(|(segment, result)| result.is_ok() && covers_extent(&map, segment))
            .map(|(segment, _)| segment.extent_index());
        self.usage.mark_unused(whole);
        first_error(results)
    }

    /// Issues `mutation` for every mapped piece, concurrently; one result per segment (holes:
    /// `Ok`). Returns only when every piece has completed.
    async fn mutate(
        &self,
        map: &ExtentMap,
        segments: &[Segment<'_>],
        mutation: impl Fn(&Segment<'_>) -> Mutation,
    ) -> Vec<Result<(), EngineError>> {
        let generation = map.generation();
        join_all(segments.iter().map(|segment| {
            let mutation = (!segment.is_hole()).then(|| mutation(segment));
            async move {
                match mutation {
                    Some(mutation) => self.mutate_piece(generation, segment, mutation).await,
                    None => Ok(()),
                }
            }
        }))
        .await
    }

    /// One piece on every healthy replica, concurrently; succeeds when at least one replica took
    /// it (ARCHITECTURE §4 "Mirrored writes": ack after every healthy replica acknowledged).
    async fn mutate_piece(
        &self,
        generation: Generation,
        segment: &Segment<'_>,
        mutation: Mutation,
    ) -> Result<(), EngineError> {
        let length = segment.length();
        let targets: Vec<_> = segment
            .replicas()
            .filter(|location| self.health.is_healthy(location.area))
            .collect();
        let results = join_all(targets.iter().map(|location| {
            let mutation = mutation.clone();
            async move {
                let backend = self.backend(location.area)?;
                let offset = location.area_offset;
                match mutation {
                    Mutation::Write { data, fua } => {
                        backend.write(generation, offset, data, fua).await
                    }
                    Mutation::WriteZeroes { fua } => {
                        backend.write_zeroes(generation, offset, length, fua).await
                    }
                    Mutation::Trim => backend.trim(generation, offset, length).await,
                }
            }
        }))
        .await;
        let mut failed: Vec<(AreaId, io::Error)> = Vec::new();
        let mut succeeded = false;
        for (location, result) in targets.iter().zip(results) {
            match result {
                Ok(()) => succeeded = true,
                Err(BackendError::StaleGeneration { sent, current }) => {
                    return Err(EngineError::StaleGeneration {
                        area: location.area.clone(),
                        sent,
                        current,
                    });
                }
                Err(BackendError::Io(e)) => failed.push((location.area.clone(), e)),
            }
        }
        if succeeded {
            self.mark_failed(segment.range(), &failed);
            Ok(())
        } else {
            Err(all_failed(segment.range(), failed))
        }
    }

    /// Makes every write acknowledged before this call durable on every healthy replica of the
    /// active map's areas. A failing area is marked unhealthy when every mapped run on it has
    /// another healthy replica that flushed; otherwise the flush fails (EIO).
    pub async fn flush(&self) -> Result<(), EngineError> {
        // A whole-volume span: any hold parks it (docs/remap.md "Flush is a whole-volume span").
        let (map, _in_flight) = self.pin(Span::WholeVolume).await?;
        self.flush_map(&map).await?;
        self.flush_leg().await;
        Ok(())
    }

    /// A flush that does not wait for the gate: for teardown while a remap holds the volume
    /// (a gated flush would park until the operator resumes). Safe: it only makes writes that
    /// were already acknowledged durable, on the active map's areas.
    pub async fn flush_ungated(&self) -> Result<(), EngineError> {
        let map = self.map.load_full();
        self.flush_map(&map).await
    }

    async fn flush_map(&self, map: &ExtentMap) -> Result<(), EngineError> {
        let generation = map.generation();
        let mut areas: Vec<&AreaId> = map
            .runs()
            .iter()
            .flat_map(|run| run.replicas.iter().map(|r| &r.area))
            .filter(|area| self.health.is_healthy(area))
            .collect();
        areas.sort_unstable();
        areas.dedup();
        let results = join_all(areas.iter().map(|area| async move {
            let backend = self.backend(area)?;
            backend.flush(generation).await
        }))
        .await;
        let mut failed: BTreeMap<&AreaId, io::Error> = BTreeMap::new();
        for (area, result) in areas.iter().zip(results) {
            match result {
                Ok(()) => {}
                Err(BackendError::StaleGeneration { sent, current }) => {
                    return Err(EngineError::StaleGeneration {
                        area: (*area).clone(),
                        sent,
                        current,
                    });
                }
                Err(BackendError::Io(e)) => {
                    failed.insert(area, e);
                }
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        // A run whose every healthy replica failed to flush has no durable copy.
        for run in map.runs().iter().filter(|r| !r.is_hole()) {
            let healthy: Vec<&AreaId> = run
                .replicas
                .iter()
                .map(|r| &r.area)
                .filter(|area| self.health.is_healthy(area))
                .collect();
            if !healthy.is_empty() && healthy.iter().all(|area| failed.contains_key(area)) {
                let range = run.range()?;
                let errors = healthy
                    .iter()
                    .filter_map(|area| failed.remove(area).map(|e| ((*area).clone(), e)))
                    .collect();
                return Err(all_failed(range, errors));
            }
        }
        let areas: Vec<AreaId> = failed.keys().map(|area| (*area).clone()).collect();
        tracing::warn!(volume = %self.name, areas = ?areas, "flush failed; replicas marked unhealthy");
        self.health.mark_unhealthy(&areas);
        Ok(())
    }

    /// Marks the replicas that failed a piece another replica served.
    fn mark_failed(&self, range: ByteRange, failed: &[(AreaId, io::Error)]) {
        if failed.is_empty() {
            return;
        }
        for (area, error) in failed {
            tracing::warn!(volume = %self.name, %area, %range, %error,
                "replica failed; marked unhealthy, volume degraded");
        }
        self.health
            .mark_unhealthy(failed.iter().map(|(area, _)| area));
    }

    fn backend(&self, area: &AreaId) -> Result<Arc<dyn AreaBackend>, BackendError> {
        self.areas.get(area).ok_or_else(|| {
            BackendError::Io(io::Error::new(
                io::ErrorKind::NotFound,
                format!("area {area} is not registered on this node"),
            ))
        })
    }

    /// Replica health under the active map.
    pub fn health(&self) -> VolumeHealth {
        self.health.report(&self.map.load())
    }

    /// Marks the area's replicas of this volume healthy again, after the operator resynced them.
    /// Must be called while no write of this volume is in flight (under a hold), or a write that
    /// skipped the area could be missed. Returns whether the area was unhealthy.
    pub fn restore_replica(&self, area: &AreaId) -> bool {
        self.health.restore(area)
    }

    /// The volume's current data priority.
    pub fn priority(&self) -> DataPriority {
        self.usage.priority()
    }

    /// Changes the data priority (the priority class changed); writes from now on use it.
    pub fn set_priority(&self, priority: DataPriority) {
        self.usage.set_priority(priority);
    }

    /// In-use bytes: in-use extents × extent size (seed 000 in-use block count 308).
    pub fn in_use_bytes(&self) -> u64 {
        self.usage
            .in_use_extents()
            .saturating_mul(self.map.load().extent_size().get())
    }

    /// High-priority bytes: high-priority extents × extent size (seed 000 count 310).
    pub fn high_priority_bytes(&self) -> u64 {
        self.usage
            .high_priority_extents()
            .saturating_mul(self.map.load().extent_size().get())
    }

    /// The usage bitmap 332 (in-use extents).
    pub fn in_use_extents(&self) -> RoaringBitmap {
        self.usage.in_use_bitmap()
    }

    /// The priority bitmap 334 (extents holding high-priority data).
    pub fn high_priority_extents(&self) -> RoaringBitmap {
        self.usage.high_priority_bitmap()
    }

    /// The usage changes since the previous report; the first report is full. See
    /// [`UsageDelta`] for the apply rules.
    pub fn take_usage_delta(&self) -> UsageDelta {
        self.usage.take_report(&self.name, self.generation(), false)
    }

    /// A full usage report (after the receiver detected a gap); later deltas follow from it.
    pub fn take_usage_full_report(&self) -> UsageDelta {
        self.usage.take_report(&self.name, self.generation(), true)
    }

    /// Starts dirty tracking from an empty bitmap (no-op when already enabled).
    pub fn enable_dirty_tracking(&self) {
        self.dirty.enable();
    }

    /// Stops dirty tracking and forgets the bits.
    pub fn disable_dirty_tracking(&self) {
        self.dirty.disable();
    }

    pub fn dirty_tracking_enabled(&self) -> bool {
        self.dirty.is_enabled()
    }

    /// The dirty extents, cleared in the same atomic step (see [`crate::engine`] for which
    /// writes a snapshot contains).
    pub fn snapshot_and_clear_dirty(&self) -> RoaringBitmap {
        self.dirty.snapshot_and_clear()
    }

    /// The dirty extents, without clearing them.
    pub fn dirty_extents(&self) -> RoaringBitmap {
        self.dirty.peek()
    }

    /// Sets, changes or removes the mirror leg (`engine::mirror`). Setting it turns dirty
    /// tracking on (from empty when it was off) *before* the leg takes effect, so a write
    /// already in flight, which is not mirrored, is still marked by its completion.
    /// `reset_dirty` starts the tracking afresh: the split cut, under a hold of the whole
    /// volume, when primary and secondary are equal. Removing the leg stops tracking.
    pub fn set_mirror_leg(
        &self,
        leg: Option<MirrorLegSpec>,
        reset_dirty: bool,
    ) -> Result<(), EngineError> {
        let Some(leg) = leg else {
            self.leg.store(None);
            self.dirty.disable();
            self.dirty_reports.lock().clear();
            *self.leg_failure.lock() = None;
            return Ok(());
        };
        let map = self.map.load();
        if leg.map.extent_size() != map.extent_size() {
            return Err(EngineError::IncompatibleMap {
                reason: format!(
                    "secondary {} has extent size {}, the primary {}",
                    leg.secondary,
                    leg.map.extent_size(),
                    map.extent_size()
                ),
            });
        }
        if leg.map.size_bytes() < map.size_bytes() {
            return Err(EngineError::IncompatibleMap {
                reason: format!(
                    "secondary {} ({} bytes) is smaller than the primary ({} bytes)",
                    leg.secondary,
                    leg.map.size_bytes(),
                    map.size_bytes()
                ),
            });
        }
        if let Some(hole) = leg
            .map
            .runs()
            .iter()
            .find(|r| r.is_hole() && r.offset < map.size_bytes())
        {
            return Err(EngineError::IncompatibleMap {
                reason: format!(
                    "secondary {} has a hole at byte {} (a mirror needs every extent allocated)",
                    leg.secondary, hole.offset
                ),
            });
        }
        check_extent_count(&leg.map)?;
        check_areas(&leg.map, &self.areas)?;
        self.dirty.enable();
        if reset_dirty {
            self.dirty.snapshot_and_clear();
            self.dirty_reports.lock().clear();
        }
        if leg.mode == LegMode::Mirror {
            *self.leg_failure.lock() = None;
        }
        tracing::info!(volume = %self.name, secondary = %leg.secondary, mode = %leg.mode,
            reset_dirty, "mirror leg set");
        self.leg.store(Some(Arc::new(leg)));
        Ok(())
    }

    /// The mirror leg, if any.
    pub fn mirror_leg(&self) -> Option<LegView> {
        let leg = self.leg.load_full()?;
        Some(LegView {
            secondary: leg.secondary.clone(),
            mode: leg.mode,
            secondary_generation: leg.map.generation(),
            failure: self.leg_failure.lock().clone(),
        })
    }

    /// Dirty extents for the operator: every bit not acknowledged yet (`acknowledge` names the
    /// sequence of the answer the operator persisted; 0 acknowledges nothing), with the
    /// sequence of this answer. Lossless when answers are lost or repeated
    /// (`engine::mirror::DirtyReports`).
    pub fn collect_dirty(&self, acknowledge: u64) -> (u64, RoaringBitmap) {
        let mut reports = self.dirty_reports.lock();
        let fresh = self.dirty.snapshot_and_clear();
        reports.collect(acknowledge, fresh)
    }

    /// Issues a data-changing request to the secondary as well, in `Mirror` mode. A piece the
    /// secondary fails suspends the leg (M-18); the extents are dirty already.
    async fn mirror(&self, range: ByteRange, mutation: impl Fn(&Segment<'_>) -> Mutation) {
        let Some(leg) = self.leg.load_full() else {
            return;
        };
        if leg.mode != LegMode::Mirror {
            return;
        }
        let end = range.end();
        if end > leg.map.size_bytes() {
            self.suspend_leg(
                &leg,
                format!("write beyond the secondary's end at byte {end}"),
            );
            return;
        }
        let segments: Vec<Segment<'_>> = match leg.map.translate(range) {
            Ok(segments) => segments.collect(),
            Err(e) => {
                self.suspend_leg(&leg, e.to_string());
                return;
            }
        };
        if let Some(hole) = segments.iter().find(|s| s.is_hole()) {
            let at = hole.offset();
            self.suspend_leg(&leg, format!("the secondary has a hole at byte {at}"));
            return;
        }
        let results = self.mutate(&leg.map, &segments, mutation).await;
        if let Err(e) = first_error(results) {
            self.suspend_leg(&leg, e.to_string());
        }
    }

    /// Makes the mirrored writes durable on the secondary; a failure suspends the leg.
    async fn flush_leg(&self) {
        let Some(leg) = self.leg.load_full() else {
            return;
        };
        if let Err(e) = self.flush_map(&leg.map).await {
            self.suspend_leg(&leg, format!("flush: {e}"));
        }
    }

    /// The leg falls back to tracking (unless it was replaced meanwhile).
    fn suspend_leg(&self, leg: &Arc<MirrorLegSpec>, cause: String) {
        let tracked = Arc::new(MirrorLegSpec {
            mode: LegMode::Track,
            ..MirrorLegSpec::clone(leg)
        });
        let previous = self.leg.compare_and_swap(leg, Some(tracked));
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, leg)) {
            tracing::warn!(volume = %self.name, secondary = %leg.secondary, %cause,
                "mirror leg suspended: the secondary failed a write; tracking dirty extents");
            *self.leg_failure.lock() = Some(cause);
        }
    }

    /// Copies the given extents of the volume (its active map) to the mirror leg: the formation
    /// copy and the resync of seed 003. Each piece is read from the primary and written to every
    /// replica of the secondary. `gated`: each piece is admitted through the I/O gate as a
    /// reader, so a remap of the primary holds and drains it like any request; pass `false`
    /// only while the caller holds the whole volume (the final pass of a converge, which would
    /// otherwise park behind its own hold). Correct against concurrent writes only together
    /// with the dirty bits: a write racing with the copy of an extent marks it for the next
    /// pass. Returns the bytes copied; the leg's areas are flushed before it returns.
    pub async fn copy_to_leg(
        &self,
        extents: &RoaringBitmap,
        gated: bool,
    ) -> Result<u64, EngineError> {
        let leg = self
            .leg
            .load_full()
            .ok_or_else(|| EngineError::IncompatibleMap {
                reason: "the volume has no mirror leg".into(),
            })?;
        let extent_size = self.map.load().extent_size();
        let size = self.size();
        // Pieces of at most one extent and 1 MiB: each lies in one run of both maps.
        let piece_max = extent_size.get().min(1 << 20);
        let mut pieces = Vec::new();
        for extent in extents.iter() {
            let Some(start) = extent_size.start_of(u64::from(extent)) else {
                continue;
            };
            if start >= size {
                continue;
            }
            let end = start.saturating_add(extent_size.get()).min(size);
            let mut at = start;
            while at < end {
                let length = piece_max.min(end - at);
                pieces.push(ByteRange::new(at, length)?);
                at += length;
            }
        }
        let leg = &leg;
        let results: Vec<Result<u64, EngineError>> = futures::stream::iter(pieces)
            .map(|piece| async move {
                let (map, _in_flight) = if gated {
                    let (map, guard) = self.pin(Span::of_bytes(piece, extent_size)).await?;
                    (map, Some(guard))
                } else {
                    (self.map.load_full(), None)
                };
                let source: Vec<Segment<'_>> = map.translate(piece)?.collect();
                let mut data = BytesMut::with_capacity(piece.length() as usize);
                for segment in &source {
                    data.extend_from_slice(&self.read_piece(map.generation(), segment).await?);
                }
                let data = data.freeze();
                let target: Vec<Segment<'_>> = leg.map.translate(piece)?.collect();
                if let Some(hole) = target.iter().find(|s| s.is_hole()) {
                    return Err(EngineError::NeedsAllocation {
                        range: hole.range(),
                    });
                }
                let results = self
                    .mutate(&leg.map, &target, |segment| {
                        let start = (segment.offset() - piece.offset()) as usize;
                        let end = start + segment.length() as usize;
                        Mutation::Write {
                            data: data.slice(start..end),
                            fua: false,
                        }
                    })
                    .await;
                first_error(results)?;
                Ok(piece.length())
            })
            .buffer_unordered(COPY_DEPTH)
            .collect()
            .await;
        let mut copied = 0;
        for result in results {
            copied += result?;
        }
        self.flush_map(&leg.map).await?;
        Ok(copied)
    }
}

/// Extent indices of `[start, end)`.
fn extent_span(extent_size: ExtentSize, start: u64, end: u64) -> Range<u64> {
    ByteRange::from_bounds(start, end)
        .map(|range| range.extent_indices(extent_size))
        .unwrap_or(0..0)
}

fn check_extent_count(map: &ExtentMap) -> Result<(), EngineError> {
    let extents = map.extent_count();
    if extents > MAX_EXTENTS {
        return Err(EngineError::TooManyExtents { extents });
    }
    Ok(())
}

fn check_areas(map: &ExtentMap, areas: &AreaRegistry) -> Result<(), EngineError> {
    for run in map.runs() {
        for replica in &run.replicas {
            if !areas.contains(&replica.area) {
                return Err(EngineError::UnknownArea {
                    area: replica.area.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The smallest extent-aligned range (clamped to the volume) covering every hole segment.
fn hole_span(map: &ExtentMap, segments: &[Segment<'_>]) -> Option<ByteRange> {
    let first = segments.iter().find(|s| s.is_hole())?;
    let last = segments.iter().rfind(|s| s.is_hole()).unwrap_or(first);
    let extent_size = map.extent_size();
    let start = extent_size.align_down(first.offset());
    let end = extent_size
        .align_up(last.range().end())
        .unwrap_or(u64::MAX)
        .min(map.size_bytes());
    ByteRange::from_bounds(start, end)
}

/// Whether a segment covers its whole extent (the tail extent ends at the volume's end).
fn covers_extent(map: &ExtentMap, segment: &Segment<'_>) -> bool {
    let extent_size = map.extent_size();
    let start = extent_size.align_down(segment.offset());
    let end = start
        .saturating_add(extent_size.get())
        .min(map.size_bytes());
    segment.offset() == start && segment.range().end() == end
}

/// The error of a piece none of whose healthy replicas served it.
fn all_failed(range: ByteRange, mut failed: Vec<(AreaId, io::Error)>) -> EngineError {
    if failed.len() == 1
        && let Some((area, source)) = failed.pop()
    {
        return EngineError::Io { area, source };
    }
    EngineError::AllReplicasFailed {
        range,
        tried: failed.into_iter().map(|(area, _)| area).collect(),
    }
}

fn first_error(results: Vec<Result<(), EngineError>>) -> Result<(), EngineError> {
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // hold scopes are lists of extent ranges
mod gate_wiring_tests {
    //! The engine's use of the I/O gate (docs/remap.md §5a): drain, park, dispatch, fence, and
    //! a dropped request releasing its place. Named after seed 004 §11.7 where one applies.

    use super::*;
    use crate::backend::BackendFuture;
    use crate::engine::gate::{ControlKind, GateState, HoldScope, Reply};
    use tessera_api::model::Run;

    /// Memory area whose writes wait for a permit while `paused`.
    #[derive(Debug)]
    struct Mem {
        id: AreaId,
        data: Mutex<Vec<u8>>,
        paused: std::sync::atomic::AtomicBool,
        permits: tokio::sync::Semaphore,
    }

    impl AreaBackend for Mem {
        fn area(&self) -> &AreaId {
            &self.id
        }
        fn size_bytes(&self) -> u64 {
            self.data.lock().len() as u64
        }
        fn read(&self, _: Generation, offset: u64, length: usize) -> BackendFuture<'_, Bytes> {
            let o = offset as usize;
            let out = Bytes::copy_from_slice(&self.data.lock()[o..o + length]);
            Box::pin(async move { Ok(out) })
        }
        fn write(&self, _: Generation, offset: u64, data: Bytes, _: bool) -> BackendFuture<'_, ()> {
            Box::pin(async move {
                if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
                    self.permits.acquire().await.expect("open").forget();
                }
                let o = offset as usize;
                self.data.lock()[o..o + data.len()].copy_from_slice(&data);
                Ok(())
            })
        }
        fn write_zeroes(&self, _: Generation, _: u64, _: u64, _: bool) -> BackendFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn trim(&self, _: Generation, _: u64, _: u64) -> BackendFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn flush(&self, _: Generation) -> BackendFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    const ES: u64 = 4096;

    fn held_extent_1() -> HoldScope {
        HoldScope::extents(vec![1..2])
    }

    /// Volume of 4 extents on area `m` (extent i at area extent i); generation 2 moves extent 1
    /// to area extent 6.
    fn rig() -> (Arc<Volume>, Arc<Mem>, Arc<ExtentMap>) {
        let mem = Arc::new(Mem {
            id: AreaId::new("m"),
            data: Mutex::new(vec![0; 8 * ES as usize]),
            paused: false.into(),
            permits: tokio::sync::Semaphore::new(0),
        });
        let registry = Arc::new(AreaRegistry::new());
        registry.insert(Arc::clone(&mem) as Arc<dyn AreaBackend>);
        let map = |generation: u64, places: [u64; 4]| {
            let runs = places
                .iter()
                .enumerate()
                .map(|(i, p)| Run::new(i as u64 * ES, ES, vec![ReplicaLocation::new("m", p * ES)]))
                .collect();
            ExtentMap::from_runs(
                4 * ES,
                ExtentSize::new(ES).expect("size"),
                Generation(generation),
                runs,
            )
            .expect("map")
        };
        let volume = Volume::open(
            "v",
            Arc::new(map(1, [0, 1, 2, 3])),
            registry,
            VolumeOptions::default(),
        )
        .expect("open");
        (Arc::new(volume), mem, Arc::new(map(2, [0, 6, 2, 3])))
    }

    fn answered(effects: &[Effect], kind: ControlKind) -> Option<Result<Reply, Refusal>> {
        effects.iter().find_map(|e| match e {
            Effect::Answer(a) if a.kind == kind => Some(a.result.clone()),
            _ => None,
        })
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    /// AS-02/AS-03 through the engine: the quiesce is answered only once the write in flight on
    /// the held extent finished; a write arriving during the hold parks and, after commit and
    /// resume, lands where the new map puts it.
    #[tokio::test]
    async fn as02_quiesce_waits_for_in_flight_io_and_parked_io_runs_on_the_new_map() {
        let (volume, mem, next) = rig();
        let op = OpRef::new("op", 1, Generation(2));
        let staged = volume.stage(op.clone(), Arc::clone(&next)).expect("stage");
        assert!(matches!(answered(&staged, ControlKind::Stage), Some(Ok(_))));

        mem.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        let in_flight = tokio::spawn({
            let volume = Arc::clone(&volume);
            async move { volume.write(ES, Bytes::from(vec![1u8; 512]), false).await }
        });
        settle().await;
        let effects = volume.gate_control(|g, _| g.quiesce("v", op.clone(), held_extent_1()));
        assert_eq!(
            answered(&effects, ControlKind::Quiesce),
            None,
            "not drained yet"
        );
        assert_eq!(volume.gate_view().state, GateState::Draining);

        let parked = tokio::spawn({
            let volume = Arc::clone(&volume);
            async move {
                volume
                    .write(ES + 512, Bytes::from(vec![2u8; 512]), false)
                    .await
            }
        });
        // Outside the held extent: not held (AS-04).
        volume.read(0, 512).await.expect("extent 0 is free");
        settle().await;
        assert_eq!(volume.gate_view().parked, 1);

        let waiter = tokio::spawn({
            let volume = Arc::clone(&volume);
            let op = op.clone();
            async move {
                volume
                    .gate_wait(|g, _| g.quiesce("v", op.clone(), held_extent_1()))
                    .await
            }
        });
        settle().await;
        assert!(
            !waiter.is_finished(),
            "quiesce answers only after the drain"
        );
        mem.paused.store(false, std::sync::atomic::Ordering::SeqCst);
        mem.permits.add_permits(1);
        in_flight
            .await
            .expect("task")
            .expect("write in flight finishes");
        let effects = waiter.await.expect("waiter");
        assert!(matches!(
            answered(&effects, ControlKind::Quiesce),
            Some(Ok(Reply::QuiesceComplete { .. }))
        ));
        let commit = volume.gate_control(|g, _| g.commit("v", op.clone()));
        assert!(matches!(
            answered(&commit, ControlKind::Commit),
            Some(Ok(_))
        ));
        assert_eq!(volume.generation(), Generation(2));
        assert!(!parked.is_finished());
        let resume = volume.gate_control(|g, _| g.resume("v", op.clone()));
        assert!(matches!(
            answered(&resume, ControlKind::Resume),
            Some(Ok(Reply::Resumed {
                redispatched: 1,
                ..
            }))
        ));
        parked.await.expect("task").expect("parked write runs");
        let data = mem.data.lock();
        assert_eq!(
            &data[(6 * ES + 512) as usize..(6 * ES + 1024) as usize],
            &[2u8; 512][..]
        );
        assert_eq!(
            &data[(ES + 512) as usize..(ES + 1024) as usize],
            &[0u8; 512][..]
        );
        assert_eq!(volume.gate_view().in_flight, 0);
    }

    /// AS-26: fencing fails parked requests and refuses new ones with EIO.
    #[tokio::test]
    async fn as26_fence_fails_parked_and_new_requests() {
        let (volume, _mem, _) = rig();
        let op = OpRef::new("op", 1, Generation(2));
        volume.gate_control(|g, _| g.quiesce("v", op.clone(), HoldScope::WholeVolume));
        let parked = tokio::spawn({
            let volume = Arc::clone(&volume);
            async move { volume.read(0, 512).await }
        });
        settle().await;
        volume.gate_control(|g, _| g.fence("v", op.clone()));
        let error = parked.await.expect("task").expect_err("fenced");
        assert_eq!(error.errno(), libc::EIO);
        let error = volume.write(0, Bytes::from(vec![0u8; 512]), false).await;
        assert!(matches!(error, Err(EngineError::Fenced { .. })));
    }

    /// A dropped request releases its place: dropped while in flight, the drain still completes;
    /// dropped while parked, its dispatch completes it at once.
    #[tokio::test]
    async fn dropped_requests_release_the_gate() {
        let (volume, mem, _) = rig();
        let op = OpRef::new("op", 1, Generation(2));
        mem.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        let in_flight = tokio::spawn({
            let volume = Arc::clone(&volume);
            async move { volume.write(0, Bytes::from(vec![1u8; 512]), false).await }
        });
        settle().await;
        let effects =
            volume.gate_control(|g, _| g.quiesce("v", op.clone(), HoldScope::WholeVolume));
        assert_eq!(answered(&effects, ControlKind::Quiesce), None);
        in_flight.abort();
        let _ = in_flight.await;
        let effects = volume
            .gate_wait(|g, _| g.quiesce("v", op.clone(), HoldScope::WholeVolume))
            .await;
        assert!(matches!(
            answered(&effects, ControlKind::Quiesce),
            Some(Ok(_))
        ));
        let parked = tokio::spawn({
            let volume = Arc::clone(&volume);
            async move { volume.read(0, 512).await }
        });
        settle().await;
        parked.abort();
        let _ = parked.await;
        volume.gate_control(|g, _| g.resume("v", op.clone()));
        let view = volume.gate_view();
        assert_eq!(
            (view.state, view.in_flight, view.parked),
            (GateState::Running, 0, 0)
        );
    }
}
