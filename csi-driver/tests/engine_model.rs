//! Property test: the engine against a byte-array reference model under random sequences of
//! reads, writes, trims, write-zeroes, holes punched and allocated through map swaps, extents
//! moved to other areas (copy, then swap, as the remap will), replica failures and resyncs,
//! priority changes, usage reports and dirty snapshots.
//!
//! The model predicts, for every piece of every request, whether it succeeds and which replicas
//! get marked unhealthy (see `engine::health`), and checks after every step: read data, errors
//! (NeedsAllocation exactly for writes touching holes), replica health, usage bits and counters
//! (seed 000 bitmaps 332/334), usage deltas applied on an operator-side mirror, dirty bits, and the
//! generation every backend call carried.

mod engine_support;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use engine_support::{ES, Rig, es, pattern, runtime};
use proptest::prelude::*;
use roaring::RoaringBitmap;
use tessera_api::model::{AreaId, ByteRange, ExtentMap, Generation, ReplicaLocation, Run, Segment};
use tessera_api::v1alpha1::DataPriority;
use tessera_csi::backend::{AreaBackend, IoDriver};
use tessera_csi::engine::{
    ApplyOutcome, EngineError, UsageDelta, UsageInit, UsageMirror, Volume, VolumeOptions,
};

/// Six extents, the last one partial.
const SIZE: u64 = 5 * ES + 2048;
const EXTENTS: u64 = 6;
const SECTORS: u64 = SIZE / 512;
const AREAS: [&str; 3] = ["a", "b", "c"];
const SLOTS: u64 = 16;

#[derive(Debug, Clone)]
enum Op {
    Read {
        start: u64,
        len: u64,
    },
    Write {
        start: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Trim {
        start: u64,
        len: u64,
    },
    WriteZeroes {
        start: u64,
        len: u64,
        fua: bool,
    },
    Flush,
    PunchHole {
        extent: u64,
    },
    Allocate {
        extent: u64,
        first: usize,
        second: usize,
    },
    Move {
        extent: u64,
        replica: usize,
        to: usize,
    },
    Fail {
        area: usize,
        reads: bool,
        writes: bool,
    },
    Heal {
        area: usize,
    },
    SetPriority {
        high: bool,
    },
    UsageReport,
    DirtySnapshot,
    ToggleDirty,
    StaleSwap,
}

fn op() -> impl Strategy<Value = Op> {
    let span = (0..SECTORS, 0..=SECTORS);
    prop_oneof![
        5 => span.clone().prop_map(|(start, len)| Op::Read { start, len }),
        6 => (span.clone(), any::<u8>(), any::<bool>())
            .prop_map(|((start, len), seed, fua)| Op::Write { start, len, seed, fua }),
        2 => span.clone().prop_map(|(start, len)| Op::Trim { start, len }),
        2 => (span, any::<bool>()).prop_map(|((start, len), fua)| Op::WriteZeroes { start, len, fua }),
        1 => Just(Op::Flush),
        1 => (0..EXTENTS).prop_map(|extent| Op::PunchHole { extent }),
        2 => (0..EXTENTS, 0..3usize, 0..2usize)
            .prop_map(|(extent, first, second)| Op::Allocate { extent, first, second }),
        2 => (0..EXTENTS, 0..2usize, 0..3usize).prop_map(|(extent, replica, to)| Op::Move { extent, replica, to }),
        2 => (0..3usize, prop::bool::weighted(0.5), prop::bool::weighted(0.5))
            .prop_map(|(area, reads, writes)| Op::Fail { area, reads, writes }),
        2 => (0..3usize).prop_map(|area| Op::Heal { area }),
        1 => any::<bool>().prop_map(|high| Op::SetPriority { high }),
        1 => Just(Op::UsageReport),
        1 => Just(Op::DirtySnapshot),
        1 => Just(Op::ToggleDirty),
        1 => Just(Op::StaleSwap),
    ]
}

struct Model {
    data: Vec<u8>,
    /// Trimmed bytes: read back as `data` or as zero.
    loose: Vec<bool>,
    map: Arc<ExtentMap>,
    failing_reads: BTreeSet<AreaId>,
    failing_writes: BTreeSet<AreaId>,
    unhealthy: BTreeSet<AreaId>,
    in_use: BTreeSet<u64>,
    high: BTreeSet<u64>,
    priority_high: bool,
    dirty_enabled: bool,
    dirty: BTreeSet<u64>,
    mirror: UsageMirror,
}

/// Outcome of one piece: success, and the replicas to mark unhealthy.
fn predict(model: &Model, segment: &Segment<'_>, read: bool) -> (bool, Vec<AreaId>) {
    if segment.is_hole() {
        return (true, Vec::new());
    }
    let failing = if read {
        &model.failing_reads
    } else {
        &model.failing_writes
    };
    let healthy: Vec<AreaId> = segment
        .replicas()
        .map(|l| l.area.clone())
        .filter(|a| !model.unhealthy.contains(a))
        .collect();
    if read {
        // First healthy replica, falling back in order; the ones that failed before a success
        // are marked.
        let mut failed = Vec::new();
        for area in healthy {
            if failing.contains(&area) {
                failed.push(area);
            } else {
                return (true, failed);
            }
        }
        (false, Vec::new())
    } else {
        let ok = healthy.iter().any(|a| !failing.contains(a));
        let marks = if ok {
            healthy
                .into_iter()
                .filter(|a| failing.contains(a))
                .collect()
        } else {
            Vec::new()
        };
        (ok, marks)
    }
}

fn range(offset: u64, length: u64) -> ByteRange {
    ByteRange::new(offset, length).expect("range")
}

fn extent_range(extent: u64) -> ByteRange {
    let start = extent * ES;
    range(start, (start + ES).min(SIZE) - start)
}

fn covers_extent(segment: &Segment<'_>) -> bool {
    let start = segment.extent_index() * ES;
    segment.offset() == start && segment.range().end() == (start + ES).min(SIZE)
}

fn roaring(set: &BTreeSet<u64>) -> RoaringBitmap {
    set.iter().map(|&e| e as u32).collect()
}

fn is_replica_error(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::Io { .. } | EngineError::AllReplicasFailed { .. }
    )
}

