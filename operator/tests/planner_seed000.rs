//! Seed 000 §8.6 acceptance scenarios 1–15, with the patent's own numbers where it gives them
//! ((P) in the seed) and the seed's test choices ((T)) otherwise. One test per scenario, named
//! after it; scenarios 14 and 15 are property tests.
//!
//! Extent = the patent's "block". Volumes are named after the patent's virtual storage areas
//! (VAREA01 …); the requesting server/process (SRV01/3088) is the claim, which the planners do
//! not need.

use std::collections::BTreeSet;

use proptest::prelude::*;
use tessera_api::model::{AreaId, ByteRange, ExtentSize, MapError};
use tessera_api::v1alpha1::{AdmissionRule, DataPriority, ReclaimTier, VictimPolicy};
use tessera_operator::planners::ExtentRange;
use tessera_operator::planners::accounting::{
    ExtentState, PoolCounters, PoolLedger, ReleaseSummary, VolumeUsage,
};
use tessera_operator::planners::allocation::{
    AdmissionCondition, AllocationError, AllocationPlan, AllocationRequest, AreaReturn,
    PoolSnapshot, ReclaimRules, Rejection, TierSet, VictimClass, VolumeCandidate,
    is_return_overdue, plan_allocation, recheck_under_hold, replan_excluding, select_return_ranges,
};
use tessera_operator::planners::charging::{Amount, Rates, StoredBytes, accrue};
use tessera_operator::planners::placement::{Piece, Placement, ReplicaPlacement};

// ---------------------------------------------------------------------------------------------
// Helpers

fn range(start: u64, len: u64) -> ExtentRange {
    ExtentRange::new(start, len)
}

/// The reclaim view of every volume of the ledger, all in the default class.
fn candidates(pool: &PoolLedger) -> Vec<VolumeCandidate> {
    pool.volumes()
        .map(|v| VolumeCandidate {
            name: v.name().to_owned(),
            usage: v.usage(),
            copies: v.copies(),
            class: VictimClass::DEFAULT,
        })
        .collect()
}

fn plan(
    pool: &PoolLedger,
    extents: u64,
    rules: &ReclaimRules,
) -> Result<AllocationPlan, AllocationError> {
    let volumes = candidates(pool);
    plan_allocation(
        PoolSnapshot {
            unallocated: pool.counters().unallocated(),
            volumes: &volumes,
        },
        &request(extents),
        rules,
    )
}

fn request(extents: u64) -> AllocationRequest {
    AllocationRequest {
        extents,
        copies: 1,
        ..AllocationRequest::default()
    }
}

/// The owner complies with a return (area return 450 → release 430 → Fig. 9): the ranges are
/// chosen, re-checked under the hold and released. Reclaim never frees high-priority data.
fn comply(pool: &mut PoolLedger, ret: &AreaReturn) -> ReleaseSummary {
    let states = pool.volume(&ret.volume).expect("victim exists").states();
    let named = select_return_ranges(states, ret.tier, ret.extents);
    let kept = recheck_under_hold(states, &named, ret.tier);
    assert_eq!(named, kept, "nothing changed between plan and hold");
    let summary = pool
        .release(&ret.volume, &kept)
        .expect("ranges are in range");
    assert_eq!(summary.released, ret.extents);
    assert_eq!(summary.high_priority, 0, "reclaim freed high-priority data");
    summary
}

fn usage_of(pool: &PoolLedger, name: &str) -> (u64, u64, u64, u64, u64) {
    let u = pool.volume(name).expect("volume exists").usage();
    (
        u.allocated(),
        u.in_use(),
        u.high_priority(),
        u.unused(),
        u.low_priority(),
    )
}

fn popcounts(pool: &PoolLedger) -> (u64, u64, u64) {
    let mut bits = (0, 0, 0);
    for volume in pool.volumes() {
        for state in volume.states() {
            bits.0 += u64::from(state.is_allocated());
            bits.1 += u64::from(state.is_in_use());
            bits.2 += u64::from(state.is_high_priority());
        }
    }
    bits
}

