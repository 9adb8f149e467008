//! StoragePool: the counters of seed 000 pool management information 114 (316–324, [0021],
//! [0026]) aggregated from the areas and the volumes, and the conditions Ready,
//! CapacityExhausted and Reclaiming (docs/api.md §5).
//!
//! - `totalBytes`: capacity of the Online areas; `unallocatedBytes`: their free space (what a
//!   claim can get without reclaim); `allocatedBytes`, `inUseBytes`, `highPriorityBytes`: sums
//!   over the volumes, each replica counted; `unusedBytes` = allocated − inUse and
//!   `lowPriorityBytes` = inUse − highPriority (seed 000 §3.2). While every area holding extents
//!   is Online, total = allocated + unallocated.
//! - `CapacityExhausted`: the pool's most recently decided claim was rejected because
//!   U + F + L did not cover it ([0045]–[0046]).
//! - `Reclaiming`: some claim of the pool is in area return processing (606).
//! - Deletion is refused while an area or a volume names the pool.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tessera_api::v1alpha1::{ClaimPhase, StorageArea, StorageClaim, StoragePool, VirtualVolume};

use super::support::{POOL_FINALIZER, patch_status, reference, set_condition};
use super::view::PoolView;
use super::{Config, Context, Error, Informers, Result};
use crate::planners::allocation::Rejection;

/// Controller name in metrics.
pub const NAME: &str = "pool";

/// The states of `tessera_pool_bytes`.
pub const STATES: [&str; 7] = [
    "total",
    "allocated",
    "unallocated",
    "inUse",
    "highPriority",
    "unused",
    "lowPriority",
];

/// The phases of `tessera_pool_claims`.
pub const PHASES: [&str; 4] = ["Pending", "Reclaiming", "Bound", "Rejected"];

pub fn controller(informers: &Informers, config: &Config) -> Controller<StoragePool> {
    Controller::for_stream(informers.pools.subscribe(), informers.pools.store())
        .with_config(controller::Config::default().debounce(config.aggregate_debounce))
        .watches_stream(informers.areas.subscribe(), |area: StorageArea| {
            Some(ObjectRef::new(&area.spec.pool_name))
        })
        .watches_stream(informers.volumes.subscribe(), |volume: VirtualVolume| {
            Some(ObjectRef::new(&volume.spec.pool_name))
        })
        .watches_stream(informers.claims.subscribe(), |claim: StorageClaim| {
            Some(ObjectRef::new(&claim.spec.pool_name))
        })
}

