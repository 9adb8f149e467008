//! VolumeRemap: the entry point of every remap. Moves (`Move`, `EvacuateArea`) and releases of
//! volumes a node uses go to the remap coordinator ([`coordinator`]: quiesce every node, change
//! the mapping, resume; seed 004). A `releaseRanges` remap of a volume **no node uses** (the
//! area return of seed 000, command 450 → release 430 → release processing 510, Figs. 7 and 9,
//! [0057], [0068]–[0074]; D-17) is applied here directly: no I/O can meet a stale mapping, so
//! no hold is needed. A release the coordinator started stays with it to the end.
//!
//! Steps of the direct release, each a write, each safe to repeat after a crash:
//! 1. Re-check under the allocation lock (the "re-check under the hold" of D-17): only the named
//!    extents still in the tier's state are released ([`recheck_under_hold`]).
//! 2. Intent: the remap's status says `Committing` with the `targetGeneration` it commits.
//! 3. The volume's `status.mapping` gets the holes, at `targetGeneration` (conditional write).
//!    A restarted operator that finds the mapping already at the target only finishes step 4.
//! 4. The remap is `Succeeded`, with a message saying what was released.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tessera_api::model::Edit;
use tessera_api::v1alpha1::{
    MirrorRole, ReclaimTier, RemapOperationType, RemapPhase, VirtualVolume, VolumeMapping,
    VolumeRemap,
};

use super::coordinator::{self, STATE_ANNOTATION};
use super::support::{claim_reference_from_labels, human_bytes, now, patch_status, reference};
use super::usage::{UsageReport, extent_states};
use super::view::{extent_size, is_attached};
use super::{Config, Context, CrashPoint, Error, Informers, Result};
use crate::planners::allocation::{mapped_named, recheck_under_hold};
use crate::planners::{ExtentRange, total_len};

/// Controller name in metrics.
pub const NAME: &str = "remap";

pub fn controller(informers: &Informers, _config: &Config) -> Controller<VolumeRemap> {
    let store = informers.remaps.store();
    // A volume that becomes unattached (or gets its mapping) may unblock its pending remaps.
    Controller::for_stream(informers.remaps.subscribe(), informers.remaps.store()).watches_stream(
        informers.volumes.subscribe(),
        move |volume: VirtualVolume| {
            let name = volume.name_any();
            store
                .state()
                .iter()
                .filter(|r| r.spec.volume_name == name && !super::claim::is_final(r))
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect::<Vec<_>>()
        },
    )
}

pub fn error_policy(_remap: Arc<VolumeRemap>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy_for(NAME, error, &ctx)
}

fn tier_name(tier: ReclaimTier) -> &'static str {
    match tier {
        ReclaimTier::Unused => "Unused",
        ReclaimTier::LowPriority => "LowPriority",
    }
}

