//! Times admission + victim selection (seed 000 Fig. 6 + Fig. 7) on a pool of 100,000 volumes.
//!
//! ```text
//! cargo run --release -p tessera-operator --example bench_allocation
//! ```
//!
//! Target: < 50 ms per plan (printed, not asserted). Three shapes: a claim that a few victims
//! satisfy, one that needs tens of thousands of returns across both tiers, and a rejection.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tessera_api::v1alpha1::VictimPolicy;
use tessera_operator::planners::accounting::VolumeUsage;
use tessera_operator::planners::allocation::{
    AllocationRequest, PoolSnapshot, ReclaimRules, VictimClass, VolumeCandidate, plan_allocation,
};

const VOLUMES: usize = 100_000;
const RUNS: usize = 15;

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pool() -> Vec<VolumeCandidate> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..VOLUMES)
        .map(|i| {
            let allocated = 1 + rng.below(2_000);
            let in_use = rng.below(allocated + 1);
            let high = rng.below(in_use + 1);
            VolumeCandidate {
                name: format!("pvc-{i:08x}"),
                usage: VolumeUsage::new(allocated, in_use, high).expect("consistent"),
                copies: 1 + (rng.below(10) == 0) as u8,
                class: VictimClass {
                    value: rng.below(5) as i32,
                    unused: rng.below(20) != 0,
                    low_priority_data: rng.below(10) != 0,
                },
            }
        })
        .collect()
}

fn time(label: &str, volumes: &[VolumeCandidate], extents: u64, rules: &ReclaimRules) {
    let request = AllocationRequest {
        extents,
        copies: 1,
        priority_value: 3,
        own_volumes: Vec::new(),
    };
    let snapshot = PoolSnapshot {
        unallocated: 1_000,
        volumes,
    };
    let mut samples: Vec<Duration> = Vec::with_capacity(RUNS);
    let mut outcome = String::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let result = black_box(plan_allocation(
            black_box(snapshot),
            black_box(&request),
            rules,
        ));
        samples.push(start.elapsed());
        outcome = match &result {
            Ok(plan) => format!("admitted, {} returns", plan.returns.len()),
            Err(err) => format!("rejected ({err})"),
        };
    }
    samples.sort();
    let median = samples[RUNS / 2];
    let worst = samples[RUNS - 1];
    println!(
        "{label:<44} median {:>8.3} ms  max {:>8.3} ms  {}",
        median.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3,
        if outcome.len() > 60 {
            format!("{}…", &outcome[..60])
        } else {
            outcome
        }
    );
}

fn main() {
    let volumes = pool();
    let unused: u64 = volumes
        .iter()
        .map(|v| v.usage.unused() * u64::from(v.copies.max(1)))
        .sum();
    println!("pool: {VOLUMES} volumes, {unused} unused extents in total; target < 50 ms per plan");
    let largest = ReclaimRules::default();
    let lower = ReclaimRules {
        victim_policy: VictimPolicy::LowerPriorityFirst,
        ..ReclaimRules::default()
    };
    time("LargestFirst, few victims", &volumes, 20_000, &largest);
    time(
        "LargestFirst, ~all unused + low data",
        &volumes,
        unused + 1_000_000,
        &largest,
    );
    time("LargestFirst, rejected", &volumes, u64::MAX / 4, &largest);
    time("LowerPriorityFirst, few victims", &volumes, 20_000, &lower);
    time(
        "LowerPriorityFirst, many victims",
        &volumes,
        unused / 3,
        &lower,
    );
}
