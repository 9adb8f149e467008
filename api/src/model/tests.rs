//! Hand-written examples and one test per error of the validating constructor. The randomized
//! comparison against a per-extent reference model is in `api/tests/model_props.rs`.

use super::*;

const ES: u64 = 4096;

fn es() -> ExtentSize {
    ExtentSize::new(ES).expect("4096 is a valid extent size")
}

fn range(offset: u64, length: u64) -> ByteRange {
    ByteRange::new(offset, length).expect("test range fits")
}

fn loc(area: &str, area_offset: u64) -> ReplicaLocation {
    ReplicaLocation::new(area, area_offset)
}

fn mapped(offset: u64, length: u64, replicas: &[(&str, u64)]) -> Run {
    Run::new(
        offset,
        length,
        replicas.iter().map(|&(a, o)| loc(a, o)).collect(),
    )
}

fn map(size: u64, runs: Vec<Run>) -> Result<ExtentMap, MapError> {
    ExtentMap::from_runs(size, es(), Generation(1), runs)
}

fn ok_map(size: u64, runs: Vec<Run>) -> ExtentMap {
    map(size, runs).expect("valid test map")
}

/// (offset, length, [(area, area_offset)]) of a translated segment, for compact assertions.
type Piece = (u64, u64, Vec<(String, u64)>);

fn pieces(m: &ExtentMap, r: ByteRange) -> Vec<Piece> {
    m.translate(r)
        .expect("in range")
        .map(|s| {
            let replicas = s
                .replicas()
                .map(|p| (p.area.to_string(), p.area_offset))
                .collect();
            (s.offset(), s.length(), replicas)
        })
        .collect()
}

fn owned(replicas: &[(&str, u64)]) -> Vec<(String, u64)> {
    replicas.iter().map(|&(a, o)| (a.to_owned(), o)).collect()
}

// ---- Hand-written examples ----

/// Three extents over two areas: extents 0–1 contiguous on `a`, extent 2 on `b`.
fn three_extents_two_areas() -> ExtentMap {
    ok_map(
        3 * ES,
        vec![
            mapped(0, ES, &[("a", 0)]),
            mapped(ES, ES, &[("a", ES)]),
            mapped(2 * ES, ES, &[("b", 4 * ES)]),
        ],
    )
}

#[test]
fn three_extents_over_two_areas() {
    let m = three_extents_two_areas();
    // The two contiguous extents on `a` are one run (canonical form).
    assert_eq!(
        m.runs(),
        &[
            mapped(0, 2 * ES, &[("a", 0)]),
            mapped(2 * ES, ES, &[("b", 4 * ES)])
        ]
    );
    assert_eq!(m.replica_count(), 1);
    assert_eq!(m.extent_count(), 3);
    assert_eq!(m.allocated_bytes(), 3 * ES);
    assert_eq!(m.allocated_extents(), 3);
    let usage = m.area_usage();
    assert_eq!(
        usage.get("a"),
        Some(&AreaUsage {
            bytes: 2 * ES,
            extents: 2
        })
    );
    assert_eq!(
        usage.get("b"),
        Some(&AreaUsage {
            bytes: ES,
            extents: 1
        })
    );

    // Unaligned request inside one run is still cut at the extent boundary.
    assert_eq!(
        pieces(&m, range(4000, 400)),
        vec![
            (4000, 96, owned(&[("a", 4000)])),
            (4096, 304, owned(&[("a", 4096)])),
        ]
    );
    // Across the run boundary onto the other area.
    assert_eq!(
        pieces(&m, range(2 * ES - 2, 4)),
        vec![
            (2 * ES - 2, 2, owned(&[("a", 2 * ES - 2)])),
            (2 * ES, 2, owned(&[("b", 4 * ES)])),
        ]
    );
    let extents: Vec<_> = m.extents().map(|s| (s.extent_index(), s.range())).collect();
    assert_eq!(
        extents,
        vec![
            (0, range(0, ES)),
            (1, range(ES, ES)),
            (2, range(2 * ES, ES))
        ]
    );
    assert!(
        m.translate(range(0, 0))
            .expect("empty is fine")
            .next()
            .is_none()
    );
    assert_eq!(
        m.translate(range(3 * ES - 1, 2)).err(),
        Some(MapError::OutOfRange {
            offset: 3 * ES - 1,
            length: 2,
            size_bytes: 3 * ES
        })
    );
}

