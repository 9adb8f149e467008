//! An embedded API server with the tessera CRDs, the operator in-process with short timings,
//! simulated node agents (StorageAreas Online with capacity, node Leases), and the CSI
//! controller serving on a unix socket in a tempdir: everything the controller talks to, the
//! way `tessera local` runs it, without the data path.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;
use tessera_api::v1alpha1::*;
use tessera_apiserver::{ApiServer, RunningServer};
use tessera_csi::csi::controller::ControllerArgs;
use tessera_operator::controllers::{Config, Operator};
use tessera_operator::leader::LeaderConfig;
use tessera_proto::csi::v1::controller_client::ControllerClient;
use tessera_proto::csi::v1::identity_client::IdentityClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const NS: &str = "default";
pub const POOL: &str = "default";
/// 1 MiB extents.
pub const ES: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;
/// Each simulated area: 8 GiB (only the API knows; nothing is stored).
pub const AREA_BYTES: i64 = 8 * GIB;
/// How long the controller waits for the operator in these tests.
pub const CREATE_TIMEOUT_SECONDS: u64 = 4;

/// The nodes of the simulated cluster: (node, zone). Each has one area `<node>-area-0`.
pub const NODES: [(&str, &str); 3] = [
    ("node-a", "zone-a"),
    ("node-b", "zone-b"),
    ("node-c", "zone-c"),
];

pub struct CsiCluster {
    _dir: tempfile::TempDir,
    pub server: Option<RunningServer>,
    pub client: Client,
    pub socket: PathBuf,
    pub controller: ControllerClient<Channel>,
    pub identity: IdentityClient<Channel>,
    stop_operator: Option<oneshot::Sender<()>>,
    operator: Option<JoinHandle<()>>,
    stop_controller: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<anyhow::Result<()>>>,
}

impl CsiCluster {
    pub async fn start() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let server = ApiServer::builder()
            .data_dir(dir.path().join("api"))
            .bind("127.0.0.1:0".parse().expect("address"))
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

        let (stop_operator, stopped) = oneshot::channel::<()>();
        let operator = Operator::new(client.clone(), operator_config());
        let operator = tokio::spawn(async move {
            let _ = operator
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
        });

        let socket = dir.path().join("csi").join("controller.sock");
        let args = ControllerArgs {
            create_timeout_seconds: CREATE_TIMEOUT_SECONDS,
            ..ControllerArgs::default()
        };
        let (stop_controller, stop) = oneshot::channel::<()>();
        let served = tokio::spawn(tessera_csi::csi::controller::serve(
            tessera_csi::csi::DRIVER_NAME,
            client.clone(),
            args,
            socket.clone(),
            async move {
                let _ = stop.await;
            },
        ));
        let channel = super::connect(&socket).await;
        let cluster = CsiCluster {
            _dir: dir,
            server: Some(server),
            client,
            socket,
            controller: ControllerClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
            stop_operator: Some(stop_operator),
            operator: Some(operator),
            stop_controller: Some(stop_controller),
            served: Some(served),
        };
        cluster.setup_pool().await;
        cluster
    }

    /// Pool `default` (1 MiB extents), classes `high` and `low`, and per node of [`NODES`] a
    /// Lease and an Online 8 GiB area in the node's zone.
    async fn setup_pool(&self) {
        let pool: StoragePool = serde_json::from_value(json!({
            "apiVersion": "tessera.io/v1alpha1",
            "kind": "StoragePool",
            "metadata": {"name": POOL},
            "spec": {"extentSizeBytes": ES, "placement": {"strategy": "Pack"}},
        }))
        .expect("pool");
        self.api::<StoragePool>()
            .create(&PostParams::default(), &pool)
            .await
            .expect("pool created");
        for (name, value, data) in [
            ("high", 1000, DataPriority::High),
            ("low", 100, DataPriority::Low),
        ] {
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
        for (node, zone) in NODES {
            self.register_node(node).await;
            self.add_area(&format!("{node}-area-0"), node, Some(zone), AREA_BYTES)
                .await;
        }
    }

    /// What a node agent does at start: its Lease `tessera-node-<node>`.
    pub async fn register_node(&self, node: &str) {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(format!("tessera-node-{node}")),
                namespace: Some(NS.into()),
                annotations: Some(
                    [(
                        "tessera.io/control-endpoint".to_owned(),
                        "127.0.0.1:1".to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.into()),
                lease_duration_seconds: Some(30),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..LeaseSpec::default()
            }),
        };
        Api::<Lease>::namespaced(self.client.clone(), NS)
            .create(&PostParams::default(), &lease)
            .await
            .expect("lease created");
    }

    /// What a node agent does for each area of its areas file: create the StorageArea, then
    /// report it Online with its capacity; returns once the operator has seen it.
    pub async fn add_area(&self, name: &str, node: &str, zone: Option<&str>, bytes: i64) {
        let area = StorageArea::new(
            name,
            StorageAreaSpec {
                node_name: node.into(),
                path: format!("/var/lib/tessera/{name}.img"),
                size_bytes: Some(bytes),
                media_type: "ssd".into(),
                domain: zone.map(str::to_owned),
                pool_name: POOL.into(),
            },
        );
        let areas = self.api::<StorageArea>();
        areas
            .create(&PostParams::default(), &area)
            .await
            .expect("area created");
        areas
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "phase": AreaPhase::Online,
                    "capacityBytes": bytes,
                    "areaUid": format!("uid-{name}"),
                    "extentServer": "127.0.0.1:7400",
                    "lastHeartbeatTime": Time(Timestamp::now()),
                }})),
            )
            .await
            .expect("area status patched");
        wait_for(&areas, name, "Ready", |a: &StorageArea| {
            a.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .await;
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

    pub async fn volume(&self, id: &str) -> VirtualVolume {
        self.api::<VirtualVolume>().get(id).await.expect("volume")
    }

    /// Stops the controller, the operator and the API server.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop_controller.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            let result = tokio::time::timeout(Duration::from_secs(10), served)
                .await
                .expect("controller stops")
                .expect("controller task");
            result.expect("controller served cleanly");
        }
        // Like a killed pod: a graceful stop would release the Lease, which nothing here needs.
        drop(self.stop_operator.take());
        if let Some(operator) = self.operator.take() {
            operator.abort();
            let _ = operator.await;
        }
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

fn operator_config() -> Config {
    let identity = "operator-0";
    let mut config = Config::new(identity);
    config.leader = LeaderConfig {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1200),
        retry_period: Duration::from_millis(200),
        ..LeaderConfig::new(identity)
    };
    config.area_heartbeat_timeout = Duration::from_secs(3600);
    config.error_retry = Duration::from_millis(200);
    config.blocked_retry = Duration::from_millis(200);
    config.wait_retry = Duration::from_millis(100);
    config.resync = Duration::from_secs(30);
    config.aggregate_debounce = Duration::from_millis(20);
    config
}

/// Polls `name` until `check` holds (15 s at most).
pub async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, check: impl Fn(&K) -> bool) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
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