/// VAREA01 in the [0025] state: blocks 0–99999 allocated, 0–39999 high-priority data,
/// 40000–49999 low-priority data, 50000–99999 unused.
fn add_varea01(pool: &mut PoolLedger) {
    pool.create_volume("VAREA01", 100_000, 1)
        .expect("room for VAREA01");
    pool.write("VAREA01", range(0, 40_000), DataPriority::High)
        .expect("allocated");
    pool.write("VAREA01", range(40_000, 10_000), DataPriority::Low)
        .expect("allocated");
}

fn strict() -> ReclaimRules {
    ReclaimRules::default()
}

fn inclusive() -> ReclaimRules {
    ReclaimRules {
        admission: AdmissionRule::Inclusive,
        ..ReclaimRules::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios 1–13

/// Scenario 1: the Fig. 2 table as a mapping; each area is one (storage device, physical disk).
#[test]
fn seed000_s01_mapping_translates_fig2_rows_and_refuses_beyond_the_table() {
    let rows = [
        "S01-D01", "S02-D01", "S03-D01", "S01-D02", "S02-D02", "S03-D02", "S01-D03", "S02-D03",
    ];
    let pieces = rows
        .iter()
        .map(|area| Piece {
            area: AreaId::new(*area),
            node: area[..3].to_owned(),
            domain: String::new(),
            area_offset: 0,
            len: 5000,
        })
        .collect();
    let table = Placement {
        extents: 40_000,
        replicas: vec![ReplicaPlacement { pieces }],
    };
    // The patent gives no block size (T: 4096).
    let block = ExtentSize::new(4096).expect("valid");
    let map = table
        .to_extent_map(40_000 * 4096, block)
        .expect("Fig. 2 is a valid map");
    let translate = |pool_block: u64| {
        let request = ByteRange::new(pool_block * 4096, 4096).expect("fits");
        map.translate(request).map(|mut segments| {
            let segment = segments.next().expect("one segment");
            let location = segment.replica(0).expect("mapped");
            (
                location.area.as_str().to_owned(),
                location.area_offset / 4096,
            )
        })
    };
    let expect = |pool_block, area: &str, physical| {
        assert_eq!(
            translate(pool_block),
            Ok((area.to_owned(), physical)),
            "pool block {pool_block}"
        );
    };
    expect(0, "S01-D01", 0);
    expect(4999, "S01-D01", 4999);
    expect(5000, "S02-D01", 0);
    expect(10_000, "S03-D01", 0);
    expect(14_999, "S03-D01", 4999);
    expect(15_000, "S01-D02", 0);
    expect(20_000, "S02-D02", 0);
    expect(25_000, "S03-D02", 0);
    expect(30_000, "S01-D03", 0);
    expect(35_000, "S02-D03", 0);
    expect(39_999, "S02-D03", 4999);
    assert!(matches!(
        translate(40_000),
        Err(MapError::OutOfRange { .. })
    ));
}

/// Scenario 2: a fresh allocation entry ([0050]–[0052]).
#[test]
fn seed000_s02_fresh_allocation_creates_entry_without_returns() {
    let mut pool = PoolLedger::new(150_000);
    let decision = plan(&pool, 100_000, &strict()).expect("admitted");
    assert!(decision.is_direct(), "no AreaReturn");
    assert_eq!(
        decision.admission.condition(),
        Some(AdmissionCondition::C1Unallocated)
    );
    pool.create_volume("VAREA01", 100_000, 1).expect("fits");
    assert_eq!(usage_of(&pool, "VAREA01"), (100_000, 0, 0, 100_000, 0));
    let c = pool.counters();
    assert_eq!((c.allocated(), c.unallocated()), (100_000, 50_000));
    assert_eq!(popcounts(&pool), (100_000, 0, 0));
    // Cumulative charge 312 starts at 0 (the controller writes Amount::ZERO).
    assert_eq!(Amount::ZERO.to_decimal_string(), "0.000000");
}

/// Scenario 3: write accounting reproduces the [0025] example.
#[test]
fn seed000_s03_write_accounting_reproduces_varea01() {
    let mut pool = PoolLedger::new(150_000);
    pool.create_volume("VAREA01", 100_000, 1).expect("fits");
    let before = pool.counters();
    let high = pool
        .write("VAREA01", range(0, 40_000), DataPriority::High)
        .expect("allocated");
    let low = pool
        .write("VAREA01", range(40_000, 10_000), DataPriority::Low)
        .expect("allocated");
    assert_eq!((high.newly_in_use, high.became_high), (40_000, 40_000));
    assert_eq!((low.newly_in_use, low.became_high), (10_000, 0));
    assert_eq!(
        usage_of(&pool, "VAREA01"),
        (100_000, 50_000, 40_000, 50_000, 10_000)
    );
    let after = pool.counters();
    assert_eq!(after.in_use() - before.in_use(), 50_000);
    assert_eq!(after.high_priority() - before.high_priority(), 40_000);
    assert_eq!(popcounts(&pool), (100_000, 50_000, 40_000));
    // Overwriting a block with the same priority changes no counter.
    let rewrite = pool
        .write("VAREA01", range(123, 1), DataPriority::High)
        .expect("allocated");
    assert!(rewrite.is_noop());
    let rewrite = pool
        .write("VAREA01", range(45_000, 1), DataPriority::Low)
        .expect("allocated");
    assert!(rewrite.is_noop());
    assert_eq!(pool.counters(), after);
}

/// Scenario 4: charging ([0076]); rateHigh = 2, rateLow = 1 per block per interval (T). With a
/// 1 GiB extent and a one-hour interval, "per GiB-hour" is "per block per interval".
#[test]
fn seed000_s04_charging_adds_high_and_low_rates_unused_free() {
    let extent = ExtentSize::new(1 << 30).expect("1 GiB is a valid extent size");
    let usage = VolumeUsage::new(100_000, 50_000, 40_000).expect("consistent");
    let stored = StoredBytes::from_usage(usage, extent).expect("fits");
    let rates = Rates::parse("2", "1").expect("valid");
    let accrued = Amount::parse_accrued("1294000").expect("valid");
    let t0 = 1_700_000_000;
    let result = accrue(accrued, t0, t0 + 3600, 3600, stored, &rates).expect("computes");
    assert_eq!(result.intervals, 1);
    assert_eq!(result.accrued.to_decimal_string(), "1384000.000000");
    assert_eq!(
        result.charged,
        Amount::parse_accrued("90000").expect("valid")
    );
    // The 50000 unused blocks contribute nothing: the same data in a volume with no unused
    // blocks costs the same.
    let full = VolumeUsage::new(50_000, 50_000, 40_000).expect("consistent");
    let full = StoredBytes::from_usage(full, extent).expect("fits");
    let same = accrue(accrued, t0, t0 + 3600, 3600, full, &rates).expect("computes");
    assert_eq!(same.accrued, result.accrued);
}

/// Scenario 5: direct allocation, no reclaim (C1).
#[test]
fn seed000_s05_direct_allocation_when_unallocated_suffices() {
    let mut pool = PoolLedger::new(160_000);
    add_varea01(&mut pool);
    assert_eq!(pool.counters().unallocated(), 60_000);
    let decision = plan(&pool, 50_000, &strict()).expect("admitted");
    assert!(decision.is_direct());
    assert_eq!(
        decision.admission.condition(),
        Some(AdmissionCondition::C1Unallocated)
    );
    pool.create_volume("VAREA02", 50_000, 1).expect("fits");
    assert_eq!(pool.counters().unallocated(), 10_000);
    assert_eq!(
        usage_of(&pool, "VAREA01"),
        (100_000, 50_000, 40_000, 50_000, 10_000)
    );
}

/// Scenario 6 fixture: 200000 blocks, 20000 unallocated, VAREA01 (50000 unused) and VAREA02
/// (SRV03: 80000 allocated, 70000 in use (T: high priority) → 10000 unused).
fn scenario6_pool() -> PoolLedger {
    let mut pool = PoolLedger::new(200_000);
    add_varea01(&mut pool);
    pool.create_volume("VAREA02", 80_000, 1).expect("fits");
    pool.write("VAREA02", range(0, 70_000), DataPriority::High)
        .expect("allocated");
    pool
}

/// Scenario 6: reclaim unused blocks from the biggest holder (C2, Fig. 7 tier 1).
#[test]
fn seed000_s06_claim_larger_than_free_reclaims_unused_largest_first() {
    let mut pool = scenario6_pool();
    assert_eq!(pool.counters().unallocated(), 20_000);
    let decision = plan(&pool, 60_000, &strict()).expect("admitted");
    // C1 fails (20000 ≯ 60000), C2 holds (20000 + 60000 > 60000).
    assert_eq!(
        decision.admission.condition(),
        Some(AdmissionCondition::C2Unused)
    );
    assert_eq!(
        decision.returns,
        vec![AreaReturn {
            volume: "VAREA01".into(),
            tier: ReclaimTier::Unused,
            extents: 40_000,
            pool_extents: 40_000,
        }],
        "the first return targets VAREA01 (50000 unused > 10000) and names the shortfall"
    );
    assert!(!decision.returns[0].discards_data());
    comply(&mut pool, &decision.returns[0]);
    // 708: re-check; now U = N, so allocate.
    let recheck = plan(&pool, 60_000, &strict()).expect("still admitted");
    assert!(recheck.is_direct());
    pool.create_volume("VAREA03", 60_000, 1).expect("fits");
    assert_eq!(
        pool.volume("VAREA03").map(|v| v.usage().allocated()),
        Some(60_000)
    );
    // No data block of VAREA01 was touched.
    assert_eq!(
        usage_of(&pool, "VAREA01"),
        (60_000, 50_000, 40_000, 10_000, 10_000)
    );
    assert_eq!(
        usage_of(&pool, "VAREA02"),
        (80_000, 70_000, 70_000, 10_000, 0)
    );
    assert_eq!(pool.counters().unallocated(), 0);
}

/// Scenario 7: unused space is exhausted before low-priority data ([0055]).
#[test]
fn seed000_s07_unused_is_exhausted_before_low_priority() {
    let mut pool = PoolLedger::new(130_000);
    add_varea01(&mut pool);
    // VAREA02 (T): 30000 blocks, all low-priority data, no unused blocks.
    pool.create_volume("VAREA02", 30_000, 1).expect("fits");
    pool.write("VAREA02", range(0, 30_000), DataPriority::Low)
        .expect("allocated");
    assert_eq!(pool.counters().unallocated(), 0);

    let decision = plan(&pool, 55_000, &strict()).expect("admitted");
    assert_eq!(
        decision.admission.condition(),
        Some(AdmissionCondition::C3LowPriority)
    );
    let summary: Vec<_> = decision
        .returns
        .iter()
        .map(|r| (r.volume.as_str(), r.tier, r.extents))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("VAREA01", ReclaimTier::Unused, 50_000),
            ("VAREA02", ReclaimTier::LowPriority, 5_000),
        ]
    );

    // Step by step, as the controller runs it.
    comply(&mut pool, &decision.returns[0]);
    assert_eq!(pool.counters().unallocated(), 50_000);
    let next = plan(&pool, 55_000, &strict()).expect("still admitted");
    assert_eq!(
        next.returns,
        vec![AreaReturn {
            volume: "VAREA02".into(),
            tier: ReclaimTier::LowPriority,
            extents: 5_000,
            pool_extents: 5_000,
        }],
        "no volume has unused blocks left: the most low-priority blocks (30000 > 10000)"
    );
    assert!(next.returns[0].discards_data());
    comply(&mut pool, &next.returns[0]);
    assert!(
        plan(&pool, 55_000, &strict())
            .expect("admitted")
            .is_direct()
    );
    pool.create_volume("VAREA03", 55_000, 1).expect("fits");
    assert_eq!(usage_of(&pool, "VAREA01").2, 40_000, "VAREA01 high intact");
    assert_eq!(usage_of(&pool, "VAREA02"), (25_000, 25_000, 0, 0, 25_000));
}

