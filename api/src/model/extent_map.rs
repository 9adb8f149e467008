//! The run-length extent map of one virtual volume.
//!
//! This is seed 004's "configuration information" 221 (§4.1: virtual offset 42, size 43, LU 44,
//! LU offset 45) and seed 002's "virtual volume sector information" (§3.2(b), [0070]–[0072]),
//! with areas in place of LUs / real volumes and several replicas per row instead of one row per
//! copy (seed 002 lists a replicated range twice, once per copy, [0072]).
//!
//! Representation choices:
//! - **Holes are explicit runs** (a run with no replicas). The runs then tile `[0, size)` exactly,
//!   so lookup is one binary search with no "between runs" case, the wire form
//!   (`status.mapping.extents`, "a hole has no replicas") converts one-to-one, and the canonical
//!   form is unique (two neighbouring holes always merge).
//! - **Canonical form**: neighbouring runs whose replicas continue each other on the same areas
//!   (or that are both holes) are merged, so two maps with the same layout are equal
//!   structurally (`==`), whatever sequence of edits built them.
//! - **Replica order is significant**: the first replica is the preferred read target (seed 002
//!   [0075]: the replication source is the access target first, the copy is used under load
//!   [0078]). Swapping the order of replicas is therefore a mapping change.
//! - **Boundaries are extent-aligned** (the pool hands out whole extents, seed 000 "blocks");
//!   only the volume's tail may end inside an extent, when the size is not a multiple of the
//!   extent size. Lookups work on arbitrary byte ranges (the engine needs 512-byte requests and
//!   tolerates unaligned ones).

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::iter::FusedIterator;

use serde::{Deserialize, Serialize};

use super::error::MapError;
use super::generation::Generation;
use super::units::{ByteRange, ExtentSize, SECTOR_SIZE};

/// Name of a storage area (the `StorageArea` object name): seed 001's registered area, seed
/// 004's LU 131 / real area 132 container, seed 002's real volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AreaId(String);

impl AreaId {
    pub fn new(name: impl Into<String>) -> Self {
        AreaId(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl From<String> for AreaId {
    fn from(name: String) -> Self {
        AreaId(name)
    }
}

impl From<&str> for AreaId {
    fn from(name: &str) -> Self {
        AreaId(name.to_owned())
    }
}

impl Borrow<str> for AreaId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for AreaId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AreaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the first byte of a run lives on one replica: seed 004's (LU address 44, LU offset 45).
/// Byte `run.offset + d` of the volume lives at `area_offset + d` on `area`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaLocation {
    pub area: AreaId,
    pub area_offset: u64,
}

impl ReplicaLocation {
    pub fn new(area: impl Into<AreaId>, area_offset: u64) -> Self {
        ReplicaLocation {
            area: area.into(),
            area_offset,
        }
    }
}

/// A maximal stretch of the volume with one linear placement: `[offset, offset + length)` maps
/// linearly onto each replica. No replicas means a hole (reads as zeros, ARCHITECTURE §4).
///
/// A `Run` on its own is raw input; inside an [`ExtentMap`] it is validated and canonical.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub offset: u64,
    pub length: u64,
    #[serde(default)]
    pub replicas: Vec<ReplicaLocation>,
}

impl Run {
    pub fn new(offset: u64, length: u64, replicas: Vec<ReplicaLocation>) -> Self {
        Run {
            offset,
            length,
            replicas,
        }
    }

    pub fn hole(offset: u64, length: u64) -> Self {
        Run::new(offset, length, Vec::new())
    }

    pub fn is_hole(&self) -> bool {
        self.replicas.is_empty()
    }

    /// One past the last byte (saturating; exact for every run of a valid map).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// The volume bytes of this run, or an error if the end overflows.
    pub fn range(&self) -> Result<ByteRange, MapError> {
        ByteRange::new(self.offset, self.length)
    }

    /// Whether `next` starts where this run ends and continues every replica on the same area
    /// at the next physical byte (or both are holes): such neighbours are merged.
    fn is_continued_by(&self, next: &Run) -> bool {
        self.offset.checked_add(self.length) == Some(next.offset)
            && self.replicas.len() == next.replicas.len()
            && self.replicas.iter().zip(&next.replicas).all(|(a, b)| {
                a.area == b.area && a.area_offset.checked_add(self.length) == Some(b.area_offset)
            })
    }