pub async fn reconcile(remap: Arc<VolumeRemap>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(NAME);
    ctx.stores.ready().await?;
    if super::claim::is_final(&remap) {
        return Ok(Action::await_change());
    }
    let volumes: Api<VirtualVolume> = Api::all(ctx.client.clone());
    // The secondary of a mirror pair is written by its primary's nodes through a copy of its map
    // (the mirror leg, docs/mirror.md §7): a remap would leave them writing the old extents.
    // Refused before anything starts; a remap already started runs to its end.
    if !remap.annotations().contains_key(STATE_ANNOTATION)
        && let Some(link) = ctx
            .stores
            .volumes
            .get(&ObjectRef::new(&remap.spec.volume_name))
            .and_then(|v| v.status.as_ref().and_then(|s| s.mirror.clone()))
        && link.role == MirrorRole::Secondary
    {
        return fail(
            &ctx,
            &remap,
            format!(
                "volume {} is the secondary of mirror pair {}: its primary's nodes write it \
                 through its current mapping, so it cannot be remapped while paired (delete \
                 the MirrorPair first)",
                remap.spec.volume_name, link.pair
            ),
        )
        .await;
    }
    // Moves, and releases of volumes a node uses, need the quiesce: the coordinator's. So does
    // a release the coordinator already started (it owns it to the end).
    let release = remap
        .spec
        .operation
        .release_ranges
        .clone()
        .filter(|_| remap.spec.operation.type_ == RemapOperationType::ReleaseRanges);
    let started = remap.annotations().contains_key(STATE_ANNOTATION);
    let Some(release) = release.filter(|_| !started) else {
        return coordinator::reconcile(remap, ctx).await;
    };
    if volumes
        .get_opt(&remap.spec.volume_name)
        .await?
        .is_some_and(|v| is_attached(&v))
    {
        return coordinator::reconcile(remap, ctx).await;
    }
    // One remap per volume: a coordinated one in flight (a move of this volume) goes first;
    // releasing under it would race its mapping commits.
    let coordinated = ctx.stores.remaps.state().iter().any(|r| {
        r.spec.volume_name == remap.spec.volume_name
            && r.name_any() != remap.name_any()
            && r.annotations().contains_key(STATE_ANNOTATION)
            && !super::claim::is_final(r)
    });
    if coordinated {
        return Ok(Action::requeue(ctx.config.wait_retry));
    }
    let remaps: Api<VolumeRemap> = Api::all(ctx.client.clone());
    let name = remap.name_any();
    let from_reclaim = claim_reference_from_labels(remap.as_ref());

    // Under the lock: no other change of extent ownership interleaves.
    let _book = ctx.allocator.lock().await;
    let Some(volume) = volumes.get_opt(&remap.spec.volume_name).await? else {
        return fail(
            &ctx,
            &remap,
            format!("volume {} does not exist", remap.spec.volume_name),
        )
        .await;
    };
    if is_attached(&volume) {
        // Attached since the check above: the coordinator takes it on the next reconcile.
        return Ok(Action::requeue(std::time::Duration::from_millis(10)));
    }
    let Some(pool) = ctx
        .stores
        .pools
        .get(&ObjectRef::new(&volume.spec.pool_name))
    else {
        return fail(
            &ctx,
            &remap,
            format!("pool {} does not exist", volume.spec.pool_name),
        )
        .await;
    };
    let es = extent_size(&pool)?;
    let Some(mapping) = volume.status.as_ref().and_then(|s| s.mapping.clone()) else {
        return Ok(Action::requeue(ctx.config.wait_retry));
    };
    let size = volume.spec.size_bytes.max(0) as u64;

    // Already committed before a restart: only the last step is left.
    let target = remap.status.as_ref().and_then(|s| s.target_generation);
    if let Some(target) = target
        && mapping.generation >= target
    {
        let message = format!(
            "released the named ranges of tier {} at generation {target} (committed before a \
             restart)",
            tier_name(release.tier)
        );
        return succeed(&remaps, &remap, target, message).await;
    }

    // D-14: ranges must be aligned to the pool's extent size.
    let mut named = Vec::new();
    for range in &release.ranges {
        let (offset, length) = (range.offset.max(0) as u64, range.length.max(0) as u64);
        let end = offset + length;
        if !es.is_aligned(offset) || !(es.is_aligned(end) || end == size) || end > size {
            return fail(
                &ctx,
                &remap,
                format!(
                    "range [{offset}, {end}) is not aligned to the pool's {} byte extents or \
                     is outside the volume",
                    es.get()
                ),
            )
            .await;
        }
        named.push(ExtentRange::new(offset / es.get(), es.extents_for(length)));
    }

    // Re-check: only extents still in the tier's state go.
    let report = UsageReport::of_volume(&volume).ok().flatten();
    let states = extent_states(&mapping, volume.spec.size_bytes, report.as_ref());
    let kept = if release.discard {
        mapped_named(&states, &named)
    } else {
        recheck_under_hold(&states, &named, release.tier)
    };
    let released = total_len(&kept);
    let model = mapping
        .to_model(volume.spec.size_bytes)
        .map_err(|source| Error::Mapping {
            volume: volume.name_any(),
            source,
        })?;
    let mut edits = Vec::new();
    for r in &kept {
        let bytes = r.to_byte_range(es)?;
        let end = bytes.end().min(size);
        edits.push(Edit::PunchHole {
            range: tessera_api::model::ByteRange::new(bytes.offset(), end - bytes.offset())?,
        });
    }
    let next = model.edit(edits)?;
    let target = next.generation().get() as i64;

    // Intent.
    let phase = remap.status.as_ref().and_then(|s| s.phase);
    let recorded = remap.status.as_ref().and_then(|s| s.target_generation);
    if phase != Some(RemapPhase::Committing) || recorded != Some(target) {
        patch_status(
            &remaps,
            &name,
            json!({
                "phase": RemapPhase::Committing,
                "attempt": 1,
                "targetGeneration": target,
                "startTime": Time(now()),
                "message": format!(
                    "releasing {released} extents of tier {} (volume not attached: no quiesce needed)",
                    tier_name(release.tier)
                ),
                "observedGeneration": remap.metadata.generation,
            }),
            remap.resource_version().as_deref(),
        )
        .await?;
    }
    ctx.crash_point(CrashPoint::RemapIntent)?;

    // The mapping change (Fig. 9 steps 900–908): holes where the released extents were.
    if target != mapping.generation {
        let wire = VolumeMapping::from_model(&next).map_err(|source| Error::Mapping {
            volume: volume.name_any(),
            source,
        })?;
        patch_status(
            &volumes,
            &volume.name_any(),
            json!({ "mapping": wire }),
            volume.resource_version().as_deref(),
        )
        .await?;
    }
    ctx.crash_point(CrashPoint::RangesReleased)?;

    let copies = u64::try_from(volume.spec.copies.clamp(1, 3)).unwrap_or(1);
    let pool_bytes = released * copies * es.get();
    ctx.metrics
        .count_reclaim(&volume.spec.pool_name, tier_name(release.tier), pool_bytes);
    let skipped = total_len(&crate::planners::coalesce(named)) - released;
    let message = format!(
        "released {released} extents ({}) of tier {} from volume {}, mapping generation {} → \
         {target}{}",
        human_bytes(released * es.get()),
        tier_name(release.tier),
        volume.name_any(),
        mapping.generation,
        if skipped > 0 {
            format!("; {skipped} named extents were written since the plan and kept")
        } else {
            String::new()
        }
    );
    let (reason, type_) = match release.tier {
        ReclaimTier::Unused => ("RangesReleased", EventType::Normal),
        ReclaimTier::LowPriority => ("LowPriorityDataReleased", EventType::Warning),
    };
    ctx.publish(
        &reference(&volume),
        type_,
        reason,
        "Reclaim",
        message.clone(),
        from_reclaim.clone(),
    )
    .await;
    if let Some(claim) = &from_reclaim {
        ctx.publish(
            claim,
            EventType::Normal,
            "AreaReturned",
            &format!("Returned{}", tier_name(release.tier)),
            message.clone(),
            Some(reference(&volume)),
        )
        .await;
    }
    succeed(&remaps, &remap, target, message).await
}

async fn succeed(
    remaps: &Api<VolumeRemap>,
    remap: &VolumeRemap,
    target: i64,
    message: String,
) -> Result<Action> {
    patch_status(
        remaps,
        &remap.name_any(),
        json!({
            "phase": RemapPhase::Succeeded,
            "attempt": 1,
            "targetGeneration": target,
            "completionTime": Time(now()),
            "message": message,
            "observedGeneration": remap.metadata.generation,
        }),
        None,
    )
    .await?;
    Ok(Action::await_change())
}

async fn fail(ctx: &Context, remap: &VolumeRemap, message: String) -> Result<Action> {
    let remaps: Api<VolumeRemap> = Api::all(ctx.client.clone());
    patch_status(
        &remaps,
        &remap.name_any(),
        json!({
            "phase": RemapPhase::Failed,
            "completionTime": Time(now()),
            "message": message,
            "observedGeneration": remap.metadata.generation,
        }),
        None,
    )
    .await?;
    Ok(Action::await_change())
}