/// First free extent slot of `area` under `map`.
fn free_slot(map: &ExtentMap, area: &str) -> Option<u64> {
    let mut used = BTreeSet::new();
    for run in map.runs() {
        for replica in run.replicas.iter().filter(|r| r.area.as_str() == area) {
            let first = replica.area_offset / ES;
            used.extend(first..first + es().extents_for(run.length));
        }
    }
    (0..SLOTS).find(|slot| !used.contains(slot))
}

fn initial_map(holes: &[bool]) -> Arc<ExtentMap> {
    let mut runs = Vec::new();
    for (extent, &hole) in holes.iter().enumerate() {
        let r = extent_range(extent as u64);
        let e = extent as u64;
        let replicas = if hole {
            Vec::new()
        } else {
            // Pairs rotate over the areas; slot = extent, so they never collide.
            let first = extent % 3;
            vec![
                ReplicaLocation::new(AREAS[first], e * ES),
                ReplicaLocation::new(AREAS[(first + 1) % 3], e * ES),
            ]
        };
        runs.push(Run::new(r.offset(), r.length(), replicas));
    }
    Arc::new(ExtentMap::from_runs(SIZE, es(), Generation(1), runs).expect("valid map"))
}

struct Harness {
    rt: tokio::runtime::Runtime,
    rig: Rig,
    volume: Volume,
    model: Model,
}

