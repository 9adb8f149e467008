//! Property tests of the extent map against a naive reference model that keeps one entry per
//! extent-sized block: `None` for a hole, or the replica locations of the block's first byte.
//!
//! Random sequences of assign / punch / grow are applied to both; the run-length map must agree
//! with the model block by block, stay canonical, translate byte ranges to the same physical
//! bytes, refuse exactly the edits the model finds invalid, and diff to exactly the blocks where
//! two models differ. Volumes are tiny (at most ~50 extents of 512 or 4096 bytes) so that the
//! whole file runs in a few seconds in debug builds.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tessera_api::model::{
    AreaUsage, ByteRange, ExtentMap, ExtentSize, MapError, Placement, ReplicaLocation, Run, diff,
};

const AREAS: [&str; 3] = ["a", "b", "c"];
/// Linear layouts put block `j` at extent `k * STRIDE + j` of an area, so that neighbouring
/// blocks assigned with the same `k` are physically contiguous (and must merge), while blocks of
/// one volume never collide (volumes stay below `STRIDE` extents).
const STRIDE: u64 = 64;

type Locations = Vec<(String, u64)>;

/// How one replica of an assignment picks its area offset.
#[derive(Debug, Clone)]
enum Layout {
    /// `(k * STRIDE + block) * extent`: contiguous with other blocks laid out with the same `k`.
    Linear(u64),
    /// `r * extent` for the first block: often collides with other mappings.
    Random(u64),
}

#[derive(Debug, Clone)]
struct ReplicaSpec {
    area: usize,
    layout: Layout,
}

#[derive(Debug, Clone)]
enum Op {
    Assign {
        start: u64,
        len: u64,
        replicas: [ReplicaSpec; 3],
        /// Use this many replicas instead of the volume's copies (mostly to provoke mismatches).
        count: Option<usize>,
    },
    Punch {
        start: u64,
        len: u64,
    },
    Grow {
        sectors: u64,
    },
}

fn replica_spec() -> impl Strategy<Value = ReplicaSpec> {
    (
        0..AREAS.len(),
        prop_oneof![
            3 => (0..3u64).prop_map(Layout::Linear),
            1 => (0..24u64).prop_map(Layout::Random),
        ],
    )
        .prop_map(|(area, layout)| ReplicaSpec { area, layout })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (
            any::<u64>(),
            any::<u64>(),
            [replica_spec(), replica_spec(), replica_spec()],
            prop_oneof![9 => Just(None), 1 => (1..=3usize).prop_map(Some)],
        )
            .prop_map(|(start, len, replicas, count)| Op::Assign { start, len, replicas, count }),
        2 => (any::<u64>(), any::<u64>()).prop_map(|(start, len)| Op::Punch { start, len }),
        1 => (0..=24u64).prop_map(|sectors| Op::Grow { sectors }),
    ]
}

