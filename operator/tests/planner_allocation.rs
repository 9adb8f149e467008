//! Property tests of the admission and reclaim planner (seed 000 Fig. 6 and Fig. 7):
//! admission is consistent with the plan, high-priority data is never named, the plan is
//! stable under execution and independent of input order, and range selection stays in the tier.

use std::collections::BTreeSet;

use proptest::prelude::*;
use tessera_api::v1alpha1::{AdmissionRule, ReclaimTier, VictimPolicy};
use tessera_operator::planners::accounting::{ExtentState, VolumeUsage};
use tessera_operator::planners::allocation::{
    AllocationError, AllocationPlan, AllocationRequest, PoolSnapshot, ReclaimRules, TierSet,
    VictimClass, VolumeCandidate, plan_allocation, recheck_under_hold, replan_excluding,
    select_return_ranges,
};
use tessera_operator::planners::total_len;

fn volume(index: usize) -> impl Strategy<Value = VolumeCandidate> {
    (
        0u64..60,
        0u64..=100,
        0u64..=100,
        1u8..=3,
        -2i32..=2,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            move |(allocated, in_use_pct, high_pct, copies, value, unused, low)| {
                let in_use = allocated * in_use_pct / 100;
                let high = in_use * high_pct / 100;
                VolumeCandidate {
                    name: format!("v{index:03}"),
                    usage: VolumeUsage::new(allocated, in_use, high).expect("consistent"),
                    copies,
                    class: VictimClass {
                        value,
                        unused,
                        low_priority_data: low,
                    },
                }
            },
        )
}

fn volumes() -> impl Strategy<Value = Vec<VolumeCandidate>> {
    (0usize..24).prop_flat_map(|n| (0..n).map(volume).collect::<Vec<_>>())
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

#[derive(Debug, Clone)]
struct Case {
    unallocated: u64,
    volumes: Vec<VolumeCandidate>,
    request: AllocationRequest,
    rules: ReclaimRules,
    skipped: BTreeSet<String>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u64..200,
        volumes(),
        1u64..150,
        1u8..=3,
        -2i32..=3,
        rules(),
        proptest::collection::btree_set(0usize..24, 0..4),
        proptest::collection::btree_set(0usize..24, 0..3),
    )
        .prop_map(
            |(unallocated, volumes, extents, copies, value, rules, own, skipped)| Case {
                unallocated,
                request: AllocationRequest {
                    extents: extents.div_ceil(u64::from(copies)),
                    copies,
                    priority_value: value,
                    own_volumes: own.iter().map(|i| format!("v{i:03}")).collect(),
                },
                volumes,
                rules,
                skipped: skipped.iter().map(|i| format!("v{i:03}")).collect(),
            },
        )
}

impl Case {
    fn plan(&self) -> Result<AllocationPlan, AllocationError> {
        replan_excluding(
            PoolSnapshot {
                unallocated: self.unallocated,
                volumes: &self.volumes,
            },
            &self.request,
            &self.rules,
            &self.skipped,
        )
    }

    /// Whether `v` may give extents of `tier` to this request, computed independently.
    fn eligible(&self, v: &VolumeCandidate, tier: ReclaimTier) -> bool {
        let policy_ok = match self.rules.victim_policy {
            VictimPolicy::LargestFirst => true,
            VictimPolicy::LowerPriorityFirst => v.class.value < self.request.priority_value,
        };
        let tier_ok = match tier {
            ReclaimTier::Unused => self.rules.tiers.unused && v.class.unused,
            ReclaimTier::LowPriority => self.rules.tiers.low_priority && v.class.low_priority_data,
        };
        policy_ok
            && tier_ok
            && !self.request.own_volumes.contains(&v.name)
            && !self.skipped.contains(&v.name)
    }

