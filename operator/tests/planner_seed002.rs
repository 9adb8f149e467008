//! Seed 002 §8.6 acceptance scenarios 13, 14, 15 and 19 (virtual volume construction, Fig. 7,
//! [0119]–[0127]), with the patent's Fig. 3 numbers.
//!
//! Fixture (seed 002 §8.6): manager device-a's domain holds storage devices 011300 (FastHDD, 40 GB
//! free), 021a00 (FastHDD 30 GB free and SlowHDD 60 GB free, [0062]), 051c00 (SlowHDD 50 GB free)
//! and 061f00 (tape, no free-capacity value); device-b's domain holds 071900 (volume-c, 200 GB
//! free). Test choices (T): one extent = 1 GB; each storage device is its own node; a device with
//! two media types is two areas on one node; 071900 is FastHDD; free space starts at area
//! offset 0; a tape without a free-capacity value has no free extents.

use tessera_api::model::{AreaId, ExtentSize};
use tessera_api::v1alpha1::{PlacementStrategy, VolumeLayout};
use tessera_operator::planners::ExtentRange;
use tessera_operator::planners::placement::{
    AreaCandidate, Placement, PlacementError, PlacementRequest, PlacementRules, plan_placement,
};

fn area(name: &str, node: &str, domain: &str, media: &str, free_gb: u64) -> AreaCandidate {
    AreaCandidate {
        area: AreaId::new(name),
        node: node.into(),
        domain: domain.into(),
        media_type: media.into(),
        free: if free_gb == 0 {
            Vec::new()
        } else {
            vec![ExtentRange::new(0, free_gb)]
        },
    }
}

fn fixture() -> Vec<AreaCandidate> {
    vec![
        area("011300", "011300", "device-a", "FastHDD", 40),
        area("021a00-fast", "021a00", "device-a", "FastHDD", 30),
        area("021a00-slow", "021a00", "device-a", "SlowHDD", 60),
        area("051c00", "051c00", "device-a", "SlowHDD", 50),
        area("061f00", "061f00", "device-a", "Tape", 0),
        area("071900", "071900", "device-b", "FastHDD", 200),
    ]
}

fn rules(strategy: PlacementStrategy) -> PlacementRules {
    PlacementRules {
        domain_order: vec!["device-a".into(), "device-b".into()],
        strategy,
    }
}

fn claim(media: &str, gb: u64) -> PlacementRequest {
    PlacementRequest {
        extents: gb,
        copies: 1,
        layout: VolumeLayout::Concatenated,
        media_type: Some(media.into()),
        preferred_node: None,
    }
}

/// (area, offset, len) of replica 0.
fn pieces(placement: &Placement) -> Vec<(String, u64, u64)> {
    placement.replicas[0]
        .pieces
        .iter()
        .map(|p| (p.area.as_str().to_owned(), p.area_offset, p.len))
        .collect()
}

fn gb() -> ExtentSize {
    // 1 GiB stands in for the patent's GB.
    ExtentSize::new(1 << 30).expect("valid")
}

/// Scenario 13: construction in priority order (S703–S709). 011300 40 GB + 021a00 30 GB = 70 GB
/// of FastHDD in device-a's domain hold a 60 GB claim, so device-b is not used.
#[test]
fn seed002_s13_construction_uses_first_domain_in_priority_order() {
    for strategy in [PlacementStrategy::Pack, PlacementStrategy::Spread] {
        let placement = plan_placement(&fixture(), &claim("FastHDD", 60), &rules(strategy))
            .expect("ConstructionComplete");
        assert_eq!(
            pieces(&placement),
            vec![
                ("011300".to_owned(), 0, 40),
                ("021a00-fast".to_owned(), 0, 20),
            ],
            "{strategy:?}: the largest FastHDD area whole, the rest where it fits"
        );
        assert_eq!(
            placement.replicas[0]
                .domains()
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["device-a"]
        );
        // S707: the mapping is a valid extent map of the 60 GB volume.
        let map = placement
            .to_extent_map(60 << 30, gb())
            .expect("valid mapping");
        assert_eq!(map.allocated_extents(), 60);
        assert_eq!(map.runs().len(), 2);
    }
    // The priority order decides: with device-b first, its one area takes it all.
    let b_first = PlacementRules {
        domain_order: vec!["device-b".into(), "device-a".into()],
        strategy: PlacementStrategy::Pack,
    };
    let placement =
        plan_placement(&fixture(), &claim("FastHDD", 60), &b_first).expect("fits in device-b");
    assert_eq!(pieces(&placement), vec![("071900".to_owned(), 0, 60)]);
}

