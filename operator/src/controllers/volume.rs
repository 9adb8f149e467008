//! VirtualVolume: owns the mapping (seed 000 allocation entry 300, [0022]–[0025]).
//!
//! - **Mapping**: a volume is created with its planned mapping in an annotation; the first thing
//!   done with it is to commit that mapping to `status.mapping` (generation 1). Afterwards only
//!   the release of reclaimed ranges ([`super::remap`]) changes it, each time with the next
//!   generation (D-20).
//! - **Usage** (seed 000 Fig. 8): the counters 307/308/310 come from the node's usage report
//!   ([`super::usage`]) intersected with the mapping.
//! - **Charging** (seed 000 Fig. 10, [0075]–[0077]): every whole `intervalSeconds` since
//!   `status.charge.lastChargedTime`, `accrued += high × rateHigh + (inUse − high) × rateLow`,
//!   through [`accrue`]. The new amount and the new mark are written in one status patch that is
//!   conditional on the resourceVersion read, so an interval is charged exactly once even across
//!   restarts and stale caches.
//! - **Deletion** (seed 000 Fig. 9): refused while a node uses the volume; then the partial last
//!   interval is charged ([`settle_final`]) and the finalizer goes. The extents return to the
//!   pool when the object is gone, because a volume's mapping is the only record of them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::{Value, json};
use tessera_api::v1alpha1::{
    AreaPhase, AttachmentState, ChargingPolicy, CopyMode, CopyPolicy, EvacuateArea, RemapOperation,
    RemapOperationType, RemapPhase, StorageArea, StoragePool, VirtualVolume, VolumeCharge,
    VolumePhase, VolumeRemap, VolumeRemapSpec, VolumeUsage as WireUsage,
};

use super::support::{
    VOLUME_FINALIZER, human_bytes, patch_status, reference, set_condition, time_from_seconds,
    unix_seconds,
};
use super::usage::{UsageReport, area_pieces, extent_states, usage_of};
use super::view::{attached_nodes, extent_size, is_attached, planned_mapping};
use super::{Config, Context, Error, Informers, Result};
use crate::planners::charging::{Amount, Rates, StoredBytes, accrue, settle_final};

/// Controller name in metrics.
pub const NAME: &str = "volume";

/// Areas a volume's mapping uses.
fn areas_of(volume: &VirtualVolume) -> BTreeSet<String> {
    super::view::effective_mapping(volume)
        .map(|m| area_pieces(&m).map(|(a, _)| a.to_owned()).collect())
        .unwrap_or_default()
}