/// Scenario 8: low-priority reclaim only (C3).
#[test]
fn seed000_s08_low_priority_reclaim_only_when_everything_is_used() {
    let mut pool = PoolLedger::new(55_000);
    // VAREA01 fully used (T: allocated 50000): 40000 high + 10000 low.
    pool.create_volume("VAREA01", 50_000, 1).expect("fits");
    pool.write("VAREA01", range(0, 40_000), DataPriority::High)
        .expect("allocated");
    pool.write("VAREA01", range(40_000, 10_000), DataPriority::Low)
        .expect("allocated");
    // Another volume with 5000 low-priority blocks (T).
    pool.create_volume("VAREA02", 5_000, 1).expect("fits");
    pool.write("VAREA02", range(0, 5_000), DataPriority::Low)
        .expect("allocated");
    assert_eq!(
        (pool.counters().unallocated(), pool.counters().unused()),
        (0, 0)
    );

    let decision = plan(&pool, 8_000, &strict()).expect("admitted");
    assert_eq!(decision.returns.len(), 1);
    let ret = &decision.returns[0];
    assert_eq!(
        (ret.volume.as_str(), ret.tier, ret.extents),
        ("VAREA01", ReclaimTier::LowPriority, 8_000)
    );
    assert!(ret.discards_data(), "LowPriorityDataReclaimed warning");
    comply(&mut pool, ret);
    assert_eq!(
        usage_of(&pool, "VAREA01"),
        (42_000, 42_000, 40_000, 0, 2_000)
    );
}