impl Harness {
    fn new(holes: &[bool], high: bool, driver: IoDriver) -> Harness {
        let rig = Rig::with_driver(&AREAS, SLOTS * ES, driver);
        let map = initial_map(holes);
        let priority = if high {
            DataPriority::High
        } else {
            DataPriority::Low
        };
        let volume = Volume::open(
            "prop",
            map.clone(),
            rig.registry.clone(),
            VolumeOptions {
                priority,
                usage: UsageInit::Empty,
            },
        )
        .expect("open");
        Harness {
            rt: runtime(),
            rig,
            volume,
            model: Model {
                data: vec![0; SIZE as usize],
                loose: vec![false; SIZE as usize],
                map,
                failing_reads: BTreeSet::new(),
                failing_writes: BTreeSet::new(),
                unhealthy: BTreeSet::new(),
                in_use: BTreeSet::new(),
                high: BTreeSet::new(),
                priority_high: high,
                dirty_enabled: false,
                dirty: BTreeSet::new(),
                mirror: UsageMirror::default(),
            },
        }
    }

    fn swap(&mut self, new: ExtentMap) {
        let new = Arc::new(new);
        self.volume
            .swap_map(new.clone())
            .expect("swap to a newer map");
        self.model.map = new;
    }

    fn check_read(&self, offset: u64, got: &[u8]) {
        for (i, &byte) in got.iter().enumerate() {
            let at = offset as usize + i;
            let want = self.model.data[at];
            let ok = byte == want || (self.model.loose[at] && byte == 0);
            assert!(
                ok,
                "byte {at}: read {byte}, model {want} (loose {})",
                self.model.loose[at]
            );
        }
    }

