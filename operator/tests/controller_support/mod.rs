//! Shared harness of the controller tests: an embedded API server with the tessera CRDs, the
//! operator running in-process with short timings, simulated node agents (area status,
//! heartbeats, usage reports) and polling helpers. Every wait has a timeout; nothing sleeps a
//! fixed time to let things happen.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tessera_api::v1alpha1::*;
use tessera_apiserver::{ApiServer, RunningServer};
use tessera_operator::controllers::usage::{UsageReport, area_pieces};
use tessera_operator::controllers::{Config, CrashPoint, Operator, RunError};
use tessera_operator::leader::LeaderConfig;
use tessera_operator::metrics::Metrics;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const NS: &str = "default";
/// 64 KiB, the smallest extent size: patent-sized block counts stay cheap.
pub const ES: i64 = 64 << 10;

pub struct Cluster {
    pub server: RunningServer,
    pub client: Client,
}

impl Cluster {
    pub async fn start() -> Self {
        // RUST_LOG=tessera_operator=debug shows the operator's decisions.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let server = ApiServer::builder()
            .bookmark_interval(Duration::from_secs(5))
            .start()
            .await
            .expect("API server starts");
        let client = server.client();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in tessera_api::crds::all() {
            crds.create(&PostParams::default(), &crd)
                .await
                .expect("CRD installs");
        }
        Cluster { server, client }
    }

    /// Test timings: a 2 s lease, fast retries.
    pub fn config(&self, identity: &str) -> Config {
        let mut config = Config::new(identity);
        config.leader = LeaderConfig {
            lease_duration: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1200),
            retry_period: Duration::from_millis(200),
            ..LeaderConfig::new(identity)
        };
        config.area_heartbeat_timeout = Duration::from_secs(3600);
        config.error_retry = Duration::from_millis(200);
        config.blocked_retry = Duration::from_millis(300);
        config.wait_retry = Duration::from_millis(100);
        config.resync = Duration::from_secs(30);
        config.aggregate_debounce = Duration::from_millis(20);
        config
    }

    pub fn spawn(&self, config: Config) -> OperatorHandle {
        let operator = Operator::new(self.client.clone(), config);
        let metrics = operator.metrics();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(operator.run(async move {
            let _ = stopped.await;
        }));
        OperatorHandle {
            metrics,
            stop: Some(stop),
            task,
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>,
    {
        Api::all(self.client.clone())
    }

    pub fn claims(&self) -> Api<StorageClaim> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub async fn create_pool(&self, name: &str, spec: serde_json::Value) -> StoragePool {
        let mut body = json!({
            "apiVersion": "tessera.io/v1alpha1",
            "kind": "StoragePool",
            "metadata": {"name": name},
            "spec": {"extentSizeBytes": ES},
        });
        merge(&mut body["spec"], spec);
        let pool: StoragePool = serde_json::from_value(body).expect("pool");
        self.api::<StoragePool>()
            .create(&PostParams::default(), &pool)
            .await
            .expect("pool created")
    }

    pub async fn create_class(&self, name: &str, value: i32, data: DataPriority) {
        let class = StoragePriorityClass::new(
            name,
            StoragePriorityClassSpec {
                value,
                data_priority: data,
                reclaimable: Reclaimable::default(),
                description: None,
            },
        );
        self.api::<StoragePriorityClass>()
            .create(&PostParams::default(), &class)
            .await
            .expect("class created");
    }

    /// An area of `extents` extents that its (simulated) node agent has opened: Online, with
    /// capacity and a heartbeat.
    pub async fn create_area(&self, name: &str, node: &str, pool: &str, extents: i64) {
        let area = StorageArea::new(
            name,
            StorageAreaSpec {
                node_name: node.into(),
                path: format!("/var/lib/tessera/{name}.img"),
                size_bytes: Some(extents * ES),
                media_type: "ssd".into(),
                domain: None,
                pool_name: pool.into(),
            },
        );
        self.api::<StorageArea>()
            .create(&PostParams::default(), &area)
            .await
            .expect("area created");
        self.node_reports_area(name, extents * ES, AreaPhase::Online)
            .await;
        // The operator has seen it Online (needs a running operator).
        wait_for(
            &self.api::<StorageArea>(),
            name,
            "Ready",
            |a: &StorageArea| {
                a.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            },
        )
        .await;
    }

    /// What a node agent writes on its area.
    pub async fn node_reports_area(&self, name: &str, capacity: i64, phase: AreaPhase) {
        self.api::<StorageArea>()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "phase": phase,
                    "capacityBytes": capacity,
                    "lastHeartbeatTime": Time(Timestamp::now()),
                }})),
            )
            .await
            .expect("area status patched");
    }

    pub async fn heartbeat(&self, name: &str) {
        self.api::<StorageArea>()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"lastHeartbeatTime": Time(Timestamp::now())}})),
            )
            .await
            .expect("heartbeat patched");
    }

    pub async fn create_claim(
        &self,
        name: &str,
        pool: &str,
        extents: i64,
        class: &str,
    ) -> StorageClaim {
        let claim = StorageClaim::new(
            name,
            StorageClaimSpec {
                pool_name: pool.into(),
                size_bytes: extents * ES,
                priority_class_name: class.into(),
                media_type: None,
                copies: 1,
                layout: VolumeLayout::Concatenated,
                preferred_node: None,
            },
        );
        self.claims()
            .create(&PostParams::default(), &claim)
            .await
            .expect("claim created")
    }

    /// Waits until the claim is Bound and returns it with its volume.
    pub async fn bound(&self, name: &str) -> (StorageClaim, VirtualVolume) {
        let claim = wait_for(&self.claims(), name, "Bound", |c: &StorageClaim| {
            c.status.as_ref().and_then(|s| s.phase) == Some(ClaimPhase::Bound)
        })
        .await;
        let volume_name = claim
            .status
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .expect("volumeName");
        let volume = wait_for(
            &self.api::<VirtualVolume>(),
            &volume_name,
            "mapped",
            |v: &VirtualVolume| v.status.as_ref().is_some_and(|s| s.mapping.is_some()),
        )
        .await;
        (claim, volume)
    }

    /// What a node agent reports for a volume: the extents written, high or low priority.
    /// Waits until the operator has applied it to `status.usage`.
    pub async fn report_usage(&self, volume: &str, written: &[(std::ops::Range<u32>, bool)]) {
        let mut report = UsageReport::new(1, "node-a");
        for (range, high) in written {
            report = report.written(range.clone(), *high);
        }
        let in_use = report.in_use.len() as i64 * ES;
        let high = report.high_priority.len() as i64 * ES;
        self.api::<VirtualVolume>()
            .patch(
                volume,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    "tessera.io/usage-report": report.encode(),
                }}})),
            )
            .await
            .expect("usage report patched");
        wait_for(
            &self.api::<VirtualVolume>(),
            volume,
            "usage applied",
            |v: &VirtualVolume| {
                v.status
                    .as_ref()
                    .and_then(|s| s.usage.as_ref())
                    .is_some_and(|u| u.in_use_bytes == in_use && u.high_priority_bytes == high)
            },
        )
        .await;
    }

    /// Events about one object, oldest first: (type, reason, note).
    pub async fn events_about(&self, name: &str) -> Vec<(String, String, String)> {
        let mut events: Vec<K8sEvent> = Api::<K8sEvent>::namespaced(self.client.clone(), NS)
            .list(&ListParams::default())
            .await
            .expect("events listed")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        events.sort_by_key(|e| (e.event_time.as_ref().map(|t| t.0), e.name_any()));
        events
            .into_iter()
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Waits until an event with `reason` about `name` exists and returns its note.
    pub async fn event(&self, name: &str, reason: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((_, _, note)) = self
                .events_about(name)
                .await
                .into_iter()
                .find(|(_, r, _)| r == reason)
            {
                return note;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {reason} event about {name}; events: {:?}",
                self.events_about(name).await
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn pool_status(&self, name: &str) -> StoragePoolStatus {
        self.api::<StoragePool>()
            .get(name)
            .await
            .expect("pool")
            .status
            .unwrap_or_default()
    }

    /// Waits until the pool's status satisfies `check`.
    pub async fn pool_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&StoragePoolStatus) -> bool,
    ) -> StoragePoolStatus {
        wait_for(&self.api::<StoragePool>(), name, what, |p: &StoragePool| {
            p.status.as_ref().is_some_and(&check)
        })
        .await
        .status
        .unwrap_or_default()
    }

    /// Every area extent must belong to at most one volume replica.
    pub async fn assert_no_extent_mapped_twice(&self) {
        let volumes = self
            .api::<VirtualVolume>()
            .list(&ListParams::default())
            .await
            .expect("volumes");
        let mut owners: BTreeMap<(String, u64), String> = BTreeMap::new();
        for v in &volumes.items {
            let Some(mapping) = v.status.as_ref().and_then(|s| s.mapping.as_ref()) else {
                continue;
            };
            mapping
                .to_model(v.spec.size_bytes)
                .expect("every mapping is valid");
            for (area, range) in area_pieces(mapping) {
                for extent in range.start..range.end() {
                    if let Some(other) = owners.insert((area.to_owned(), extent), v.name_any()) {
                        panic!(
                            "extent {extent} of {area} is mapped by {other} and {}",
                            v.name_any()
                        );
                    }
                }
            }
        }
    }
}

