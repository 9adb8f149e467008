//! StorageClaim: Pending → (Reclaiming) → Bound with a VirtualVolume, or Rejected with the
//! reason and a Warning event (seed 000 Fig. 6 area allocation processing 502 and Fig. 7 area
//! return processing 606; seed 002 Fig. 7 placement).
//!
//! One reconcile of an unbound claim:
//!
//! 1. **Adopt** the claim's volume `vol-<claim uid>` if it exists: a previous attempt created it
//!    and stopped before binding (crash safety, docs/operator.md).
//! 2. **Wait** for this claim's area return in flight (a `releaseRanges` VolumeRemap), or time
//!    it out after `returnTimeoutSeconds` (D-18); make sure the caches show every release that
//!    already happened (the re-check of 708, [0058], must see the freed extents).
//! 3. Under the [`Allocator`](super::Allocator) lock, **plan** with
//!    [`replan_excluding`]: admission 600 ([0045]); then either
//!    - **reject** (602, [0046]): nothing was changed;
//!    - **allocate directly** (604 → 608–614, [0047]–[0052]): placement (seed 002 S701–S712),
//!      reserve, create the volume with its planned mapping, commit the mapping, bind;
//!    - **reclaim** (606): record the intent (`Reclaiming`), then issue the *first* return of the
//!      plan as a VolumeRemap on that victim. When it completes, the next reconcile plans again
//!      from the fresh state — that re-plan is the re-check of 708 — so victims shrink one at a
//!      time in exactly the order of Fig. 7.
//!
//! A Bound claim whose `sizeBytes` grew is **grown** ([`grow`]): the delta is admitted and
//! placed like an allocation (no reclaim), its runs are appended past the old end of the
//! volume's mapping at the next generation, then the volume's `spec.sizeBytes` is raised
//! (docs/decisions.md D-33).
//!
//! Attached victims give their ranges back through a quiesced remap (the coordinator,
//! `controllers/coordinator.rs`); only an operator without a node-control token skips them, with
//! a `VictimSkipped` Warning event. One reclaim runs per pool at a time (the patent's idle
//! loop handles one allocation command at a time, Fig. 5); while it runs, other claims of the
//! pool only allocate directly from space the reclaiming claim does not need.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tessera_api::model::{ByteRange, Edit, ExtentMap, Generation};
use tessera_api::v1alpha1::{
    AreaPhase, ClaimPhase, CopyPolicy, ObjectRef as ClaimRef, ReclaimTier, ReleaseRanges,
    RemapOperation, RemapOperationType, RemapPhase, RemapPolicy, StorageArea, StorageClaim,
    StoragePool, StoragePriorityClass, VirtualVolume, VirtualVolumeSpec, VolumeLayout,
    VolumeMapping, VolumeRange, VolumeRemap, VolumeRemapSpec,
};

use super::support::{
    CLAIM_FINALIZER, CLAIM_NAME_LABEL, CLAIM_NAMESPACE_LABEL, CLAIM_UID_LABEL,
    PLANNED_MAPPING_ANNOTATION, POOL_LABEL, RECLAIM_STEP_LABEL, VOLUME_FINALIZER, field_manager,
    human_bytes, patch_status, reclaim_remap_name, reference, set_condition, unix_seconds,
    volume_name_for,
};
use super::usage::{UsageReport, allocated_extent_ranges, area_pieces, extent_states};
use super::view::{PoolView, extent_size};
use super::{Config, Context, CrashPoint, Error, Informers, Result, volume};
use crate::planners::allocation::{
    AllocationError, AllocationPlan, AllocationRequest, AreaReturn, PoolSnapshot, ReclaimRules,
    Rejection, TierSet, is_return_overdue, replan_excluding, select_return_ranges,
};
use crate::planners::placement::{
    Placement, PlacementError, PlacementRequest, PlacementRules, plan_placement,
};
use crate::planners::total_len;

/// Controller name in metrics.
pub const NAME: &str = "claim";

/// Claims that wait for something outside themselves (a pool, a class, an area, another
/// claim's reclaim) and should be retried when it changes.
fn is_waiting(claim: &StorageClaim) -> bool {
    claim.status.as_ref().and_then(|s| s.phase) == Some(ClaimPhase::Pending)
}