pub async fn reconcile(pool: Arc<StoragePool>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(NAME);
    ctx.stores.ready().await?;
    let api: Api<StoragePool> = Api::all(ctx.client.clone());
    finalizer(&api, POOL_FINALIZER, pool, |event| async {
        match event {
            Finalizer::Apply(pool) => apply(pool, &ctx).await,
            Finalizer::Cleanup(pool) => cleanup(&pool, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

pub fn error_policy(_pool: Arc<StoragePool>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy_for(NAME, error, &ctx)
}

fn phase_name(phase: Option<ClaimPhase>) -> &'static str {
    match phase.unwrap_or_default() {
        ClaimPhase::Pending => "Pending",
        ClaimPhase::Reclaiming => "Reclaiming",
        ClaimPhase::Bound => "Bound",
        ClaimPhase::Rejected => "Rejected",
    }
}

/// When a claim was last decided (Bound or Rejected): the Admitted condition's transition.
fn decided_at(claim: &StorageClaim) -> Option<(i64, bool)> {
    let status = claim.status.as_ref()?;
    let rejected_for_capacity = status.phase == Some(ClaimPhase::Rejected)
        && status.reason.as_deref() == Some(Rejection::REASON);
    if !matches!(status.phase, Some(ClaimPhase::Bound | ClaimPhase::Rejected)) {
        return None;
    }
    let at = status
        .conditions
        .iter()
        .filter(|c| c.type_ == "Admitted" || c.type_ == "Bound")
        .map(|c: &Condition| c.last_transition_time.0.as_second())
        .max()?;
    Some((at, rejected_for_capacity))
}

async fn apply(pool: Arc<StoragePool>, ctx: &Context) -> Result<Action> {
    let name = pool.name_any();
    let generation = pool.metadata.generation;
    let view = PoolView::build(
        Arc::clone(&pool),
        &ctx.stores.areas.state(),
        &ctx.stores.volumes.state(),
        std::iter::empty(),
    )?;
    let totals = view.totals();
    let es = view.extent_size.get() as i64;
    let c = totals.counters;
    let bytes = |extents: u64| extents as i64 * es;
    let values = [
        bytes(totals.online_capacity),
        bytes(c.allocated()),
        bytes(c.unallocated()),
        bytes(c.in_use()),
        bytes(c.high_priority()),
        bytes(c.unused()),
        bytes(c.low_priority()),
    ];

    let claims: Vec<Arc<StorageClaim>> = ctx
        .stores
        .claims
        .state()
        .into_iter()
        .filter(|c| c.spec.pool_name == name)
        .collect();
    for phase in PHASES {
        let count = claims
            .iter()
            .filter(|c| phase_name(c.status.as_ref().and_then(|s| s.phase)) == phase)
            .count();
        ctx.metrics.set_pool_claims(&name, phase, count as i64);
    }
    for (state, value) in STATES.iter().zip(values) {
        ctx.metrics.set_pool_bytes(&name, state, value);
    }

    let status = pool.status.clone().unwrap_or_default();
    let mut conditions = status.conditions.clone();
    let ready = totals.online_areas > 0;
    set_condition(
        &mut conditions,
        "Ready",
        ready,
        if ready { "AreasOnline" } else { "NoOnlineArea" },
        if totals.allocated_elsewhere > 0 {
            format!(
                "{} of {} areas Online; {} allocated bytes lie on areas that are not Online",
                totals.online_areas,
                totals.areas,
                bytes(totals.allocated_elsewhere)
            )
        } else {
            format!("{} of {} areas Online", totals.online_areas, totals.areas)
        },
        generation,
    );
    let latest = claims
        .iter()
        .filter_map(|c| decided_at(c).map(|(at, rejected)| (at, rejected, c.name_any())))
        .max_by_key(|(at, rejected, _)| (*at, *rejected));
    let exhausted = latest.as_ref().is_some_and(|(_, rejected, _)| *rejected);
    set_condition(
        &mut conditions,
        "CapacityExhausted",
        exhausted,
        if exhausted {
            "ClaimRejected"
        } else {
            "ClaimsSatisfied"
        },
        match &latest {
            Some((_, true, claim)) => format!(
                "claim {claim} was rejected: unallocated, unused and low-priority space did not \
                 cover it (seed 000 [0045])"
            ),
            _ => "the last claim decided was satisfied".to_owned(),
        },
        generation,
    );
    let reclaiming: Vec<String> = claims
        .iter()
        .filter(|c| c.status.as_ref().and_then(|s| s.phase) == Some(ClaimPhase::Reclaiming))
        .map(|c| format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()))
        .collect();
    set_condition(
        &mut conditions,
        "Reclaiming",
        !reclaiming.is_empty(),
        if reclaiming.is_empty() {
            "Idle"
        } else {
            "AreaReturnInProgress"
        },
        if reclaiming.is_empty() {
            "no claim is reclaiming space".to_owned()
        } else {
            format!("reclaiming space for {}", reclaiming.join(", "))
        },
        generation,
    );

    let desired = json!({
        "totalBytes": values[0],
        "allocatedBytes": values[1],
        "unallocatedBytes": values[2],
        "inUseBytes": values[3],
        "highPriorityBytes": values[4],
        "unusedBytes": values[5],
        "lowPriorityBytes": values[6],
        "areas": totals.areas,
        "onlineAreas": totals.online_areas,
        "volumes": totals.volumes,
        "observedGeneration": generation,
        "conditions": conditions,
    });
    let current = json!({
        "totalBytes": status.total_bytes,
        "allocatedBytes": status.allocated_bytes,
        "unallocatedBytes": status.unallocated_bytes,
        "inUseBytes": status.in_use_bytes,
        "highPriorityBytes": status.high_priority_bytes,
        "unusedBytes": status.unused_bytes,
        "lowPriorityBytes": status.low_priority_bytes,
        "areas": status.areas,
        "onlineAreas": status.online_areas,
        "volumes": status.volumes,
        "observedGeneration": status.observed_generation,
        "conditions": status.conditions,
    });
    if desired != current {
        patch_status(
            &Api::<StoragePool>::all(ctx.client.clone()),
            &name,
            desired,
            None,
        )
        .await?;
    }
    Ok(Action::requeue(ctx.config.resync))
}

async fn cleanup(pool: &StoragePool, ctx: &Context) -> Result<Action> {
    let name = pool.name_any();
    let areas: Vec<String> = ctx
        .stores
        .areas
        .state()
        .iter()
        .filter(|a| a.spec.pool_name == name)
        .map(|a| a.name_any())
        .collect();
    let volumes = ctx
        .stores
        .volumes
        .state()
        .iter()
        .filter(|v| v.spec.pool_name == name)
        .count();
    if areas.is_empty() && volumes == 0 {
        ctx.metrics.forget_pool(&name, &STATES, &PHASES);
        return Ok(Action::await_change());
    }
    let message = format!(
        "pool {name} still has {} areas ({}) and {volumes} volumes",
        areas.len(),
        areas.join(", ")
    );
    ctx.publish(
        &reference(pool),
        EventType::Warning,
        "PoolInUse",
        "Delete",
        message.clone(),
        None,
    )
    .await;
    Err(Error::Blocked(message))
}