pub fn controller(informers: &Informers, _config: &Config) -> Controller<VirtualVolume> {
    let (by_area, by_pool) = (informers.volumes.store(), informers.volumes.store());
    Controller::for_stream(informers.volumes.subscribe(), informers.volumes.store())
        .watches_stream(informers.remaps.subscribe(), |remap: VolumeRemap| {
            Some(ObjectRef::new(&remap.spec.volume_name))
        })
        .watches_stream(informers.areas.subscribe(), move |area: StorageArea| {
            let name = area.name_any();
            by_area
                .state()
                .iter()
                .filter(|v| areas_of(v).contains(&name))
                .map(|v| ObjectRef::from_obj(v.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(informers.pools.subscribe(), move |pool: StoragePool| {
            let name = pool.name_any();
            by_pool
                .state()
                .iter()
                .filter(|v| v.spec.pool_name == name)
                .map(|v| ObjectRef::from_obj(v.as_ref()))
                .collect::<Vec<_>>()
        })
}

/// What one charging step needs (seed 000 Fig. 10): the pool's rates, the volume's stored bytes,
/// what it has accrued so far, and where the last charge ended (creation when never charged).
struct ChargeInputs {
    rates: Rates,
    stored: StoredBytes,
    accrued: Amount,
    last: i64,
}

fn charge_inputs(
    volume: &VirtualVolume,
    policy: &ChargingPolicy,
    usage: &WireUsage,
    charge: Option<&VolumeCharge>,
    now: i64,
) -> Result<ChargeInputs> {
    let (accrued, last) = match charge {
        Some(c) => (
            Amount::parse_accrued(&c.accrued)?,
            c.last_charged_time.as_ref().map_or(now, unix_seconds),
        ),
        None => (
            Amount::ZERO,
            volume
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(now, unix_seconds),
        ),
    };
    Ok(ChargeInputs {
        rates: Rates::try_from(policy)?,
        stored: StoredBytes::new(
            usage.in_use_bytes.max(0) as u64,
            usage.high_priority_bytes.max(0) as u64,
        )?,
        accrued,
        last,
    })
}

pub async fn reconcile(volume: Arc<VirtualVolume>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(NAME);
    ctx.stores.ready().await?;
    let api: Api<VirtualVolume> = Api::all(ctx.client.clone());
    finalizer(&api, VOLUME_FINALIZER, volume, |event| async {
        match event {
            Finalizer::Apply(volume) => apply(volume, &ctx).await,
            Finalizer::Cleanup(volume) => cleanup(&volume, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

pub fn error_policy(_volume: Arc<VirtualVolume>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy_for(NAME, error, &ctx)
}

/// Copies the planned mapping a volume was created with into `status.mapping`, once. Returns
/// the volume as it is afterwards.
pub async fn commit_planned_mapping(
    ctx: &Context,
    volume: Arc<VirtualVolume>,
) -> Result<Arc<VirtualVolume>> {
    if volume.status.as_ref().is_some_and(|s| s.mapping.is_some()) {
        return Ok(volume);
    }
    let Some(planned) = planned_mapping(&volume) else {
        return Ok(volume);
    };
    let api: Api<VirtualVolume> = Api::all(ctx.client.clone());
    // Conditional: if anything else wrote the status meanwhile, read again.
    let updated = patch_status(
        &api,
        &volume.name_any(),
        json!({ "mapping": planned, "phase": VolumePhase::Available }),
        volume.resource_version().as_deref(),
    )
    .await;
    match updated {
        Ok(v) => Ok(Arc::new(v)),
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
            let fresh = api.get(&volume.name_any()).await?;
            if fresh.status.as_ref().is_some_and(|s| s.mapping.is_some()) {
                Ok(Arc::new(fresh))
            } else {
                Err(Error::Kube(kube::Error::Api(e)))
            }
        }
        Err(e) => Err(e),
    }
}

async fn apply(volume: Arc<VirtualVolume>, ctx: &Context) -> Result<Action> {
    let volume = commit_planned_mapping(ctx, volume).await?;
    let name = volume.name_any();
    let Some(pool) = ctx
        .stores
        .pools
        .get(&ObjectRef::new(&volume.spec.pool_name))
    else {
        return Ok(Action::requeue(ctx.config.resync));
    };
    let es = extent_size(&pool)?.get();
    let status = volume.status.clone().unwrap_or_default();
    let generation = volume.metadata.generation;

    // Usage (Fig. 8) from the node's report and the committed mapping.
    let report = match UsageReport::of_volume(&volume) {
        Ok(report) => report,
        Err(e) => {
            let raw = volume
                .annotations()
                .get(super::support::USAGE_REPORT_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            if ctx.first_bad_report(&name, &raw) {
                ctx.publish(
                    &reference(volume.as_ref()),
                    EventType::Warning,
                    "InvalidUsageReport",
                    "Account",
                    format!("the node's usage report is ignored: {e}"),
                    None,
                )
                .await;
            }
            None
        }
    };
    let usage = status.mapping.as_ref().map(|mapping| {
        let counts = usage_of(&extent_states(
            mapping,
            volume.spec.size_bytes,
            report.as_ref(),
        ));
        let bytes = |extents: u64| (extents * es) as i64;
        let mut usage = WireUsage {
            allocated_bytes: bytes(counts.allocated()),
            in_use_bytes: bytes(counts.in_use()),
            high_priority_bytes: bytes(counts.high_priority()),
            last_report_time: status
                .usage
                .as_ref()
                .and_then(|u| u.last_report_time.clone()),
        };
        let same = status.usage.as_ref().is_some_and(|old| {
            (
                old.allocated_bytes,
                old.in_use_bytes,
                old.high_priority_bytes,
            ) == (
                usage.allocated_bytes,
                usage.in_use_bytes,
                usage.high_priority_bytes,
            )
        });
        if !same && report.is_some() {
            usage.last_report_time = Some(Time(super::support::now()));
        }
        usage
    });

    // Charging (Fig. 10), restart-safe through lastChargedTime.
    let now = super::support::now().as_second();
    let mut next_charge: Option<Duration> = None;
    let charge = match (&pool.spec.charging, &usage) {
        (Some(policy), Some(usage)) => {
            let ChargeInputs {
                rates,
                stored,
                accrued,
                last,
            } = charge_inputs(&volume, policy, usage, status.charge.as_ref(), now)?;
            let accrual = accrue(accrued, last, now, policy.interval_seconds, stored, &rates)?;
            let due = accrual.charged_until + policy.interval_seconds - now;
            next_charge = Some(Duration::from_secs(due.max(1) as u64));
            ctx.metrics.set_volume_charge(
                &volume.spec.pool_name,
                &name,
                accrual.accrued.micros() as f64 / 1e6,
            );
            Some(VolumeCharge {
                accrued: accrual.accrued.to_decimal_string(),
                last_charged_time: Some(time_from_seconds(accrual.charged_until)),
            })
        }
        _ => status.charge.clone(),
    };

    // Phase and conditions.
    let attached = is_attached(&volume);
    let phase = match (&status.mapping, attached) {
        (None, _) => VolumePhase::Pending,
        (Some(_), true) => VolumePhase::Attached,
        (Some(_), false) => VolumePhase::Available,
    };
    let mut conditions = status.conditions.clone();
    let mut unhealthy: Vec<String> = Vec::new();
    let mut offline: Vec<String> = Vec::new();
    for area in areas_of(&volume) {
        let phase = ctx
            .stores
            .areas
            .get(&ObjectRef::new(&area))
            .and_then(|a| a.status.as_ref().and_then(|s| s.phase));
        if phase != Some(AreaPhase::Online) {
            unhealthy.push(format!(
                "{area} ({})",
                phase.map_or("missing".to_owned(), |p| format!("{p:?}"))
            ));
        }
        if phase == Some(AreaPhase::Offline) {
            offline.push(area);
        }
    }
    // Replicas a node stopped writing after a failure, even on an area that is Online again
    // (it missed writes since): degraded, and rebuilt like an Offline area's.
    let mapped = areas_of(&volume);
    for attachment in &status.attachments {
        for area in &attachment.unhealthy_areas {
            if mapped.contains(area) && !offline.contains(area) {
                unhealthy.push(format!("{area} (missed writes on {})", attachment.node));
                offline.push(area.clone());
            }
        }
    }

    let fenced: Vec<String> = status
        .attachments
        .iter()
        .filter(|a| a.state == AttachmentState::Fenced)
        .map(|a| a.node.clone())
        .collect();
    let degraded = !unhealthy.is_empty() || !fenced.is_empty();
    let degraded_message = if degraded {
        let mut parts = Vec::new();
        if !unhealthy.is_empty() {
            parts.push(format!(
                "replicas on areas that are not Online: {}",
                unhealthy.join(", ")
            ));
        }
        if !fenced.is_empty() {
            parts.push(format!("fenced on {}", fenced.join(", ")));
        }
        parts.join("; ")
    } else {
        "every replica's area is Online".to_owned()
    };
    set_condition(
        &mut conditions,
        "Degraded",
        degraded,
        if degraded {
            "ReplicaUnavailable"
        } else {
            "AllReplicasOnline"
        },
        degraded_message,
        generation,
    );
    let ready = status.mapping.is_some() && !degraded;
    set_condition(
        &mut conditions,
        "Ready",
        ready,
        if status.mapping.is_none() {
            "NotMapped"
        } else if degraded {
            "Degraded"
        } else {
            "Mapped"
        },
        if ready {
            "mapped; every replica's area is Online".to_owned()
        } else {
            "see Degraded".to_owned()
        },
        generation,
    );
    let returns: Vec<String> = ctx
        .stores
        .remaps
        .state()
        .iter()
        .filter(|r| r.spec.volume_name == name && !super::claim::is_final(r))
        .map(|r| r.name_any())
        .collect();
    set_condition(
        &mut conditions,
        "ReturnRequested",
        !returns.is_empty(),
        if returns.is_empty() {
            "NoReturnOutstanding"
        } else {
            "AreaReturnOutstanding"
        },
        if returns.is_empty() {
            "no area return is outstanding".to_owned()
        } else {
            format!("area return requested by {}", returns.join(", "))
        },
        generation,
    );

    let desired = json!({
        "phase": phase,
        "usage": usage,
        "charge": charge,
        "conditions": conditions,
        "observedGeneration": generation,
    });
    let current = json!({
        "phase": status.phase,
        "usage": status.usage,
        "charge": status.charge,
        "conditions": status.conditions,
        "observedGeneration": status.observed_generation,
    });
    if desired != current {
        let mut patch = desired;
        if let Value::Object(map) = &mut patch {
            map.retain(|_, v| !v.is_null());
        }
        // Conditional on what was read: exactly-once charging.
        patch_status(
            &Api::<VirtualVolume>::all(ctx.client.clone()),
            &name,
            patch,
            volume.resource_version().as_deref(),
        )
        .await?;
    }
    // After the status: Degraded is shown whatever happens to the rebuild request.
    if volume.spec.copies >= 2 && status.mapping.is_some() && !offline.is_empty() {
        request_rebuild(&volume, &offline, ctx).await?;
    }
    let requeue = next_charge.map_or(ctx.config.resync, |d| d.min(ctx.config.resync));
    Ok(Action::requeue(requeue))
}

/// Rebuild attempts per area and mapping generation.
const MAX_REBUILD_ATTEMPTS: u32 = 5;

/// Duplexed volumes (`copies` ≥ 2, seed 001 [0019]): the replicas on an area that went Offline,
/// or that a node stopped writing after a failure (`attachments[].unhealthyAreas`), are rebuilt
/// from the surviving replica onto areas placement chooses among the areas of other nodes, by
/// an `EvacuateArea` VolumeRemap with `otherNodesOnly` (online copy under the quiesce of the
/// volume's nodes; docs/mirror.md §8). One rebuild at a time per volume; names carry the
/// mapping generation and an attempt number, so repeats of this reconcile find the one already
/// asked for and a failed attempt is retried a few times.
async fn request_rebuild(volume: &VirtualVolume, offline: &[String], ctx: &Context) -> Result<()> {
    let name = volume.name_any();
    let busy = ctx
        .stores
        .remaps
        .state()
        .iter()
        .any(|r| r.spec.volume_name == name && !super::claim::is_final(r));
    if busy {
        return Ok(());
    }
    let Some(area) = offline.first() else {
        return Ok(());
    };
    let Some(mapping) = volume.status.as_ref().and_then(|s| s.mapping.as_ref()) else {
        return Ok(());
    };
    let generation = mapping.generation;
    // A failed attempt (say, no room yet) is retried under the next name, a few times per
    // mapping generation.
    let remaps: Api<VolumeRemap> = Api::all(ctx.client.clone());
    let mut remap_name = None;
    for attempt in 1..=MAX_REBUILD_ATTEMPTS {
        let candidate = format!("rebuild-{name}-{area}-g{generation}-{attempt}");
        match remaps.get_opt(&candidate).await? {
            None => {
                remap_name = Some(candidate);
                break;
            }
            Some(r) if r.status.as_ref().and_then(|s| s.phase) == Some(RemapPhase::Failed) => {}
            // In flight or done.
            Some(_) => return Ok(()),
        }
    }
    let Some(remap_name) = remap_name else {
        return Ok(());
    };
    let spec = VolumeRemapSpec {
        volume_name: name.clone(),
        operation: RemapOperation {
            type_: RemapOperationType::EvacuateArea,
            r#move: None,
            // The node of the failed area is likely down with all its areas, even those still
            // shown Online until their heartbeats expire.
            evacuate_area: Some(EvacuateArea {
                area: area.clone(),
                other_nodes_only: true,
            }),
            release_ranges: None,
        },
        copy: CopyPolicy {
            mode: CopyMode::Online,
            ..Default::default()
        },
        policy: Default::default(),
    };
    match remaps
        .create(&Default::default(), &VolumeRemap::new(&remap_name, spec))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    ctx.publish(
        &reference(volume),
        EventType::Warning,
        "RebuildStarted",
        "Rebuild",
        format!(
            "the replicas of {name} on area {area} are unavailable (area Offline, or writes \
             missed): they are rebuilt from the surviving replica onto other areas by \
             VolumeRemap {remap_name}"
        ),
        None,
    )
    .await;
    Ok(())
}

async fn cleanup(volume: &VirtualVolume, ctx: &Context) -> Result<Action> {
    let name = volume.name_any();
    if is_attached(volume) {
        let nodes = attached_nodes(volume).join(", ");
        let message = format!(
            "volume {name} is still attached to {nodes}; its extents are returned once no node \
             uses it"
        );
        ctx.publish(
            &reference(volume),
            EventType::Warning,
            "VolumeAttached",
            "Release",
            message.clone(),
            None,
        )
        .await;
        return Err(Error::Blocked(message));
    }
    let status = volume.status.clone().unwrap_or_default();
    let pool = ctx
        .stores
        .pools
        .get(&ObjectRef::new(&volume.spec.pool_name));
    let now = super::support::now().as_second();
    // Final settlement: the partial last interval is charged too (no later run will).
    let mut note = String::new();
    if let (Some(pool), Some(usage)) = (&pool, &status.usage)
        && let Some(policy) = &pool.spec.charging
    {
        let ChargeInputs {
            rates,
            stored,
            accrued,
            last,
        } = charge_inputs(volume, policy, usage, status.charge.as_ref(), now)?;
        let accrual = settle_final(accrued, last, now, policy.interval_seconds, stored, &rates)?;
        patch_status(
            &Api::<VirtualVolume>::all(ctx.client.clone()),
            &name,
            json!({
                "phase": VolumePhase::Releasing,
                "charge": VolumeCharge {
                    accrued: accrual.accrued.to_decimal_string(),
                    last_charged_time: Some(time_from_seconds(accrual.charged_until)),
                },
            }),
            volume.resource_version().as_deref(),
        )
        .await?;
        note = format!("; final charge {}", accrual.accrued.to_decimal_string());
    }
    let allocated = status
        .usage
        .as_ref()
        .map_or(0, |u| u.allocated_bytes.max(0));
    ctx.allocator.lock().await.release(&name);
    ctx.metrics.forget_volume(&volume.spec.pool_name, &name);
    ctx.publish(
        &reference(volume),
        EventType::Normal,
        "ExtentsReturned",
        "Release",
        format!(
            "the extents of volume {name} ({} per copy) return to pool {} (seed 000 Fig. 9){note}",
            human_bytes(allocated as u64),
            volume.spec.pool_name
        ),
        None,
    )
    .await;
    Ok(Action::await_change())
}