/// Scenario 9: rejection when nothing suffices ([0045]–[0046]).
#[test]
fn seed000_s09_rejects_when_unallocated_unused_and_low_priority_fall_short() {
    let mut pool = PoolLedger::new(100_000);
    add_varea01(&mut pool);
    let before = pool.clone();
    let err = plan(&pool, 70_000, &strict()).expect_err("not admitted");
    let AllocationError::InsufficientCapacity(rejection) = &err else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(Rejection::REASON, "InsufficientCapacity");
    assert_eq!(
        (
            rejection.admission.requested,
            rejection.admission.unallocated,
            rejection.admission.reclaimable_unused,
            rejection.admission.reclaimable_low_priority,
        ),
        (70_000, 0, 50_000, 10_000)
    );
    assert_eq!(rejection.admission.condition(), None);
    assert_eq!(
        err.to_string(),
        "the claim needs 70000 extents but at most 60000 can be made free: 0 unallocated, \
         50000 unused and 10000 low-priority extents of other volumes that may be reclaimed \
         (admission is Strict: more than 70000 are needed)"
    );
    // No AreaReturn exists, so nothing was released: the ledger is untouched.
    assert_eq!(pool, before);
    pool.create_volume("VAREA02", 70_000, 1)
        .expect_err("the ledger also refuses");
    assert_eq!(pool, before);
}