#[test]
fn hole_in_the_middle() {
    let m = ok_map(
        3 * ES,
        vec![
            mapped(0, ES, &[("a", 0)]),
            Run::hole(ES, ES),
            mapped(2 * ES, ES, &[("a", 2 * ES)]),
        ],
    );
    assert_eq!(m.allocated_bytes(), 2 * ES);
    let segments: Vec<_> = m
        .translate(range(ES - 10, ES + 20))
        .expect("in range")
        .map(|s| (s.range(), s.is_hole()))
        .collect();
    assert_eq!(
        segments,
        vec![
            (range(ES - 10, 10), false),
            (range(ES, ES), true),
            (range(2 * ES, 10), false),
        ]
    );
    assert_eq!(
        pieces(&m, range(ES, 1)),
        vec![(ES, 1, Vec::<(String, u64)>::new())]
    );

    // Filling the hole with the contiguous extent merges everything into one run.
    let filled = m
        .assign(range(ES, ES), vec![loc("a", ES)])
        .expect("valid assign");
    assert_eq!(filled.runs(), &[mapped(0, 3 * ES, &[("a", 0)])]);
    assert_eq!(filled.generation(), Generation(2));
    // Punching it again gives back the original layout, one generation later.
    let punched = filled.punch_hole(range(ES, ES)).expect("valid punch");
    assert!(punched.same_layout(&m));
    assert_eq!(punched.generation(), Generation(3));
    // A no-op edit keeps the generation.
    assert_eq!(punched.punch_hole(range(ES, ES)), Ok(punched.clone()));
}

#[test]
fn two_replica_map() {
    let m = ok_map(2 * ES, vec![mapped(0, 2 * ES, &[("a", 0), ("b", 8 * ES)])]);
    assert_eq!(m.replica_count(), 2);
    assert_eq!(
        pieces(&m, range(ES + 512, 512)),
        vec![(
            ES + 512,
            512,
            owned(&[("a", ES + 512), ("b", 9 * ES + 512)])
        )]
    );
    let first = m.translate(range(0, 1)).expect("in range").next();
    assert_eq!(
        first
            .and_then(|s| s.replica(1))
            .map(|p| p.to_replica_location()),
        Some(loc("b", 8 * ES))
    );
    // Every replica counts for the areas, once for the volume.
    assert_eq!(m.allocated_bytes(), 2 * ES);
    assert_eq!(
        m.area_usage().values().map(|u| u.bytes).sum::<u64>(),
        4 * ES
    );

    // One copy for one extent only: the volume's copies would be mixed.
    assert_eq!(
        m.assign(range(0, ES), vec![loc("c", 0)]),
        Err(MapError::ReplicaCountMismatch {
            offset: ES,
            expected: 1,
            found: 2
        })
    );
    // Moving one replica of one extent keeps the other replica.
    let moved = m
        .assign(range(ES, ES), vec![loc("a", ES), loc("c", 0)])
        .expect("valid move");
    assert_eq!(
        moved.runs(),
        &[
            mapped(0, ES, &[("a", 0), ("b", 8 * ES)]),
            mapped(ES, ES, &[("a", ES), ("c", 0)]),
        ]
    );
    // Changing the copies of the whole volume in one edit is fine.
    let single = m
        .edit([
            Edit::Assign {
                range: range(0, ES),
                replicas: vec![loc("c", 0)],
            },
            Edit::Assign {
                range: range(ES, ES),
                replicas: vec![loc("c", 4 * ES)],
            },
        ])
        .expect("valid batch");
    assert_eq!(single.replica_count(), 1);
    assert_eq!(single.generation(), Generation(2));
    // Swapping the preferred replica is a change.
    let swapped = m
        .assign(range(0, 2 * ES), vec![loc("b", 8 * ES), loc("a", 0)])
        .expect("valid swap");
    assert!(!swapped.same_layout(&m));
}