/// Scenario 14: fallback to the next SAN (S710–S711, S704–S709) when device-a's domain cannot
/// hold the claim.
#[test]
fn seed002_s14_falls_back_to_next_domain() {
    // Capacity: device-a has 70 GB of FastHDD, device-b 200 GB; a 100 GB claim goes wholly to
    // device-b rather than spanning domains.
    let placement = plan_placement(
        &fixture(),
        &claim("FastHDD", 100),
        &rules(PlacementStrategy::Pack),
    )
    .expect("ConstructionComplete");
    assert_eq!(pieces(&placement), vec![("071900".to_owned(), 0, 100)]);

    // Type: a media type device-a's domain does not have at all (T: an SSD area in device-b).
    let mut areas = fixture();
    areas.push(area("081a00", "081a00", "device-b", "SSD", 80));
    let placement = plan_placement(&areas, &claim("SSD", 50), &rules(PlacementStrategy::Pack))
        .expect("ConstructionComplete");
    assert_eq!(pieces(&placement), vec![("081a00".to_owned(), 0, 50)]);

    // Only when no single domain can hold it does a Concatenated replica span domains, still in
    // priority order: 250 GB = device-a's 70 GB + 180 GB of device-b.
    let placement = plan_placement(
        &fixture(),
        &claim("FastHDD", 250),
        &rules(PlacementStrategy::Pack),
    )
    .expect("fits across domains");
    assert_eq!(
        pieces(&placement),
        vec![
            ("011300".to_owned(), 0, 40),
            ("021a00-fast".to_owned(), 0, 30),
            ("071900".to_owned(), 0, 180),
        ]
    );
}

/// Scenario 15: construction failure (S712) — no domain satisfies FastHDD 500 GB. The reason
/// names the failed constraint; nothing is placed.
#[test]
fn seed002_s15_construction_failure_names_the_constraint() {
    let err = plan_placement(
        &fixture(),
        &claim("FastHDD", 500),
        &rules(PlacementStrategy::Pack),
    )
    .expect_err("ConstructionFailed");
    assert_eq!(
        err,
        PlacementError::InsufficientCapacity {
            needed: 500,
            free: 270,
            media: "FastHDD".into()
        }
    );
    assert_eq!(err.reason(), "InsufficientCapacity");
    assert_eq!(
        err.to_string(),
        "the claim needs 500 extents of FastHDD space, the pool has 270 free"
    );

    // Other constraints, each with its own reason.
    let mut single = claim("FastHDD", 250);
    single.layout = VolumeLayout::Single;
    assert_eq!(
        plan_placement(&fixture(), &single, &rules(PlacementStrategy::Pack)),
        Err(PlacementError::NoAreaLargeEnough {
            needed: 250,
            largest_free: 200,
            media: "FastHDD".into()
        })
    );
    assert_eq!(
        plan_placement(
            &fixture(),
            &claim("NVMe", 1),
            &rules(PlacementStrategy::Pack)
        ),
        Err(PlacementError::NoAreaOfMediaType {
            media_type: "NVMe".into()
        })
    );
    // The tape has no free-capacity value, so it holds nothing.
    assert_eq!(
        plan_placement(
            &fixture(),
            &claim("Tape", 1),
            &rules(PlacementStrategy::Pack)
        ),
        Err(PlacementError::InsufficientCapacity {
            needed: 1,
            free: 0,
            media: "Tape".into()
        })
    );
    // Duplexed SlowHDD 60 GB: 110 GB free but only 021a00 holds 60, and 051c00 cannot take the
    // second copy.
    let mut duplexed = claim("SlowHDD", 60);
    duplexed.copies = 2;
    assert_eq!(
        plan_placement(&fixture(), &duplexed, &rules(PlacementStrategy::Pack)),
        Err(PlacementError::InsufficientCapacity {
            needed: 120,
            free: 110,
            media: "SlowHDD".into()
        })
    );
    duplexed.extents = 50;
    let placement = plan_placement(&fixture(), &duplexed, &rules(PlacementStrategy::Pack))
        .expect("50 GB fits twice, on 021a00 and 051c00");
    let nodes: Vec<_> = placement
        .replicas
        .iter()
        .map(|r| r.nodes().into_iter().collect::<Vec<_>>())
        .collect();
    assert_eq!(nodes, vec![vec!["051c00"], vec!["021a00"]]);
}

/// Scenario 19: multi-type device ([0062]). 021a00 has FastHDD 30 GB and SlowHDD 60 GB; a
/// SlowHDD 60 GB claim may use its SlowHDD capacity and not its FastHDD capacity.
#[test]
fn seed002_s19_multi_type_device_only_matching_type_is_eligible() {
    for layout in [VolumeLayout::Single, VolumeLayout::Concatenated] {
        let mut request = claim("SlowHDD", 60);
        request.layout = layout;
        let placement = plan_placement(&fixture(), &request, &rules(PlacementStrategy::Pack))
            .expect("ConstructionComplete");
        assert_eq!(
            pieces(&placement),
            vec![("021a00-slow".to_owned(), 0, 60)],
            "{layout:?}"
        );
        assert!(
            placement.replicas[0]
                .areas()
                .iter()
                .all(|a| a.as_str() != "021a00-fast")
        );
    }
    // The FastHDD capacity of the same device is eligible for a FastHDD claim only.
    let fast = plan_placement(
        &fixture(),
        &claim("FastHDD", 30),
        &rules(PlacementStrategy::Pack),
    )
    .expect("fits");
    assert_eq!(pieces(&fast), vec![("021a00-fast".to_owned(), 0, 30)]);
}