/// Scenario 10: the equality boundary. Decision: `Strict` (default) is the patent's literal
/// "more than"; `Inclusive` admits equality. The shortage test 604/708 reclaims only while
/// U < N, so U = N allocates directly.
#[test]
fn seed000_s10_equality_boundary_follows_admission_rule() {
    // U + F + L = 0 + 50000 + 10000 = 60000 = N.
    let mut pool = PoolLedger::new(100_000);
    add_varea01(&mut pool);
    assert!(matches!(
        plan(&pool, 60_000, &strict()),
        Err(AllocationError::InsufficientCapacity(_))
    ));
    let admitted = plan(&pool, 60_000, &inclusive()).expect("Inclusive admits equality");
    assert_eq!(admitted.reclaimed(), 60_000);
    assert_eq!(admitted.returns.len(), 2);

    // U = N with nothing reclaimable.
    let empty = PoolLedger::new(1_000);
    assert!(matches!(
        plan(&empty, 1_000, &strict()),
        Err(AllocationError::InsufficientCapacity(_))
    ));
    assert!(
        plan(&empty, 1_000, &inclusive())
            .expect("admitted")
            .is_direct()
    );

    // U = N with something reclaimable: Strict admits, and no return is needed.
    let mut spare = PoolLedger::new(2_000);
    spare.create_volume("VAREA01", 1_000, 1).expect("fits");
    let direct = plan(&spare, 1_000, &strict()).expect("admitted");
    assert!(direct.is_direct());
}