#[test]
fn partial_tail_and_grow() {
    let size = ES + 512;
    let m = ok_map(
        size,
        vec![mapped(0, ES, &[("a", 0)]), mapped(ES, 512, &[("b", 0)])],
    );
    assert_eq!(m.extent_count(), 2);
    assert_eq!(
        m.area_usage().get("b"),
        Some(&AreaUsage {
            bytes: 512,
            extents: 1
        })
    );
    // The tail extent may be edited up to the end of the volume.
    let punched = m
        .punch_hole(range(ES, 512))
        .expect("tail edit ends at the volume end");
    assert_eq!(punched.allocated_bytes(), ES);

    // Growing extends the mapped tail to its extent end, then appends a hole.
    let grown = m.grow(3 * ES).expect("valid grow");
    assert_eq!(
        grown.runs(),
        &[
            mapped(0, ES, &[("a", 0)]),
            mapped(ES, ES, &[("b", 0)]),
            Run::hole(2 * ES, ES),
        ]
    );
    assert_eq!(grown.generation(), Generation(2));
    // Growing inside the tail extent stays inside it.
    let nudged = m.grow(ES + 1024).expect("valid grow");
    assert_eq!(nudged.runs()[1], mapped(ES, 1024, &[("b", 0)]));
    assert_eq!(m.grow(size), Ok(m.clone()));
    assert_eq!(
        m.grow(ES),
        Err(MapError::Shrink {
            size_bytes: size,
            new_size: ES
        })
    );
    assert_eq!(
        m.grow(3 * ES + 1),
        Err(MapError::UnalignedVolumeSize {
            size_bytes: 3 * ES + 1
        })
    );
}

#[test]
fn new_hole_and_empty_volume() {
    let m = ExtentMap::new_hole(5 * ES, es()).expect("valid");
    assert_eq!(m.runs(), &[Run::hole(0, 5 * ES)]);
    assert_eq!(m.generation(), Generation::INITIAL);
    assert_eq!(m.replica_count(), 0);
    assert_eq!(m.extents().count(), 5);
    assert!(m.extents().all(|s| s.is_hole()));
    let empty = ExtentMap::new_hole(0, es()).expect("a zero-sized volume is consistent");
    assert!(empty.runs().is_empty());
    assert_eq!(empty.extents().count(), 0);
}

// ---- One test per error of the validating constructor ----

#[test]
fn rejects_unaligned_volume_size() {
    assert_eq!(
        map(ES + 1, vec![Run::hole(0, ES + 1)]),
        Err(MapError::UnalignedVolumeSize { size_bytes: ES + 1 })
    );
}

#[test]
fn rejects_invalid_extent_size() {
    assert_eq!(
        ExtentSize::new(3000),
        Err(MapError::InvalidExtentSize { bytes: 3000 })
    );
}

#[test]
fn rejects_empty_run() {
    assert_eq!(
        map(ES, vec![Run::hole(0, 0), Run::hole(0, ES)]),
        Err(MapError::EmptyRun { offset: 0 })
    );
}

#[test]
fn rejects_gap() {
    assert_eq!(
        map(2 * ES, vec![Run::hole(ES, ES)]),
        Err(MapError::RunGap {
            expected: 0,
            found: ES
        })
    );
}

#[test]
fn rejects_overlap_and_unsorted_runs() {
    assert_eq!(
        map(2 * ES, vec![Run::hole(0, 2 * ES), Run::hole(ES, ES)]),
        Err(MapError::RunOverlap {
            expected: 2 * ES,
            found: ES
        })
    );
    assert_eq!(
        map(2 * ES, vec![Run::hole(ES, ES), Run::hole(0, ES)]),
        Err(MapError::RunGap {
            expected: 0,
            found: ES
        })
    );
}

#[test]
fn rejects_runs_past_end() {
    assert_eq!(
        map(ES, vec![Run::hole(0, 2 * ES)]),
        Err(MapError::RunsPastEnd {
            end: 2 * ES,
            size_bytes: ES
        })
    );
}

#[test]
fn rejects_short_coverage() {
    assert_eq!(
        map(2 * ES, vec![Run::hole(0, ES)]),
        Err(MapError::RunsShort {
            covered: ES,
            size_bytes: 2 * ES
        })
    );
}

#[test]
fn rejects_overflowing_run() {
    assert_eq!(
        map(ES, vec![Run::hole(0, ES), Run::hole(ES, u64::MAX)]),
        Err(MapError::RangeOverflow {
            offset: ES,
            length: u64::MAX
        })
    );
}

#[test]
fn rejects_misaligned_run_boundary() {
    assert_eq!(
        map(
            2 * ES,
            vec![
                mapped(0, 512, &[("a", 0)]),
                mapped(512, 2 * ES - 512, &[("b", 0)])
            ]
        ),
        Err(MapError::MisalignedRun {
            offset: 0,
            length: 512,
            extent_size: ES
        })
    );
}

#[test]
fn accepts_mid_extent_split_of_contiguous_data() {
    // Same byte-to-location function as one run: merged first, then valid.
    let m = ok_map(
        2 * ES,
        vec![
            mapped(0, 512, &[("a", 0)]),
            mapped(512, 2 * ES - 512, &[("a", 512)]),
        ],
    );
    assert_eq!(m.runs(), &[mapped(0, 2 * ES, &[("a", 0)])]);
}