    /// F or L by brute force.
    fn reclaimable(&self, tier: ReclaimTier) -> u64 {
        self.volumes
            .iter()
            .filter(|v| self.eligible(v, tier))
            .map(|v| v.pool_extents_in(tier))
            .sum()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Admitted ⇒ the plan frees enough, only from eligible victims, tier 1 before tier 2, never
    /// beyond a victim's tier; rejected ⇒ even everything reclaimable is not enough.
    #[test]
    fn admission_is_consistent_with_the_reclaim_plan(case in case()) {
        let f = case.reclaimable(ReclaimTier::Unused);
        let l = case.reclaimable(ReclaimTier::LowPriority);
        let n = case.request.pool_extents();
        let obtainable = u128::from(case.unallocated) + u128::from(f) + u128::from(l);
        let admit = match case.rules.admission {
            AdmissionRule::Strict => obtainable > u128::from(n),
            AdmissionRule::Inclusive => obtainable >= u128::from(n),
        };
        match case.plan() {
            Ok(plan) => {
                prop_assert!(admit);
                prop_assert_eq!(
                    (plan.admission.reclaimable_unused, plan.admission.reclaimable_low_priority),
                    (f, l)
                );
                prop_assert!(case.unallocated + plan.reclaimed() >= n, "frees enough");
                if case.unallocated >= n {
                    prop_assert!(plan.is_direct(), "no reclaim without a shortage (604)");
                }
                let shortfall = n.saturating_sub(case.unallocated);
                let mut seen = BTreeSet::new();
                let mut low_started = false;
                let mut unused_taken = 0;
                for (i, ret) in plan.returns.iter().enumerate() {
                    let v = case.volumes.iter().find(|v| v.name == ret.volume).expect("known");
                    prop_assert!(case.eligible(v, ret.tier), "{} not eligible", ret.volume);
                    prop_assert!(ret.extents > 0);
                    prop_assert!(ret.extents <= v.extents_in(ret.tier), "beyond the tier");
                    prop_assert_eq!(ret.pool_extents, ret.extents * u64::from(v.copies));
                    prop_assert!(seen.insert((ret.volume.clone(), ret.tier == ReclaimTier::Unused)), "one return per victim and tier");
                    match ret.tier {
                        ReclaimTier::Unused => {
                            prop_assert!(!low_started, "Unused after LowPriority");
                            unused_taken += ret.pool_extents;
                        }
                        ReclaimTier::LowPriority => low_started = true,
                    }
                    // Every return but the last takes its victim's whole tier; the plan stops
                    // as soon as the shortfall is covered (less than one more virtual extent).
                    if i + 1 < plan.returns.len() {
                        prop_assert_eq!(ret.extents, v.extents_in(ret.tier));
                    } else {
                        let before: u64 = plan.reclaimed() - ret.pool_extents;
                        prop_assert!(before < shortfall);
                        prop_assert!(plan.reclaimed() - shortfall < u64::from(v.copies));
                    }
                }
                // [0055]: low-priority data only when no eligible volume has unused space left.
                if low_started {
                    prop_assert_eq!(unused_taken, f);
                }
            }
            Err(AllocationError::InsufficientCapacity(rejection)) => {
                prop_assert!(!admit, "rejected although {} are obtainable for {}", obtainable, n);
                prop_assert_eq!(
                    (rejection.admission.reclaimable_unused, rejection.admission.reclaimable_low_priority),
                    (f, l)
                );
                prop_assert_eq!(
                    rejection.skipped_victims,
                    case.skipped.iter().cloned().collect::<Vec<_>>()
                );
            }
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    /// The plan is stable under execution: after the first return completes as planned, the
    /// re-plan (708) is the rest of the same plan.
    #[test]
    fn replanning_after_a_completed_return_yields_the_rest(case in case()) {
        let Ok(plan) = case.plan() else { return Ok(()) };
        let Some(first) = plan.returns.first() else { return Ok(()) };
        let mut after = case.clone();
        after.unallocated += first.pool_extents;
        let v = after
            .volumes
            .iter_mut()
            .find(|v| v.name == first.volume)
            .expect("victim exists");
        let u = v.usage;
        v.usage = match first.tier {
            ReclaimTier::Unused => VolumeUsage::new(u.allocated() - first.extents, u.in_use(), u.high_priority()),
            ReclaimTier::LowPriority => VolumeUsage::new(
                u.allocated() - first.extents,
                u.in_use() - first.extents,
                u.high_priority(),
            ),
        }
        .expect("a return keeps the counters consistent");
        let replan = after.plan().expect("still admitted");
        prop_assert_eq!(&replan.returns[..], &plan.returns[1..]);
    }

    /// Ties break by name, so the order of the input does not matter.
    #[test]
    fn plan_does_not_depend_on_input_order(case in case(), seed in any::<u64>()) {
        let mut shuffled = case.clone();
        // A deterministic permutation from the seed.
        let len = shuffled.volumes.len();
        let mut state = seed | 1;
        for i in (1..len).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.volumes.swap(i, (state % (i as u64 + 1)) as usize);
        }
        prop_assert_eq!(case.plan(), shuffled.plan());
    }

    /// Range selection names only extents of the tier (never high-priority data), exactly as
    /// many as asked when the volume has them, and the re-check under the hold drops extents
    /// written since.
    #[test]
    fn return_ranges_stay_in_the_tier(
        states in proptest::collection::vec(0u8..4, 0..200),
        low in any::<bool>(),
        wanted in 0u64..120,
        writes in proptest::collection::vec(0usize..200, 0..20),
    ) {
        let states: Vec<ExtentState> = states
            .into_iter()
            .map(|s| match s {
                0 => ExtentState::Unallocated,
                1 => ExtentState::Unused,
                2 => ExtentState::LowPriority,
                _ => ExtentState::HighPriority,
            })
            .collect();
        let (tier, state) = if low {
            (ReclaimTier::LowPriority, ExtentState::LowPriority)
        } else {
            (ReclaimTier::Unused, ExtentState::Unused)
        };
        let available = states.iter().filter(|s| **s == state).count() as u64;
        let ranges = select_return_ranges(&states, tier, wanted);
        prop_assert_eq!(total_len(&ranges), wanted.min(available));
        for pair in ranges.windows(2) {
            prop_assert!(pair[0].end() < pair[1].start, "sorted, disjoint, coalesced");
        }
        for r in &ranges {
            for i in r.start..r.end() {
                prop_assert_eq!(states[i as usize], state);
            }
        }
        // Writes land between plan and hold: high-priority data appears in some extents.
        let mut now = states.clone();
        for w in writes {
            if let Some(s) = now.get_mut(w) && s.is_allocated() {
                *s = ExtentState::HighPriority;
            }
        }
        let kept = recheck_under_hold(&now, &ranges, tier);
        for r in &kept {
            for i in r.start..r.end() {
                prop_assert_eq!(now[i as usize], state);
                prop_assert!(ranges.iter().any(|n| n.start <= i && i < n.end()));
            }
        }
        let still: u64 = ranges
            .iter()
            .flat_map(|r| r.start..r.end())
            .filter(|&i| now[i as usize] == state)
            .count() as u64;
        prop_assert_eq!(total_len(&kept), still);
    }
}

#[test]
fn own_volumes_are_never_victims() {
    let usage = VolumeUsage::new(100, 0, 0).expect("consistent");
    let volumes = vec![VolumeCandidate {
        name: "mine".into(),
        usage,
        copies: 1,
        class: VictimClass::DEFAULT,
    }];
    let request = AllocationRequest {
        extents: 50,
        copies: 1,
        priority_value: 0,
        own_volumes: vec!["mine".into()],
    };
    let snapshot = PoolSnapshot {
        unallocated: 10,
        volumes: &volumes,
    };
    assert!(matches!(
        plan_allocation(snapshot, &request, &ReclaimRules::default()),
        Err(AllocationError::InsufficientCapacity(_))
    ));
}

#[test]
fn lower_priority_first_takes_lowest_class_first_and_skips_higher() {
    let volume = |name: &str, unused: u64, value: i32| VolumeCandidate {
        name: name.into(),
        usage: VolumeUsage::new(unused, 0, 0).expect("consistent"),
        copies: 1,
        class: VictimClass {
            value,
            ..VictimClass::DEFAULT
        },
    };
    let volumes = vec![
        volume("big-mid", 100, 5),
        volume("small-low", 10, 1),
        volume("other-low", 20, 1),
        volume("peer", 500, 10),
    ];
    let rules = ReclaimRules {
        victim_policy: VictimPolicy::LowerPriorityFirst,
        ..ReclaimRules::default()
    };
    let request = AllocationRequest {
        extents: 40,
        copies: 1,
        priority_value: 10,
        own_volumes: Vec::new(),
    };
    let plan = plan_allocation(
        PoolSnapshot {
            unallocated: 0,
            volumes: &volumes,
        },
        &request,
        &rules,
    )
    .expect("admitted");
    let order: Vec<_> = plan
        .returns
        .iter()
        .map(|r| (r.volume.as_str(), r.extents))
        .collect();
    // Value 1 first (largest of them first), then value 5; never the equal-valued peer.
    assert_eq!(
        order,
        vec![("other-low", 20), ("small-low", 10), ("big-mid", 10)]
    );
    assert_eq!(plan.admission.reclaimable_unused, 130);
}

#[test]
fn replicated_victims_free_copies_times_their_extents() {
    let volumes = vec![VolumeCandidate {
        name: "mirror".into(),
        usage: VolumeUsage::new(10, 0, 0).expect("consistent"),
        copies: 2,
        class: VictimClass::DEFAULT,
    }];
    // A 2-copy claim of 4 extents needs 8 pool extents; 3 are free; 5 short → 3 virtual
    // extents of the mirror (6 pool extents).
    let request = AllocationRequest {
        extents: 4,
        copies: 2,
        ..AllocationRequest::default()
    };
    let plan = plan_allocation(
        PoolSnapshot {
            unallocated: 3,
            volumes: &volumes,
        },
        &request,
        &ReclaimRules::default(),
    )
    .expect("admitted");
    assert_eq!(plan.admission.requested, 8);
    assert_eq!(plan.admission.reclaimable_unused, 20);
    assert_eq!(
        (plan.returns[0].extents, plan.returns[0].pool_extents),
        (3, 6)
    );
    assert_eq!(
        plan_allocation(
            PoolSnapshot {
                unallocated: 3,
                volumes: &volumes
            },
            &AllocationRequest::default(),
            &ReclaimRules::default()
        ),
        Err(AllocationError::EmptyRequest {
            extents: 0,
            copies: 0
        })
    );
}