/// Scenario 11: voluntary release ([0069]–[0073]): 1000 blocks, 600 in use, 400 of them high
/// (T).
#[test]
fn seed000_s11_voluntary_release_updates_volume_and_pool_from_bitmaps() {
    let mut pool = PoolLedger::new(100_000);
    add_varea01(&mut pool);
    let before = pool.counters();
    let released = [
        range(39_600, 400), // high-priority data
        range(40_000, 200), // low-priority data
        range(50_000, 400), // unused
    ];
    let summary = pool.release("VAREA01", &released).expect("in range");
    assert_eq!(
        (summary.released, summary.in_use, summary.high_priority),
        (1_000, 600, 400)
    );
    let (allocated, in_use, high, _, _) = usage_of(&pool, "VAREA01");
    assert_eq!((allocated, in_use, high), (99_000, 49_400, 39_600));
    let after = pool.counters();
    assert_eq!(before.allocated() - after.allocated(), 1_000);
    assert_eq!(after.unallocated() - before.unallocated(), 1_000);
    assert_eq!(before.in_use() - after.in_use(), 600);
    assert_eq!(before.high_priority() - after.high_priority(), 400);
    // All three bits cleared.
    let volume = pool.volume("VAREA01").expect("exists");
    for r in released {
        for block in r.start..r.end() {
            assert_eq!(volume.state(block), Some(ExtentState::Unallocated));
        }
    }
    // The blocks appear in the free list.
    assert_eq!(summary.freed, vec![range(39_600, 600), range(50_000, 400)]);
}

/// Scenario 12: return non-compliance. Decision: after `returnTimeoutSeconds` the victim is
/// skipped and the claim re-planned without it; that ends in the next victim or a rejection
/// naming the skipped victims, never in an endless loop.
#[test]
fn seed000_s12_non_compliant_victim_is_skipped_then_next_victim_or_rejection() {
    let t0 = 1_000;
    assert!(!is_return_overdue(t0, t0 + 59, 60));
    assert!(is_return_overdue(t0, t0 + 60, 60));
    assert!(!is_return_overdue(t0, t0 - 5, 60), "clock going back");

    // Scenario 6's pool: without VAREA01 only 20000 + 10000 remain for 60000 → rejected.
    let pool = scenario6_pool();
    let volumes = candidates(&pool);
    let snapshot = PoolSnapshot {
        unallocated: pool.counters().unallocated(),
        volumes: &volumes,
    };
    let first = plan_allocation(snapshot, &request(60_000), &strict()).expect("admitted");
    assert_eq!(first.returns[0].volume, "VAREA01");
    let skipped = BTreeSet::from(["VAREA01".to_owned()]);
    let err = replan_excluding(snapshot, &request(60_000), &strict(), &skipped)
        .expect_err("not enough without VAREA01");
    let AllocationError::InsufficientCapacity(rejection) = &err else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(rejection.skipped_victims, vec!["VAREA01".to_owned()]);
    assert!(
        err.to_string()
            .ends_with("; skipped because they did not give space back in time: VAREA01")
    );

    // With another holder the claim moves on to it.
    let mut roomy = PoolLedger::new(250_000);
    add_varea01(&mut roomy);
    roomy.create_volume("VAREA04", 45_000, 1).expect("fits");
    roomy.create_volume("VAREA05", 85_000, 1).expect("fits");
    roomy
        .write("VAREA05", range(0, 85_000), DataPriority::High)
        .expect("allocated");
    assert_eq!(roomy.counters().unallocated(), 20_000);
    let volumes = candidates(&roomy);
    let snapshot = PoolSnapshot {
        unallocated: 20_000,
        volumes: &volumes,
    };
    let next = replan_excluding(snapshot, &request(60_000), &strict(), &skipped)
        .expect("VAREA04 suffices");
    assert_eq!(
        next.returns,
        vec![AreaReturn {
            volume: "VAREA04".into(),
            tier: ReclaimTier::Unused,
            extents: 40_000,
            pool_extents: 40_000,
        }]
    );

    // Every victim times out: the loop ends after at most one re-plan per volume.
    let mut skipped = BTreeSet::new();
    let mut rounds = 0;
    let outcome = loop {
        rounds += 1;
        assert!(rounds <= volumes.len() + 1, "re-planning must terminate");
        match replan_excluding(snapshot, &request(60_000), &strict(), &skipped) {
            Ok(plan) => {
                skipped.insert(plan.returns[0].volume.clone());
            }
            Err(err) => break err,
        }
    };
    assert!(matches!(outcome, AllocationError::InsufficientCapacity(_)));
}

