//! The configuration diff between two mappings of one volume.
//!
//! Seed 004's "configuration information diff" 222 (§4.5): the before/after difference of the
//! mapping. It is what is staged on every node before the hold (530/531, [0075]), it **defines
//! the ranges that are held and drained** (813'/810', [0086]–[0087]), and its reverse restores
//! the old mapping on rollback (612, 635, [0099]). The patent gives no entry format; ours is one
//! entry per maximal volume range whose placement changed, with its old and new placement.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::error::MapError;
use super::extent_map::{ExtentMap, ReplicaLocation, Run, resize_runs, splice};
use super::generation::Generation;
use super::units::{ByteRange, ExtentSize};

/// Where a volume range lives on one side of a diff. Locations are those of the range's first
/// byte; the rest follows linearly.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Placement {
    /// Beyond the end of that side's volume (the two maps have different sizes).
    Absent,
    /// Inside the volume but unallocated.
    Hole,
    /// On these replicas, in replica order.
    Mapped(Vec<ReplicaLocation>),
}

impl Placement {
    /// The replicas (empty for `Absent` and `Hole`).
    pub fn replicas(&self) -> &[ReplicaLocation] {
        match self {
            Placement::Mapped(replicas) => replicas,
            Placement::Absent | Placement::Hole => &[],
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, Placement::Mapped(_))
    }

    /// The placement of byte `offset` of `run`.
    fn of_run(run: &Run, offset: u64) -> Placement {
        if run.is_hole() {
            Placement::Hole
        } else {
            shifted(&run.replicas, offset - run.offset)
        }
    }
}

/// `replicas` moved `delta` bytes further on (cannot saturate for runs of a valid map).
fn shifted(replicas: &[ReplicaLocation], delta: u64) -> Placement {
    Placement::Mapped(
        replicas
            .iter()
            .map(|r| ReplicaLocation {
                area: r.area.clone(),
                area_offset: r.area_offset.saturating_add(delta),
            })
            .collect(),
    )
}

/// One changed range: every byte of `range` was placed per `old` and is placed per `new`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeChange {
    pub range: ByteRange,
    pub old: Placement,
    pub new: Placement,
}

/// The difference between an old and a new mapping of one volume. Built by [`diff`].
///
/// Changes are sorted, disjoint and maximal: two neighbouring changes are kept apart only when
/// the old or the new placement does not continue linearly across their boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapDiff {
    old_generation: Generation,
    new_generation: Generation,
    old_size: u64,
    new_size: u64,
    extent_size: ExtentSize,
    changes: Vec<RangeChange>,
}

/// The ranges of the volume whose placement differs between `old` and `new`: replica set or
/// order, physical offset, hole ↔ mapped.
///
/// Maps of different sizes are compared too: bytes that exist on one side only count as changed
/// (their other side is [`Placement::Absent`]). A grown tail changes what I/O the volume accepts,
/// so it belongs in the hold, and the same rule makes the reverse diff (a rollback of a grow)
/// well defined. Maps of different extent sizes belong to different pools and are refused.
pub fn diff(old: &ExtentMap, new: &ExtentMap) -> Result<MapDiff, MapError> {
    let extent_size = old.extent_size();
    if extent_size != new.extent_size() {
        return Err(MapError::ExtentSizeMismatch {
            left: extent_size.get(),
            right: new.extent_size().get(),
        });
    }
    let end = old.size_bytes().max(new.size_bytes());
    let mut old_walk = Walker::new(old);
    let mut new_walk = Walker::new(new);
    let mut changes: Vec<RangeChange> = Vec::new();
    let mut cursor = 0;
    while cursor < end {
        let (old_placement, old_end) = old_walk.at(cursor);
        let (new_placement, new_end) = new_walk.at(cursor);
        let piece_end = old_end.min(new_end).min(end);
        // Pieces end at run boundaries of either map. Both maps are canonical, so at every piece
        // boundary at least one side does not continue linearly: the changes are already maximal
        // and need no coalescing.
        if old_placement != new_placement
            && let Some(range) = ByteRange::from_bounds(cursor, piece_end)
        {
            changes.push(RangeChange {
                range,
                old: old_placement,
                new: new_placement,
            });
        }
        cursor = piece_end;
    }
    Ok(MapDiff {
        old_generation: old.generation(),
        new_generation: new.generation(),
        old_size: old.size_bytes(),
        new_size: new.size_bytes(),
        extent_size,
        changes,
    })
}

/// Walks the runs of one map in order, answering "what is placed at this offset, and until where".
struct Walker<'a> {
    runs: &'a [Run],
    index: usize,
    size: u64,
}

impl<'a> Walker<'a> {
    fn new(map: &'a ExtentMap) -> Self {
        Walker {
            runs: map.runs(),
            index: 0,
            size: map.size_bytes(),
        }
    }

    /// Offsets must be asked in increasing order.
    fn at(&mut self, offset: u64) -> (Placement, u64) {
        if offset >= self.size {
            return (Placement::Absent, u64::MAX);
        }
        while let Some(run) = self.runs.get(self.index)
            && run.end() <= offset
        {
            self.index += 1;
        }
        match self.runs.get(self.index) {
            Some(run) => (Placement::of_run(run, offset), run.end()),
            // Unreachable for a valid map (its runs tile [0, size)).
            None => (Placement::Absent, u64::MAX),
        }
    }
}