    fn mark_dirty(&mut self, r: ByteRange) {
        if self.model.dirty_enabled {
            self.model.dirty.extend(r.extent_indices(es()));
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Read { start, len } => {
                let (offset, length) = span(start, len);
                let result = self.rt.block_on(self.volume.read(offset, length));
                let map = self.model.map.clone();
                let mut ok = true;
                let mut marks = Vec::new();
                for segment in map.translate(range(offset, length)).expect("in range") {
                    let (piece_ok, piece_marks) = predict(&self.model, &segment, true);
                    ok &= piece_ok;
                    marks.extend(piece_marks);
                }
                match result {
                    Ok(data) => {
                        assert!(ok, "read succeeded, model predicted a failure");
                        assert_eq!(data.len() as u64, length);
                        self.check_read(offset, &data);
                    }
                    Err(e) => assert!(!ok && is_replica_error(&e), "unexpected {e}"),
                }
                self.model.unhealthy.extend(marks);
            }
            Op::Write {
                start,
                len,
                seed,
                fua,
            } => {
                let (offset, length) = span(start, len);
                let data = pattern(seed, length as usize);
                let result =
                    self.rt
                        .block_on(self.volume.write(offset, Bytes::from(data.clone()), fua));
                if length == 0 {
                    result.expect("empty write");
                    return;
                }
                let map = self.model.map.clone();
                let r = range(offset, length);
                let segments: Vec<Segment<'_>> = map.translate(r).expect("in range").collect();
                let holes: Vec<&Segment<'_>> = segments.iter().filter(|s| s.is_hole()).collect();
                if let (Some(first), Some(last)) = (holes.first(), holes.last()) {
                    let start = first.extent_index() * ES;
                    let end = ((last.extent_index() + 1) * ES).min(SIZE);
                    match result {
                        Err(EngineError::NeedsAllocation { range: got }) => {
                            assert_eq!(got, range(start, end - start));
                        }
                        other => {
                            panic!("write into a hole: expected NeedsAllocation, got {other:?}")
                        }
                    }
                    return;
                }
                self.mark_dirty(r);
                for extent in r.extent_indices(es()) {
                    self.model.in_use.insert(extent);
                    if self.model.priority_high {
                        self.model.high.insert(extent);
                    } else {
                        self.model.high.remove(&extent);
                    }
                }
                let mut ok = true;
                let mut marks = Vec::new();
                for segment in &segments {
                    let (piece_ok, piece_marks) = predict(&self.model, segment, false);
                    marks.extend(piece_marks);
                    ok &= piece_ok;
                    if piece_ok {
                        let from = (segment.offset() - offset) as usize;
                        let to = from + segment.length() as usize;
                        let at = segment.offset() as usize;
                        self.model.data[at..at + to - from].copy_from_slice(&data[from..to]);
                        self.model.loose[at..at + to - from].fill(false);
                    }
                    // A piece whose every healthy replica failed wrote nothing (the injector
                    // fails before the area is touched), so the model keeps the old bytes.
                }
                match result {
                    Ok(()) => assert!(ok, "write succeeded, model predicted a failure"),
                    Err(e) => assert!(!ok && is_replica_error(&e), "unexpected {e}"),
                }
                self.model.unhealthy.extend(marks);
            }
            Op::Trim { start, len } | Op::WriteZeroes { start, len, .. } => {
                let zeroes = matches!(op, Op::WriteZeroes { .. });
                let (offset, length) = span(start, len);
                let result = self.rt.block_on(match *op {
                    Op::WriteZeroes { fua, .. } => {
                        Box::pin(self.volume.write_zeroes(offset, length, fua))
                            as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>
                    }
                    _ => Box::pin(self.volume.trim(offset, length)),
                });
                if length == 0 {
                    result.expect("empty discard");
                    return;
                }
                let map = self.model.map.clone();
                let r = range(offset, length);
                self.mark_dirty(r);
                let mut ok = true;
                let mut marks = Vec::new();
                for segment in map.translate(r).expect("in range") {
                    let (piece_ok, piece_marks) = predict(&self.model, &segment, false);
                    marks.extend(piece_marks);
                    ok &= piece_ok;
                    if !piece_ok {
                        continue;
                    }
                    let at = segment.offset() as usize;
                    let end = at + segment.length() as usize;
                    if !segment.is_hole() {
                        if zeroes {
                            self.model.data[at..end].fill(0);
                            self.model.loose[at..end].fill(false);
                        } else {
                            self.model.loose[at..end].fill(true);
                        }
                    }
                    if covers_extent(&segment) {
                        self.model.in_use.remove(&segment.extent_index());
                        self.model.high.remove(&segment.extent_index());
                    }
                }
                match result {
                    Ok(()) => assert!(ok, "discard succeeded, model predicted a failure"),
                    Err(e) => assert!(!ok && is_replica_error(&e), "unexpected {e}"),
                }
                self.model.unhealthy.extend(marks);
            }
            Op::Flush => {
                // Flush faults are not injected here (unit tests cover them).
                self.rt.block_on(self.volume.flush()).expect("flush");
            }
            Op::PunchHole { extent } => {
                let r = extent_range(extent);
                if self.model.map.run_at(r.offset()).is_none_or(Run::is_hole) {
                    return;
                }
                let punched = self.model.map.punch_hole(r).expect("punch");
                self.swap(punched);
                let at = r.offset() as usize;
                self.model.data[at..r.end() as usize].fill(0);
                self.model.loose[at..r.end() as usize].fill(false);
                self.model.in_use.remove(&extent);
                self.model.high.remove(&extent);
            }
            Op::Allocate {
                extent,
                first,
                second,
            } => {
                let r = extent_range(extent);
                if !self.model.map.run_at(r.offset()).is_some_and(Run::is_hole) {
                    return;
                }
                let a = AREAS[first];
                let b = AREAS[(first + 1 + second) % 3];
                let (Some(slot_a), Some(slot_b)) =
                    (free_slot(&self.model.map, a), free_slot(&self.model.map, b))
                else {
                    return;
                };
                // The allocator hands out zeroed extents.
                for (area, slot) in [(a, slot_a), (b, slot_b)] {
                    self.rt
                        .block_on(self.rig.area(area).write_zeroes(
                            Generation(0),
                            slot * ES,
                            ES,
                            false,
                        ))
                        .expect("zero new extent");
                }
                let assigned = self
                    .model
                    .map
                    .assign(
                        r,
                        vec![
                            ReplicaLocation::new(a, slot_a * ES),
                            ReplicaLocation::new(b, slot_b * ES),
                        ],
                    )
                    .expect("assign");
                self.swap(assigned);
            }
            Op::Move {
                extent,
                replica,
                to,
            } => {
                let r = extent_range(extent);
                let map = self.model.map.clone();
                let Some(segment) = map.translate(r).expect("in range").next() else {
                    return;
                };
                if segment.is_hole() {
                    return;
                }
                let locations: Vec<ReplicaLocation> = segment
                    .replicas()
                    .map(|l| l.to_replica_location())
                    .collect();
                let target = AREAS[to];
                if locations.iter().any(|l| l.area.as_str() == target) {
                    return;
                }
                let Some(slot) = free_slot(&map, target) else {
                    return;
                };
                // Copy from a healthy replica (the remap's copier), then switch the map.
                let Some(source) = locations
                    .iter()
                    .find(|l| !self.model.unhealthy.contains(&l.area))
                else {
                    return;
                };
                let copy = self
                    .rt
                    .block_on(self.rig.area(source.area.as_str()).read(
                        Generation(0),
                        source.area_offset,
                        ES as usize,
                    ))
                    .expect("copy out");
                self.rt
                    .block_on(
                        self.rig
                            .area(target)
                            .write(Generation(0), slot * ES, copy, true),
                    )
                    .expect("copy in");
                let mut moved = locations.clone();
                moved[replica] = ReplicaLocation::new(target, slot * ES);
                let new = map.assign(r, moved).expect("assign");
                self.swap(new);
            }
            Op::Fail {
                area,
                reads,
                writes,
            } => {
                let id = AreaId::new(AREAS[area]);
                self.rig.fault(AREAS[area]).fail_reads(reads);
                self.rig.fault(AREAS[area]).fail_writes(writes);
                set_flag(&mut self.model.failing_reads, &id, reads);
                set_flag(&mut self.model.failing_writes, &id, writes);
            }
            Op::Heal { area } => {
                let name = AREAS[area];
                let id = AreaId::new(name);
                self.rig.fault(name).fail_all(false);
                self.model.failing_reads.remove(&id);
                self.model.failing_writes.remove(&id);
                if !self.model.unhealthy.contains(&id) {
                    return;
                }
                // Resync every run on the area from another healthy replica, if each has one.
                let map = self.model.map.clone();
                let mut copies = Vec::new();
                for run in map.runs() {
                    let Some(target) = run.replicas.iter().find(|r| r.area == id) else {
                        continue;
                    };
                    let Some(source) = run
                        .replicas
                        .iter()
                        .find(|r| r.area != id && !self.model.unhealthy.contains(&r.area))
                    else {
                        return;
                    };
                    copies.push((source.clone(), target.clone(), run.length));
                }
                for (source, target, length) in copies {
                    let data = self
                        .rt
                        .block_on(self.rig.area(source.area.as_str()).read(
                            Generation(0),
                            source.area_offset,
                            length as usize,
                        ))
                        .expect("resync read");
                    self.rt
                        .block_on(self.rig.area(name).write(
                            Generation(0),
                            target.area_offset,
                            data,
                            true,
                        ))
                        .expect("resync write");
                }
                assert!(self.volume.restore_replica(&id));
                self.model.unhealthy.remove(&id);
            }
            Op::SetPriority { high } => {
                self.volume.set_priority(if high {
                    DataPriority::High
                } else {
                    DataPriority::Low
                });
                self.model.priority_high = high;
            }
            Op::UsageReport => {
                let delta = self.volume.take_usage_delta();
                let decoded = UsageDelta::from_bytes(&delta.to_bytes()).expect("decode");
                assert_eq!(decoded, delta);
                assert_eq!(delta.map_generation, self.model.map.generation());
                assert_eq!(self.model.mirror.apply(&decoded), ApplyOutcome::Applied);
                let applied = self.model.mirror.clone();
                assert_eq!(self.model.mirror.apply(&decoded), ApplyOutcome::Duplicate);
                assert_eq!(self.model.mirror, applied, "re-applying changes nothing");
                assert_eq!(self.model.mirror.in_use, roaring(&self.model.in_use));
                assert_eq!(self.model.mirror.high_priority, roaring(&self.model.high));
                assert_eq!(delta.in_use_bytes, self.model.in_use.len() as u64 * ES);
                assert_eq!(delta.high_priority_bytes, self.model.high.len() as u64 * ES);
            }
            Op::DirtySnapshot => {
                let snapshot = self.volume.snapshot_and_clear_dirty();
                assert_eq!(snapshot, roaring(&self.model.dirty));
                self.model.dirty.clear();
            }
            Op::ToggleDirty => {
                if self.model.dirty_enabled {
                    self.volume.disable_dirty_tracking();
                } else {
                    self.volume.enable_dirty_tracking();
                }
                self.model.dirty_enabled = !self.model.dirty_enabled;
                self.model.dirty.clear();
            }
            Op::StaleSwap => {
                let error = self
                    .volume
                    .swap_map(self.model.map.clone())
                    .expect_err("same generation");
                assert!(matches!(error, EngineError::GenerationNotNewer { .. }));
            }
        }
    }