/// (extent size, initial size, copies, ops).
fn scenario(max_ops: usize) -> impl Strategy<Value = (u64, u64, usize, Vec<Op>)> {
    (
        prop_oneof![Just(512u64), Just(4096u64)],
        1..=12u64,
        0..8u64,
        1..=2usize,
    )
        .prop_flat_map(move |(es, blocks, tail_sectors, copies)| {
            // A partial tail extent (only possible when the extent is bigger than a sector).
            let tail = if es > 512 { tail_sectors * 512 } else { 0 };
            let size = blocks * es + tail;
            (
                Just(es),
                Just(size),
                Just(copies),
                proptest::collection::vec(op(), 0..=max_ops),
            )
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Naive {
    size: u64,
    es: u64,
    blocks: Vec<Option<Locations>>,
}

/// What the model expects from an edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Valid,
    DuplicateArea,
    ReplicaCountMismatch,
    PhysicalOverlap,
}

impl Naive {
    fn new(size: u64, es: u64) -> Self {
        Naive {
            size,
            es,
            blocks: vec![None; size.div_ceil(es) as usize],
        }
    }

    fn nblocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    fn block_range(&self, i: u64) -> ByteRange {
        let start = i * self.es;
        ByteRange::from_bounds(start, ((i + 1) * self.es).min(self.size)).expect("block in volume")
    }

    /// Blocks `[first, first + count)` picked from raw random numbers.
    fn pick(&self, start: u64, len: u64) -> (u64, u64) {
        let n = self.nblocks();
        let first = start % n;
        (first, 1 + len % (n - first))
    }

    fn bytes_of(&self, first: u64, count: u64) -> ByteRange {
        ByteRange::from_bounds(first * self.es, ((first + count) * self.es).min(self.size))
            .expect("blocks in volume")
    }

    fn placement_at(&self, byte: u64) -> Placement {
        if byte >= self.size {
            return Placement::Absent;
        }
        match &self.blocks[(byte / self.es) as usize] {
            None => Placement::Hole,
            Some(locations) => Placement::Mapped(
                locations
                    .iter()
                    .map(|(a, o)| ReplicaLocation::new(a.as_str(), o + byte % self.es))
                    .collect(),
            ),
        }
    }

    /// Same checks as the map, in the order the map makes them.
    fn verdict(&self, new_replicas: &Locations) -> Verdict {
        let areas: BTreeSet<_> = new_replicas.iter().map(|(a, _)| a).collect();
        if areas.len() != new_replicas.len() {
            return Verdict::DuplicateArea;
        }
        let counts: BTreeSet<usize> = self.blocks.iter().flatten().map(Vec::len).collect();
        if counts.len() > 1 {
            return Verdict::ReplicaCountMismatch;
        }
        let mut physical = BTreeSet::new();
        for locations in self.blocks.iter().flatten() {
            for location in locations {
                if !physical.insert(location.clone()) {
                    return Verdict::PhysicalOverlap;
                }
            }
        }
        Verdict::Valid
    }

    fn allocated_bytes(&self) -> u64 {
        (0..self.nblocks())
            .filter(|&i| self.blocks[i as usize].is_some())
            .map(|i| self.block_range(i).length())
            .sum()
    }

    fn area_usage(&self) -> BTreeMap<String, AreaUsage> {
        let mut usage: BTreeMap<String, AreaUsage> = BTreeMap::new();
        for i in 0..self.nblocks() {
            for (area, _) in self.blocks[i as usize].iter().flatten() {
                let entry = usage.entry(area.clone()).or_default();
                entry.bytes += self.block_range(i).length();
                entry.extents += 1;
            }
        }
        usage
    }

    /// One run per block: the non-canonical form of the same mapping.
    fn per_block_runs(&self) -> Vec<Run> {
        (0..self.nblocks())
            .map(|i| {
                let range = self.block_range(i);
                let replicas = self.blocks[i as usize]
                    .iter()
                    .flatten()
                    .map(|(a, o)| ReplicaLocation::new(a.as_str(), *o))
                    .collect();
                Run::new(range.offset(), range.length(), replicas)
            })
            .collect()
    }
}

fn area_offset(spec: &ReplicaSpec, first: u64, es: u64) -> u64 {
    match spec.layout {
        Layout::Linear(k) => (k * STRIDE + first) * es,
        Layout::Random(r) => r * es,
    }
}

fn expected_error(verdict: Verdict, err: &MapError) -> bool {
    matches!(
        (verdict, err),
        (Verdict::DuplicateArea, MapError::DuplicateArea { .. })
            | (
                Verdict::ReplicaCountMismatch,
                MapError::ReplicaCountMismatch { .. }
            )
            | (Verdict::PhysicalOverlap, MapError::PhysicalOverlap { .. })
    )
}

/// Applies `op` to both; checks that they agree on success or on the kind of refusal.
fn step(
    map: &ExtentMap,
    naive: &Naive,
    op: &Op,
    copies: usize,
) -> Result<(ExtentMap, Naive), TestCaseError> {
    let es = naive.es;
    let (result, next) = match op {
        Op::Assign {
            start,
            len,
            replicas,
            count,
        } => {
            let (first, n) = naive.pick(*start, *len);
            let specs = &replicas[..count.unwrap_or(copies)];
            let base: Locations = specs
                .iter()
                .map(|s| (AREAS[s.area].to_owned(), area_offset(s, first, es)))
                .collect();
            let mut next = naive.clone();
            for j in first..first + n {
                next.blocks[j as usize] = Some(
                    base.iter()
                        .map(|(a, o)| (a.clone(), o + (j - first) * es))
                        .collect(),
                );
            }
            let verdict = next.verdict(&base);
            let locations = base
                .iter()
                .map(|(a, o)| ReplicaLocation::new(a.as_str(), *o))
                .collect();
            let result = map.assign(naive.bytes_of(first, n), locations);
            if verdict != Verdict::Valid {
                match &result {
                    Err(e) => prop_assert!(expected_error(verdict, e), "{verdict:?} vs {e:?}"),
                    Ok(m) => prop_assert!(false, "expected {verdict:?}, got {m:?}"),
                }
                return Ok((map.clone(), naive.clone()));
            }
            (result, next)
        }
        Op::Punch { start, len } => {
            let (first, n) = naive.pick(*start, *len);
            let mut next = naive.clone();
            for j in first..first + n {
                next.blocks[j as usize] = None;
            }
            (map.punch_hole(naive.bytes_of(first, n)), next)
        }
        Op::Grow { sectors } => {
            let new_size = naive.size + sectors * 512;
            let mut next = naive.clone();
            next.size = new_size;
            next.blocks.resize(new_size.div_ceil(es) as usize, None);
            (map.grow(new_size), next)
        }
    };
    let new_map = match result {
        Ok(m) => m,
        Err(e) => return Err(TestCaseError::fail(format!("{op:?} refused: {e}"))),
    };
    let expected_generation = if next == *naive {
        map.generation()
    } else {
        map.generation().next()
    };
    prop_assert_eq!(new_map.generation(), expected_generation);
    Ok((new_map, next))
}

fn locations_of(segment: &tessera_api::model::Segment<'_>) -> Option<Locations> {
    (!segment.is_hole()).then(|| {
        segment
            .replicas()
            .map(|p| (p.area.to_string(), p.area_offset))
            .collect()
    })
}

/// Every invariant of a map, and agreement with the model block by block.
fn check(map: &ExtentMap, naive: &Naive) -> Result<(), TestCaseError> {
    prop_assert_eq!(map.size_bytes(), naive.size);
    prop_assert_eq!(map.extent_count(), naive.nblocks());
    let extents: Vec<_> = map.extents().collect();
    prop_assert_eq!(extents.len() as u64, naive.nblocks());
    for (i, segment) in extents.iter().enumerate() {
        prop_assert_eq!(segment.extent_index(), i as u64);
        prop_assert_eq!(segment.range(), naive.block_range(i as u64));
        prop_assert_eq!(&locations_of(segment), &naive.blocks[i]);
    }

    // Canonical: tiled, aligned, and no neighbours that could be merged.
    let es = naive.es;
    let mut cursor = 0;
    for run in map.runs() {
        prop_assert_eq!(run.offset, cursor);
        prop_assert!(run.length > 0);
        cursor = run.offset + run.length;
        prop_assert!(
            cursor == naive.size || cursor % es == 0,
            "unaligned boundary {cursor}"
        );
        for replica in &run.replicas {
            prop_assert_eq!(replica.area_offset % es, 0);
        }
    }
    prop_assert_eq!(cursor, naive.size);
    for pair in map.runs().windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let mergeable = a.replicas.len() == b.replicas.len()
            && a.replicas
                .iter()
                .zip(&b.replicas)
                .all(|(x, y)| x.area == y.area && x.area_offset + a.length == y.area_offset);
        prop_assert!(!mergeable, "mergeable neighbours {a:?} {b:?}");
    }

    // Accounting.
    let copies = naive
        .blocks
        .iter()
        .flatten()
        .map(Vec::len)
        .next()
        .unwrap_or(0);
    prop_assert_eq!(map.replica_count(), copies);
    prop_assert_eq!(map.allocated_bytes(), naive.allocated_bytes());
    prop_assert_eq!(
        map.allocated_extents(),
        naive.blocks.iter().flatten().count() as u64
    );
    let usage: BTreeMap<String, AreaUsage> = map
        .area_usage()
        .into_iter()
        .map(|(a, u)| (a.into_string(), u))
        .collect();
    prop_assert_eq!(usage, naive.area_usage());

    // The per-block form canonicalizes to the same map; serde round-trips.
    let rebuilt = ExtentMap::from_runs(
        naive.size,
        map.extent_size(),
        map.generation(),
        naive.per_block_runs(),
    );
    prop_assert_eq!(rebuilt.as_ref(), Ok(map));
    let json = serde_json::to_string(map).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: ExtentMap =
        serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, map);
    Ok(())
}