#[test]
fn rejects_replica_count_mismatch() {
    assert_eq!(
        map(
            3 * ES,
            vec![
                mapped(0, ES, &[("a", 0), ("b", 0)]),
                Run::hole(ES, ES),
                mapped(2 * ES, ES, &[("a", ES)]),
            ]
        ),
        Err(MapError::ReplicaCountMismatch {
            offset: 2 * ES,
            expected: 2,
            found: 1
        })
    );
}

#[test]
fn rejects_empty_area_name() {
    assert_eq!(
        map(ES, vec![mapped(0, ES, &[("", 0)])]),
        Err(MapError::EmptyAreaId { offset: 0 })
    );
}

#[test]
fn rejects_misaligned_area_offset() {
    assert_eq!(
        map(ES, vec![mapped(0, ES, &[("a", 512)])]),
        Err(MapError::MisalignedAreaOffset {
            offset: 0,
            area: AreaId::new("a"),
            area_offset: 512,
            extent_size: ES
        })
    );
}

#[test]
fn rejects_two_replicas_on_one_area() {
    assert_eq!(
        map(ES, vec![mapped(0, ES, &[("a", 0), ("a", 4 * ES)])]),
        Err(MapError::DuplicateArea {
            offset: 0,
            area: AreaId::new("a")
        })
    );
}

#[test]
fn rejects_area_offset_overflow() {
    let top = u64::MAX - (ES - 1); // the last extent-aligned area offset
    assert_eq!(
        map(2 * ES, vec![mapped(0, 2 * ES, &[("a", top)])]),
        Err(MapError::AreaOffsetOverflow {
            offset: 0,
            area: AreaId::new("a"),
            area_offset: top
        })
    );
}

#[test]
fn rejects_physical_overlap_between_runs() {
    assert_eq!(
        map(
            3 * ES,
            vec![
                mapped(0, 2 * ES, &[("a", ES)]),
                mapped(2 * ES, ES, &[("a", 2 * ES)]),
            ]
        ),
        Err(MapError::PhysicalOverlap {
            area: AreaId::new("a"),
            area_offset: 2 * ES,
            first_run: 0,
            second_run: 2 * ES
        })
    );
    // Between replicas of different runs on different positions.
    assert_eq!(
        map(
            2 * ES,
            vec![
                mapped(0, ES, &[("a", 0), ("b", 0)]),
                mapped(ES, ES, &[("c", 0), ("a", 0)]),
            ]
        ),
        Err(MapError::PhysicalOverlap {
            area: AreaId::new("a"),
            area_offset: 0,
            first_run: 0,
            second_run: ES
        })
    );
}

// ---- Errors of edits ----

#[test]
fn edit_errors() {
    let m = three_extents_two_areas();
    assert_eq!(
        m.assign(range(512, ES), vec![loc("c", 0)]),
        Err(MapError::UnalignedEdit {
            offset: 512,
            length: ES,
            extent_size: ES
        })
    );
    assert_eq!(
        m.punch_hole(range(0, ES + 512)),
        Err(MapError::UnalignedEdit {
            offset: 0,
            length: ES + 512,
            extent_size: ES
        })
    );
    assert_eq!(
        m.punch_hole(range(2 * ES, 2 * ES)),
        Err(MapError::OutOfRange {
            offset: 2 * ES,
            length: 2 * ES,
            size_bytes: 3 * ES
        })
    );
    assert_eq!(
        m.assign(range(0, ES), vec![]),
        Err(MapError::EmptyReplicaSet)
    );
    // Pointing extent 2 at bytes extent 0 already uses.
    assert_eq!(
        m.assign(range(2 * ES, ES), vec![loc("a", 0)]),
        Err(MapError::PhysicalOverlap {
            area: AreaId::new("a"),
            area_offset: 0,
            first_run: 0,
            second_run: 2 * ES
        })
    );
    let exhausted = m.clone().with_generation(Generation(u64::MAX));
    assert_eq!(
        exhausted.punch_hole(range(0, ES)),
        Err(MapError::GenerationOverflow(Generation(u64::MAX)))
    );
}

// ---- Diff ----