    fn check_invariants(&self) {
        let generation = self.model.map.generation();
        assert_eq!(self.volume.generation(), generation);
        assert_eq!(*self.volume.map(), *self.model.map);
        for area in AREAS {
            for call in self.rig.fault(area).calls() {
                assert_eq!(call.generation, generation, "{call:?} on {area}");
            }
        }
        self.rig.clear_calls();
        let unhealthy: Vec<AreaId> = self.model.unhealthy.iter().cloned().collect();
        assert_eq!(self.volume.health().unhealthy_areas, unhealthy);
        assert_eq!(self.volume.in_use_extents(), roaring(&self.model.in_use));
        assert_eq!(
            self.volume.high_priority_extents(),
            roaring(&self.model.high)
        );
        assert_eq!(
            self.volume.in_use_bytes(),
            self.model.in_use.len() as u64 * ES
        );
        assert_eq!(
            self.volume.high_priority_bytes(),
            self.model.high.len() as u64 * ES
        );
        assert!(self.model.high.is_subset(&self.model.in_use));
        let dirty = if self.model.dirty_enabled {
            roaring(&self.model.dirty)
        } else {
            RoaringBitmap::new()
        };
        assert_eq!(self.volume.dirty_extents(), dirty);
    }

    /// Heals everything and reads the whole volume.
    fn final_check(&mut self) {
        for area in 0..AREAS.len() {
            self.step(&Op::Heal { area });
        }
        if let Ok(all) = self.rt.block_on(self.volume.read(0, SIZE)) {
            self.check_read(0, &all);
        } else {
            // Only possible when some run lost every replica (per-area health).
            assert_ne!(self.volume.health().failed_bytes, 0);
        }
    }
}

fn span(start: u64, len: u64) -> (u64, u64) {
    let len = len.min(SECTORS - start);
    (start * 512, len * 512)
}

fn set_flag(set: &mut BTreeSet<AreaId>, area: &AreaId, on: bool) {
    if on {
        set.insert(area.clone());
    } else {
        set.remove(area);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_reference_model(
        holes in prop::collection::vec(prop::bool::weighted(0.3), EXTENTS as usize),
        high in any::<bool>(),
        thread_pool in any::<bool>(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        // Both drivers: the default (io_uring where allowed) and the thread pool.
        let driver = if thread_pool { IoDriver::ThreadPool } else { IoDriver::Auto };
        let mut harness = Harness::new(&holes, high, driver);
        for op in &ops {
            harness.step(op);
            harness.check_invariants();
        }
        harness.final_check();
    }
}