impl MapDiff {
    /// Whether the two maps place every byte identically (generations may still differ).
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn changes(&self) -> &[RangeChange] {
        &self.changes
    }

    pub fn old_generation(&self) -> Generation {
        self.old_generation
    }

    pub fn new_generation(&self) -> Generation {
        self.new_generation
    }

    pub fn old_size(&self) -> u64 {
        self.old_size
    }

    pub fn new_size(&self) -> u64 {
        self.new_size
    }

    pub fn extent_size(&self) -> ExtentSize {
        self.extent_size
    }

    /// Volume bytes whose placement changes.
    pub fn changed_bytes(&self) -> u64 {
        self.changes.iter().map(|c| c.range.length()).sum()
    }

    /// The extents a change touches, as sorted, disjoint, coalesced index ranges: the scope of
    /// the range-limited hold (seed 004 813' [0086]; ARCHITECTURE §4 "hold domains").
    pub fn changed_extent_ranges(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for change in &self.changes {
            let extents = change.range.extent_indices(self.extent_size);
            match out.last_mut() {
                Some(last) if extents.start <= last.end => last.end = last.end.max(extents.end),
                _ => out.push(extents),
            }
        }
        out
    }

    /// The indices of the extents a change touches, ascending, each once.
    pub fn changed_extents(&self) -> impl Iterator<Item = u64> + use<> {
        self.changed_extent_ranges().into_iter().flatten()
    }

    /// Whether a request for `range` touches a changed extent, i.e. must be held while this diff
    /// is committed. The hold works on whole extents (seed 004 [0077]: per entry, not per byte),
    /// and a request that touches one held extent is held whole (seed 004 §11.4).
    pub fn affects(&self, range: ByteRange) -> bool {
        if range.is_empty() {
            return false;
        }
        let start = self.extent_size.align_down(range.offset());
        let end = self.extent_size.align_up(range.end()).unwrap_or(u64::MAX);
        let index = self.changes.partition_point(|c| c.range.end() <= start);
        self.changes
            .get(index)
            .is_some_and(|c| c.range.offset() < end)
    }

    /// The diff that undoes this one (seed 004 635 [0099]: restore the configuration from before
    /// the operation). Equal to `diff(new, old)`.
    pub fn reversed(&self) -> MapDiff {
        MapDiff {
            old_generation: self.new_generation,
            new_generation: self.old_generation,
            old_size: self.new_size,
            new_size: self.old_size,
            extent_size: self.extent_size,
            changes: self
                .changes
                .iter()
                .map(|c| RangeChange {
                    range: c.range,
                    old: c.new.clone(),
                    new: c.old.clone(),
                })
                .collect(),
        }
    }
}

impl ExtentMap {
    /// `diff(self, new)`.
    pub fn diff(&self, new: &ExtentMap) -> Result<MapDiff, MapError> {
        diff(self, new)
    }

    /// Builds the new map from this one and a diff (seed 004 531/707: the standby plane is built
    /// from the diff). The diff must have been computed from a map of this generation, and its old
    /// side must match this map exactly; the result carries the diff's new generation.
    pub fn apply(&self, diff: &MapDiff) -> Result<ExtentMap, MapError> {
        if diff.extent_size != self.extent_size() {
            return Err(MapError::ExtentSizeMismatch {
                left: self.extent_size().get(),
                right: diff.extent_size.get(),
            });
        }
        if diff.old_generation != self.generation() {
            return Err(MapError::GenerationMismatch {
                expected: diff.old_generation,
                found: self.generation(),
            });
        }
        if diff.old_size != self.size_bytes() {
            return Err(MapError::DiffMismatch {
                offset: diff.old_size.min(self.size_bytes()),
            });
        }
        let mut runs = resize_runs(
            self.runs(),
            self.size_bytes(),
            diff.new_size,
            self.extent_size(),
        )?;
        for change in &diff.changes {
            let replicas = match &change.new {
                Placement::Absent => {
                    if change.range.offset() < diff.new_size {
                        return Err(MapError::DiffMismatch {
                            offset: change.range.offset(),
                        });
                    }
                    continue;
                }
                Placement::Hole => Vec::new(),
                Placement::Mapped(replicas) => replicas.clone(),
            };
            if change.range.end() > diff.new_size {
                return Err(MapError::DiffMismatch {
                    offset: change.range.offset(),
                });
            }
            let run = Run::new(change.range.offset(), change.range.length(), replicas);
            runs = splice(&runs, change.range, run);
        }
        let result =
            ExtentMap::from_runs(diff.new_size, self.extent_size(), diff.new_generation, runs)?;
        // The splices alone would accept a diff whose old side describes another map; recomputing
        // proves the diff really is the change from this map to the result.
        let check = self::diff(self, &result)?;
        if check.changes != diff.changes {
            let first = check
                .changes
                .iter()
                .zip(&diff.changes)
                .position(|(a, b)| a != b)
                .unwrap_or(check.changes.len().min(diff.changes.len()));
            let offset = [check.changes.get(first), diff.changes.get(first)]
                .into_iter()
                .flatten()
                .map(|c| c.range.offset())
                .min()
                .unwrap_or(0);
            return Err(MapError::DiffMismatch { offset });
        }
        Ok(result)
    }
}
