//! The controllers: kube-rs `Controller`s that read the tessera objects, call the pure
//! [`planners`](crate::planners) and apply their decisions (ARCHITECTURE §2: "a reconciler reads
//! state, calls a planner, applies its decision").
//!
//! | Controller | Kind | What it does |
//! |---|---|---|
//! | [`area`] | StorageArea | validation against the pool, heartbeats (Offline/Online), `allocatedBytes`, deletion refused while extents are allocated there |
//! | [`pool`] | StoragePool | counters 316–324 of seed 000 from areas and volumes; Ready, CapacityExhausted, Reclaiming |
//! | [`claim`] | StorageClaim | admission, reclaim and placement (seed 000 Figs. 6–7, seed 002 Fig. 7); Pending → (Reclaiming) → Bound, or Rejected |
//! | [`volume`] | VirtualVolume | mapping commit, usage from node reports, charging (seed 000 Fig. 10), release on deletion |
//! | [`remap`] | VolumeRemap | moves and releases of attached volumes through the remap [`coordinator`] (seed 004: quiesce, commit, resume over [`node_control`]); `releaseRanges` of unattached volumes directly (seed 000 Fig. 7/9) |
//! | [`class`] | StoragePriorityClass | volume count; deletion refused while claims or volumes use it |
//! | [`mirror`] | MirrorPair | pair, split, resync with dirty tracking and the secondary mount check (seed 003) over node-control |
//!
//! [`Operator`] runs them only while this replica holds the leader Lease ([`crate::leader`]).
//! The design decisions (usage channel, intent recording, naming, crash safety) are in
//! `docs/operator.md`.

pub mod allocator;
pub mod area;
pub mod claim;
pub mod class;
pub mod coordinator;
pub mod informer;
pub mod mirror;
pub mod node_control;
pub mod pool;
pub mod remap;
pub mod support;
pub mod usage;
pub mod view;
pub mod volume;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer;
use kube::runtime::reflector::Store;
use tessera_api::model::MapError;
use tessera_api::v1alpha1::{
    MappingConversionError, MirrorPair, StorageArea, StorageClaim, StoragePool,
    StoragePriorityClass, VirtualVolume, VolumeRemap,
};
use tokio::sync::watch;

use crate::leader::{LeaderConfig, LeaderElection};
use crate::metrics::{Health, Metrics};
use crate::planners::charging::ChargingError;
use crate::planners::placement::ToExtentMapError;
use informer::Informer;

pub use allocator::Allocator;

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "tessera-operator";

/// Tunables. [`Config::new`] has production values; tests shorten them.
#[derive(Debug, Clone)]
pub struct Config {
    /// Leader election (the identity also names the event reporter instance).
    pub leader: LeaderConfig,
    /// An Online area whose `lastHeartbeatTime` is older than this becomes Offline
    /// (ARCHITECTURE §8).
    pub area_heartbeat_timeout: Duration,
    /// Requeue after a failed reconcile.
    pub error_retry: Duration,
    /// Requeue after a refused deletion (an area, pool or class still in use, a volume still
    /// attached).
    pub blocked_retry: Duration,
    /// Requeue of a claim waiting for something that has no watch of its own (another claim's
    /// reclaim, the caches catching up with the operator's own writes).
    pub wait_retry: Duration,
    /// Periodic requeue of every object (safety net for missed triggers).
    pub resync: Duration,
    /// Trailing-edge debounce of pool and area reconciles (their status aggregates many
    /// objects; see kube's `controller::Config::debounce`).
    pub aggregate_debounce: Duration,
    /// Maximum concurrent claim reconciles (allocation itself is serialized, see
    /// [`Allocator`]).
    pub claim_concurrency: u16,
    /// Test hook: stop the whole operator abruptly, like a `kill -9`, right after this step.
    pub crash_at: Option<CrashPoint>,
    /// Namespace of the node Leases `tessera-node-<node>` that name each node's node-control
    /// endpoint (the node agents' `--namespace`).
    pub node_namespace: String,
    /// The shared node-control token. Without it remaps of attached volumes are refused.
    pub node_token: Option<String>,
    /// Replaces the gRPC node-control client (tests, in-memory fakes).
    pub node_control: Option<Arc<dyn node_control::NodeControl>>,
}

impl Config {
    pub fn new(identity: impl Into<String>) -> Self {
        Config {
            leader: LeaderConfig::new(identity),
            area_heartbeat_timeout: Duration::from_secs(40),
            error_retry: Duration::from_secs(5),
            blocked_retry: Duration::from_secs(10),
            wait_retry: Duration::from_secs(1),
            resync: Duration::from_secs(300),
            aggregate_debounce: Duration::from_millis(500),
            claim_concurrency: 64,
            crash_at: None,
            node_namespace: "default".into(),
            node_token: None,
            node_control: None,
        }
    }
}