    /// The part `[start, end)` of this run, with replica offsets moved along. The caller keeps
    /// `offset <= start <= end <= self.end()`.
    fn slice(&self, start: u64, end: u64) -> Run {
        let delta = start - self.offset;
        Run {
            offset: start,
            length: end - start,
            replicas: self
                .replicas
                .iter()
                .map(|r| ReplicaLocation {
                    area: r.area.clone(),
                    // Cannot saturate for a validated run; a raw edit that would is rejected by
                    // the final validation (the saturated offset is not extent-aligned).
                    area_offset: r.area_offset.saturating_add(delta),
                })
                .collect(),
        }
    }
}

/// One edit of [`ExtentMap::edit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Map `range` so that its first byte lives at each replica's location.
    Assign {
        range: ByteRange,
        replicas: Vec<ReplicaLocation>,
    },
    /// Unmap `range` (it reads as zeros afterwards).
    PunchHole { range: ByteRange },
}

/// Bytes of one area used by one map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AreaUsage {
    /// Mapped bytes (exact; the volume's partial tail counts its real length).
    pub bytes: u64,
    /// Extents reserved on the area (a partial tail extent still reserves a whole one).
    pub extents: u64,
}

/// The validated, canonical, run-length mapping of one virtual volume.
///
/// Immutable: every edit returns a new map, because the engine shares the active map behind an
/// atomic pointer and builds the staged one beside it (seed 004 "planes" 221a/221b,
/// [0070]–[0075]; ARCHITECTURE §4).
///
/// Invariants (checked by [`ExtentMap::from_runs`], kept by every edit):
/// - the size is a multiple of [`SECTOR_SIZE`];
/// - runs are non-empty, sorted and tile `[0, size)` (holes are explicit runs);
/// - every run boundary is a multiple of the extent size, except the end of the volume;
/// - mapped runs all have the same number of replicas (the volume's copies);
/// - replica area offsets are extent-aligned, area names are non-empty, no run has two replicas
///   on one area, and no byte of any area is mapped twice;
/// - no two neighbouring runs can be merged (canonical form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentMap {
    size_bytes: u64,
    extent_size: ExtentSize,
    generation: Generation,
    runs: Vec<Run>,
    /// Replicas per mapped run; 0 while the whole volume is a hole.
    replica_count: usize,
}

impl ExtentMap {
    /// A volume of `size_bytes` with nothing allocated yet, at [`Generation::INITIAL`].
    pub fn new_hole(size_bytes: u64, extent_size: ExtentSize) -> Result<Self, MapError> {
        let runs = if size_bytes == 0 {
            Vec::new()
        } else {
            vec![Run::hole(0, size_bytes)]
        };
        ExtentMap::from_runs(size_bytes, extent_size, Generation::INITIAL, runs)
    }