/// Scenario 13: out-of-band data path (Fig. 11). The node translates with its own copy of the
/// mapping (the placement's ExtentMap); the operator only receives the usage report and applies
/// it to the counters. Nothing in the accounting planner sees data or does I/O.
#[test]
fn seed000_s13_out_of_band_node_translates_operator_only_accounts() {
    let extent = ExtentSize::new(1 << 20).expect("valid");
    let placement = Placement {
        extents: 4,
        replicas: vec![ReplicaPlacement {
            pieces: vec![Piece {
                area: AreaId::new("node-a-disk"),
                node: "node-a".into(),
                domain: "zone-1".into(),
                area_offset: 10,
                len: 4,
            }],
        }],
    };
    let map = placement.to_extent_map(4 << 20, extent).expect("valid map");
    // The node's translation of a write at volume byte 2 MiB + 4096.
    let write = ByteRange::new((2 << 20) + 4096, 4096).expect("fits");
    let segment = map
        .translate(write)
        .expect("in range")
        .next()
        .expect("one segment");
    let location = segment.replica(0).expect("mapped");
    assert_eq!(location.area.as_str(), "node-a-disk");
    assert_eq!(location.area_offset, (12 << 20) + 4096);
    // The usage report the node sends: extent 2 newly written with the volume's priority.
    let mut pool = PoolLedger::new(16);
    pool.create_volume("vol", 4, 1).expect("fits");
    let report = range(segment.extent_index(), 1);
    let delta = pool
        .write("vol", report, DataPriority::Low)
        .expect("allocated");
    assert_eq!((delta.newly_in_use, delta.became_high), (1, 0));
    // Re-sending the same report (node restart) changes nothing.
    assert!(
        pool.write("vol", report, DataPriority::Low)
            .expect("allocated")
            .is_noop()
    );
    assert_eq!(pool.counters().in_use(), 1);
}

// ---------------------------------------------------------------------------------------------
// Scenarios 14 and 15: property tests over random pools and operation sequences.

#[derive(Debug, Clone)]
enum Op {
    /// A claim of this many extents with a class value; admitted claims reclaim and allocate.
    Claim { extents: u64, value: i32 },
    /// A write to volume `volume % n` at `start % size`, `len` extents.
    Write {
        volume: usize,
        start: u64,
        len: u64,
        high: bool,
    },
    /// A voluntary release by the owner.
    Release { volume: usize, start: u64, len: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u64..60, -2i32..3).prop_map(|(extents, value)| Op::Claim { extents, value }),
        (0usize..16, 0u64..64, 1u64..24, any::<bool>()).prop_map(|(volume, start, len, high)| {
            Op::Write {
                volume,
                start,
                len,
                high,
            }
        }),
        (0usize..16, 0u64..64, 1u64..16).prop_map(|(volume, start, len)| Op::Release {
            volume,
            start,
            len
        }),
    ]
}

fn rules() -> impl Strategy<Value = ReclaimRules> {
    (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(unused, low, lower_first, inclusive)| ReclaimRules {
            tiers: TierSet {
                unused,
                low_priority: low,
            },
            victim_policy: if lower_first {
                VictimPolicy::LowerPriorityFirst
            } else {
                VictimPolicy::LargestFirst
            },
            admission: if inclusive {
                AdmissionRule::Inclusive
            } else {
                AdmissionRule::Strict
            },
        },
    )
}

/// Classes by volume-name hash: values −1..=1, reclaimable flags vary.
fn class_of(name: &str) -> VictimClass {
    let h = name
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    VictimClass {
        value: (h % 3) as i32 - 1,
        unused: h % 5 != 0,
        low_priority_data: h % 7 != 0,
    }
}

/// Checks scenario 15's invariants on the ledger.
fn assert_consistent(pool: &PoolLedger) {
    let c = pool.counters();
    assert_eq!(c.total(), c.allocated() + c.unallocated());
    let (alloc, usage, priority) = popcounts(pool);
    assert_eq!(
        (alloc, usage, priority),
        (c.allocated(), c.in_use(), c.high_priority())
    );
    assert_eq!(
        pool.recount(),
        Ok(c),
        "incremental counters equal the recount"
    );
    let sums = PoolCounters::from_volumes(c.total(), pool.volumes().map(|v| (v.usage(), 1)))
        .expect("not over-committed");
    assert_eq!(sums, c, "per-volume counters sum to the pool counters");
    for volume in pool.volumes() {
        assert_eq!(volume.usage(), volume.recount());
    }
}