fn build(
    es: u64,
    size: u64,
    copies: usize,
    ops: &[Op],
) -> Result<(ExtentMap, Naive), TestCaseError> {
    let extent_size = ExtentSize::new(es).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut map =
        ExtentMap::new_hole(size, extent_size).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut naive = Naive::new(size, es);
    check(&map, &naive)?;
    for op in ops {
        (map, naive) = step(&map, &naive, op, copies)?;
        check(&map, &naive)?;
    }
    Ok((map, naive))
}

fn continues(a: &Placement, length: u64, b: &Placement) -> bool {
    match (a, b) {
        (Placement::Absent, Placement::Absent) | (Placement::Hole, Placement::Hole) => true,
        (Placement::Mapped(x), Placement::Mapped(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|(p, q)| p.area == q.area && p.area_offset + length == q.area_offset)
        }
        _ => false,
    }
}

fn shifted(p: &Placement, delta: u64) -> Placement {
    match p {
        Placement::Mapped(replicas) => Placement::Mapped(
            replicas
                .iter()
                .map(|r| ReplicaLocation::new(r.area.clone(), r.area_offset + delta))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Sorted, disjoint, coalesced union of ranges.
fn union(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The diff of two models, piece by piece (pieces split at block ends and at both sizes).
fn naive_changes(old: &Naive, new: &Naive) -> Vec<(u64, u64, Placement, Placement)> {
    let es = old.es;
    let end = old.size.max(new.size);
    let mut cuts: BTreeSet<u64> = (0..=end.div_ceil(es)).map(|i| (i * es).min(end)).collect();
    cuts.insert(old.size);
    cuts.insert(new.size);
    let cuts: Vec<u64> = cuts.into_iter().collect();
    cuts.windows(2)
        .filter(|w| w[0] < w[1])
        .filter_map(|w| {
            let (o, n) = (old.placement_at(w[0]), new.placement_at(w[0]));
            (o != n).then_some((w[0], w[1], o, n))
        })
        .collect()
}

fn check_diff(a: &ExtentMap, na: &Naive, b: &ExtentMap, nb: &Naive) -> Result<(), TestCaseError> {
    let d = diff(a, b).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let expected = naive_changes(na, nb);
    let changes = d.changes();

    // Exactly the changed bytes.
    prop_assert_eq!(
        union(changes.iter().map(|c| (c.range.offset(), c.range.end()))),
        union(expected.iter().map(|(s, e, _, _)| (*s, *e)))
    );
    for (start, _, old, new) in &expected {
        let change = changes.iter().find(|c| c.range.contains(*start));
        let Some(change) = change else {
            return Err(TestCaseError::fail(format!("no change covers {start}")));
        };
        let delta = start - change.range.offset();
        prop_assert_eq!(&shifted(&change.old, delta), old);
        prop_assert_eq!(&shifted(&change.new, delta), new);
    }
    // Sorted, non-empty, disjoint, maximal.
    for change in changes {
        prop_assert!(!change.range.is_empty());
    }
    for pair in changes.windows(2) {
        let (x, y) = (&pair[0], &pair[1]);
        prop_assert!(x.range.end() <= y.range.offset());
        if x.range.end() == y.range.offset() {
            let len = x.range.length();
            prop_assert!(
                !(continues(&x.old, len, &y.old) && continues(&x.new, len, &y.new)),
                "changes not coalesced: {x:?} {y:?}"
            );
        }
    }

    // The hold scope: exactly the blocks with a changed byte.
    let blocks: BTreeSet<u64> = expected
        .iter()
        .flat_map(|(s, e, _, _)| s / na.es..=(e - 1) / na.es)
        .collect();
    prop_assert_eq!(d.changed_extents().collect::<BTreeSet<_>>(), blocks.clone());
    prop_assert_eq!(d.is_empty(), blocks.is_empty());
    let end = na.size.max(nb.size);
    for offset in (0..end).step_by((na.es / 2) as usize) {
        let request =
            ByteRange::new(offset, na.es).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let touched = request.extent_indices(a.extent_size());
        prop_assert_eq!(
            d.affects(request),
            touched.clone().any(|i| blocks.contains(&i))
        );
    }

    // Applying the diff rebuilds the new map; the reverse diff is the diff the other way.
    let applied = a.apply(&d);
    prop_assert_eq!(applied.as_ref(), Ok(b));
    let backwards = diff(b, a);
    prop_assert_eq!(backwards, Ok(d.reversed()));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every step agrees with the model and keeps every invariant (checked inside `build`).
    #[test]
    fn edits_agree_with_the_block_model((es, size, copies, ops) in scenario(16)) {
        build(es, size, copies, &ops)?;
    }

    /// Translation of arbitrary byte ranges matches the model byte by byte.
    #[test]
    fn translate_agrees_byte_by_byte(
        (es, size, copies, ops) in scenario(10),
        requests in proptest::collection::vec((any::<u64>(), any::<u64>()), 1..4),
    ) {
        let (map, naive) = build(es, size, copies, &ops)?;
        for (offset_pick, length_pick) in requests {
            let offset = offset_pick % (naive.size + 1);
            let length = length_pick % (naive.size - offset + 1);
            let request = ByteRange::new(offset, length)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let segments: Vec<_> = map
                .translate(request)
                .map_err(|e| TestCaseError::fail(e.to_string()))?
                .collect();
            let mut cursor = offset;
            for segment in &segments {
                prop_assert_eq!(segment.offset(), cursor);
                prop_assert!(segment.length() > 0);
                cursor = segment.range().end();
                let extent = segment.offset() / es;
                prop_assert_eq!(segment.extent_index(), extent);
                prop_assert_eq!((cursor - 1) / es, extent, "segment crosses an extent boundary");
                let block = &naive.blocks[extent as usize];
                prop_assert_eq!(segment.is_hole(), block.is_none());
                for byte in segment.offset()..cursor {
                    let delta = byte - segment.offset();
                    for (i, (area, start)) in block.iter().flatten().enumerate() {
                        let physical = segment.replica(i);
                        prop_assert_eq!(physical.map(|p| p.area.as_str()), Some(area.as_str()));
                        prop_assert_eq!(
                            physical.map(|p| p.area_offset + delta),
                            Some(start + byte % es)
                        );
                    }
                }
            }
            prop_assert_eq!(cursor, offset + length, "segments do not tile the request");
            let past_end = ByteRange::new(offset, naive.size - offset + 1)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let is_out_of_range = matches!(map.translate(past_end), Err(MapError::OutOfRange { .. }));
            prop_assert!(is_out_of_range);
        }
    }

    /// `diff` covers exactly the blocks where the models differ, both ways, across grows.
    #[test]
    fn diff_matches_the_block_models(
        (es, size, copies, ops) in scenario(10),
        more in proptest::collection::vec(op(), 0..8),
    ) {
        let (a, na) = build(es, size, copies, &ops)?;
        let (mut b, mut nb) = (a.clone(), na.clone());
        for op in &more {
            (b, nb) = step(&b, &nb, op, copies)?;
        }
        check_diff(&a, &na, &b, &nb)?;
        check_diff(&b, &nb, &a, &na)?;
    }
}