    /// Validates raw runs (for example converted from `VirtualVolume.status.mapping` or read
    /// from the node's mapping cache) and returns the canonical map.
    ///
    /// Neighbours that continue each other are merged *before* the alignment and replica checks:
    /// such a split point does not change which byte lives where, so a producer that writes one
    /// run per extent (or splits mid-extent where the data is contiguous) is accepted.
    pub fn from_runs(
        size_bytes: u64,
        extent_size: ExtentSize,
        generation: Generation,
        runs: Vec<Run>,
    ) -> Result<Self, MapError> {
        if !size_bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(MapError::UnalignedVolumeSize { size_bytes });
        }
        check_tiling(size_bytes, &runs)?;
        let runs = canonicalize(runs);
        let replica_count = check_runs(size_bytes, extent_size, &runs)?;
        check_physical_overlap(&runs)?;
        Ok(ExtentMap {
            size_bytes,
            extent_size,
            generation,
            runs,
            replica_count,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn extent_size(&self) -> ExtentSize {
        self.extent_size
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The same layout under another generation (the operator stamps the staged map with the
    /// generation the remap commits, seed 004 §11.3).
    pub fn with_generation(mut self, generation: Generation) -> Self {
        self.generation = generation;
        self
    }

    /// The canonical runs, in volume order (what a conversion to the wire type iterates).
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    pub fn into_runs(self) -> Vec<Run> {
        self.runs
    }

    /// Copies of each mapped byte; 0 when nothing is mapped.
    pub fn replica_count(&self) -> usize {
        self.replica_count
    }

    /// Number of extents of the volume (a partial tail extent counts as one).
    pub fn extent_count(&self) -> u64 {
        self.extent_size.extents_for(self.size_bytes)
    }

    /// Whether both maps place every byte the same way (generation ignored).
    pub fn same_layout(&self, other: &ExtentMap) -> bool {
        self.size_bytes == other.size_bytes
            && self.extent_size == other.extent_size
            && self.runs == other.runs
    }

    /// The run containing byte `offset`, or `None` past the end.
    pub fn run_at(&self, offset: u64) -> Option<&Run> {
        let index = self.runs.partition_point(|r| r.end() <= offset);
        self.runs.get(index)
    }

    /// Splits `range` at run boundaries and at extent boundaries and gives each piece's physical
    /// locations (seed 004 step 803 [0056]: the entry whose virtual range contains the address
    /// gives LU 44 and offset 45 + (addr − 42); seed 002 [0076]). A piece never crosses an
    /// extent, because the extent is the unit of allocation, usage tracking and holding
    /// (ARCHITECTURE §4). Any byte range is accepted; an empty range yields nothing.
    pub fn translate(&self, range: ByteRange) -> Result<Segments<'_>, MapError> {
        if range.end() > self.size_bytes {
            return Err(MapError::OutOfRange {
                offset: range.offset(),
                length: range.length(),
                size_bytes: self.size_bytes,
            });
        }
        Ok(self.segments(range.offset(), range.end()))
    }

    /// One segment per extent of the volume, in order (seed 000's per-block view).
    pub fn extents(&self) -> Segments<'_> {
        self.segments(0, self.size_bytes)
    }

    fn segments(&self, start: u64, end: u64) -> Segments<'_> {
        Segments {
            runs: &self.runs,
            run_index: self.runs.partition_point(|r| r.end() <= start),
            cursor: start,
            end,
            extent_size: self.extent_size,
        }
    }

    /// Applies `edits` in order and validates the result once, so intermediate states may break
    /// invariants that the final one keeps (for example changing the copies of every run).
    /// Ranges must start on an extent boundary and end on one or at the end of the volume. The
    /// result has the next generation, or this generation if nothing changed.
    pub fn edit(&self, edits: impl IntoIterator<Item = Edit>) -> Result<Self, MapError> {
        let mut runs = self.runs.clone();
        for edit in edits {
            let (range, replicas) = match edit {
                Edit::Assign { range, replicas } => {
                    if replicas.is_empty() {
                        return Err(MapError::EmptyReplicaSet);
                    }
                    (range, replicas)
                }
                Edit::PunchHole { range } => (range, Vec::new()),
            };
            self.check_edit_range(range)?;
            if range.is_empty() {
                continue;
            }
            let run = Run::new(range.offset(), range.length(), replicas);
            check_replicas(&run, self.extent_size)?;
            runs = splice(&runs, range, run);
        }
        self.derive(self.size_bytes, runs)
    }

    /// Maps `range` to new locations: byte `range.offset + d` goes to `area_offset + d` on each
    /// replica. See [`ExtentMap::edit`] for alignment and generation.
    pub fn assign(
        &self,
        range: ByteRange,
        replicas: Vec<ReplicaLocation>,
    ) -> Result<Self, MapError> {
        self.edit([Edit::Assign { range, replicas }])
    }

    /// Unmaps `range` (releasing its extents, seed 000 Fig. 9).
    pub fn punch_hole(&self, range: ByteRange) -> Result<Self, MapError> {
        self.edit([Edit::PunchHole { range }])
    }

    /// Grows the volume to `new_size`, appending a hole.
    ///
    /// If the old size ends inside a mapped extent, that extent's run is extended to the end of
    /// the extent (or to `new_size`): the area extent is already reserved whole for this volume
    /// and an extent boundary may not fall inside it. Those bytes were never writable through the
    /// volume, so they read as whatever the allocator left there; allocation must zero extents.
    pub fn grow(&self, new_size: u64) -> Result<Self, MapError> {
        if new_size < self.size_bytes {
            return Err(MapError::Shrink {
                size_bytes: self.size_bytes,
                new_size,
            });
        }
        if !new_size.is_multiple_of(SECTOR_SIZE) {
            return Err(MapError::UnalignedVolumeSize {
                size_bytes: new_size,
            });
        }
        let runs = resize_runs(&self.runs, self.size_bytes, new_size, self.extent_size)?;
        self.derive(new_size, runs)
    }

    /// Volume bytes backed by storage (not holes), counted once whatever the number of copies:
    /// `VirtualVolume.status.usage.allocatedBytes` (seed 000 allocated block count 307).
    pub fn allocated_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| !r.is_hole())
            .map(|r| r.length)
            .sum()
    }

    /// Extents backed by storage, counted once whatever the number of copies.
    pub fn allocated_extents(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| !r.is_hole())
            .map(|r| self.extent_size.extents_for(r.length))
            .sum()
    }

    /// Physical usage per area, every replica counted (feeds `StorageArea.status.allocatedBytes`).
    pub fn area_usage(&self) -> BTreeMap<AreaId, AreaUsage> {
        let mut usage: BTreeMap<AreaId, AreaUsage> = BTreeMap::new();
        for run in &self.runs {
            for replica in &run.replicas {
                let entry = usage.entry(replica.area.clone()).or_default();
                entry.bytes += run.length;
                entry.extents += self.extent_size.extents_for(run.length);
            }
        }
        usage
    }

    fn check_edit_range(&self, range: ByteRange) -> Result<(), MapError> {
        if range.end() > self.size_bytes {
            return Err(MapError::OutOfRange {
                offset: range.offset(),
                length: range.length(),
                size_bytes: self.size_bytes,
            });
        }
        let ends_ok = self.extent_size.is_aligned(range.end()) || range.end() == self.size_bytes;
        if !self.extent_size.is_aligned(range.offset()) || !ends_ok {
            return Err(MapError::UnalignedEdit {
                offset: range.offset(),
                length: range.length(),
                extent_size: self.extent_size.get(),
            });
        }
        Ok(())
    }

    /// Builds the successor map from edited runs: validated, canonical, next generation unless
    /// the layout did not change.
    pub(super) fn derive(&self, size_bytes: u64, runs: Vec<Run>) -> Result<Self, MapError> {
        let candidate = ExtentMap::from_runs(size_bytes, self.extent_size, self.generation, runs)?;
        if candidate.same_layout(self) {
            return Ok(candidate);
        }
        let next = self
            .generation
            .checked_next()
            .ok_or(MapError::GenerationOverflow(self.generation))?;
        Ok(candidate.with_generation(next))
    }
}