/// Runs one operation. Returns the high-priority extents released by reclaim (must be 0).
fn run(pool: &mut PoolLedger, rules: &ReclaimRules, op: &Op, serial: &mut u32) -> u64 {
    let names: Vec<String> = pool.volumes().map(|v| v.name().to_owned()).collect();
    match *op {
        Op::Claim { extents, value } => {
            let volumes: Vec<VolumeCandidate> = pool
                .volumes()
                .map(|v| VolumeCandidate {
                    name: v.name().to_owned(),
                    usage: v.usage(),
                    copies: 1,
                    class: class_of(v.name()),
                })
                .collect();
            let req = AllocationRequest {
                extents,
                copies: 1,
                priority_value: value,
                own_volumes: Vec::new(),
            };
            let snapshot = PoolSnapshot {
                unallocated: pool.counters().unallocated(),
                volumes: &volumes,
            };
            let Ok(decision) = plan_allocation(snapshot, &req, rules) else {
                return 0;
            };
            let mut high_released = 0;
            for ret in &decision.returns {
                let states = pool.volume(&ret.volume).expect("victim exists").states();
                let named = select_return_ranges(states, ret.tier, ret.extents);
                let kept = recheck_under_hold(states, &named, ret.tier);
                let summary = pool.release(&ret.volume, &kept).expect("in range");
                high_released += summary.high_priority;
            }
            *serial += 1;
            pool.create_volume(&format!("vol-{serial:03}"), extents, 1)
                .expect("the plan freed enough");
            high_released
        }
        Op::Write {
            volume,
            start,
            len,
            high,
        } => {
            if let Some(name) = names.get(volume % names.len().max(1)) {
                let size = pool.volume(name).map_or(0, |v| v.extents());
                if size > 0 {
                    let start = start % size;
                    let len = len.min(size - start);
                    let priority = if high {
                        DataPriority::High
                    } else {
                        DataPriority::Low
                    };
                    // Writes to released (hole) extents are refused and change nothing.
                    let before = pool.clone();
                    if pool.write(name, range(start, len), priority).is_err() {
                        assert_eq!(*pool, before);
                    }
                }
            }
            0
        }
        Op::Release { volume, start, len } => {
            if let Some(name) = names.get(volume % names.len().max(1)) {
                let size = pool.volume(name).map_or(0, |v| v.extents());
                if size > 0 {
                    let start = start % size;
                    let len = len.min(size - start);
                    pool.release(name, &[range(start, len)]).expect("in range");
                }
            }
            0
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Scenario 14: after any sequence of claims, writes and reclaims, no block holding
    /// high-priority data is freed except by its owner's voluntary release; and every
    /// high-priority block that was not voluntarily released is still allocated and high.
    #[test]
    fn seed000_s14_high_priority_is_never_reclaimed(
        total in 20u64..200,
        rules in rules(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut pool = PoolLedger::new(total);
        let mut serial = 0;
        for op in &ops {
            // Snapshot the high-priority extents before the operation.
            let high_before: Vec<(String, u64)> = pool
                .volumes()
                .flat_map(|v| {
                    v.states()
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.is_high_priority())
                        .map(|(i, _)| (v.name().to_owned(), i as u64))
                        .collect::<Vec<_>>()
                })
                .collect();
            let released_high = run(&mut pool, &rules, op, &mut serial);
            prop_assert_eq!(released_high, 0);
            if let Op::Claim { .. } = op {
                for (name, extent) in high_before {
                    prop_assert_eq!(
                        pool.volume(&name).and_then(|v| v.state(extent)),
                        Some(ExtentState::HighPriority)
                    );
                }
            }
        }
    }

    /// Scenario 15: counter/bitmap consistency after any sequence of operations.
    #[test]
    fn seed000_s15_counters_match_bitmaps_and_sum_over_volumes(
        total in 20u64..200,
        rules in rules(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut pool = PoolLedger::new(total);
        let mut serial = 0;
        assert_consistent(&pool);
        for op in &ops {
            run(&mut pool, &rules, op, &mut serial);
            assert_consistent(&pool);
        }
    }
}