fn waiting_claims_of_pool(
    claims: &[Arc<StorageClaim>],
    pool: &str,
) -> Vec<ObjectRef<StorageClaim>> {
    claims
        .iter()
        .filter(|c| c.spec.pool_name == pool && is_waiting(c))
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

pub fn controller(informers: &Informers, config: &Config) -> Controller<StorageClaim> {
    let store = informers.claims.store();
    let (by_pool, by_area, by_class, by_volume) =
        (store.clone(), store.clone(), store.clone(), store);
    Controller::for_stream(informers.claims.subscribe(), informers.claims.store())
        .with_config(controller::Config::default().concurrency(config.claim_concurrency))
        .watches_stream(
            informers.volumes.subscribe(),
            move |volume: VirtualVolume| {
                let mut refs: Vec<ObjectRef<StorageClaim>> = volume
                    .spec
                    .claim_ref
                    .iter()
                    .map(|c| ObjectRef::new(&c.name).within(&c.namespace))
                    .collect();
                // A volume going away frees space that waiting claims may use.
                if volume.metadata.deletion_timestamp.is_some() {
                    refs.extend(waiting_claims_of_pool(
                        &by_volume.state(),
                        &volume.spec.pool_name,
                    ));
                }
                refs
            },
        )
        .watches_stream(informers.remaps.subscribe(), |remap: VolumeRemap| {
            let labels = remap.labels();
            match (
                labels.get(CLAIM_NAME_LABEL),
                labels.get(CLAIM_NAMESPACE_LABEL),
            ) {
                (Some(name), Some(ns)) => Some(ObjectRef::new(name).within(ns)),
                _ => None,
            }
        })
        .watches_stream(informers.pools.subscribe(), move |pool: StoragePool| {
            waiting_claims_of_pool(&by_pool.state(), &pool.name_any())
        })
        .watches_stream(informers.areas.subscribe(), move |area: StorageArea| {
            waiting_claims_of_pool(&by_area.state(), &area.spec.pool_name)
        })
        .watches_stream(
            informers.classes.subscribe(),
            move |class: StoragePriorityClass| {
                let name = class.name_any();
                by_class
                    .state()
                    .iter()
                    .filter(|c| c.spec.priority_class_name == name && is_waiting(c))
                    .map(|c| ObjectRef::from_obj(c.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
}

pub async fn reconcile(claim: Arc<StorageClaim>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(NAME);
    ctx.stores.ready().await?;
    let ns = claim
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<StorageClaim> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, CLAIM_FINALIZER, claim, |event| async {
        match event {
            Finalizer::Apply(claim) => apply(&claim, &ctx).await,
            Finalizer::Cleanup(claim) => cleanup(&claim, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

pub fn error_policy(_claim: Arc<StorageClaim>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy_for(NAME, error, &ctx)
}

fn claim_api(ctx: &Context, claim: &StorageClaim) -> Api<StorageClaim> {
    Api::namespaced(
        ctx.client.clone(),
        claim.namespace().as_deref().unwrap_or("default"),
    )
}

/// The claim's key in the allocator's reclaim book: `namespace/name`.
fn claim_key(claim: &StorageClaim) -> String {
    format!(
        "{}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    )
}

async fn apply(claim: &StorageClaim, ctx: &Context) -> Result<Action> {
    let status = claim.status.clone().unwrap_or_default();
    match status.phase {
        Some(ClaimPhase::Bound) => {
            if status.observed_generation != claim.metadata.generation || growth_pending(claim, ctx)
            {
                return grow(claim, ctx).await;
            }
            Ok(Action::requeue(ctx.config.resync))
        }
        // Rejected is final for this generation of the spec (a grown size is tried again).
        Some(ClaimPhase::Rejected) if status.observed_generation == claim.metadata.generation => {
            Ok(Action::await_change())
        }
        _ => allocate(claim, ctx).await,
    }
}

/// Condition of a Bound claim that says whether its last growth is done.
pub const EXPANDED_CONDITION: &str = "Expanded";

/// Bytes a wire mapping covers: the end of its last run.
fn mapped_bytes(mapping: &VolumeMapping) -> i64 {
    mapping
        .extents
        .iter()
        .map(|r| r.offset + r.length)
        .max()
        .unwrap_or(0)
}

/// Whether the claim's volume (as cached) is smaller than the claim: a growth was not finished
/// (rejected for capacity, or interrupted between its two writes).
fn growth_pending(claim: &StorageClaim, ctx: &Context) -> bool {
    let Some(name) = claim.status.as_ref().and_then(|s| s.volume_name.as_deref()) else {
        return false;
    };
    ctx.stores
        .volumes
        .get(&ObjectRef::new(name))
        .is_some_and(|v| {
            let mapped = v
                .status
                .as_ref()
                .and_then(|s| s.mapping.as_ref())
                .map_or(0, mapped_bytes);
            mapped < claim.spec.size_bytes || v.spec.size_bytes < claim.spec.size_bytes
        })
}

/// A Bound claim's `sizeBytes` grew (D-5: it may grow, never shrink). Two writes, in this
/// order, each harmless on its own:
///
/// 1. the volume's `status.mapping` gets runs for the new bytes appended past its old end, at
///    the next generation (one write, conditional on the volume's resourceVersion), planned like
///    an allocation of the delta only (admission 600 and placement) under the allocator lock;
/// 2. the volume's `spec.sizeBytes` is raised to the claim's size.
///
/// A crash between them leaves a mapping that covers more than `spec.sizeBytes`; the next
/// reconcile sees the mapping covers the claim and only does step 2. Nodes never see a size
/// their mapping does not cover. Growth never reclaims other volumes' space: if the unallocated
/// space does not admit the delta, the claim stays Bound at its old size with
/// `Expanded=False` and a Warning, and is tried again at every resync (docs/decisions.md).
async fn grow(claim: &StorageClaim, ctx: &Context) -> Result<Action> {
    let status = claim.status.clone().unwrap_or_default();
    let Some(volume_name) = status.volume_name.clone() else {
        return Ok(Action::requeue(ctx.config.resync));
    };
    let Some(mut volume) = ctx.stores.volumes.get(&ObjectRef::new(&volume_name)) else {
        return Ok(Action::requeue(ctx.config.wait_retry));
    };
    let Some(mapping) = volume.status.as_ref().and_then(|s| s.mapping.clone()) else {
        return Ok(Action::requeue(ctx.config.wait_retry));
    };
    let target = claim.spec.size_bytes;
    let was_smaller = mapped_bytes(&mapping) < target || volume.spec.size_bytes < target;
    if mapped_bytes(&mapping) < target {
        match grow_mapping(claim, ctx, &volume, &mapping).await? {
            Growth::Mapped(grown) => volume = grown,
            Growth::Later(action) => return Ok(action),
        }
    }
    let api: Api<VirtualVolume> = Api::all(ctx.client.clone());
    if volume.spec.size_bytes < target {
        volume = Arc::new(
            api.patch(
                &volume_name,
                &field_manager(),
                &Patch::Merge(json!({ "spec": { "sizeBytes": target } })),
            )
            .await?,
        );
    }
    let mapping = volume
        .status
        .as_ref()
        .and_then(|s| s.mapping.clone())
        .ok_or(Error::MissingField("status.mapping"))?;
    let es = mapping.extent_size_bytes.max(1) as u64;
    let allocated = total_len(&allocated_extent_ranges(&mapping)) * es;
    let message = format!(
        "volume {volume_name} is {} ({target} bytes) at mapping generation {}",
        human_bytes(target as u64),
        mapping.generation
    );
    write_phase(
        claim,
        ctx,
        ClaimPhase::Bound,
        &[(EXPANDED_CONDITION, true, "Expanded", message.clone())],
        Some(json!({ "allocatedBytes": allocated as i64 })),
    )
    .await?;
    if was_smaller {
        ctx.publish(
            &reference(claim),
            EventType::Normal,
            "Expanded",
            "Expand",
            message,
            Some(reference(volume.as_ref())),
        )
        .await;
    }
    Ok(Action::requeue(ctx.config.resync))
}

enum Growth {
    /// The mapping covers the claim now (the volume as written).
    Mapped(Arc<VirtualVolume>),
    /// Not now (a remap in flight, capacity short): the reconcile's answer.
    Later(Action),
}

/// Step 1 of [`grow`]: plan the new extents and append them to the mapping.
async fn grow_mapping(
    claim: &StorageClaim,
    ctx: &Context,
    volume: &VirtualVolume,
    mapping: &VolumeMapping,
) -> Result<Growth> {
    let name = volume.name_any();
    // A remap of this volume in flight commits the next generation itself; growing now would
    // race it. Its completion triggers this claim again (the volume changes).
    let remap_in_flight = ctx
        .stores
        .remaps
        .state()
        .iter()
        .any(|r| r.spec.volume_name == name && !is_final(r));
    if remap_in_flight {
        return Ok(Growth::Later(Action::requeue(ctx.config.wait_retry)));
    }
    let pool_name = claim.spec.pool_name.as_str();
    let Some(pool) = ctx.stores.pools.get(&ObjectRef::new(pool_name)) else {
        return Ok(Growth::Later(Action::requeue(ctx.config.resync)));
    };
    let as_mapping_error = |source| Error::Mapping {
        volume: name.clone(),
        source,
    };
    let old_bytes = mapped_bytes(mapping);
    let old = mapping.to_model(old_bytes).map_err(as_mapping_error)?;
    let es = old.extent_size();
    let new_bytes = claim.spec.size_bytes.max(0) as u64;
    // Whole extents the old end already holds (a partial last extent is reserved whole).
    let base = es.extents_for(old_bytes as u64);
    let delta = es.extents_for(new_bytes).saturating_sub(base);
    let copies = u8::try_from(volume.spec.copies.clamp(1, 3)).unwrap_or(1);
    // `grow` extends a partial last extent and appends a hole; the new runs fill the hole.
    let grown = old.grow(new_bytes)?;

    let mut book = ctx.allocator.lock().await;
    let mut edits = Vec::new();
    if delta > 0 {
        let stores = &ctx.stores;
        book.forget_cached(|v| stores.volumes.get(&ObjectRef::new(v)).is_some());
        let view = PoolView::build(
            Arc::clone(&pool),
            &stores.areas.state(),
            &stores.volumes.state(),
            book.reservations(pool_name),
        )?;
        let earmark = earmarked(ctx, &view, &book.reclaims(pool_name), &claim_key(claim));
        // Admission 600 ([0045]) for the delta only, without reclaim.
        let admission = replan_excluding(
            PoolSnapshot {
                unallocated: view.unallocated().saturating_sub(earmark),
                volumes: &[],
            },
            &AllocationRequest {
                extents: delta,
                copies,
                priority_value: 0,
                own_volumes: vec![name.clone()],
            },
            &ReclaimRules {
                tiers: TierSet::NONE,
                ..ReclaimRules::from(&pool.spec.reclaim)
            },
            &BTreeSet::new(),
        );
        if let Err(e) = admission {
            drop(book);
            let reason = match &e {
                AllocationError::InsufficientCapacity(_) => Rejection::REASON,
                AllocationError::EmptyRequest { .. } => "InvalidRequest",
            };
            return reject_growth(claim, ctx, reason, e.to_string()).await;
        }
        let rules = PlacementRules::from(&pool.spec.placement);
        let placement = match place_growth(&view, claim, &old, delta, copies, &rules) {
            Ok(p) => p,
            Err(e) => {
                drop(book);
                return reject_growth(claim, ctx, e.reason(), e.to_string()).await;
            }
        };
        let offset = base * es.get();
        for run in placement.to_runs(new_bytes - offset, es)? {
            edits.push(Edit::Assign {
                range: ByteRange::new(offset + run.offset, run.length)?,
                replicas: run.replicas,
            });
        }
    }
    let generation = old.generation().next();
    let map = grown.edit(edits)?.with_generation(generation);
    let wire = VolumeMapping::from_model(&map).map_err(as_mapping_error)?;
    let api: Api<VirtualVolume> = Api::all(ctx.client.clone());
    let written = patch_status(
        &api,
        &name,
        json!({ "mapping": wire }),
        volume.resource_version().as_deref(),
    )
    .await?;
    // The reservations only cover volumes the cache does not show; this one it shows with the
    // old mapping. Holding the lock until the cache has the new one keeps the next placement
    // from handing out the same extents.
    wait_for_cached_generation(ctx, &name, wire.generation).await;
    drop(book);
    ctx.crash_point(CrashPoint::VolumeGrown)?;
    Ok(Growth::Mapped(Arc::new(written)))
}

/// Placement of `extents` new extents for a growing volume. `Single` keeps every replica in the
/// area it already uses (D-24); `Concatenated` places the delta like a new volume.
fn place_growth(
    view: &PoolView,
    claim: &StorageClaim,
    old: &ExtentMap,
    extents: u64,
    copies: u8,
    rules: &PlacementRules,
) -> std::result::Result<Placement, PlacementError> {
    let candidates = view.area_candidates();
    let request = PlacementRequest {
        extents,
        copies,
        layout: claim.spec.layout,
        media_type: claim.spec.media_type.clone(),
        preferred_node: claim.spec.preferred_node.clone(),
    };
    let held = old.runs().iter().find(|r| !r.is_hole());
    match (claim.spec.layout, held) {
        (VolumeLayout::Single, Some(run)) => {
            let mut replicas = Vec::with_capacity(run.replicas.len());
            for replica in &run.replicas {
                let own: Vec<_> = candidates
                    .iter()
                    .filter(|c| c.area == replica.area)
                    .cloned()
                    .collect();
                let one = plan_placement(
                    &own,
                    &PlacementRequest {
                        copies: 1,
                        preferred_node: None,
                        ..request.clone()
                    },
                    rules,
                )?;
                replicas.extend(one.replicas);
            }
            Ok(Placement { extents, replicas })
        }
        _ => plan_placement(&candidates, &request, rules),
    }
}

/// Polls the volume cache until it shows `generation` (5 s at most; a slower cache only
/// weakens the guard, it does not corrupt anything already written).
async fn wait_for_cached_generation(ctx: &Context, volume: &str, generation: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let cached = ctx
            .stores
            .volumes
            .get(&ObjectRef::new(volume))
            .and_then(|v| {
                v.status
                    .as_ref()
                    .and_then(|s| s.mapping.as_ref())
                    .map(|m| m.generation)
            });
        if cached.is_some_and(|g| g >= generation) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                volume,
                generation,
                "the cache did not show the grown mapping in 5 s"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The growth cannot be placed now: the claim stays Bound at its old size, `Expanded=False`
/// says why (once per distinct reason), and the claim is tried again at the next resync.
async fn reject_growth(
    claim: &StorageClaim,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Growth> {
    let status = claim.status.clone().unwrap_or_default();
    let already = status.conditions.iter().any(|c| {
        c.type_ == EXPANDED_CONDITION
            && c.status == "False"
            && c.reason == reason
            && c.message == message
            && c.observed_generation == claim.metadata.generation
    });
    if !already {
        write_phase(
            claim,
            ctx,
            ClaimPhase::Bound,
            &[(EXPANDED_CONDITION, false, reason, message.clone())],
            None,
        )
        .await?;
        ctx.publish(
            &reference(claim),
            EventType::Warning,
            "ExpansionRejected",
            "Expand",
            format!(
                "growing to {} bytes: {reason}: {message}",
                claim.spec.size_bytes
            ),
            None,
        )
        .await;
    }
    Ok(Growth::Later(Action::requeue(ctx.config.resync)))
}

/// Everything `allocate` needs about the claim, resolved once.
struct Request {
    pool: Arc<StoragePool>,
    class_value: i32,
    volume_name: String,
    /// Virtual extents (size rounded up to whole extents).
    extents: u64,
    copies: u8,
}

async fn allocate(claim: &StorageClaim, ctx: &Context) -> Result<Action> {
    let stores = &ctx.stores;
    let pool_name = claim.spec.pool_name.as_str();
    let Some(pool) = stores.pools.get(&ObjectRef::new(pool_name)) else {
        let msg = format!("StoragePool {pool_name} does not exist");
        return wait(claim, ctx, "PoolNotFound", msg, ctx.config.resync).await;
    };
    if pool.metadata.deletion_timestamp.is_some() {
        let msg = format!("StoragePool {pool_name} is being deleted");
        return wait(claim, ctx, "PoolDeleting", msg, ctx.config.resync).await;
    }
    let class_name = claim.spec.priority_class_name.as_str();
    let Some(class) = stores.classes.get(&ObjectRef::new(class_name)) else {
        let msg = format!("StoragePriorityClass {class_name} does not exist");
        return wait(claim, ctx, "PriorityClassNotFound", msg, ctx.config.resync).await;
    };
    let areas = stores.areas.state();
    let online = areas.iter().any(|a| {
        a.spec.pool_name == pool_name
            && a.status.as_ref().and_then(|s| s.phase) == Some(AreaPhase::Online)
    });
    if !online {
        // Not a capacity verdict: the pool cannot be judged before its areas report.
        let msg = format!("StoragePool {pool_name} has no Online area yet");
        return wait(claim, ctx, "NoOnlineArea", msg, ctx.config.resync).await;
    }
    let es = extent_size(&pool)?;
    let request = Request {
        class_value: class.spec.value,
        volume_name: volume_name_for(claim)?,
        extents: es.extents_for(claim.spec.size_bytes.max(0) as u64),
        copies: u8::try_from(claim.spec.copies.clamp(1, 3)).unwrap_or(1),
        pool,
    };

    // 1. Adopt the volume an earlier attempt created.
    if let Some(volume) = stores.volumes.get(&ObjectRef::new(&request.volume_name)) {
        return bind(claim, volume, ctx).await;
    }

    // 2. This claim's area returns: wait for one in flight, time it out, or let the caches
    // catch up with a finished one.
    let uid = claim.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let returns = own_returns(ctx, &uid);
    let timeout = request.pool.spec.reclaim.return_timeout_seconds;
    let now = super::support::now().as_second();
    // Returns are issued one at a time, so at most one is in flight.
    if let Some(remap) = returns.iter().find(|r| !is_final(r)) {
        let requested = remap
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(now, unix_seconds);
        let pending = remap
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_none_or(|p| p == RemapPhase::Pending);
        if pending && is_return_overdue(requested, now, timeout) {
            time_out(claim, remap, ctx).await?;
            return Ok(Action::requeue(ctx.config.wait_retry));
        }
        let left = (requested + i64::from(timeout) - now).max(1) as u64;
        return Ok(Action::requeue(Duration::from_secs(left)));
    }
    for remap in returns
        .iter()
        .filter(|r| phase_of(r) == Some(RemapPhase::Succeeded))
    {
        let target = remap.status.as_ref().and_then(|s| s.target_generation);
        let cached = stores
            .volumes
            .get(&ObjectRef::new(&remap.spec.volume_name))
            .and_then(|v| {
                v.status
                    .as_ref()
                    .and_then(|s| s.mapping.as_ref())
                    .map(|m| m.generation)
            });
        if let (Some(target), Some(cached)) = (target, cached)
            && cached < target
        {
            return Ok(Action::requeue(Duration::from_millis(20)));
        }
    }
    let failed: BTreeSet<String> = returns
        .iter()
        .filter(|r| {
            matches!(
                phase_of(r),
                Some(RemapPhase::Failed | RemapPhase::FailedRecovery)
            )
        })
        .map(|r| r.spec.volume_name.clone())
        .collect();

    // 3. Plan under the allocation lock.
    let key = claim_key(claim);
    let mut book = ctx.allocator.lock().await;
    book.forget_cached(|v| stores.volumes.get(&ObjectRef::new(v)).is_some());
    let view = PoolView::build(
        Arc::clone(&request.pool),
        &areas,
        &stores.volumes.state(),
        book.reservations(pool_name),
    )?;
    let earmark = earmarked(ctx, &view, &book.reclaims(pool_name), &key);
    let candidates = view.victim_candidates(&stores.classes);
    // Attached victims give their ranges back through the remap coordinator's quiesced
    // release (controllers/coordinator.rs); only an operator that cannot reach the nodes (no
    // node-control token) has to skip them.
    let quiesce_unavailable = ctx.node_control.available().err();
    let attached: BTreeSet<String> = view
        .volumes
        .iter()
        .filter(|v| quiesce_unavailable.is_some() && v.attached())
        .map(|v| v.name.clone())
        .collect();
    // Volumes only this process knows about cannot be asked for anything yet.
    let unseen = view
        .volumes
        .iter()
        .filter(|v| v.volume.is_none())
        .map(|v| v.name.clone());
    let mut skipped: BTreeSet<String> = failed.iter().cloned().chain(unseen).collect();
    let planned_without_attached_skip = replan_excluding(
        PoolSnapshot {
            unallocated: view.unallocated().saturating_sub(earmark),
            volumes: &candidates,
        },
        &allocation_request(&request),
        &ReclaimRules::from(&request.pool.spec.reclaim),
        &skipped,
    );
    skipped.extend(attached.iter().cloned());
    let plan = replan_excluding(
        PoolSnapshot {
            unallocated: view.unallocated().saturating_sub(earmark),
            volumes: &candidates,
        },
        &allocation_request(&request),
        &ReclaimRules::from(&request.pool.spec.reclaim),
        &skipped,
    );
    // Attached volumes the unrestricted plan would have asked for space.
    let skipped_attached: Vec<String> = match &planned_without_attached_skip {
        Ok(p) => p
            .returns
            .iter()
            .filter(|r| attached.contains(&r.volume))
            .map(|r| r.volume.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        Err(_) => Vec::new(),
    };

    tracing::debug!(claim = %key, earmark, ?plan, "planned");
    match plan {
        Err(AllocationError::InsufficientCapacity(rejection)) => {
            book.forget_reclaim(&key);
            drop(book);
            if earmark > 0 {
                let msg = "another claim of the pool is reclaiming space; waiting for it".into();
                return wait(claim, ctx, "WaitingForReclaim", msg, ctx.config.wait_retry).await;
            }
            warn_skipped(claim, ctx, &view, &skipped_attached).await;
            let message = rejection_message(&rejection, &view, &attached);
            reject(claim, ctx, Rejection::REASON, message).await
        }
        Err(e @ AllocationError::EmptyRequest { .. }) => {
            book.forget_reclaim(&key);
            drop(book);
            reject(claim, ctx, "InvalidRequest", e.to_string()).await
        }
        Ok(plan) if plan.is_direct() => {
            let placement = plan_placement(
                &view.area_candidates(),
                &PlacementRequest {
                    extents: request.extents,
                    copies: request.copies,
                    layout: claim.spec.layout,
                    media_type: claim.spec.media_type.clone(),
                    preferred_node: claim.spec.preferred_node.clone(),
                },
                &PlacementRules::from(&request.pool.spec.placement),
            );
            let placement = match placement {
                Ok(p) => p,
                Err(e) => {
                    book.forget_reclaim(&key);
                    drop(book);
                    if earmark > 0 {
                        let msg = format!("waiting for another claim's reclaim: {e}");
                        return wait(claim, ctx, "WaitingForReclaim", msg, ctx.config.wait_retry)
                            .await;
                    }
                    return reject(claim, ctx, e.reason(), e.to_string()).await;
                }
            };
            let size = claim.spec.size_bytes.max(0) as u64;
            // Generation 1: the first mapping of the volume (0 is the all-hole map).
            let map = placement
                .to_extent_map(size, view.extent_size)?
                .with_generation(Generation::INITIAL.next());
            let mapping = VolumeMapping::from_model(&map).map_err(|source| Error::Mapping {
                volume: request.volume_name.clone(),
                source,
            })?;
            book.reserve(&request.volume_name, pool_name, mapping.clone());
            book.forget_reclaim(&key);
            drop(book);
            create_and_bind(claim, ctx, &request, mapping).await
        }
        Ok(plan) => {
            if earmark > 0 {
                drop(book);
                let msg = "another claim of the pool is reclaiming space; waiting for it".into();
                return wait(claim, ctx, "WaitingForReclaim", msg, ctx.config.wait_retry).await;
            }
            book.note_reclaim(&key, pool_name, request.extents * u64::from(request.copies));
            drop(book);
            request_return(
                claim,
                ctx,
                &request,
                &view,
                &plan,
                returns.len(),
                &skipped_attached,
            )
            .await
        }
    }
}

fn allocation_request(request: &Request) -> AllocationRequest {
    AllocationRequest {
        extents: request.extents,
        copies: request.copies,
        priority_value: request.class_value,
        own_volumes: Vec::new(),
    }
}

/// Pool extents other claims of the pool are reclaiming for (the cache's `Reclaiming` claims
/// and the ones this process decided a moment ago), which direct allocations must leave alone.
fn earmarked(ctx: &Context, view: &PoolView, in_process: &BTreeMap<String, u64>, me: &str) -> u64 {
    let pool = view.name();
    let mut need: BTreeMap<String, u64> = in_process.clone();
    for claim in ctx.stores.claims.state() {
        if claim.spec.pool_name != pool
            || claim.status.as_ref().and_then(|s| s.phase) != Some(ClaimPhase::Reclaiming)
        {
            continue;
        }
        let extents = view
            .extent_size
            .extents_for(claim.spec.size_bytes.max(0) as u64)
            * u64::try_from(claim.spec.copies.clamp(1, 3)).unwrap_or(1);
        need.entry(claim_key(&claim)).or_insert(extents);
    }
    need.remove(me);
    need.values().sum()
}

/// This claim's area returns (VolumeRemaps labelled with its UID), in step order.
fn own_returns(ctx: &Context, uid: &str) -> Vec<Arc<VolumeRemap>> {
    let mut remaps: Vec<(usize, Arc<VolumeRemap>)> = ctx
        .stores
        .remaps
        .state()
        .into_iter()
        .filter(|r| r.labels().get(CLAIM_UID_LABEL).map(String::as_str) == Some(uid))
        .map(|r| {
            let step = r
                .labels()
                .get(RECLAIM_STEP_LABEL)
                .and_then(|s| s.parse().ok())
                .unwrap_or(usize::MAX);
            (step, r)
        })
        .collect();
    remaps.sort_by_key(|(step, _)| *step);
    remaps.into_iter().map(|(_, r)| r).collect()
}

fn phase_of(remap: &VolumeRemap) -> Option<RemapPhase> {
    remap.status.as_ref().and_then(|s| s.phase)
}

/// Whether a remap ended.
pub fn is_final(remap: &VolumeRemap) -> bool {
    matches!(
        phase_of(remap),
        Some(RemapPhase::Succeeded | RemapPhase::Failed | RemapPhase::FailedRecovery)
    )
}

/// D-18: a victim that did not give its space back in `returnTimeoutSeconds` is skipped.
async fn time_out(claim: &StorageClaim, remap: &VolumeRemap, ctx: &Context) -> Result<()> {
    let api: Api<VolumeRemap> = Api::all(ctx.client.clone());
    let timeout = ctx
        .stores
        .pools
        .get(&ObjectRef::new(&claim.spec.pool_name))
        .map_or(0, |p| p.spec.reclaim.return_timeout_seconds);
    let message = format!(
        "TimedOut: volume {} did not give the space back within {timeout} s; it is skipped",
        remap.spec.volume_name
    );
    patch_status(
        &api,
        &remap.name_any(),
        json!({
            "phase": RemapPhase::Failed,
            "message": message,
            "completionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(super::support::now()),
        }),
        remap.resource_version().as_deref(),
    )
    .await?;
    ctx.publish(
        &reference(claim),
        EventType::Warning,
        "AreaReturnTimedOut",
        "Reclaim",
        message,
        volume_reference(ctx, &remap.spec.volume_name),
    )
    .await;
    Ok(())
}

fn volume_reference(
    ctx: &Context,
    name: &str,
) -> Option<k8s_openapi::api::core::v1::ObjectReference> {
    ctx.stores
        .volumes
        .get(&ObjectRef::new(name))
        .map(|v| reference(v.as_ref()))
}

/// Fig. 7 step 706 ([0057]): ask the first victim of the plan for its extents, as a
/// `releaseRanges` VolumeRemap (D-17). The claim's status records the intent first.
async fn request_return(
    claim: &StorageClaim,
    ctx: &Context,
    request: &Request,
    view: &PoolView,
    plan: &AllocationPlan,
    step: usize,
    skipped_attached: &[String],
) -> Result<Action> {
    let ret: &AreaReturn = &plan.returns[0];
    let es = view.extent_size;
    let Some(victim) = view.volume(&ret.volume).and_then(|v| v.volume.clone()) else {
        return Ok(Action::requeue(ctx.config.wait_retry));
    };
    let Some(mapping) = victim.status.as_ref().and_then(|s| s.mapping.clone()) else {
        return Ok(Action::requeue(ctx.config.wait_retry));
    };
    let report = UsageReport::of_volume(&victim).ok().flatten();
    let states = extent_states(&mapping, victim.spec.size_bytes, report.as_ref());
    // Field 460 of the return command: which virtual extents ([0057]).
    let named = select_return_ranges(&states, ret.tier, ret.extents);
    if named.is_empty() {
        // The counters the plan used are older than the report; the volume controller is
        // about to catch up.
        return Ok(Action::requeue(ctx.config.wait_retry));
    }
    let size = victim.spec.size_bytes.max(0) as u64;
    let ranges: Vec<VolumeRange> = named
        .iter()
        .filter_map(|r| r.to_byte_range(es).ok())
        .map(|r| {
            let end = r.end().min(size);
            VolumeRange {
                offset: r.offset() as i64,
                length: (end - r.offset()) as i64,
            }
        })
        .collect();
    let named_extents = total_len(&named);

    // Intent: the claim says Reclaiming before anything is asked of anyone.
    let status = claim.status.clone().unwrap_or_default();
    let a = &plan.admission;
    if status.phase != Some(ClaimPhase::Reclaiming) {
        let condition = a
            .condition()
            .map_or("none".to_owned(), |c| format!("{c:?}"));
        let message = format!(
            "admitted ({condition} of seed 000 [0045]): needs {} pool extents, {} unallocated; \
             reclaiming {} extents from other volumes",
            a.requested,
            a.unallocated,
            plan.reclaimed()
        );
        write_phase(
            claim,
            ctx,
            ClaimPhase::Reclaiming,
            &[("Admitted", true, "ReclaimNeeded", message.clone())],
            None,
        )
        .await?;
        ctx.publish(
            &reference(claim),
            EventType::Normal,
            "ReclaimStarted",
            "Reclaim",
            message,
            None,
        )
        .await;
        ctx.crash_point(CrashPoint::ClaimReclaimIntent)?;
    }

    let uid = claim.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let remap = VolumeRemap {
        metadata: ObjectMeta {
            name: Some(reclaim_remap_name(&uid, step)),
            labels: Some(
                [
                    (CLAIM_UID_LABEL.to_owned(), uid.clone()),
                    (CLAIM_NAME_LABEL.to_owned(), claim.name_any()),
                    (
                        CLAIM_NAMESPACE_LABEL.to_owned(),
                        claim.namespace().unwrap_or_default(),
                    ),
                    (POOL_LABEL.to_owned(), claim.spec.pool_name.clone()),
                    (RECLAIM_STEP_LABEL.to_owned(), step.to_string()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: VolumeRemapSpec {
            volume_name: ret.volume.clone(),
            operation: RemapOperation {
                type_: RemapOperationType::ReleaseRanges,
                r#move: None,
                evacuate_area: None,
                release_ranges: Some(ReleaseRanges {
                    ranges,
                    tier: ret.tier,
                    // Reclaim re-checks the tier under the hold (D-17).
                    discard: false,
                }),
            },
            copy: CopyPolicy::default(),
            policy: RemapPolicy::default(),
        },
        status: None,
    };
    let api: Api<VolumeRemap> = Api::all(ctx.client.clone());
    match api.create(&PostParams::default(), &remap).await {
        Ok(_) => {}
        // An earlier attempt created this step already.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            return Ok(Action::requeue(ctx.config.wait_retry));
        }
        Err(e) => return Err(e.into()),
    }
    ctx.crash_point(CrashPoint::RemapCreated)?;

    warn_skipped(claim, ctx, view, skipped_attached).await;
    let victim_ref = Some(reference(victim.as_ref()));
    let bytes = named_extents * es.get();
    ctx.publish(
        &reference(claim),
        EventType::Normal,
        "AreaReturnRequested",
        &format!("Return{:?}", ret.tier),
        format!(
            "step {}: asked volume {} to return {named_extents} extents ({}) of tier {:?} \
             (seed 000 Fig. 7: the volume with the most {} extents)",
            step + 1,
            ret.volume,
            human_bytes(bytes),
            ret.tier,
            match ret.tier {
                ReclaimTier::Unused => "unused",
                ReclaimTier::LowPriority => "low-priority",
            }
        ),
        victim_ref.clone(),
    )
    .await;
    if ret.discards_data() {
        ctx.publish(
            &reference(claim),
            EventType::Warning,
            "LowPriorityDataReclaimed",
            "Reclaim",
            format!(
                "{named_extents} extents ({}) of low-priority data of volume {} will be discarded \
                 (seed 000 [0056])",
                human_bytes(bytes),
                ret.volume
            ),
            victim_ref,
        )
        .await;
    }
    let timeout = request.pool.spec.reclaim.return_timeout_seconds.max(1) as u64;
    Ok(Action::requeue(Duration::from_secs(timeout)))
}

/// One `VictimSkipped` Warning per attached volume the plan would otherwise have used.
async fn warn_skipped(claim: &StorageClaim, ctx: &Context, view: &PoolView, skipped: &[String]) {
    for name in skipped {
        let Some(volume) = view.volume(name).and_then(|v| v.volume.clone()) else {
            continue;
        };
        let nodes = super::view::attached_nodes(&volume).join(", ");
        ctx.publish(
            &reference(claim),
            EventType::Warning,
            "VictimSkipped",
            "Reclaim",
            format!(
                "volume {name} would be asked for space but is attached to {nodes}; releasing \
                 ranges of an attached volume needs the cluster-wide quiesce of the remap \
                 protocol, and this operator has no node-control token, so it is skipped"
            ),
            Some(reference(volume.as_ref())),
        )
        .await;
    }
}

fn rejection_message(
    rejection: &Rejection,
    view: &PoolView,
    attached: &BTreeSet<String>,
) -> String {
    let mut message = rejection.to_string();
    let attached_with_space: Vec<&str> = view
        .volumes
        .iter()
        .filter(|v| attached.contains(&v.name))
        .filter(|v| {
            v.usage(view.extent_size).unused() > 0 || v.usage(view.extent_size).low_priority() > 0
        })
        .map(|v| v.name.as_str())
        .collect();
    if !attached_with_space.is_empty() {
        message.push_str(&format!(
            "; not counted because they are attached and cannot be quiesced (no node-control token): {}",
            attached_with_space.join(", ")
        ));
    }
    message
}

/// Fig. 6 steps 608–614: create the volume with its planned mapping (deterministic name: a
/// retry finds it), then commit the mapping and bind.
async fn create_and_bind(
    claim: &StorageClaim,
    ctx: &Context,
    request: &Request,
    mapping: VolumeMapping,
) -> Result<Action> {
    let uid = claim.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let planned = serde_json::to_string(&mapping)?;
    let volume = VirtualVolume {
        metadata: ObjectMeta {
            name: Some(request.volume_name.clone()),
            labels: Some(
                [
                    (POOL_LABEL.to_owned(), claim.spec.pool_name.clone()),
                    (CLAIM_UID_LABEL.to_owned(), uid.clone()),
                    (CLAIM_NAME_LABEL.to_owned(), claim.name_any()),
                    (
                        CLAIM_NAMESPACE_LABEL.to_owned(),
                        claim.namespace().unwrap_or_default(),
                    ),
                ]
                .into(),
            ),
            annotations: Some([(PLANNED_MAPPING_ANNOTATION.to_owned(), planned)].into()),
            finalizers: Some(vec![VOLUME_FINALIZER.to_owned()]),
            ..ObjectMeta::default()
        },
        spec: VirtualVolumeSpec {
            size_bytes: claim.spec.size_bytes,
            pool_name: claim.spec.pool_name.clone(),
            priority_class_name: claim.spec.priority_class_name.clone(),
            copies: claim.spec.copies,
            layout: claim.spec.layout,
            claim_ref: Some(ClaimRef {
                namespace: claim.namespace().unwrap_or_default(),
                name: claim.name_any(),
                uid: Some(uid.clone()),
            }),
            access_node: None,
            shared_access_nodes: Vec::new(),
        },
        status: None,
    };
    let api: Api<VirtualVolume> = Api::all(ctx.client.clone());
    let created = match api.create(&PostParams::default(), &volume).await {
        Ok(v) => v,
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&request.volume_name).await?;
            let owner = existing.spec.claim_ref.as_ref().and_then(|c| c.uid.clone());
            if owner.as_deref() != Some(uid.as_str()) {
                ctx.allocator.lock().await.release(&request.volume_name);
                return Err(Error::NameTaken {
                    name: request.volume_name.clone(),
                });
            }
            existing
        }
        Err(e) => {
            ctx.allocator.lock().await.release(&request.volume_name);
            return Err(e.into());
        }
    };
    ctx.crash_point(CrashPoint::VolumeCreated)?;
    bind(claim, Arc::new(created), ctx).await
}

/// Commits the volume's mapping if needed and marks the claim Bound (614, [0052]).
async fn bind(claim: &StorageClaim, volume: Arc<VirtualVolume>, ctx: &Context) -> Result<Action> {
    let volume = volume::commit_planned_mapping(ctx, volume).await?;
    ctx.crash_point(CrashPoint::VolumeMapped)?;
    let mapping = volume
        .status
        .as_ref()
        .and_then(|s| s.mapping.clone())
        .ok_or(Error::MissingField("status.mapping"))?;
    let es = mapping.extent_size_bytes.max(1) as u64;
    let extents = total_len(&allocated_extent_ranges(&mapping));
    let mut per_area: BTreeMap<&str, u64> = BTreeMap::new();
    for (area, range) in area_pieces(&mapping) {
        *per_area.entry(area).or_default() += range.len;
    }
    let areas = per_area
        .iter()
        .map(|(a, n)| format!("{a} ({n})"))
        .collect::<Vec<_>>()
        .join(", ");
    let message = format!(
        "bound to volume {}: {extents} extents ({}) on {areas}",
        volume.name_any(),
        human_bytes(extents * es)
    );
    let was_bound = claim.status.as_ref().and_then(|s| s.phase) == Some(ClaimPhase::Bound);
    write_phase(
        claim,
        ctx,
        ClaimPhase::Bound,
        &[
            (
                "Admitted",
                true,
                "Admitted",
                "admitted (seed 000 [0045])".into(),
            ),
            ("Bound", true, "Bound", message.clone()),
        ],
        Some(json!({
            "volumeName": volume.name_any(),
            "allocatedBytes": (extents * es) as i64,
            "reason": null,
            "message": message,
        })),
    )
    .await?;
    ctx.allocator.lock().await.forget_reclaim(&claim_key(claim));
    ctx.crash_point(CrashPoint::ClaimBound)?;
    if !was_bound {
        ctx.publish(
            &reference(claim),
            EventType::Normal,
            "Bound",
            "Allocate",
            message,
            Some(reference(volume.as_ref())),
        )
        .await;
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// 602 ([0046]): the claim cannot be satisfied; nothing was allocated or reclaimed for it.
async fn reject(
    claim: &StorageClaim,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action> {
    let status = claim.status.clone().unwrap_or_default();
    let already = status.phase == Some(ClaimPhase::Rejected)
        && status.reason.as_deref() == Some(reason)
        && status.message.as_deref() == Some(message.as_str())
        && status.observed_generation == claim.metadata.generation;
    if !already {
        write_phase(
            claim,
            ctx,
            ClaimPhase::Rejected,
            &[
                ("Admitted", false, reason, message.clone()),
                ("Bound", false, reason, "nothing was allocated".into()),
            ],
            Some(json!({ "reason": reason, "message": message, "volumeName": null })),
        )
        .await?;
        ctx.publish(
            &reference(claim),
            EventType::Warning,
            "AllocationRejected",
            "Allocate",
            format!("{reason}: {message}"),
            None,
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Pending, waiting for `reason`; retried after `retry` (or when a watched object changes).
async fn wait(
    claim: &StorageClaim,
    ctx: &Context,
    reason: &str,
    message: String,
    retry: Duration,
) -> Result<Action> {
    let status = claim.status.clone().unwrap_or_default();
    let unchanged = status.phase == Some(ClaimPhase::Pending)
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Admitted" && c.reason == reason && c.message == message);
    if !unchanged {
        write_phase(
            claim,
            ctx,
            ClaimPhase::Pending,
            &[("Admitted", false, reason, message.clone())],
            Some(json!({ "message": message })),
        )
        .await?;
    }
    Ok(Action::requeue(retry))
}

/// Writes the phase, conditions and extra status fields in one merge patch of `/status`.
async fn write_phase(
    claim: &StorageClaim,
    ctx: &Context,
    phase: ClaimPhase,
    conditions: &[(&str, bool, &str, String)],
    extra: Option<serde_json::Value>,
) -> Result<()> {
    let generation = claim.metadata.generation;
    let mut conds = claim
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    for (type_, status, reason, message) in conditions {
        set_condition(
            &mut conds,
            type_,
            *status,
            reason,
            message.clone(),
            generation,
        );
    }
    let mut status = json!({
        "phase": phase,
        "observedGeneration": generation,
        "conditions": conds,
    });
    if let Some(serde_json::Value::Object(extra)) = extra {
        for (k, v) in extra {
            status[k] = v;
        }
    }
    patch_status(&claim_api(ctx, claim), &claim.name_any(), status, None).await?;
    Ok(())
}

/// The claim is being deleted: delete its volume (whose finalizer returns the extents, D-6) and
/// keep the claim until the volume is gone.
async fn cleanup(claim: &StorageClaim, ctx: &Context) -> Result<Action> {
    ctx.allocator.lock().await.forget_reclaim(&claim_key(claim));
    let name = claim
        .status
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .map_or_else(|| volume_name_for(claim), Ok)?;
    let api: Api<VirtualVolume> = Api::all(ctx.client.clone());
    let Some(volume) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    if volume.metadata.deletion_timestamp.is_none() {
        api.delete(&name, &DeleteParams::default()).await?;
        ctx.publish(
            &reference(claim),
            EventType::Normal,
            "ReleasingVolume",
            "Release",
            format!("deleting volume {name}; its extents return to the pool once it is gone"),
            Some(reference(&volume)),
        )
        .await;
    }
    Err(Error::Blocked(format!(
        "claim {} waits until volume {name} has returned its extents",
        claim_key(claim)
    )))
}