/// Replaces the bytes of `range` in tiled `runs` with `replacement` (which covers `range`).
pub(super) fn splice(runs: &[Run], range: ByteRange, replacement: Run) -> Vec<Run> {
    let mut out = Vec::with_capacity(runs.len() + 2);
    let mut replacement = Some(replacement);
    for run in runs {
        let end = run.end();
        if end <= range.offset() {
            out.push(run.clone());
            continue;
        }
        if run.offset < range.offset() {
            out.push(run.slice(run.offset, range.offset()));
        }
        if run.offset < range.end() {
            out.extend(replacement.take());
        }
        if end > range.end() {
            out.extend(replacement.take());
            out.push(run.slice(run.offset.max(range.end()), end));
        }
    }
    out.extend(replacement);
    out
}

/// The runs of a volume resized from `old_size` to `new_size` (truncated, or grown with a hole;
/// see [`ExtentMap::grow`] for the partial tail extent).
pub(super) fn resize_runs(
    runs: &[Run],
    old_size: u64,
    new_size: u64,
    extent_size: ExtentSize,
) -> Result<Vec<Run>, MapError> {
    if new_size <= old_size {
        return Ok(runs
            .iter()
            .take_while(|r| r.offset < new_size)
            .map(|r| r.slice(r.offset, r.end().min(new_size)))
            .collect());
    }
    let mut out = runs.to_vec();
    let mut covered = old_size;
    if let Some(last) = out.last_mut()
        && !last.is_hole()
        && !extent_size.is_aligned(old_size)
    {
        let extent_end = extent_size
            .align_up(old_size)
            .ok_or(MapError::RangeOverflow {
                offset: old_size,
                length: extent_size.get(),
            })?;
        covered = extent_end.min(new_size);
        last.length += covered - old_size;
    }
    if covered < new_size {
        out.push(Run::hole(covered, new_size - covered));
    }
    Ok(out)
}

