//! StorageArea: validation against the pool, heartbeats, allocated bytes, protected deletion
//! (seed 001 registration [0022]–[0023]; seed 002 liveness exchange [0108], ARCHITECTURE §8).
//!
//! - The node agent opens the area, reports `capacityBytes`, sets `phase: Online` and patches
//!   `lastHeartbeatTime` periodically. An Online area whose heartbeat is older than
//!   `Config::area_heartbeat_timeout` becomes **Offline** (Warning `HeartbeatLost`); an Offline
//!   area whose heartbeat is fresh again becomes **Online** (`HeartbeatResumed`). The controller
//!   requeues itself for the moment the heartbeat would expire.
//! - `Ready` says whether the area can take extents: its pool exists, it holds at least one whole
//!   extent, it is Online with a current heartbeat.
//! - `allocatedBytes` is what the volumes' mappings place on it.
//! - Deletion is refused while any extent of the area is allocated (finalizer).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tessera_api::v1alpha1::{AreaPhase, StorageArea, StoragePool, VirtualVolume};

use super::support::{AREA_FINALIZER, patch_status, reference, set_condition, unix_seconds};
use super::usage::area_pieces;
use super::view::{PoolView, effective_mapping};
use super::{Config, Context, Error, Informers, Result};

/// Controller name in metrics.
pub const NAME: &str = "area";

fn areas_of(volume: &VirtualVolume) -> BTreeSet<String> {
    effective_mapping(volume)
        .map(|m| area_pieces(&m).map(|(a, _)| a.to_owned()).collect())
        .unwrap_or_default()
}

pub fn controller(informers: &Informers, config: &Config) -> Controller<StorageArea> {
    let store = informers.areas.store();
    // The areas a volume used before its latest change, so a release also updates the areas
    // it left.
    let previous: Arc<Mutex<HashMap<String, BTreeSet<String>>>> = Arc::default();
    Controller::for_stream(informers.areas.subscribe(), informers.areas.store())
        .with_config(controller::Config::default().debounce(config.aggregate_debounce))
        .watches_stream(
            informers.volumes.subscribe(),
            move |volume: VirtualVolume| {
                let now = areas_of(&volume);
                let mut previous = previous.lock().unwrap_or_else(|e| e.into_inner());
                let before = if volume.metadata.deletion_timestamp.is_some() {
                    previous.remove(&volume.name_any())
                } else {
                    previous.insert(volume.name_any(), now.clone())
                };
                now.into_iter()
                    .chain(before.unwrap_or_default())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .map(|a| ObjectRef::new(&a))
                    .collect::<Vec<_>>()
            },
        )
        .watches_stream(informers.pools.subscribe(), move |pool: StoragePool| {
            let name = pool.name_any();
            store
                .state()
                .iter()
                .filter(|a| a.spec.pool_name == name)
                .map(|a| ObjectRef::from_obj(a.as_ref()))
                .collect::<Vec<_>>()
        })
}