#[test]
fn diff_of_a_move() {
    let old = three_extents_two_areas();
    let new = old
        .assign(range(ES, ES), vec![loc("c", 0)])
        .expect("valid move");
    let d = diff(&old, &new).expect("same pool");
    assert_eq!(
        d.changes(),
        &[RangeChange {
            range: range(ES, ES),
            old: Placement::Mapped(vec![loc("a", ES)]),
            new: Placement::Mapped(vec![loc("c", 0)]),
        }]
    );
    assert_eq!(d.old_generation(), Generation(1));
    assert_eq!(d.new_generation(), Generation(2));
    assert_eq!(d.changed_extents().collect::<Vec<_>>(), vec![1]);
    assert_eq!(d.changed_bytes(), ES);
    assert!(d.affects(range(ES + 100, 1)));
    assert!(
        d.affects(range(ES - 1, 2)),
        "spans a held and a free extent"
    );
    assert!(!d.affects(range(0, ES)));
    assert!(!d.affects(range(2 * ES, ES)));
    assert_eq!(old.apply(&d), Ok(new.clone()));
    assert_eq!(new.apply(&d.reversed()), Ok(old.clone()));
    assert_eq!(diff(&new, &old), Ok(d.reversed()));
    assert!(diff(&old, &old).expect("same pool").is_empty());
}

#[test]
fn diff_coalesces_and_keeps_discontinuities() {
    let old = ExtentMap::new_hole(4 * ES, es()).expect("valid");
    // Extents 0–1 contiguous on a, extents 2–3 on b: two changes (new side not linear across).
    let new = old
        .edit([
            Edit::Assign {
                range: range(0, 2 * ES),
                replicas: vec![loc("a", 0)],
            },
            Edit::Assign {
                range: range(2 * ES, 2 * ES),
                replicas: vec![loc("b", 0)],
            },
        ])
        .expect("valid");
    let d = diff(&old, &new).expect("same pool");
    assert_eq!(d.changes().len(), 2);
    assert_eq!(d.changed_extent_ranges(), vec![0..4]);
    assert_eq!(new.generation(), Generation(1));
}

#[test]
fn diff_of_a_grow_marks_the_tail() {
    let old = ok_map(ES + 512, vec![mapped(0, ES + 512, &[("a", 0)])]);
    let new = old.grow(3 * ES).expect("valid grow");
    let d = diff(&old, &new).expect("same pool");
    assert_eq!(
        d.changes(),
        &[
            RangeChange {
                range: range(ES + 512, ES - 512),
                old: Placement::Absent,
                new: Placement::Mapped(vec![loc("a", ES + 512)]),
            },
            RangeChange {
                range: range(2 * ES, ES),
                old: Placement::Absent,
                new: Placement::Hole,
            },
        ]
    );
    assert_eq!(d.changed_extent_ranges(), vec![1..3]);
    assert_eq!(old.apply(&d), Ok(new.clone()));
    // The reverse (a shrink) applies too: rollback of a grow.
    assert_eq!(new.apply(&d.reversed()), Ok(old.clone()));
}

#[test]
fn diff_errors() {
    let old = three_extents_two_areas();
    let other_pool =
        ExtentMap::new_hole(3 * ES, ExtentSize::new(2 * ES).expect("valid")).expect("valid");
    assert_eq!(
        diff(&old, &other_pool),
        Err(MapError::ExtentSizeMismatch {
            left: ES,
            right: 2 * ES
        })
    );
    let new = old.punch_hole(range(0, ES)).expect("valid");
    let d = diff(&old, &new).expect("same pool");
    // Applied to the wrong generation.
    assert_eq!(
        new.apply(&d),
        Err(MapError::GenerationMismatch {
            expected: Generation(1),
            found: Generation(2)
        })
    );
    // Applied to a map of the right generation whose old side differs.
    let lookalike = old
        .assign(range(0, ES), vec![loc("c", 0)])
        .expect("valid")
        .with_generation(old.generation());
    assert_eq!(
        lookalike.apply(&d),
        Err(MapError::DiffMismatch { offset: 0 })
    );
}

#[test]
fn serde_round_trip_and_validation() {
    let m = three_extents_two_areas();
    let json = serde_json::to_string(&m).expect("serializes");
    assert!(json.contains("\"areaOffset\""));
    let back: ExtentMap = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, m);
    let corrupt = json.replace(
        r#""area":"b","areaOffset":16384"#,
        r#""area":"a","areaOffset":0"#,
    );
    assert_ne!(corrupt, json);
    let err = serde_json::from_str::<ExtentMap>(&corrupt).expect_err("overlap is refused");
    assert!(err.to_string().contains("mapped twice"), "{err}");
    let d = diff(&m, &m.punch_hole(range(0, ES)).expect("valid")).expect("same pool");
    let d_json = serde_json::to_string(&d).expect("serializes");
    assert_eq!(serde_json::from_str::<MapDiff>(&d_json).ok(), Some(d));
}