/// The steps after which [`Config::crash_at`] can stop the operator. Each is a write to the API;
/// the crash test restarts the operator after each one and checks that exactly one allocation
/// happens and no extent leaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// The claim's status says `Reclaiming` (the reclaim intent), no remap created yet.
    ClaimReclaimIntent,
    /// A `releaseRanges` VolumeRemap was created for a victim.
    RemapCreated,
    /// The remap's status says `Committing` with its target generation (the release intent).
    RemapIntent,
    /// The victim's mapping has the holes, the remap is not marked `Succeeded` yet.
    RangesReleased,
    /// The VirtualVolume exists (with its planned mapping), its status has no mapping yet.
    VolumeCreated,
    /// The volume's status has the mapping, the claim is not `Bound` yet.
    VolumeMapped,
    /// The claim is `Bound`.
    ClaimBound,
    /// A growing volume's mapping covers the claim's new size; its `spec.sizeBytes` is not
    /// raised yet.
    VolumeGrown,
}

/// Why a reconcile failed. Every variant is retried by the error policy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The cached object was older than the stored one (the finalizer helper's JSON patch
    /// `test` failed); retried at once with the fresh object.
    #[error("stale object: {0}")]
    Stale(String),
    /// A deletion the object's finalizer refuses for now (an area with allocated extents, a
    /// class in use, an attached volume …); retried after `blocked_retry`.
    #[error("{0}")]
    Blocked(String),
    #[error("the {0} cache is not synced")]
    NotSynced(&'static str),
    #[error("object without {0}")]
    MissingField(&'static str),
    #[error("invalid mapping of volume {volume}: {source}")]
    Mapping {
        volume: String,
        #[source]
        source: MappingConversionError,
    },
    #[error("mapping edit: {0}")]
    Map(#[from] MapError),
    #[error("placement result: {0}")]
    Placement(#[from] ToExtentMapError),
    #[error("charging: {0}")]
    Charging(#[from] ChargingError),
    #[error("usage report: {0}")]
    Usage(#[from] usage::UsageReportError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("object {name} already exists and belongs to someone else")]
    NameTaken { name: String },
    #[error("crash injected after {0:?}")]
    InjectedCrash(CrashPoint),
}

impl Error {
    /// Label for `tessera_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Stale(_) => "conflict",
            Error::Blocked(_) => "blocked",
            Error::NotSynced(_) => "not_synced",
            Error::MissingField(_) => "missing_field",
            Error::Mapping { .. } | Error::Map(_) | Error::Placement(_) => "mapping",
            Error::Charging(_) => "charging",
            Error::Usage(_) => "usage_report",
            Error::Json(_) => "json",
            Error::NameTaken { .. } => "name_taken",
            Error::InjectedCrash(_) => "injected_crash",
        }
    }

    /// The finalizer helper's error, unwrapped so `Blocked` stays `Blocked`.
    pub fn from_finalizer(e: finalizer::Error<Error>) -> Self {
        match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(kube::Error::Api(ref api))
            | finalizer::Error::RemoveFinalizer(kube::Error::Api(ref api))
                if api.code == 422 || api.code == 409 =>
            {
                Error::Stale(e.to_string())
            }
            other => Error::Finalizer(other.to_string()),
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(e)) if e.code == 409)
            || matches!(self, Error::Stale(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The caches every controller reads (one reflector per kind, fed by each kind's controller).
#[derive(Clone)]
pub struct Stores {
    pub pools: Store<StoragePool>,
    pub areas: Store<StorageArea>,
    pub classes: Store<StoragePriorityClass>,
    pub claims: Store<StorageClaim>,
    pub volumes: Store<VirtualVolume>,
    pub remaps: Store<VolumeRemap>,
    /// True once every cache has its first full list (see [`Stores::ready`]).
    synced: watch::Receiver<bool>,
}

impl Stores {
    /// Waits until every cache has its first full list.
    ///
    /// kube's `Store::wait_until_ready` keeps the waker of only its latest poller, so concurrent
    /// reconciles waiting on it could sleep forever; one task waits for the stores
    /// ([`Stores::wait_for_lists`]) and publishes the result here for everyone.
    pub async fn ready(&self) -> Result<()> {
        let mut synced = self.synced.clone();
        synced
            .wait_for(|s| *s)
            .await
            .map(|_| ())
            .map_err(|_| Error::NotSynced("operator"))
    }

    /// The single waiter on every store's first list; sets `synced` when all are listed.
    async fn wait_for_lists(
        &self,
        synced: watch::Sender<bool>,
        allocator: &Allocator,
    ) -> Result<()> {
        let not = |kind| move |_| Error::NotSynced(kind);
        self.pools.wait_until_ready().await.map_err(not("pool"))?;
        self.areas.wait_until_ready().await.map_err(not("area"))?;
        self.classes
            .wait_until_ready()
            .await
            .map_err(not("class"))?;
        self.claims.wait_until_ready().await.map_err(not("claim"))?;
        self.volumes
            .wait_until_ready()
            .await
            .map_err(not("volume"))?;
        self.remaps.wait_until_ready().await.map_err(not("remap"))?;
        // A new leader re-reserves the destinations of moves in flight before anything
        // allocates (the reconciles all wait for `synced`).
        coordinator::restore_reservations(self, &mut *allocator.lock().await);
        synced.send_replace(true);
        Ok(())
    }
}

/// One shared watch per kind (see [`informer`]).
pub struct Informers {
    pub pools: Informer<StoragePool>,
    pub areas: Informer<StorageArea>,
    pub classes: Informer<StoragePriorityClass>,
    pub claims: Informer<StorageClaim>,
    pub volumes: Informer<VirtualVolume>,
    pub remaps: Informer<VolumeRemap>,
    pub mirrors: Informer<MirrorPair>,
}

/// Shared by every reconcile (the controller-rs `Context`).
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    pub stores: Stores,
    /// Serializes every change of extent ownership (see [`Allocator`]).
    pub allocator: Allocator,
    /// The remap coordinator's calls to node plugins.
    pub node_control: Arc<dyn node_control::NodeControl>,
    crash: Arc<watch::Sender<Option<CrashPoint>>>,
    crashed: AtomicBool,
    /// The last undecodable usage report per volume, so its Warning event is sent once.
    bad_reports: Mutex<HashMap<String, String>>,
}

impl Context {
    /// The [`Config::crash_at`] hook: after `point`, signal the runtime to stop everything and
    /// fail this reconcile.
    pub fn crash_point(&self, point: CrashPoint) -> Result<()> {
        if self.config.crash_at == Some(point) && !self.crashed.swap(true, Ordering::SeqCst) {
            tracing::warn!(?point, "injected crash");
            self.crash.send_replace(Some(point));
        }
        if self.crashed.load(Ordering::SeqCst) {
            return Err(Error::InjectedCrash(point));
        }
        Ok(())
    }

    /// Whether `report` is a new undecodable usage report of `volume` (its event not yet sent).
    pub fn first_bad_report(&self, volume: &str, report: &str) -> bool {
        let mut seen = self.bad_reports.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(volume.to_owned(), report.to_owned()).as_deref() != Some(report)
    }

    /// The requeue after an error (kube's `error_policy`).
    fn retry_after(&self, error: &Error) -> Action {
        match error {
            Error::Blocked(_) => Action::requeue(self.config.blocked_retry),
            e if e.is_conflict() => Action::requeue(Duration::from_millis(50)),
            Error::NotSynced(_) => Action::requeue(self.config.wait_retry),
            _ => Action::requeue(self.config.error_retry),
        }
    }
}

/// How [`Operator::run`] ended.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The [`Config::crash_at`] hook fired; the Lease was not released.
    #[error("crash injected after {0:?}")]
    Crashed(CrashPoint),
}

/// The operator: leader election, and the controllers while leading.
pub struct Operator {
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Operator {
    pub fn new(client: Client, config: Config) -> Self {
        Operator {
            client,
            config,
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Competes for the Lease and runs the controllers while leading, until `shutdown`
    /// completes (then the Lease is released) or an injected crash stops everything at once.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let election = LeaderElection::start(self.client.clone(), self.config.leader.clone());
        let mut leader = election.subscribe();
        let (crash_tx, mut crash_rx) = watch::channel(None);
        let crash_tx = Arc::new(crash_tx);
        tokio::pin!(shutdown);
        // Dropped (with everything in it) if this future is dropped, e.g. when the task running
        // the operator is aborted.
        let mut running: Option<AbortOnDrop> = None;
        let outcome = loop {
            let state = *leader.borrow_and_update();
            self.health.set_elector_ok(state.healthy);
            self.health.set_leader(state.leading);
            self.metrics.set_leader(state.leading);
            match (state.leading, running.is_some()) {
                (true, false) => {
                    tracing::info!(identity = %self.config.leader.identity, "leading: starting the controllers");
                    running = Some(AbortOnDrop(tokio::spawn(run_controllers(
                        self.client.clone(),
                        self.config.clone(),
                        Arc::clone(&self.metrics),
                        Arc::clone(&self.health),
                        Arc::clone(&crash_tx),
                    ))));
                }
                (false, true) => {
                    tracing::warn!(identity = %self.config.leader.identity, "lost the lease: stopping the controllers");
                    running = None;
                }
                _ => {}
            }
            tokio::select! {
                changed = leader.changed() => {
                    if changed.is_err() {
                        break Ok(());
                    }
                }
                _ = crash_rx.changed() => {
                    if let Some(point) = *crash_rx.borrow() {
                        break Err(RunError::Crashed(point));
                    }
                }
                _ = &mut shutdown => break Ok(()),
            }
        };
        if let Some(task) = running.take() {
            task.stop().await;
        }
        self.metrics.set_leader(false);
        self.health.set_leader(false);
        match outcome {
            Ok(()) => election.resign().await,
            Err(_) => election.abort(),
        }
        outcome
    }
}

/// A task that is aborted when this handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Aborts the task and waits until it is gone.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Builds every controller, shares their caches through one [`Context`] and runs them until the
/// task is aborted.
async fn run_controllers(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    crash: Arc<watch::Sender<Option<CrashPoint>>>,
) {
    let mut informers = Informers {
        pools: Informer::new(&client),
        areas: Informer::new(&client),
        classes: Informer::new(&client),
        claims: Informer::new(&client),
        volumes: Informer::new(&client),
        remaps: Informer::new(&client),
        mirrors: Informer::new(&client),
    };
    let areas = area::controller(&informers, &config);
    let pools = pool::controller(&informers, &config);
    let classes = class::controller(&informers, &config);
    let claims = claim::controller(&informers, &config);
    let volumes = volume::controller(&informers, &config);
    let remaps = remap::controller(&informers, &config);
    let mirrors = mirror::controller(&informers, &config);
    let (synced_tx, synced_rx) = watch::channel(false);
    let stores = Stores {
        pools: informers.pools.store(),
        areas: informers.areas.store(),
        classes: informers.classes.store(),
        claims: informers.claims.store(),
        volumes: informers.volumes.store(),
        remaps: informers.remaps.store(),
        synced: synced_rx,
    };
    let watches = futures::future::join_all([
        informers.pools.take_driver(),
        informers.areas.take_driver(),
        informers.classes.take_driver(),
        informers.claims.take_driver(),
        informers.volumes.take_driver(),
        informers.remaps.take_driver(),
        informers.mirrors.take_driver(),
    ]);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(config.leader.identity.clone()),
        },
    );
    let node_control: Arc<dyn node_control::NodeControl> = match &config.node_control {
        Some(control) => Arc::clone(control),
        None => Arc::new(node_control::TonicNodeControl::new(
            client.clone(),
            config.node_namespace.clone(),
            config.node_token.clone(),
        )),
    };
    let ctx = Arc::new(Context {
        node_control,
        client,
        recorder,
        metrics,
        config,
        stores: stores.clone(),
        allocator: Allocator::default(),
        crash,
        crashed: AtomicBool::new(false),
        bad_reports: Mutex::default(),
    });
    let synced = {
        let health = Arc::clone(&health);
        let ctx = Arc::clone(&ctx);
        async move {
            if stores
                .wait_for_lists(synced_tx, &ctx.allocator)
                .await
                .is_ok()
            {
                health.set_synced(true);
            }
        }
    };
    tokio::join!(
        watches,
        synced,
        areas
            .run(area::reconcile, area::error_policy, ctx.clone())
            .for_each(drain),
        pools
            .run(pool::reconcile, pool::error_policy, ctx.clone())
            .for_each(drain),
        classes
            .run(class::reconcile, class::error_policy, ctx.clone())
            .for_each(drain),
        claims
            .run(claim::reconcile, claim::error_policy, ctx.clone())
            .for_each(drain),
        volumes
            .run(volume::reconcile, volume::error_policy, ctx.clone())
            .for_each(drain),
        remaps
            .run(remap::reconcile, remap::error_policy, ctx.clone())
            .for_each(drain),
        mirrors
            .run(mirror::reconcile, mirror::error_policy, ctx.clone())
            .for_each(drain),
    );
}

/// Consumes a controller's output stream (results are already logged by the error policy).
fn drain<T>(_: T) -> futures::future::Ready<()> {
    futures::future::ready(())
}

/// The shared error policy: count the error, log it, requeue by kind.
fn error_policy_for(controller: &'static str, error: &Error, ctx: &Context) -> Action {
    ctx.metrics
        .count_reconcile_error(controller, error.metric_label());
    match error {
        Error::Blocked(reason) => tracing::info!(controller, %reason, "deletion refused"),
        Error::InjectedCrash(_) => {}
        e if e.is_conflict() => tracing::debug!(controller, error = %e, "conflict, retrying"),
        e => tracing::warn!(controller, error = %e, "reconcile failed"),
    }
    ctx.retry_after(error)
}