pub async fn reconcile(area: Arc<StorageArea>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(NAME);
    ctx.stores.ready().await?;
    let api: Api<StorageArea> = Api::all(ctx.client.clone());
    finalizer(&api, AREA_FINALIZER, area, |event| async {
        match event {
            Finalizer::Apply(area) => apply(&area, &ctx).await,
            Finalizer::Cleanup(area) => cleanup(&area, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

pub fn error_policy(_area: Arc<StorageArea>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy_for(NAME, error, &ctx)
}

/// Extents of `area` the pool's volumes (and this process's reservations) use, with the
/// volumes that hold them.
async fn usage_of_area(ctx: &Context, area: &StorageArea) -> Result<Option<(u64, Vec<String>)>> {
    let Some(pool) = ctx.stores.pools.get(&ObjectRef::new(&area.spec.pool_name)) else {
        return Ok(None);
    };
    let name = area.name_any();
    let book = ctx.allocator.lock().await;
    let view = PoolView::build(
        pool,
        &ctx.stores.areas.state(),
        &ctx.stores.volumes.state(),
        book.reservations(&area.spec.pool_name),
    )?;
    drop(book);
    let extents = view.areas.get(&name).map_or(0, |a| a.used_extents());
    let holders = view
        .volumes
        .iter()
        .filter(|v| {
            v.mapping
                .as_ref()
                .is_some_and(|m| area_pieces(m).any(|(a, _)| a == name))
        })
        .map(|v| v.name.clone())
        .collect();
    Ok(Some((extents * view.extent_size.get(), holders)))
}

async fn apply(area: &StorageArea, ctx: &Context) -> Result<Action> {
    let name = area.name_any();
    let status = area.status.clone().unwrap_or_default();
    let generation = area.metadata.generation;
    let pool = ctx.stores.pools.get(&ObjectRef::new(&area.spec.pool_name));
    let allocated = usage_of_area(ctx, area)
        .await?
        .map(|(bytes, _)| bytes as i64);

    // Heartbeats (seed 002 [0108]).
    let now = super::support::now().as_second();
    let timeout = ctx.config.area_heartbeat_timeout.as_secs().max(1) as i64;
    let beat = status.last_heartbeat_time.as_ref().map(unix_seconds);
    let fresh = beat.is_some_and(|b| now - b < timeout);
    let mut phase = status.phase;
    let mut event = None;
    match (status.phase, fresh) {
        (Some(AreaPhase::Online), false) => {
            phase = Some(AreaPhase::Offline);
            event = Some((
                EventType::Warning,
                "HeartbeatLost",
                format!(
                    "no heartbeat from node {} for {timeout} s or more (last {}); area is Offline",
                    area.spec.node_name,
                    status
                        .last_heartbeat_time
                        .as_ref()
                        .map_or("never".to_owned(), |t| t.0.to_string())
                ),
            ));
        }
        (Some(AreaPhase::Offline), true) => {
            phase = Some(AreaPhase::Online);
            event = Some((
                EventType::Normal,
                "HeartbeatResumed",
                format!(
                    "node {} heartbeats again; area is Online",
                    area.spec.node_name
                ),
            ));
        }
        _ => {}
    }

    // Validation against the pool and readiness.
    let capacity = status.capacity_bytes.or(area.spec.size_bytes).unwrap_or(0);
    let (ready, reason, message) = match &pool {
        None => (
            false,
            "PoolNotFound",
            format!("StoragePool {} does not exist", area.spec.pool_name),
        ),
        Some(pool) if capacity < pool.spec.extent_size_bytes => (
            false,
            "SmallerThanOneExtent",
            format!(
                "capacity {capacity} bytes is less than one extent of pool {} ({} bytes)",
                area.spec.pool_name, pool.spec.extent_size_bytes
            ),
        ),
        Some(_) if phase != Some(AreaPhase::Online) => (
            false,
            match phase {
                Some(AreaPhase::Offline) => "HeartbeatTimeout",
                Some(AreaPhase::Failed) => "Failed",
                _ => "WaitingForNode",
            },
            format!(
                "area is {}",
                phase.map_or("Pending".to_owned(), |p| format!("{p:?}"))
            ),
        ),
        Some(pool) => {
            let es = pool.spec.extent_size_bytes.max(1);
            let tail = capacity % es;
            (
                true,
                "Online",
                if tail == 0 {
                    format!("{} extents", capacity / es)
                } else {
                    format!(
                        "{} extents; the last {tail} bytes are not a whole extent and stay unused",
                        capacity / es
                    )
                },
            )
        }
    };
    let mut conditions = status.conditions.clone();
    set_condition(&mut conditions, "Ready", ready, reason, message, generation);

    let desired = json!({
        "phase": phase,
        "allocatedBytes": allocated.or(status.allocated_bytes),
        "conditions": conditions,
        "observedGeneration": generation,
    });
    let current = json!({
        "phase": status.phase,
        "allocatedBytes": status.allocated_bytes,
        "conditions": status.conditions,
        "observedGeneration": status.observed_generation,
    });
    if desired != current {
        // Conditional: a heartbeat written meanwhile must not be answered with a stale phase.
        patch_status(
            &Api::<StorageArea>::all(ctx.client.clone()),
            &name,
            desired,
            area.resource_version().as_deref(),
        )
        .await?;
        if let Some((type_, reason, note)) = event {
            ctx.publish(&reference(area), type_, reason, "Heartbeat", note, None)
                .await;
        }
    }
    // Come back when the heartbeat would expire.
    let requeue = match (phase, beat) {
        (Some(AreaPhase::Online), Some(b)) => {
            Duration::from_secs((b + timeout - now).max(1) as u64).min(ctx.config.resync)
        }
        _ => ctx.config.resync,
    };
    Ok(Action::requeue(requeue))
}

async fn cleanup(area: &StorageArea, ctx: &Context) -> Result<Action> {
    let Some((bytes, holders)) = usage_of_area(ctx, area).await? else {
        return Ok(Action::await_change());
    };
    if bytes == 0 {
        return Ok(Action::await_change());
    }
    let message = format!(
        "area {} still holds {bytes} allocated bytes of volumes {}; move them off first \
         (VolumeRemap EvacuateArea)",
        area.name_any(),
        holders.join(", ")
    );
    ctx.publish(
        &reference(area),
        EventType::Warning,
        "AreaInUse",
        "Delete",
        message.clone(),
        None,
    )
    .await;
    Err(Error::Blocked(message))
}