/// Runs must be non-empty, contiguous from 0 and end exactly at the volume's end.
fn check_tiling(size_bytes: u64, runs: &[Run]) -> Result<(), MapError> {
    let mut cursor = 0u64;
    for run in runs {
        if run.length == 0 {
            return Err(MapError::EmptyRun { offset: run.offset });
        }
        if run.offset > cursor {
            return Err(MapError::RunGap {
                expected: cursor,
                found: run.offset,
            });
        }
        if run.offset < cursor {
            return Err(MapError::RunOverlap {
                expected: cursor,
                found: run.offset,
            });
        }
        let end = run.range()?.end();
        if end > size_bytes {
            return Err(MapError::RunsPastEnd { end, size_bytes });
        }
        cursor = end;
    }
    if cursor != size_bytes {
        return Err(MapError::RunsShort {
            covered: cursor,
            size_bytes,
        });
    }
    Ok(())
}

fn canonicalize(runs: Vec<Run>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for run in runs {
        match out.last_mut() {
            Some(last) if last.is_continued_by(&run) => last.length += run.length,
            _ => out.push(run),
        }
    }
    out
}

/// Per-run checks on tiled, canonical runs; returns the replica count.
fn check_runs(size_bytes: u64, extent_size: ExtentSize, runs: &[Run]) -> Result<usize, MapError> {
    let mut replica_count = None;
    for run in runs {
        // Offsets are aligned inductively: the first is 0, each next one is a previous end.
        if run.end() != size_bytes && !extent_size.is_aligned(run.length) {
            return Err(MapError::MisalignedRun {
                offset: run.offset,
                length: run.length,
                extent_size: extent_size.get(),
            });
        }
        if !run.is_hole() {
            match replica_count {
                None => replica_count = Some(run.replicas.len()),
                Some(expected) if expected != run.replicas.len() => {
                    return Err(MapError::ReplicaCountMismatch {
                        offset: run.offset,
                        expected,
                        found: run.replicas.len(),
                    });
                }
                Some(_) => {}
            }
        }
        check_replicas(run, extent_size)?;
    }
    Ok(replica_count.unwrap_or(0))
}

/// The replicas of one run: named, extent-aligned, within `u64`, on distinct areas.
fn check_replicas(run: &Run, extent_size: ExtentSize) -> Result<(), MapError> {
    for (i, replica) in run.replicas.iter().enumerate() {
        if replica.area.as_str().is_empty() {
            return Err(MapError::EmptyAreaId { offset: run.offset });
        }
        if !extent_size.is_aligned(replica.area_offset) {
            return Err(MapError::MisalignedAreaOffset {
                offset: run.offset,
                area: replica.area.clone(),
                area_offset: replica.area_offset,
                extent_size: extent_size.get(),
            });
        }
        if replica.area_offset.checked_add(run.length).is_none() {
            return Err(MapError::AreaOffsetOverflow {
                offset: run.offset,
                area: replica.area.clone(),
                area_offset: replica.area_offset,
            });
        }
        // Copies are 1–3 (ARCHITECTURE §3), so the quadratic scan is the cheapest.
        if run.replicas[..i].iter().any(|r| r.area == replica.area) {
            return Err(MapError::DuplicateArea {
                offset: run.offset,
                area: replica.area.clone(),
            });
        }
    }
    Ok(())
}

/// No byte of an area may back two volume bytes (runs already passed `check_replicas`).
fn check_physical_overlap(runs: &[Run]) -> Result<(), MapError> {
    let mut spans: Vec<(&AreaId, u64, u64, u64)> = runs
        .iter()
        .flat_map(|run| {
            run.replicas.iter().map(move |r| {
                (
                    &r.area,
                    r.area_offset,
                    r.area_offset + run.length,
                    run.offset,
                )
            })
        })
        .collect();
    spans.sort_unstable();
    // Sorted by (area, start): if a span overlaps no later span's predecessor, it overlaps none.
    for pair in spans.windows(2) {
        if let [(area_a, _, end_a, run_a), (area_b, start_b, _, run_b)] = pair
            && area_a == area_b
            && start_b < end_a
        {
            return Err(MapError::PhysicalOverlap {
                area: (*area_b).clone(),
                area_offset: *start_b,
                first_run: (*run_a).min(*run_b),
                second_run: (*run_a).max(*run_b),
            });
        }
    }
    Ok(())
}