/// A running in-process operator.
pub struct OperatorHandle {
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

impl OperatorHandle {
    /// Graceful stop: controllers stop, the Lease is released.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("operator stops")
            .expect("operator task")
            .expect("clean stop");
    }

    /// `kill -9`: everything stops at once, the Lease is not released.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Waits for the injected crash and returns where it happened.
    pub async fn crashed(self) -> CrashPoint {
        match tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the operator crashes in time")
            .expect("operator task")
        {
            Err(RunError::Crashed(point)) => point,
            Ok(()) => panic!("the operator stopped without crashing"),
        }
    }
}

/// Polls `name` until `check` holds (10 s at most).
pub async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, check: impl Fn(&K) -> bool) -> K
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let current = api.get_opt(name).await.expect("get");
        if let Some(obj) = &current
            && check(obj)
        {
            return obj.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {name} to be {what}; last state: {current:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `name` is gone.
pub async fn wait_gone<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while api.get_opt(name).await.expect("get").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    if let (Some(t), serde_json::Value::Object(p)) = (target.as_object_mut(), patch) {
        for (k, v) in p {
            t.insert(k, v);
        }
    }
}

/// Allocated, in-use and high-priority extents of a volume (from its status).
pub fn usage_extents(volume: &VirtualVolume) -> (i64, i64, i64) {
    let u = volume
        .status
        .as_ref()
        .and_then(|s| s.usage.clone())
        .unwrap_or_default();
    (
        u.allocated_bytes / ES,
        u.in_use_bytes / ES,
        u.high_priority_bytes / ES,
    )
}

pub fn generation(volume: &VirtualVolume) -> i64 {
    volume
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map_or(0, |m| m.generation)
}

pub fn metadata(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    }
}
