//! 1,000 StorageClaims created at once against the embedded API server, until all are Bound.
//!
//! ```text
//! cargo run --release -p tessera-operator --example bench_claims [-- CLAIMS]
//! ```
//!
//! The whole operator runs in-process (leader election, every controller, events), against an
//! in-memory embedded API server with the tessera CRDs; 8 areas on 4 nodes hold the claims.
//! Prints the wall time until every claim is Bound, claims per second, the claim controller's
//! reconcile latency (p50/p99) and each claim's create → Bound latency (p50/p99). Target
//! (docs/benchmarks/operator.md): 1,000 claims in < 20 s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tessera_api::v1alpha1::*;
use tessera_apiserver::ApiServer;
use tessera_operator::controllers::{Config, Operator};
use tokio::sync::Mutex;

const GIB: i64 = 1 << 30;
const AREAS: usize = 8;
const NODES: usize = 4;

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let claims: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000);
    let server = ApiServer::builder().start().await?;
    let client = server.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in tessera_api::crds::all() {
        crds.create(&PostParams::default(), &crd).await?;
    }

    let mut config = Config::new("bench-operator");
    config.leader.lease_duration = Duration::from_secs(5);
    config.leader.renew_deadline = Duration::from_secs(3);
    config.leader.retry_period = Duration::from_millis(500);
    let operator = Operator::new(client.clone(), config);
    let metrics = operator.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));

    // The pool: 8 areas on 4 nodes, 64 MiB extents, room for every claim (1 GiB each).
    let classes: Api<StoragePriorityClass> = Api::all(client.clone());
    classes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tessera.io/v1alpha1", "kind": "StoragePriorityClass",
                "metadata": {"name": "standard"},
                "spec": {"value": 0, "dataPriority": "High"},
            }))?,
        )
        .await?;
    let pools: Api<StoragePool> = Api::all(client.clone());
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tessera.io/v1alpha1", "kind": "StoragePool",
                "metadata": {"name": "bench"},
                "spec": {"extentSizeBytes": 64 << 20, "placement": {"strategy": "Spread"}},
            }))?,
        )
        .await?;
    let per_area = (claims as i64 * GIB) / AREAS as i64 + 16 * GIB;
    let areas: Api<StorageArea> = Api::all(client.clone());
    for i in 0..AREAS {
        let name = format!("area-{i}");
        areas
            .create(
                &PostParams::default(),
                &StorageArea::new(
                    &name,
                    StorageAreaSpec {
                        node_name: format!("node-{}", i % NODES),
                        path: format!("/var/lib/tessera/{name}.img"),
                        size_bytes: Some(per_area),
                        media_type: "ssd".into(),
                        domain: None,
                        pool_name: "bench".into(),
                    },
                ),
            )
            .await?;
        areas
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "phase": "Online", "capacityBytes": per_area,
                    "lastHeartbeatTime": Time(Timestamp::now()),
                }})),
            )
            .await?;
    }
    // Wait until the operator has seen every area Online.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pool = pools.get("bench").await?;
        if pool
            .status
            .as_ref()
            .is_some_and(|s| s.online_areas == AREAS as i32)
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "areas never came online");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Watch the claims for Bound.
    let claims_api: Api<StorageClaim> = Api::namespaced(client.clone(), "default");
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let bound_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let bound_at = Arc::clone(&bound_at);
        let api = claims_api.clone();
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Ok(Some(claim)) = stream.try_next().await {
                if claim.status.as_ref().and_then(|s| s.phase) == Some(ClaimPhase::Bound) {
                    bound_at
                        .lock()
                        .await
                        .entry(claim.name_any())
                        .or_insert_with(Instant::now);
                }
            }
        })
    };

    println!("creating {claims} claims of 1 GiB at once …");
    let start = Instant::now();
    futures::stream::iter(0..claims)
        .for_each_concurrent(64, |i| {
            let api = claims_api.clone();
            let created = Arc::clone(&created);
            async move {
                let name = format!("claim-{i:04}");
                let claim = StorageClaim::new(
                    &name,
                    StorageClaimSpec {
                        pool_name: "bench".into(),
                        size_bytes: GIB,
                        priority_class_name: "standard".into(),
                        media_type: None,
                        copies: 1,
                        layout: VolumeLayout::Concatenated,
                        preferred_node: None,
                    },
                );
                created.lock().await.insert(name, Instant::now());
                api.create(&PostParams::default(), &claim)
                    .await
                    .expect("claim created");
            }
        })
        .await;
    let creating = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = bound_at.lock().await.len();
        if done >= claims {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {claims} claims were Bound after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = start.elapsed();
    watch.abort();

    let created = created.lock().await;
    let bound_at = bound_at.lock().await;
    let mut latencies: Vec<Duration> = bound_at
        .iter()
        .filter_map(|(name, at)| created.get(name).map(|c| at.saturating_duration_since(*c)))
        .collect();
    latencies.sort_unstable();
    // The pool status is debounced; wait for it to add up.
    let want = claims as i64 * GIB;
    let pool = loop {
        let pool = pools.get("bench").await?.status.unwrap_or_default();
        if pool.allocated_bytes == want {
            break pool;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "pool counters never added up: {pool:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let counted = start.elapsed();
    // Every area extent belongs to at most one volume.
    let volumes = Api::<VirtualVolume>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let mut owner: HashMap<(String, i64), String> = HashMap::new();
    for v in &volumes {
        let mapping = v
            .status
            .as_ref()
            .and_then(|s| s.mapping.clone())
            .ok_or_else(|| anyhow::anyhow!("{} has no mapping", v.name_any()))?;
        for run in &mapping.extents {
            for r in &run.replicas {
                for e in 0..run.length / mapping.extent_size_bytes {
                    let key = (
                        r.area.clone(),
                        r.area_offset / mapping.extent_size_bytes + e,
                    );
                    if let Some(other) = owner.insert(key.clone(), v.name_any()) {
                        anyhow::bail!("{key:?} is mapped by {other} and {}", v.name_any());
                    }
                }
            }
        }
    }
    let volumes = volumes.len();

    println!("claims                      {claims}");
    println!(
        "creating them took          {:.2} s",
        creating.as_secs_f64()
    );
    println!("all Bound after             {:.2} s", total.as_secs_f64());
    println!(
        "throughput                  {:.0} claims/s",
        claims as f64 / total.as_secs_f64()
    );
    for (label, q) in [("p50", 0.50), ("p99", 0.99)] {
        println!(
            "claim reconcile {label}         {:.1} ms",
            metrics
                .reconcile_percentile("claim", q)
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3
        );
    }
    println!(
        "claim reconciles            {}",
        metrics.reconcile_count("claim")
    );
    println!(
        "create → Bound p50 / p99    {:.0} ms / {:.0} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    println!("virtual volumes             {volumes}");
    println!(
        "pool counters added up at   {:.2} s ({} GiB allocated of {} GiB; status is debounced)",
        counted.as_secs_f64(),
        pool.allocated_bytes / GIB,
        pool.total_bytes / GIB
    );
    println!(
        "extents mapped twice        0 (checked {} extents)",
        owner.len()
    );
    let _ = stop.send(());
    let _ = running.await;
    server.shutdown().await;
    Ok(())
}
