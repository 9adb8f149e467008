//! MirrorPair: pair, split and resync of two VirtualVolumes with the secondary mount check
//! (seed 003; ARCHITECTURE §7; docs/mirror.md). The decisions are the pure planner's
//! ([`crate::planners::mirror`]); this controller feeds it events, persists its state, and carries
//! out its commands against the node plugins (node-control: MountInquiry, SetMirrorLeg,
//! CollectDirty, CopyToLeg, Quiesce/Resume).
//!
//! - **State.** The planner state, the dirty-report acknowledgements per node and the pending
//!   resumes are one JSON record in the annotation `tessera.io/mirror-state`, written with the
//!   pair's resourceVersion *before* any command is carried out (write-ahead). A restarted
//!   leader re-runs what the record says is in flight (inquiry round, copy pass, cut): every
//!   node step is idempotent.
//! - **Data path.** `status.mirror` on both volumes tells the nodes what to do: a node staging
//!   the primary opens the leg (`Mirror`/`Track`), the lenders of the secondary grant it to
//!   `writers`. The controller writes it before it tells the nodes already serving the primary.
//! - **Copies** (formation, resync) converge (docs/mirror.md §7): copy the set with writes
//!   mirrored and tracked, collect the bits of writes that raced, copy those, and finish with
//!   one pass under a hold of every node of the primary, so nothing is in flight when the pair
//!   is declared synchronized.
//! - **The split cut** holds every node of the primary, switches them to tracking with empty
//!   bitmaps and releases them: the secondary is an image of that instant (JP [0007]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use roaring::{RoaringBitmap, RoaringTreemap};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_api::v1alpha1::{
    CopyMode, CopyPolicy, MIRROR_ROLE_LABEL, MirrorLegMode, MirrorPair, MirrorPhase, MirrorRole,
    ReclaimTier, ReleaseRanges, RemapOperation, RemapOperationType, RemapPhase, VirtualVolume,
    VolumeRange, VolumeRemap, VolumeRemapSpec,
};

use super::coordinator::update_volume_status;
use super::node_control::{
    DirtyAnswer, LegMode, LegRequest, NodeCallError, NodeRequest, OperationRef as NodeOp,
};
use super::support::{field_manager, now, patch_status, reference, set_condition};
use super::view::{attached_nodes, extent_size};
use super::{Config, Context, Error, Informers, Result};
use crate::planners::ExtentRange;
use crate::planners::mirror::{
    Command, CopyKind, DataPath, Event, MirrorPairState, NodeAnswer, PairMembership, PairSetup,
    Resize, VolumeRole, VolumeView, check_named_secondary, select_secondary, step,
};

/// Controller name in metrics.
pub const NAME: &str = "mirror";
/// The controller's write-ahead record (JSON of [`Record`]).
pub const STATE_ANNOTATION: &str = "tessera.io/mirror-state";
pub const MIRROR_FINALIZER: &str = "tessera.io/mirrorpair-protection";

/// One node-control call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// One CopyToLeg batch.
const COPY_TIMEOUT: Duration = Duration::from_secs(300);
/// Extents per CopyToLeg call (progress is reported between batches).
const COPY_BATCH: u64 = 8;
/// Copy passes before the final pass under the hold, at most.
const CONVERGE_ROUNDS: usize = 4;
/// A pass this small goes straight to the final, held pass.
const FINAL_PASS_EXTENTS: u64 = 16;
/// Event reasons of a finished copy (with the extents and bytes it copied).
pub const REASON_FORMATION_COPY_COMPLETED: &str = "FormationCopyCompleted";
pub const REASON_RESYNC_COMPLETED: &str = "ResyncCompleted";
/// Requeue while split (the dirty bits are collected) or while a shift waits for an unmount.
const POLL: Duration = Duration::from_secs(5);

pub fn controller(informers: &Informers, _config: &Config) -> Controller<MirrorPair> {
    let store = informers.mirrors.store();
    // Only changes that matter trigger a reconcile: the pair's spec, deletion and finalizers
    // (not its own record and status writes, which would otherwise re-trigger it at once), and
    // of its volumes who may serve them and their mapping and link (not usage reports).
    let pairs = changed_only(informers.mirrors.subscribe(), |pair: &MirrorPair| {
        json!([
            pair.metadata.generation,
            pair.metadata.deletion_timestamp.is_some(),
            pair.finalizers(),
        ])
    });
    let volumes = changed_only(informers.volumes.subscribe(), |volume: &VirtualVolume| {
        let status = volume.status.as_ref();
        json!([
            nodes_of(volume),
            status
                .and_then(|s| s.mapping.as_ref())
                .map(|m| m.generation),
            status.and_then(|s| s.mirror.as_ref()),
            volume.metadata.deletion_timestamp.is_some(),
        ])
    });
    Controller::for_stream(pairs, informers.mirrors.store()).watches_stream(
        volumes,
        move |volume: VirtualVolume| {
            let name = volume.name_any();
            store
                .state()
                .iter()
                .filter(|p| {
                    p.spec.primary == name
                        || p.spec.secondary.as_deref() == Some(name.as_str())
                        || p.status.as_ref().and_then(|s| s.secondary_name.as_deref())
                            == Some(name.as_str())
                })
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        },
    )
}

/// The objects of `stream` whose `key` changed since the object was last seen.
fn changed_only<K: ResourceExt + Send + 'static, E: Send + 'static>(
    stream: impl futures::Stream<Item = Result<K, E>> + Send + 'static,
    key: impl Fn(&K) -> serde_json::Value + Send + 'static,
) -> impl futures::Stream<Item = Result<K, E>> + Send + 'static {
    use futures::StreamExt;
    let mut seen: std::collections::HashMap<String, serde_json::Value> = Default::default();
    stream.filter(move |item| {
        let changed = match item {
            Ok(object) => {
                let value = key(object);
                seen.insert(object.name_any(), value.clone()) != Some(value)
            }
            Err(_) => true,
        };
        futures::future::ready(changed)
    })
}

pub fn error_policy(_pair: Arc<MirrorPair>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy_for(NAME, error, &ctx)
}

