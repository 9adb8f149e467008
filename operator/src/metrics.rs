//! Prometheus metrics of the operator (prometheus-client) and its HTTP endpoint: `/metrics`,
//! `/healthz` and `/readyz` (axum).
//!
//! Names follow ARCHITECTURE §11 (`tessera_<subsystem>_<name>`, labels `pool`, `volume`, …):
//!
//! | Metric | Type | Labels | Meaning |
//! |---|---|---|---|
//! | `tessera_pool_bytes` | gauge | `pool`, `state` | Pool counters of seed 000 114 ([0021]): `total`, `allocated`, `unallocated`, `inUse`, `highPriority`, `unused`, `lowPriority` |
//! | `tessera_pool_claims` | gauge | `pool`, `phase` | Claims of the pool by phase |
//! | `tessera_reclaim_returns_total` | counter | `pool`, `tier` | Completed area returns (seed 000 Fig. 7) |
//! | `tessera_reclaim_bytes_total` | counter | `pool`, `tier` | Pool bytes they freed |
//! | `tessera_volume_charge_accrued` | gauge | `pool`, `volume` | Cumulative charge 312 (seed 000 Fig. 10) |
//! | `tessera_operator_reconcile_duration_seconds` | histogram | `controller` | Time per reconcile |
//! | `tessera_operator_reconcile_errors_total` | counter | `controller`, `error` | Failed reconciles by cause |
//! | `tessera_operator_leader` | gauge | | 1 while this replica holds the leader Lease |
//! | `tessera_mirror_dirty_bytes` | gauge | `pair` | Bytes the secondary lacks while split (seed 003 dirty bitmap) |
//! | `tessera_mirror_copy_bytes_total` | counter | `pair` | Bytes copied by formation copies and resyncs |
//! | `tessera_mirror_copy_duration_seconds` | gauge | `pair` | Duration of the last formation copy or resync |

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How many reconcile durations per controller are kept for [`Metrics::reconcile_percentile`].
const SAMPLES_KEPT: usize = 100_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabels {
    pub pool: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolPhaseLabels {
    pub pool: String,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolTierLabels {
    pub pool: String,
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub pool: String,
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairLabels {
    pub pair: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerErrorLabels {
    pub controller: &'static str,
    pub error: &'static str,
}

type DurationHistogram = Family<ControllerLabels, Histogram, fn() -> Histogram>;

fn reconcile_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric of the operator, registered once.
pub struct Metrics {
    registry: Registry,
    pool_bytes: Family<PoolStateLabels, Gauge>,
    pool_claims: Family<PoolPhaseLabels, Gauge>,
    reclaim_returns: Family<PoolTierLabels, Counter>,
    reclaim_bytes: Family<PoolTierLabels, Counter>,
    volume_charge: Family<VolumeLabels, Gauge<f64, AtomicU64>>,
    reconcile_duration: DurationHistogram,
    reconcile_errors: Family<ControllerErrorLabels, Counter>,
    leader: Gauge,
    mirror_dirty: Family<PairLabels, Gauge>,
    mirror_copy_bytes: Family<PairLabels, Counter>,
    mirror_copy_seconds: Family<PairLabels, Gauge<f64, AtomicU64>>,
    samples: Mutex<HashMap<&'static str, VecDeque<Duration>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let pool_bytes = Family::<PoolStateLabels, Gauge>::default();
        let pool_claims = Family::<PoolPhaseLabels, Gauge>::default();
        let reclaim_returns = Family::<PoolTierLabels, Counter>::default();
        let reclaim_bytes = Family::<PoolTierLabels, Counter>::default();
        let volume_charge = Family::<VolumeLabels, Gauge<f64, AtomicU64>>::default();
        let reconcile_duration: DurationHistogram =
            Family::new_with_constructor(reconcile_histogram as fn() -> Histogram);
        let reconcile_errors = Family::<ControllerErrorLabels, Counter>::default();
        let leader = Gauge::default();
        let mirror_dirty = Family::<PairLabels, Gauge>::default();
        let mirror_copy_bytes = Family::<PairLabels, Counter>::default();
        let mirror_copy_seconds = Family::<PairLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "tessera_mirror_dirty_bytes",
            "Bytes the secondary of a mirror pair lacks (seed 003 dirty bitmap)",
            mirror_dirty.clone(),
        );
        registry.register(
            "tessera_mirror_copy_bytes",
            "Bytes copied by formation copies and resyncs of a mirror pair",
            mirror_copy_bytes.clone(),
        );
        registry.register(
            "tessera_mirror_copy_duration_seconds",
            "Duration of the last formation copy or resync of a mirror pair",
            mirror_copy_seconds.clone(),
        );
        registry.register(
            "tessera_pool_bytes",
            "Pool counters by state (seed 000 pool management information 114)",
            pool_bytes.clone(),
        );
        registry.register(
            "tessera_pool_claims",
            "Storage claims of the pool by phase",
            pool_claims.clone(),
        );
        registry.register(
            "tessera_reclaim_returns",
            "Completed area returns (releaseRanges remaps) by reclaim tier",
            reclaim_returns.clone(),
        );
        registry.register(
            "tessera_reclaim_bytes",
            "Pool bytes freed by area returns, by reclaim tier",
            reclaim_bytes.clone(),
        );
        registry.register(
            "tessera_volume_charge_accrued",
            "Cumulative charge of a virtual volume (seed 000 cumulative charge 312)",
            volume_charge.clone(),
        );
        registry.register(
            "tessera_operator_reconcile_duration_seconds",
            "Duration of one reconcile, by controller",
            reconcile_duration.clone(),
        );
        registry.register(
            "tessera_operator_reconcile_errors",
            "Failed reconciles, by controller and cause",
            reconcile_errors.clone(),
        );
        registry.register(
            "tessera_operator_leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Metrics {
            registry,
            pool_bytes,
            pool_claims,
            reclaim_returns,
            reclaim_bytes,
            volume_charge,
            reconcile_duration,
            reconcile_errors,
            leader,
            mirror_dirty,
            mirror_copy_bytes,
            mirror_copy_seconds,
            samples: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_mirror_dirty_bytes(&self, pair: &str, bytes: u64) {
        self.mirror_dirty
            .get_or_create(&PairLabels { pair: pair.into() })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A formation copy or resync finished: its bytes and duration.
    pub fn count_mirror_copy(&self, pair: &str, bytes: u64, seconds: f64) {
        let labels = PairLabels { pair: pair.into() };
        self.mirror_copy_bytes.get_or_create(&labels).inc_by(bytes);
        self.mirror_copy_seconds.get_or_create(&labels).set(seconds);
    }

    pub fn mirror_copy_bytes(&self, pair: &str) -> u64 {
        self.mirror_copy_bytes
            .get_or_create(&PairLabels { pair: pair.into() })
            .get()
    }

    pub fn forget_mirror(&self, pair: &str) {
        let labels = PairLabels { pair: pair.into() };
        self.mirror_dirty.remove(&labels);
        self.mirror_copy_bytes.remove(&labels);
        self.mirror_copy_seconds.remove(&labels);
    }

    /// The registry in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn set_pool_bytes(&self, pool: &str, state: &'static str, bytes: i64) {
        self.pool_bytes
            .get_or_create(&PoolStateLabels {
                pool: pool.to_owned(),
                state,
            })
            .set(bytes);
    }

    pub fn set_pool_claims(&self, pool: &str, phase: &'static str, claims: i64) {
        self.pool_claims
            .get_or_create(&PoolPhaseLabels {
                pool: pool.to_owned(),
                phase,
            })
            .set(claims);
    }

    /// Drops every series of a deleted pool.
    pub fn forget_pool(&self, pool: &str, states: &[&'static str], phases: &[&'static str]) {
        for state in states {
            self.pool_bytes.remove(&PoolStateLabels {
                pool: pool.to_owned(),
                state,
            });
        }
        for phase in phases {
            self.pool_claims.remove(&PoolPhaseLabels {
                pool: pool.to_owned(),
                phase,
            });
        }
    }

    pub fn count_reclaim(&self, pool: &str, tier: &'static str, bytes: u64) {
        let labels = PoolTierLabels {
            pool: pool.to_owned(),
            tier,
        };
        self.reclaim_returns.get_or_create(&labels).inc();
        self.reclaim_bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// Completed returns of a tier (for tests and the benchmark).
    pub fn reclaim_returns(&self, pool: &str, tier: &'static str) -> u64 {
        self.reclaim_returns
            .get(&PoolTierLabels {
                pool: pool.to_owned(),
                tier,
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    pub fn set_volume_charge(&self, pool: &str, volume: &str, accrued: f64) {
        self.volume_charge
            .get_or_create(&VolumeLabels {
                pool: pool.to_owned(),
                volume: volume.to_owned(),
            })
            .set(accrued);
    }

    pub fn forget_volume(&self, pool: &str, volume: &str) {
        self.volume_charge.remove(&VolumeLabels {
            pool: pool.to_owned(),
            volume: volume.to_owned(),
        });
    }

    /// Starts timing one reconcile of `controller`; the time is recorded when the guard drops.
    pub fn reconcile_timer(self: &Arc<Self>, controller: &'static str) -> ReconcileTimer {
        ReconcileTimer {
            metrics: Arc::clone(self),
            controller,
            started: Instant::now(),
        }
    }

    fn observe_reconcile(&self, controller: &'static str, elapsed: Duration) {
        self.reconcile_duration
            .get_or_create(&ControllerLabels { controller })
            .observe(elapsed.as_secs_f64());
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let kept = samples.entry(controller).or_default();
        if kept.len() == SAMPLES_KEPT {
            kept.pop_front();
        }
        kept.push_back(elapsed);
    }

    pub fn count_reconcile_error(&self, controller: &'static str, error: &'static str) {
        self.reconcile_errors
            .get_or_create(&ControllerErrorLabels { controller, error })
            .inc();
    }

    /// Reconciles of `controller` recorded so far (bounded by the samples kept).
    pub fn reconcile_count(&self, controller: &'static str) -> usize {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.get(controller).map_or(0, VecDeque::len)
    }

    /// The `q` quantile (0–1) of the recent reconcile durations of `controller` (nearest rank).
    pub fn reconcile_percentile(&self, controller: &'static str, q: f64) -> Option<Duration> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut sorted: Vec<Duration> = samples.get(controller)?.iter().copied().collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_unstable();
        let rank = ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).max(1);
        sorted.get(rank - 1).copied()
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    controller: &'static str,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .observe_reconcile(self.controller, self.started.elapsed());
    }
}

/// What `/healthz` and `/readyz` report.
#[derive(Debug, Default)]
pub struct Health {
    /// The leader election loop has completed a round against the API server.
    elector_ok: AtomicBool,
    /// This replica leads and its caches are synced.
    leading_and_synced: AtomicBool,
    leader: AtomicBool,
}

impl Health {
    pub fn set_elector_ok(&self, ok: bool) {
        self.elector_ok.store(ok, Ordering::Relaxed);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
        if !leader {
            self.leading_and_synced.store(false, Ordering::Relaxed);
        }
    }

    pub fn set_synced(&self, synced: bool) {
        self.leading_and_synced.store(synced, Ordering::Relaxed);
    }

    /// Ready: a standby whose election loop talks to the API server, or a leader whose caches
    /// are synced.
    pub fn is_ready(&self) -> bool {
        let elector = self.elector_ok.load(Ordering::Relaxed);
        let leader = self.leader.load(Ordering::Relaxed);
        elector && (!leader || self.leading_and_synced.load(Ordering::Relaxed))
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The router of `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(serve_ready))
        .with_state(HttpState { metrics, health })
}

async fn serve_metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn serve_ready(State(state): State<HttpState>) -> impl IntoResponse {
    if state.health.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves the endpoints on `addr` until `shutdown` completes. Returns the bound address (useful
/// with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(metrics, health);
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((bound, handle))
}