/// A physical location of a segment on one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PhysicalLocation<'a> {
    pub area: &'a AreaId,
    pub area_offset: u64,
}

impl PhysicalLocation<'_> {
    pub fn to_replica_location(&self) -> ReplicaLocation {
        ReplicaLocation::new(self.area.clone(), self.area_offset)
    }
}

/// A piece of a translated request: inside one run and one extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    range: ByteRange,
    extent_index: u64,
    run: &'a Run,
}

impl<'a> Segment<'a> {
    /// Volume bytes of this piece.
    pub fn range(&self) -> ByteRange {
        self.range
    }

    pub fn offset(&self) -> u64 {
        self.range.offset()
    }

    pub fn length(&self) -> u64 {
        self.range.length()
    }

    /// The extent this piece lies in (the usage bitmap bit and the hold domain).
    pub fn extent_index(&self) -> u64 {
        self.extent_index
    }

    pub fn is_hole(&self) -> bool {
        self.run.is_hole()
    }

    pub fn replica_count(&self) -> usize {
        self.run.replicas.len()
    }

    /// The run the piece was cut from.
    pub fn run(&self) -> &'a Run {
        self.run
    }

    /// Physical location of the piece's first byte on each replica, in replica order; empty for
    /// a hole.
    pub fn replicas(&self) -> impl ExactSizeIterator<Item = PhysicalLocation<'a>> + 'a {
        let delta = self.range.offset() - self.run.offset;
        self.run.replicas.iter().map(move |r| PhysicalLocation {
            area: &r.area,
            // In range: a valid run's area_offset + length fits in u64.
            area_offset: r.area_offset + delta,
        })
    }

    /// The location on replica `index`, if the run has that many.
    pub fn replica(&self, index: usize) -> Option<PhysicalLocation<'a>> {
        self.replicas().nth(index)
    }
}

/// Iterator of [`ExtentMap::translate`] and [`ExtentMap::extents`]: the pieces tile the request
/// in order.
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    runs: &'a [Run],
    run_index: usize,
    cursor: u64,
    end: u64,
    extent_size: ExtentSize,
}

impl<'a> Iterator for Segments<'a> {
    type Item = Segment<'a>;

    fn next(&mut self) -> Option<Segment<'a>> {
        if self.cursor >= self.end {
            return None;
        }
        let mut run = self.runs.get(self.run_index)?;
        while run.end() <= self.cursor {
            self.run_index += 1;
            run = self.runs.get(self.run_index)?;
        }
        let extent_end = self
            .extent_size
            .align_down(self.cursor)
            .saturating_add(self.extent_size.get());
        let piece_end = self.end.min(run.end()).min(extent_end);
        let segment = Segment {
            range: ByteRange::from_bounds(self.cursor, piece_end)?,
            extent_index: self.extent_size.index_of(self.cursor),
            run,
        };
        self.cursor = piece_end;
        Some(segment)
    }
}

impl FusedIterator for Segments<'_> {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExtentMapRef<'a> {
    size_bytes: u64,
    extent_size: ExtentSize,
    generation: Generation,
    runs: &'a [Run],
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawExtentMap {
    size_bytes: u64,
    extent_size: ExtentSize,
    generation: Generation,
    runs: Vec<Run>,
}

/// Serialized as `{sizeBytes, extentSize, generation, runs}` for the node's mapping cache. Not
/// the Kubernetes wire type (that one lives in `v1alpha1`).
impl Serialize for ExtentMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ExtentMapRef {
            size_bytes: self.size_bytes,
            extent_size: self.extent_size,
            generation: self.generation,
            runs: &self.runs,
        }
        .serialize(serializer)
    }
}

/// Deserializing validates like [`ExtentMap::from_runs`]: a corrupt cache file is an error, never
/// a map that breaks the invariants.
impl<'de> Deserialize<'de> for ExtentMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawExtentMap::deserialize(deserializer)?;
        ExtentMap::from_runs(raw.size_bytes, raw.extent_size, raw.generation, raw.runs)
            .map_err(serde::de::Error::custom)
    }
}