pub async fn reconcile(pair: Arc<MirrorPair>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(NAME);
    ctx.stores.ready().await?;
    let api: Api<MirrorPair> = Api::all(ctx.client.clone());
    finalizer(&api, MIRROR_FINALIZER, pair, |event| async {
        match event {
            Finalizer::Apply(pair) => apply(pair, &ctx).await,
            Finalizer::Cleanup(pair) => cleanup(pair, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

/// What the controller persists besides the planner state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    state: MirrorPairState,
    /// Per node: the sequence of the last dirty answer whose bits are persisted or copied
    /// (acknowledged with the next collection).
    #[serde(default)]
    primary_acks: BTreeMap<String, u64>,
    #[serde(default)]
    secondary_acks: BTreeMap<String, u64>,
    /// Holds this controller set and could not release yet: node → (operation id, generation).
    #[serde(default)]
    pending_resumes: BTreeMap<String, (String, i64)>,
    /// The last data path could not be applied on every node: apply it again.
    #[serde(default)]
    path_pending: bool,
    /// Unix seconds of the last time the secondary was made equal to the primary.
    #[serde(default)]
    last_sync: Option<i64>,
}

struct Driver<'a> {
    ctx: &'a Context,
    pair: Arc<MirrorPair>,
    name: String,
    record: Record,
    /// The record as last written.
    written: Option<Record>,
    resource_version: Option<String>,
    events: VecDeque<Event>,
    /// Why the last SetDataPath failed (the copy that follows fails with it).
    path_error: Option<String>,
    /// Conditions as the planner set them, merged into the status.
    conditions: Vec<Condition>,
}

async fn apply(pair: Arc<MirrorPair>, ctx: &Context) -> Result<Action> {
    let record = match pair.annotations().get(STATE_ANNOTATION) {
        Some(text) => serde_json::from_str::<Record>(text)?,
        None => match setup(&pair, ctx).await? {
            Ok(record) => record,
            Err(wait) => return Ok(wait),
        },
    };
    let mut driver = Driver {
        ctx,
        name: pair.name_any(),
        resource_version: pair.resource_version(),
        conditions: pair
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        written: pair
            .annotations()
            .contains_key(STATE_ANNOTATION)
            .then(|| record.clone()),
        pair,
        record,
        events: VecDeque::new(),
        path_error: None,
    };
    driver.run().await
}

/// The first reconcile: the secondary (named or selected), the planner state, the volumes
/// linked. `Ok(Err(action))`: not possible yet (the status says why).
async fn setup(pair: &MirrorPair, ctx: &Context) -> Result<Result<Record, Action>> {
    let volumes: Api<VirtualVolume> = Api::all(ctx.client.clone());
    let pairs: Api<MirrorPair> = Api::all(ctx.client.clone());
    let name = pair.name_any();
    let waiting = |message: String| {
        let pairs = pairs.clone();
        let name = name.clone();
        async move {
            patch_status(
                &pairs,
                &name,
                json!({ "phase": MirrorPhase::Simplex, "message": message }),
                None,
            )
            .await?;
            Ok::<_, Error>(Err(Action::requeue(Duration::from_secs(10))))
        }
    };
    let Some(primary) = volumes.get_opt(&pair.spec.primary).await? else {
        return waiting(format!(
            "primary VirtualVolume {} does not exist",
            pair.spec.primary
        ))
        .await;
    };
    let Some(pool) = ctx
        .stores
        .pools
        .get(&ObjectRef::new(&primary.spec.pool_name))
    else {
        return waiting(format!(
            "pool {} of the primary is not known",
            primary.spec.pool_name
        ))
        .await;
    };
    if primary
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .is_none()
    {
        return waiting(format!("primary {} has no mapping yet", pair.spec.primary)).await;
    }
    let es = extent_size(&pool)?.get();
    let primary_view = volume_view(&primary, es, &name);
    // A secondary chosen earlier and being resized (ResizeToMatch) is kept: selecting again
    // could pick another volume, or the same one for the same resize again.
    let resizing = pair
        .status
        .as_ref()
        .and_then(|s| s.secondary_name.clone())
        .filter(|_| pair.spec.secondary.is_none());
    if let Some(chosen) = &resizing {
        match resize_progress(pair, ctx, chosen, &primary).await? {
            Ok(()) => {}
            Err(message) => return waiting(message).await,
        }
    }
    let selection = match resizing.as_ref().or(pair.spec.secondary.as_ref()) {
        Some(secondary) => {
            let Some(object) = volumes.get_opt(secondary).await? else {
                return waiting(format!(
                    "secondary VirtualVolume {secondary} does not exist"
                ))
                .await;
            };
            check_named_secondary(&primary_view, &volume_view(&object, es, &name))
        }
        None => {
            let selection = pair
                .spec
                .secondary_selection
                .unwrap_or(tessera_api::v1alpha1::SecondarySelection::SameSize);
            let candidates: Vec<VolumeView> = ctx
                .stores
                .volumes
                .state()
                .iter()
                .filter(|v| {
                    v.labels().get(MIRROR_ROLE_LABEL).map(String::as_str)
                        == Some("SecondaryCandidate")
                })
                .map(|v| volume_view(v, es, &name))
                .collect();
            let unallocated = pool
                .status
                .as_ref()
                .map_or(0, |s| u64::try_from(s.unallocated_bytes).unwrap_or(0) / es);
            select_secondary(&primary_view, selection, &candidates, unallocated)
        }
    };
    let selection = match selection {
        Ok(selection) => selection,
        Err(error) => {
            let message = error.to_string();
            ctx.publish(
                &reference(pair),
                EventType::Warning,
                error.reason(),
                "SelectSecondary",
                message.clone(),
                None,
            )
            .await;
            return waiting(message).await;
        }
    };
    if selection.resize != Resize::None {
        let message = start_resize(pair, ctx, &selection, &primary, es).await?;
        ctx.publish(
            &reference(pair),
            EventType::Normal,
            "SecondaryResizing",
            "SelectSecondary",
            message.clone(),
            None,
        )
        .await;
        patch_status(
            &pairs,
            &name,
            json!({ "phase": MirrorPhase::Simplex, "secondaryName": selection.secondary, "message": message }),
            None,
        )
        .await?;
        return Ok(Err(Action::requeue(Duration::from_secs(2))));
    }
    let extents = u64::try_from(primary.spec.size_bytes)
        .unwrap_or(0)
        .div_ceil(es);
    let state = MirrorPairState::new(PairSetup::from_spec(
        &pair.spec,
        selection.secondary.clone(),
        extents,
        es,
    ));
    let record = Record {
        state,
        primary_acks: BTreeMap::new(),
        secondary_acks: BTreeMap::new(),
        pending_resumes: BTreeMap::new(),
        path_pending: false,
        last_sync: None,
    };
    // The pair flag on both volumes (JP pair flag 203), refused if either is in another pair.
    for (volume, role, peer) in [
        (
            &pair.spec.primary,
            MirrorRole::Primary,
            &selection.secondary,
        ),
        (
            &selection.secondary,
            MirrorRole::Secondary,
            &pair.spec.primary,
        ),
    ] {
        let taken = std::sync::Mutex::new(None);
        update_volume_status(ctx, volume, |v| {
            match v.status.as_ref().and_then(|s| s.mirror.as_ref()) {
                Some(link) if link.pair != name => {
                    *taken.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.pair.clone());
                    None
                }
                Some(_) => None,
                None => Some(json!({ "mirror": {
                    "pair": name, "role": role, "peer": peer, "leg": MirrorLegMode::Unpaired,
                }})),
            }
        })
        .await?;
        let taken = taken.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(other) = taken {
            return waiting(format!("volume {volume} is already in mirror pair {other}")).await;
        }
    }
    Ok(Ok(record))
}

/// The VolumeRemap that returns a selected secondary's tail (ResizeToMatch).
fn resize_remap_name(pair: &str) -> String {
    format!("mirror-resize-{pair}")
}

/// ResizeToMatch (JP Fig. 24, S2202/S2203; M-15): return the tail beyond the primary's size by a
/// `releaseRanges` VolumeRemap (its data is discarded: the formation overwrites the rest), or grow
/// the secondary through its StorageClaim (D-33). Returns what the status says meanwhile.
async fn start_resize(
    pair: &MirrorPair,
    ctx: &Context,
    selection: &crate::planners::mirror::Selection,
    primary: &VirtualVolume,
    es: u64,
) -> Result<String> {
    let secondary = &selection.secondary;
    match selection.resize {
        Resize::None => Ok(String::new()),
        Resize::Return { range } => {
            let remaps: Api<VolumeRemap> = Api::all(ctx.client.clone());
            let spec = VolumeRemapSpec {
                volume_name: secondary.clone(),
                operation: RemapOperation {
                    type_: RemapOperationType::ReleaseRanges,
                    r#move: None,
                    evacuate_area: None,
                    release_ranges: Some(ReleaseRanges {
                        ranges: vec![VolumeRange {
                            offset: (range.start * es) as i64,
                            length: (range.len * es) as i64,
                        }],
                        tier: ReclaimTier::LowPriority,
                        discard: true,
                    }),
                },
                copy: CopyPolicy {
                    mode: CopyMode::None,
                    ..Default::default()
                },
                policy: Default::default(),
            };
            let name = resize_remap_name(&pair.name_any());
            match remaps
                .create(&Default::default(), &VolumeRemap::new(&name, spec))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            Ok(format!(
                "secondary {secondary} is larger than the primary: its extents {range} beyond \
                 the primary's size are returned to the pool (VolumeRemap {name}; their data is \
                 discarded)"
            ))
        }
        Resize::Add { extents } => {
            let volumes: Api<VirtualVolume> = Api::all(ctx.client.clone());
            let object = volumes.get(secondary).await?;
            let Some(claim) = object.spec.claim_ref.clone() else {
                return Ok(format!(
                    "secondary {secondary} needs {extents} more extents but has no StorageClaim \
                     to grow: name a secondary of at least the primary's size"
                ));
            };
            let claims: Api<tessera_api::v1alpha1::StorageClaim> =
                Api::namespaced(ctx.client.clone(), &claim.namespace);
            let size = primary.spec.size_bytes;
            let current = claims.get(&claim.name).await?;
            if current.spec.size_bytes < size {
                claims
                    .patch(
                        &claim.name,
                        &field_manager(),
                        &Patch::Merge(json!({ "spec": { "sizeBytes": size } })),
                    )
                    .await?;
            }
            Ok(format!(
                "secondary {secondary} is smaller than the primary: its StorageClaim {}/{} grows \
                 by {extents} extents to {size} bytes",
                claim.namespace, claim.name
            ))
        }
    }
}

/// Whether the resize of the chosen secondary is done: `Ok(Err(message))` while it runs.
async fn resize_progress(
    pair: &MirrorPair,
    ctx: &Context,
    chosen: &str,
    primary: &VirtualVolume,
) -> Result<Result<(), String>> {
    let remaps: Api<VolumeRemap> = Api::all(ctx.client.clone());
    if let Some(remap) = remaps.get_opt(&resize_remap_name(&pair.name_any())).await? {
        let status = remap.status.unwrap_or_default();
        return Ok(match status.phase {
            Some(RemapPhase::Succeeded) => Ok(()),
            Some(RemapPhase::Failed | RemapPhase::FailedRecovery) => Err(format!(
                "returning the tail of secondary {chosen} failed: {}",
                status.message.unwrap_or_default()
            )),
            _ => Err(format!("returning the tail of secondary {chosen}")),
        });
    }
    let volumes: Api<VirtualVolume> = Api::all(ctx.client.clone());
    let Some(object) = volumes.get_opt(chosen).await? else {
        return Ok(Err(format!("secondary {chosen} is gone")));
    };
    let mapped = object
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .is_some_and(|m| {
            m.extents.iter().map(|r| r.offset + r.length).max() >= Some(primary.spec.size_bytes)
        });
    if object.spec.size_bytes < primary.spec.size_bytes || !mapped {
        return Ok(Err(format!(
            "growing secondary {chosen} to {} bytes",
            primary.spec.size_bytes
        )));
    }
    Ok(Ok(()))
}

/// The planner's view of a volume: role from the label, pair side from `status.mirror` (a
/// link of this very pair counts as unpaired: a restarted setup finds its own links).
fn volume_view(volume: &VirtualVolume, extent_size: u64, pair: &str) -> VolumeView {
    let role = match volume.labels().get(MIRROR_ROLE_LABEL).map(String::as_str) {
        Some("SecondaryCandidate") => VolumeRole::SecondaryCandidate,
        _ => VolumeRole::Normal,
    };
    let membership = match volume.status.as_ref().and_then(|s| s.mirror.as_ref()) {
        Some(link) if link.pair != pair => match link.role {
            MirrorRole::Primary => PairMembership::Primary,
            MirrorRole::Secondary => PairMembership::Secondary,
        },
        _ => PairMembership::Unpaired,
    };
    VolumeView {
        name: volume.name_any(),
        size_extents: u64::try_from(volume.spec.size_bytes)
            .unwrap_or(0)
            .div_ceil(extent_size.max(1)),
        pool: volume.spec.pool_name.clone(),
        role,
        pair: membership,
    }
}

/// Nodes that may have `volume` staged: its access nodes and its attachments.
fn nodes_of(volume: &VirtualVolume) -> Vec<String> {
    let mut nodes = attached_nodes(volume);
    nodes.sort();
    nodes.dedup();
    nodes
}

fn to_bitmap(set: &RoaringTreemap) -> RoaringBitmap {
    set.iter().filter_map(|e| u32::try_from(e).ok()).collect()
}

fn from_bitmap(set: &RoaringBitmap) -> RoaringTreemap {
    set.iter().map(u64::from).collect()
}

/// The extents a dirty answer names: every extent when the node lost bits (it restarted);
/// empty bytes are none.
fn dirty_bits(answer: &DirtyAnswer, extents: u64) -> Result<RoaringTreemap, String> {
    if !answer.complete {
        return Ok(full(extents));
    }
    if answer.extents.is_empty() {
        return Ok(RoaringTreemap::new());
    }
    RoaringBitmap::deserialize_from(&answer.extents[..])
        .map(|bits| from_bitmap(&bits))
        .map_err(|e| format!("undecodable dirty bits: {e}"))
}

/// Extents `[0, extents)`.
fn full(extents: u64) -> RoaringTreemap {
    let mut set = RoaringTreemap::new();
    set.insert_range(0..extents);
    set
}

fn bitmap_bytes(set: &RoaringBitmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(set.serialized_size());
    // Writing to a Vec cannot fail.
    let _ = set.serialize_into(&mut out);
    out
}

fn ranges_of(set: &RoaringTreemap) -> Vec<ExtentRange> {
    crate::planners::mirror::extent_ranges(set)
}

impl Driver<'_> {
    fn primary(&self) -> String {
        self.record.state.primary().to_string()
    }

    fn secondary(&self) -> String {
        self.record.state.secondary().to_string()
    }

    async fn volume(&self, name: &str) -> Result<VirtualVolume> {
        let volumes: Api<VirtualVolume> = Api::all(self.ctx.client.clone());
        volumes.get_opt(name).await?.ok_or_else(|| {
            Error::Stale(format!(
                "VirtualVolume {name} of pair {} is gone",
                self.name
            ))
        })
    }

    async fn run(&mut self) -> Result<Action> {
        self.retry_resumes().await;
        let spec = self.pair.spec.clone();
        let state = &self.record.state;
        if spec.desired_state != state.desired() {
            self.events
                .push_back(Event::DesiredStateChanged(spec.desired_state));
        }
        if spec.mount_check != state.mount_check() {
            self.events
                .push_back(Event::MountCheckPolicyChanged(spec.mount_check));
        }
        if spec.override_mount_check != state.override_mount_check() {
            self.events
                .push_back(Event::OverrideSet(spec.override_mount_check));
        }
        let primary = self.volume(&self.primary()).await?;
        let secondary = self.volume(&self.secondary()).await?;
        let copying = primary
            .status
            .as_ref()
            .and_then(|s| s.mirror.as_ref())
            .is_some_and(|l| l.copying);
        if copying && self.record.state.copy_in_flight().is_none() {
            self.set_copying(false).await?;
        }
        if self.record.path_pending {
            let path = self.record.state.data_path();
            if self.apply_path(path).await.is_ok() {
                self.record.path_pending = false;
            }
        } else if self.record.state.data_path() == DataPath::Mirror {
            self.refresh_writers(&primary, &secondary).await?;
        }
        self.collect_tracked(&primary, &secondary).await;
        let accessors: BTreeSet<String> = nodes_of(&secondary).into_iter().collect();
        self.events.push_back(Event::Reconcile { accessors });
        self.redo_in_flight().await?;
        self.drive().await?;
        self.persist().await?;
        self.write_status().await?;
        let state = &self.record.state;
        self.ctx
            .metrics
            .set_mirror_dirty_bytes(&self.name, state.dirty_bytes());
        Ok(
            if state.is_blocked()
                || matches!(state.phase(), MirrorPhase::Split | MirrorPhase::Failed)
                || self.record.path_pending
                || !self.record.pending_resumes.is_empty()
            {
                Action::requeue(POLL)
            } else {
                Action::requeue(self.ctx.config.resync)
            },
        )
    }

    /// A restarted controller (or one whose last reconcile failed half-way) re-runs what the
    /// record says is in flight; the answers go to the planner like fresh ones.
    async fn redo_in_flight(&mut self) -> Result<()> {
        let state = &self.record.state;
        let mut commands = Vec::new();
        if let Some((op, nodes)) = state.mount_check_round() {
            commands.push(Command::StartMountCheck { op, nodes });
        }
        if let (Some((op, kind)), Some(extents)) =
            (state.copy_in_flight(), state.copy_pass_extents())
        {
            // The data path may not have reached every node before the interruption.
            commands.push(Command::SetDataPath(DataPath::Mirror));
            commands.push(Command::StartCopy {
                op,
                kind,
                ranges: ranges_of(&extents),
            });
        }
        if let Some(op) = state.cut_in_flight() {
            commands.push(Command::QuiesceAndCut { op });
        }
        for command in commands {
            tracing::info!(pair = %self.name, ?command, "re-running an interrupted step");
            self.execute(command).await?;
        }
        Ok(())
    }

    /// Feeds the queued events to the planner; the record is written before the commands of
    /// each step are carried out, and the commands' answers are queued in turn.
    async fn drive(&mut self) -> Result<()> {
        while let Some(event) = self.events.pop_front() {
            let before = self.record.state.clone();
            let (state, commands) = step(before.clone(), event);
            self.record.state = state;
            if commands.is_empty() {
                continue;
            }
            self.persist().await?;
            for command in commands {
                self.execute(command).await?;
            }
        }
        Ok(())
    }

    async fn execute(&mut self, command: Command) -> Result<()> {
        match command {
            Command::StartMountCheck { op, nodes } => {
                let answers = self.inquire(&nodes).await;
                self.events
                    .push_back(Event::MountCheckResult { op, answers });
            }
            Command::SetDataPath(path) => {
                self.path_error = None;
                if let Err(cause) = self.apply_path(path).await {
                    tracing::warn!(pair = %self.name, ?path, %cause, "data path not applied everywhere");
                    self.record.path_pending = true;
                    self.path_error = Some(cause);
                } else {
                    self.record.path_pending = false;
                }
            }
            Command::StartCopy { op, kind, ranges } => {
                let mut extents = RoaringTreemap::new();
                for r in &ranges {
                    extents.insert_range(r.start..r.end());
                }
                let outcome = match self.path_error.clone() {
                    Some(cause) => Err(format!("the mirror leg could not be set up: {cause}")),
                    None => self.converge(op, kind, &extents).await,
                };
                if let Ok(copied) = &outcome {
                    let what = match kind {
                        CopyKind::Formation => "formation copy",
                        CopyKind::Resync => "resync pass",
                    };
                    // One event per copy: kube's recorder folds events of equal reason and
                    // action into one series that keeps the first note.
                    let (reason, action) = match kind {
                        CopyKind::Formation => (REASON_FORMATION_COPY_COMPLETED, "FormationCopy"),
                        CopyKind::Resync => (REASON_RESYNC_COMPLETED, "Resync"),
                    };
                    self.event_with_action(
                        EventType::Normal,
                        reason,
                        &format!("{action}-{op}"),
                        format!(
                            "{what} {op} of {} → {} copied {} extents ({} bytes) in {:.2} s: {} \
                             asked for, {} again after writes that raced with the copy, {} in \
                             the final pass under the hold",
                            self.primary(),
                            self.secondary(),
                            copied.extents,
                            copied.bytes,
                            copied.seconds,
                            extents.len(),
                            copied.recopied,
                            copied.held
                        ),
                    )
                    .await;
                }
                self.events.push_back(match (kind, outcome) {
                    (CopyKind::Formation, Ok(_)) => Event::FormationCopyDone { op },
                    (CopyKind::Resync, Ok(_)) => Event::ResyncDone { op },
                    (CopyKind::Formation, Err(cause)) => Event::FormationCopyFailed { op, cause },
                    (CopyKind::Resync, Err(cause)) => Event::ResyncFailed { op, cause },
                });
            }
            // Copies run inside the reconcile; nothing runs in the background to cancel.
            Command::CancelCopy { .. } => {}
            Command::QuiesceAndCut { op } => {
                let event = match self.cut(op).await {
                    Ok(()) => Event::SplitCutDone { op },
                    Err(cause) => Event::SplitCutFailed { op, cause },
                };
                self.events.push_back(event);
            }
            Command::ClearDirty => {
                // The nodes' bits were acknowledged as they were copied; the secondary equals
                // the primary from here on.
                self.record.last_sync = Some(now().as_second());
            }
            Command::Warn { reason, message } => {
                self.event(EventType::Warning, reason, message).await;
            }
            Command::Note { reason, message } => {
                self.event(EventType::Normal, reason, message).await;
            }
            Command::SetCondition {
                kind,
                status,
                reason,
                message,
            } => {
                set_condition(
                    &mut self.conditions,
                    kind,
                    status,
                    reason,
                    message,
                    self.pair.metadata.generation,
                );
            }
        }
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, message: String) {
        // The console messages of seed 003 become events and `status.message`.
        self.event_with_action(type_, reason, "Mirror", message)
            .await;
    }

    async fn event_with_action(
        &self,
        type_: EventType,
        reason: &str,
        action: &str,
        message: String,
    ) {
        self.ctx
            .publish(
                &reference(self.pair.as_ref()),
                type_,
                reason,
                action,
                message,
                None,
            )
            .await;
    }

    /// Seed 003 claim 1 "inquiring": each reachable node answers from its records and mount
    /// table; a node that does not answer is left out (the planner counts it as NoAnswer).
    async fn inquire(&self, nodes: &[String]) -> BTreeMap<String, NodeAnswer> {
        let secondary = self.secondary();
        let calls = nodes.iter().map(|node| {
            let call = self
                .ctx
                .node_control
                .mount_inquiry(node, &secondary, CALL_TIMEOUT);
            async move { (node.clone(), call.await) }
        });
        let mut answers = BTreeMap::new();
        for (node, answer) in futures::future::join_all(calls).await {
            match answer {
                Ok(a) => {
                    let answer = if a.mounted {
                        NodeAnswer::Mounted
                    } else if a.published {
                        NodeAnswer::Published
                    } else if a.staged {
                        NodeAnswer::Staged
                    } else {
                        NodeAnswer::NotInUse
                    };
                    answers.insert(node, answer);
                }
                Err(error) => {
                    tracing::warn!(pair = %self.name, %node, %error, "mount inquiry unanswered");
                }
            }
        }
        answers
    }

    /// Writes `status.mirror` of both volumes for `path`, then sets the leg on every node that
    /// may serve the primary (nodes that stage it later read the status).
    async fn apply_path(&self, path: DataPath) -> Result<(), String> {
        let primary = self
            .volume(&self.primary())
            .await
            .map_err(|e| e.to_string())?;
        let nodes = nodes_of(&primary);
        let (leg, mode, writers) = match path {
            DataPath::Mirror => (MirrorLegMode::Mirror, LegMode::Mirror, nodes.clone()),
            DataPath::Track => (MirrorLegMode::Track, LegMode::Track, Vec::new()),
            DataPath::Unpaired => (MirrorLegMode::Unpaired, LegMode::None, Vec::new()),
        };
        // Grants first (the nodes probe them when they open the leg), then the primary's mode.
        self.link(&self.secondary(), MirrorRole::Secondary, leg, &writers)
            .await
            .map_err(|e| e.to_string())?;
        self.link(&self.primary(), MirrorRole::Primary, leg, &[])
            .await
            .map_err(|e| e.to_string())?;
        let failures = self.set_legs(&nodes, mode, None).await;
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    }

    /// `status.mirror` of one volume of the pair (only if it is linked to this pair).
    async fn link(
        &self,
        volume: &str,
        role: MirrorRole,
        leg: MirrorLegMode,
        writers: &[String],
    ) -> Result<()> {
        let name = self.name.clone();
        let peer = match role {
            MirrorRole::Primary => self.secondary(),
            MirrorRole::Secondary => self.primary(),
        };
        update_volume_status(self.ctx, volume, |v| {
            let current = v.status.as_ref().and_then(|s| s.mirror.as_ref());
            if current.is_some_and(|l| l.pair != name) {
                return None;
            }
            let wanted = json!({
                "pair": name, "role": role, "peer": peer, "leg": leg, "writers": writers,
            });
            let same = current
                .is_some_and(|l| l.leg == leg && l.role == role && l.writers.as_slice() == writers);
            (!same).then(|| json!({ "mirror": wanted }))
        })
        .await
    }

    /// While writes are mirrored, every node that may serve the primary must be able to write
    /// the secondary: a node published later is added to `writers`.
    async fn refresh_writers(
        &self,
        primary: &VirtualVolume,
        secondary: &VirtualVolume,
    ) -> Result<()> {
        let nodes = nodes_of(primary);
        let current = secondary
            .status
            .as_ref()
            .and_then(|s| s.mirror.as_ref())
            .map(|l| l.writers.clone())
            .unwrap_or_default();
        if current != nodes {
            self.link(
                &self.secondary(),
                MirrorRole::Secondary,
                MirrorLegMode::Mirror,
                &nodes,
            )
            .await?;
        }
        Ok(())
    }

    /// SetMirrorLeg on every node; the failures, named.
    async fn set_legs(&self, nodes: &[String], mode: LegMode, cut: Option<&str>) -> Vec<String> {
        let request = LegRequest {
            volume: self.primary(),
            secondary: self.secondary(),
            mode,
            reset_cut: cut.map(str::to_string),
        };
        let calls = nodes.iter().map(|node| {
            let call = self
                .ctx
                .node_control
                .set_mirror_leg(node, request.clone(), CALL_TIMEOUT);
            async move { (node.clone(), call.await) }
        });
        let mut failures = Vec::new();
        for (node, result) in futures::future::join_all(calls).await {
            match result {
                Ok(answer) if !answer.failure.is_empty() && mode == LegMode::Mirror => {
                    failures.push(format!("{node}: the secondary failed: {}", answer.failure));
                }
                Ok(_) => {}
                Err(error) => failures.push(format!("{node}: {error}")),
            }
        }
        failures
    }

    /// While the pair tracks (split, or a failed resync), the bits of the primary's nodes and of
    /// the nodes that used the secondary on its own become planner events. Acknowledged only
    /// with the next collection, after the record holding them was written.
    async fn collect_tracked(&mut self, primary: &VirtualVolume, secondary: &VirtualVolume) {
        let tracking = match self.record.state.phase() {
            MirrorPhase::Split => true,
            MirrorPhase::Failed => self.record.state.data_path() == DataPath::Track,
            _ => false,
        };
        if !tracking {
            return;
        }
        let primary_nodes = self.with_area_nodes(primary);
        let secondary_nodes = self.with_area_nodes(secondary);
        let extents = self.record.state.extents();
        let (dirty, acks) = self
            .collect(
                &self.primary(),
                &primary_nodes,
                &self.record.primary_acks.clone(),
                extents,
            )
            .await;
        self.record.primary_acks.extend(acks);
        if !dirty.is_empty() {
            self.events.push_back(Event::PrimaryWrite {
                extents: ranges_of(&dirty),
            });
        }
        let (changed, acks) = self
            .collect(
                &self.secondary(),
                &secondary_nodes,
                &self.record.secondary_acks.clone(),
                extents,
            )
            .await;
        self.record.secondary_acks.extend(acks);
        if !changed.is_empty() {
            self.events.push_back(Event::SecondaryWrite {
                extents: ranges_of(&changed),
            });
        }
    }

    /// The nodes that may hold dirty bits of `volume`: those that may have it staged, and every
    /// node with an area (a node that unstaged it keeps its bits in a file until collected).
    fn with_area_nodes(&self, volume: &VirtualVolume) -> Vec<String> {
        let mut nodes: BTreeSet<String> = nodes_of(volume).into_iter().collect();
        for area in self.ctx.stores.areas.state() {
            nodes.insert(area.spec.node_name.clone());
        }
        nodes.into_iter().collect()
    }

    /// CollectDirty of `volume` on `nodes`, acknowledging `acks`: the union of the bits (every
    /// extent when a node lost some) and the new sequences. Unreachable nodes are skipped:
    /// their bits wait on the node.
    async fn collect(
        &self,
        volume: &str,
        nodes: &[String],
        acks: &BTreeMap<String, u64>,
        extents: u64,
    ) -> (RoaringTreemap, BTreeMap<String, u64>) {
        let mut union = RoaringTreemap::new();
        let mut sequences = BTreeMap::new();
        for (node, answer) in self.ask_dirty(volume, nodes, acks).await {
            match answer {
                Ok(answer) => {
                    union |= dirty_bits(&answer, extents).unwrap_or_else(|error| {
                        tracing::warn!(pair = %self.name, %node, %volume, %error,
                            "every extent counts as dirty");
                        full(extents)
                    });
                    if answer.sequence != 0 {
                        sequences.insert(node, answer.sequence);
                    }
                }
                Err(error) => {
                    tracing::debug!(pair = %self.name, %node, %volume, %error, "dirty bits not collected");
                }
            }
        }
        (union, sequences)
    }

    /// CollectDirty of `volume` on every node of `nodes`, acknowledging `acks`.
    async fn ask_dirty(
        &self,
        volume: &str,
        nodes: &[String],
        acks: &BTreeMap<String, u64>,
    ) -> Vec<(String, Result<DirtyAnswer, NodeCallError>)> {
        let calls = nodes.iter().map(|node| {
            let ack = acks.get(node).copied().unwrap_or(0);
            let call = self
                .ctx
                .node_control
                .collect_dirty(node, volume, ack, CALL_TIMEOUT);
            async move { (node.clone(), call.await) }
        });
        futures::future::join_all(calls).await
    }

    /// Formation copy or resync pass (docs/mirror.md §7 "converge"): the data path is Mirror on
    /// every node (writes reach both volumes and mark their extents). Copy the set; collect the
    /// bits of writes that raced with it and copy those; then hold every node of the primary,
    /// collect once more (nothing is in flight) and copy the rest while held. Returns the bytes
    /// copied.
    async fn converge(
        &mut self,
        op: u64,
        kind: CopyKind,
        set: &RoaringTreemap,
    ) -> Result<CopyOutcome, String> {
        let started = std::time::Instant::now();
        // New nodes wait with their NodeStage until the copy ends (M-26), so the nodes read
        // below are every node that can write the primary during the copy.
        self.set_copying(true).await.map_err(|e| e.to_string())?;
        let result = self.converge_copying(op, kind, set, started).await;
        if let Err(e) = self.set_copying(false).await {
            // `run` clears a flag left behind when no copy is in flight.
            tracing::warn!(pair = %self.name, error = %e, "copying flag not cleared");
        }
        result
    }

    /// `status.mirror.copying` of the primary.
    async fn set_copying(&self, copying: bool) -> Result<()> {
        let name = self.name.clone();
        update_volume_status(self.ctx, &self.primary(), |v| {
            let link = v.status.as_ref().and_then(|s| s.mirror.as_ref())?;
            (link.pair == name && link.copying != copying)
                .then(|| json!({ "mirror": { "copying": copying } }))
        })
        .await
    }

    async fn converge_copying(
        &mut self,
        op: u64,
        kind: CopyKind,
        set: &RoaringTreemap,
        started: std::time::Instant,
    ) -> Result<CopyOutcome, String> {
        let primary = self
            .volume(&self.primary())
            .await
            .map_err(|e| e.to_string())?;
        // Held at the end: the nodes that may serve the primary. Asked for bits: those and
        // every node that may keep bits of it in a file.
        let nodes = nodes_of(&primary);
        let others: Vec<String> = self
            .with_area_nodes(&primary)
            .into_iter()
            .filter(|n| !nodes.contains(n))
            .collect();
        let extents = self.record.state.extents();
        let mut acks = self.record.primary_acks.clone();
        // Bits kept in files by nodes that no longer serve the primary (an unreachable one
        // keeps them for the next collection).
        let (kept, sequences) = self.collect(&self.primary(), &others, &acks, extents).await;
        acks.extend(sequences);
        // The copier: a node that serves the primary (the first collection tells which).
        let (mut pass, sequences, staged) = self.collect_staged(&nodes, &acks, extents).await?;
        acks.extend(sequences);
        pass |= kept;
        let Some(copier) = staged.first().cloned() else {
            if !nodes.is_empty() {
                return Err(format!(
                    "primary {} is published to {nodes:?} but staged on none of them; the copy \
                     runs once a node serves it or none may",
                    self.primary()
                ));
            }
            return self
                .copy_unused(op, kind, &(pass | set), &primary, started)
                .await;
        };
        pass |= set;
        let total = pass.len().max(1);
        let first = pass.len();
        let mut copied_bytes = 0u64;
        let mut copied_extents = 0u64;
        for round in 0..CONVERGE_ROUNDS {
            if round > 0 && pass.len() <= FINAL_PASS_EXTENTS {
                break;
            }
            copied_bytes += self
                .copy_batches(op, kind, &copier, &pass, false, &mut copied_extents, total)
                .await?;
            let (dirty, sequences, _) = self.collect_staged(&nodes, &acks, extents).await?;
            acks.extend(sequences);
            pass = dirty;
        }
        let before_hold = copied_extents;
        // The final pass under a hold of every node of the primary.
        let hold = NodeOp {
            volume: self.primary(),
            operation_id: format!("mirror-{}-{op}-final", self.name),
            attempt: 1,
            generation: generation_of(&primary),
        };
        let held = self.quiesce(&nodes, &hold).await;
        let result = async {
            let held_nodes = held.as_ref().map_err(Clone::clone)?;
            let (dirty, sequences, _) = self.collect_staged(held_nodes, &acks, extents).await?;
            pass |= dirty;
            let bytes = self
                .copy_batches(op, kind, &copier, &pass, true, &mut copied_extents, total)
                .await?;
            Ok::<(u64, BTreeMap<String, u64>), String>((bytes, sequences))
        }
        .await;
        let asked = match &held {
            Ok(nodes) => nodes.clone(),
            Err(_) => nodes.clone(),
        };
        self.resume(&asked, &hold).await;
        let (bytes, sequences) = result?;
        acks.extend(sequences);
        copied_bytes += bytes;
        // Everything collected is copied: the acknowledgements can go out with the next call.
        self.record.primary_acks = acks;
        let seconds = started.elapsed().as_secs_f64();
        self.ctx
            .metrics
            .count_mirror_copy(&self.name, copied_bytes, seconds);
        tracing::info!(pair = %self.name, op, ?kind, copied_bytes, seconds, "mirror copy converged");
        Ok(CopyOutcome {
            extents: copied_extents,
            bytes: copied_bytes,
            seconds,
            recopied: before_hold.saturating_sub(first),
            held: copied_extents - before_hold,
        })
    }

    /// The copy of a primary no node may write (no access node, and NodeStage waits for
    /// `copying`): one pass through a private engine on the node of the primary's first area,
    /// which both volumes' lenders grant for the copy (`writers`); no dirty bits, no hold (M-23).
    async fn copy_unused(
        &mut self,
        op: u64,
        kind: CopyKind,
        set: &RoaringTreemap,
        primary: &VirtualVolume,
        started: std::time::Instant,
    ) -> Result<CopyOutcome, String> {
        let copier = primary
            .status
            .as_ref()
            .and_then(|s| s.mapping.as_ref())
            .and_then(|m| m.extents.iter().find_map(|r| r.replicas.first()))
            .and_then(|r| self.ctx.stores.areas.get(&ObjectRef::new(&r.area)))
            .map(|area| area.spec.node_name.clone())
            .ok_or_else(|| {
                format!(
                    "primary {} has no mapped extent on a known area",
                    self.primary()
                )
            })?;
        let writers = [copier.clone()];
        let granted = async {
            self.link(
                &self.secondary(),
                MirrorRole::Secondary,
                MirrorLegMode::Mirror,
                &writers,
            )
            .await?;
            self.link(
                &self.primary(),
                MirrorRole::Primary,
                MirrorLegMode::Mirror,
                &writers,
            )
            .await
        }
        .await;
        let result = match granted {
            Ok(()) => {
                let mut copied = 0;
                let total = set.len().max(1);
                self.copy_batches(op, kind, &copier, set, false, &mut copied, total)
                    .await
                    .map(|bytes| (copied, bytes))
            }
            Err(e) => Err(e.to_string()),
        };
        // The grants end with the copy.
        let ungranted = async {
            self.link(
                &self.primary(),
                MirrorRole::Primary,
                MirrorLegMode::Mirror,
                &[],
            )
            .await?;
            self.link(
                &self.secondary(),
                MirrorRole::Secondary,
                MirrorLegMode::Mirror,
                &[],
            )
            .await
        }
        .await;
        if let Err(e) = ungranted {
            tracing::warn!(pair = %self.name, error = %e, "copier grants not withdrawn");
        }
        let (extents, bytes) = result?;
        let seconds = started.elapsed().as_secs_f64();
        self.ctx
            .metrics
            .count_mirror_copy(&self.name, bytes, seconds);
        Ok(CopyOutcome {
            extents,
            bytes,
            seconds,
            recopied: 0,
            held: 0,
        })
    }

    /// CollectDirty on `nodes`: the bits (all on an incomplete answer), the new sequences and
    /// the nodes that serve the primary. An unreachable node fails the copy: its writes could be
    /// anywhere.
    async fn collect_staged(
        &self,
        nodes: &[String],
        acks: &BTreeMap<String, u64>,
        extents: u64,
    ) -> Result<(RoaringTreemap, BTreeMap<String, u64>, Vec<String>), String> {
        let mut union = RoaringTreemap::new();
        let mut sequences = BTreeMap::new();
        let mut staged = Vec::new();
        for (node, answer) in self.ask_dirty(&self.primary(), nodes, acks).await {
            let answer = answer.map_err(|e| format!("{node}: {e}"))?;
            // Absent: not staged there, but a node that unstaged the primary keeps the bits of
            // its last writes in a file until they are acknowledged.
            if answer.leg.state != "Absent" {
                if !answer.leg.failure.is_empty() {
                    return Err(format!(
                        "{node}: the secondary failed a write: {}",
                        answer.leg.failure
                    ));
                }
                staged.push(node.clone());
            }
            union |= dirty_bits(&answer, extents).map_err(|e| format!("{node}: {e}"))?;
            if answer.sequence != 0 {
                sequences.insert(node, answer.sequence);
            }
        }
        Ok((union, sequences, staged))
    }

    /// Copies `pass` on `copier` in batches, reporting progress to the planner and the status.
    #[allow(clippy::too_many_arguments)]
    async fn copy_batches(
        &mut self,
        op: u64,
        kind: CopyKind,
        copier: &str,
        pass: &RoaringTreemap,
        held: bool,
        copied: &mut u64,
        total: u64,
    ) -> Result<u64, String> {
        let extents: Vec<u64> = pass.iter().collect();
        let mut bytes = 0;
        for batch in extents.chunks(COPY_BATCH as usize) {
            let set: RoaringTreemap = batch.iter().copied().collect();
            bytes += self
                .ctx
                .node_control
                .copy_to_leg(
                    copier,
                    &self.primary(),
                    bitmap_bytes(&to_bitmap(&set)),
                    held,
                    COPY_TIMEOUT,
                )
                .await
                .map_err(|e| format!("copy on {copier}: {e}"))?;
            *copied += batch.len() as u64;
            let percent = u8::try_from((*copied * 100 / total).min(100)).unwrap_or(100);
            let event = match kind {
                CopyKind::Formation => Event::FormationCopyProgress { op, percent },
                CopyKind::Resync => Event::ResyncProgress { op, percent },
            };
            let before = self.record.state.copy_progress_percent();
            self.record.state = step(self.record.state.clone(), event).0;
            if self.record.state.copy_progress_percent() / 10 != before / 10 {
                // Progress is shown, not persisted: a restart repeats the pass anyway.
                let _ = self.write_status().await;
            }
        }
        Ok(bytes)
    }

    /// The split cut (seed 003 claim 1 second process; JP [0007]): hold every node of the
    /// primary, switch them to tracking from empty bitmaps, record Track for later stagers,
    /// release. A node that cannot switch puts every node back to mirroring.
    async fn cut(&mut self, op: u64) -> Result<(), String> {
        let primary = self
            .volume(&self.primary())
            .await
            .map_err(|e| e.to_string())?;
        let nodes = nodes_of(&primary);
        let hold = NodeOp {
            volume: self.primary(),
            operation_id: format!("mirror-{}-{op}-cut", self.name),
            attempt: 1,
            generation: generation_of(&primary),
        };
        let held = match self.quiesce(&nodes, &hold).await {
            Ok(held) => held,
            Err(cause) => {
                self.resume(&nodes, &hold).await;
                return Err(cause);
            }
        };
        let failures = self
            .set_legs(&held, LegMode::Track, Some(&hold.operation_id))
            .await;
        let recorded = if failures.is_empty() {
            self.link(
                &self.primary(),
                MirrorRole::Primary,
                MirrorLegMode::Track,
                &[],
            )
            .await
            .map_err(|e| e.to_string())
        } else {
            Err(failures.join("; "))
        };
        if let Err(cause) = recorded {
            let back = self.set_legs(&held, LegMode::Mirror, None).await;
            if !back.is_empty() {
                tracing::warn!(pair = %self.name, failures = ?back, "nodes not put back to mirroring");
                let _ = self.apply_path(DataPath::Mirror).await;
            }
            self.resume(&held, &hold).await;
            return Err(cause);
        }
        self.resume(&held, &hold).await;
        // The secondary is on its own now: nobody writes it as a mirror any more.
        self.link(
            &self.secondary(),
            MirrorRole::Secondary,
            MirrorLegMode::Track,
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
        self.record.primary_acks.clear();
        Ok(())
    }

    /// Quiesce of the whole primary on `nodes` (nodes that have not staged it answer Absent and
    /// keep it from being staged until the resume). `Ok`: every node answered held.
    async fn quiesce(&self, nodes: &[String], hold: &NodeOp) -> Result<Vec<String>, String> {
        let calls = nodes.iter().map(|node| {
            let call = self.ctx.node_control.call(
                node,
                NodeRequest::Quiesce {
                    op: hold.clone(),
                    ranges: Vec::new(),
                    hold_timeout_ms: 0,
                },
                CALL_TIMEOUT,
            );
            async move { (node.clone(), call.await) }
        });
        let mut failures = Vec::new();
        for (node, answer) in futures::future::join_all(calls).await {
            if let Err(error) = answer {
                failures.push(format!("{node}: {error}"));
            }
        }
        if failures.is_empty() {
            Ok(nodes.to_vec())
        } else {
            Err(format!("quiesce failed: {}", failures.join("; ")))
        }
    }

    /// Resume on `nodes`; a node that does not answer is remembered and retried on every
    /// reconcile (a hold must never be left behind).
    async fn resume(&mut self, nodes: &[String], hold: &NodeOp) {
        for node in nodes {
            self.record
                .pending_resumes
                .insert(node.clone(), (hold.operation_id.clone(), hold.generation));
        }
        self.retry_resumes().await;
    }

    async fn retry_resumes(&mut self) {
        let pending = std::mem::take(&mut self.record.pending_resumes);
        for (node, (operation_id, generation)) in pending {
            let op = NodeOp {
                volume: self.primary(),
                operation_id: operation_id.clone(),
                attempt: 1,
                generation,
            };
            match self
                .ctx
                .node_control
                .call(&node, NodeRequest::Resume(op), CALL_TIMEOUT)
                .await
            {
                // Refused: not held (any more) for this operation — nothing to release.
                Ok(_) | Err(NodeCallError::Refused(_)) => {}
                Err(error) => {
                    tracing::warn!(pair = %self.name, %node, %error, "resume failed; retrying later");
                    self.record
                        .pending_resumes
                        .insert(node, (operation_id, generation));
                }
            }
        }
    }

    /// Writes the record if it changed (annotation, with the pair's resourceVersion).
    async fn persist(&mut self) -> Result<()> {
        if self.written.as_ref() == Some(&self.record) {
            return Ok(());
        }
        let pairs: Api<MirrorPair> = Api::all(self.ctx.client.clone());
        let text = serde_json::to_string(&self.record)?;
        let mut meta = json!({ "annotations": { STATE_ANNOTATION: text } });
        if let Some(rv) = &self.resource_version {
            meta["resourceVersion"] = json!(rv);
        }
        let written = pairs
            .patch(
                &self.name,
                &field_manager(),
                &Patch::Merge(json!({ "metadata": meta })),
            )
            .await?;
        self.resource_version = written.resource_version();
        self.written = Some(self.record.clone());
        Ok(())
    }

    async fn write_status(&mut self) -> Result<()> {
        let pairs: Api<MirrorPair> = Api::all(self.ctx.client.clone());
        let mut status = self.record.state.status();
        let checked = Time(now());
        for accessor in &mut status.secondary_accessors {
            accessor.checked_at = Some(checked.clone());
        }
        status.last_sync_time = self.record.last_sync.map(super::support::time_from_seconds);
        status.observed_generation = self.pair.metadata.generation;
        status.conditions = self.conditions.clone();
        if let Some(pending) = self.pending_message() {
            status.message = Some(pending);
        }
        let unchanged = self.pair.status.as_ref().is_some_and(|s| {
            let mut old = s.clone();
            for a in &mut old.secondary_accessors {
                a.checked_at = Some(checked.clone());
            }
            old == status
        });
        if unchanged {
            return Ok(());
        }
        let written =
            patch_status(&pairs, &self.name, serde_json::to_value(&status)?, None).await?;
        self.resource_version = written.resource_version();
        Ok(())
    }

    fn pending_message(&self) -> Option<String> {
        if !self.record.pending_resumes.is_empty() {
            let nodes: Vec<&String> = self.record.pending_resumes.keys().collect();
            return Some(format!(
                "nodes {nodes:?} could not be released from a hold of the primary yet; retrying"
            ));
        }
        if self.record.path_pending {
            return Some(format!(
                "the data path ({:?}) is not set on every node of the primary yet: {}",
                self.record.state.data_path(),
                self.path_error.clone().unwrap_or_else(|| "retrying".into())
            ));
        }
        None
    }
}

/// What a converged copy did: extent copies (an extent copied twice counts twice), bytes,
/// duration, the copies repeated for racing writes and the copies made under the hold.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CopyOutcome {
    extents: u64,
    bytes: u64,
    seconds: f64,
    recopied: u64,
    held: u64,
}

/// The primary's committed mapping generation (the hold's generation).
fn generation_of(volume: &VirtualVolume) -> i64 {
    volume
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map_or(0, |m| m.generation)
}

/// Deletion: the legs are removed from the primary's nodes and the links from both volumes;
/// the secondary keeps its data (JP release, S800–S802: it stays a secondary).
async fn cleanup(pair: Arc<MirrorPair>, ctx: &Context) -> Result<Action> {
    let name = pair.name_any();
    let record = pair
        .annotations()
        .get(STATE_ANNOTATION)
        .and_then(|t| serde_json::from_str::<Record>(t).ok());
    if let Some(record) = record {
        let mut driver = Driver {
            ctx,
            name: name.clone(),
            resource_version: pair.resource_version(),
            conditions: Vec::new(),
            written: Some(record.clone()),
            pair: Arc::clone(&pair),
            record,
            events: VecDeque::new(),
            path_error: None,
        };
        driver.retry_resumes().await;
        if !driver.record.pending_resumes.is_empty() {
            return Err(Error::Blocked(format!(
                "mirror pair {name}: nodes {:?} are still held by it",
                driver.record.pending_resumes.keys().collect::<Vec<_>>()
            )));
        }
        if let Ok(primary) = driver.volume(&driver.primary()).await {
            let failures = driver
                .set_legs(&nodes_of(&primary), LegMode::None, None)
                .await;
            if !failures.is_empty() {
                return Err(Error::Blocked(format!(
                    "mirror pair {name}: the mirror leg could not be removed on: {}",
                    failures.join("; ")
                )));
            }
        }
        for volume in [driver.primary(), driver.secondary()] {
            update_volume_status(ctx, &volume, |v| {
                v.status
                    .as_ref()
                    .and_then(|s| s.mirror.as_ref())
                    .filter(|l| l.pair == name)
                    .map(|_| json!({ "mirror": null }))
            })
            .await?;
        }
        ctx.metrics.forget_mirror(&name);
    }
    Ok(Action::await_change())
}
