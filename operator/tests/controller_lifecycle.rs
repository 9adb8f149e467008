//! Lifecycles around allocation: area heartbeats (Offline after the timeout, Online when they
//! return), deletions refused while in use, a deleted claim returning its extents, charging
//! every interval exactly once across a restart (seed 000 Fig. 10), and the HTTP endpoints.

mod controller_support;

use std::time::Duration;

use controller_support::*;
use kube::ResourceExt;
use kube::api::DeleteParams;
use serde_json::json;
use tessera_api::v1alpha1::{
    AreaPhase, DataPriority, StorageArea, StoragePool, StoragePriorityClass, VirtualVolume,
};
use tessera_operator::controllers::Operator;
use tessera_operator::planners::charging::Amount;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<String> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn areas_go_offline_without_heartbeats_and_online_when_they_return() {
    let cluster = Cluster::start().await;
    let mut config = cluster.config("operator-0");
    config.area_heartbeat_timeout = Duration::from_secs(2);
    let operator = cluster.spawn(config);
    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 1_000).await;
    cluster.create_claim("data", "pool", 100, "standard").await;
    let (_, volume) = cluster.bound("data").await;

    // The node stops heartbeating.
    let areas = cluster.api::<StorageArea>();
    let offline = wait_for(&areas, "area-a", "Offline", |a: &StorageArea| {
        a.status.as_ref().and_then(|s| s.phase) == Some(AreaPhase::Offline)
    })
    .await;
    assert_eq!(
        condition(&offline.status.unwrap().conditions, "Ready").as_deref(),
        Some("False")
    );
    let note = cluster.event("area-a", "HeartbeatLost").await;
    assert!(note.contains("node-a"), "{note}");
    wait_for(
        &cluster.api::<VirtualVolume>(),
        &volume.name_any(),
        "Degraded",
        |v: &VirtualVolume| {
            v.status
                .as_ref()
                .is_some_and(|s| condition(&s.conditions, "Degraded").as_deref() == Some("True"))
        },
    )
    .await;
    cluster
        .pool_where("pool", "not Ready", |s| {
            s.online_areas == 0 && condition(&s.conditions, "Ready").as_deref() == Some("False")
        })
        .await;

    // Heartbeats return.
    cluster.heartbeat("area-a").await;
    wait_for(&areas, "area-a", "Online", |a: &StorageArea| {
        a.status.as_ref().and_then(|s| s.phase) == Some(AreaPhase::Online)
    })
    .await;
    cluster.event("area-a", "HeartbeatResumed").await;
    wait_for(
        &cluster.api::<VirtualVolume>(),
        &volume.name_any(),
        "healthy",
        |v: &VirtualVolume| {
            v.status
                .as_ref()
                .is_some_and(|s| condition(&s.conditions, "Ready").as_deref() == Some("True"))
        },
    )
    .await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletions_wait_while_in_use_and_a_deleted_claim_returns_its_extents() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    cluster.create_class("standard", 0, DataPriority::Low).await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 1_000).await;
    cluster.create_claim("data", "pool", 300, "standard").await;
    let (_, volume) = cluster.bound("data").await;
    cluster
        .pool_where("pool", "allocated", |s| s.allocated_bytes == 300 * ES)
        .await;

    // Growing a bound claim appends extents (D-33); the pool counts them.
    cluster
        .claims()
        .patch(
            "data",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"sizeBytes": 400 * ES}})),
        )
        .await
        .unwrap();
    let note = cluster.event("data", "Expanded").await;
    assert!(note.contains(&volume.name_any()), "{note}");
    cluster
        .pool_where("pool", "allocated", |s| s.allocated_bytes == 400 * ES)
        .await;

    // Area, class and pool are in use: their deletion waits, with a Warning saying why.
    let delete = DeleteParams::default();
    cluster
        .api::<StorageArea>()
        .delete("area-a", &delete)
        .await
        .unwrap();
    cluster
        .api::<StoragePriorityClass>()
        .delete("standard", &delete)
        .await
        .unwrap();
    cluster
        .api::<StoragePool>()
        .delete("pool", &delete)
        .await
        .unwrap();
    let note = cluster.event("area-a", "AreaInUse").await;
    assert!(note.contains(&volume.name_any()), "{note}");
    assert!(
        cluster
            .event("standard", "ClassInUse")
            .await
            .contains("1 claims")
    );
    assert!(cluster.event("pool", "PoolInUse").await.contains("area-a"));
    let area = cluster.api::<StorageArea>().get("area-a").await.unwrap();
    assert!(area.metadata.deletion_timestamp.is_some());
    // A claim arriving now cannot use the area being deleted.
    assert!(
        cluster
            .api::<StoragePriorityClass>()
            .get_opt("standard")
            .await
            .unwrap()
            .is_some()
    );

    // Deleting the claim deletes its volume; the volume's finalizer returns the extents.
    cluster.claims().delete("data", &delete).await.unwrap();
    wait_gone(&cluster.claims(), "data").await;
    wait_gone(&cluster.api::<VirtualVolume>(), &volume.name_any()).await;
    assert!(
        cluster
            .event(&volume.name_any(), "ExtentsReturned")
            .await
            .contains("pool")
    );
    // Now nothing holds them: area, class and pool go.
    wait_gone(&cluster.api::<StorageArea>(), "area-a").await;
    wait_gone(&cluster.api::<StoragePriorityClass>(), "standard").await;
    wait_gone(&cluster.api::<StoragePool>(), "pool").await;
    operator.stop().await;
}

/// Seed 000 Fig. 10 with D-4 rates: 3600 per GiB-hour of high-priority data is 1 per GiB-second,
/// so a 1 GiB volume full of high-priority data accrues exactly 1 per 1 s interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn charging_accrues_each_interval_once_across_a_restart() {
    let cluster = Cluster::start().await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    cluster.create_class("gold", 10, DataPriority::High).await;
    cluster
        .create_pool(
            "pool",
            json!({"charging": {
                "intervalSeconds": 1,
                "highPriorityRatePerGiBHour": "3600",
                "lowPriorityRatePerGiBHour": "1800",
            }}),
        )
        .await;
    cluster
        .create_area("area-a", "node-a", "pool", 20_000)
        .await;
    cluster.create_claim("billed", "pool", 16_384, "gold").await;
    let (_, volume) = cluster.bound("billed").await;
    let name = volume.name_any();
    cluster.report_usage(&name, &[(0..16_384, true)]).await;

    let volumes = cluster.api::<VirtualVolume>();
    let charge = |v: &VirtualVolume| {
        let c = v.status.as_ref().and_then(|s| s.charge.clone()).unwrap();
        (
            Amount::parse_accrued(&c.accrued).unwrap().micros(),
            c.last_charged_time.unwrap().0.as_second(),
        )
    };
    // A first mark with the usage in place, then two more whole intervals.
    let first = charge(
        &wait_for(&volumes, &name, "charged", |v| {
            v.status.as_ref().is_some_and(|s| s.charge.is_some())
        })
        .await,
    );
    let first = {
        let mark = first.1 + 1;
        charge(&wait_for(&volumes, &name, "charged", |v| charge(v).1 >= mark).await)
    };
    let second = charge(
        &wait_for(&volumes, &name, "charged twice", |v| {
            charge(v).1 >= first.1 + 2
        })
        .await,
    );
    assert_eq!(second.0 - first.0, (second.1 - first.1) as i128 * 1_000_000);

    // The operator is down for a while; the restarted one charges every missed interval once.
    operator.stop().await;
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let operator = cluster.spawn(cluster.config("operator-0"));
    let third = charge(
        &wait_for(&volumes, &name, "charged after restart", |v| {
            charge(v).1 >= second.1 + 3
        })
        .await,
    );
    assert_eq!(third.0 - second.0, (third.1 - second.1) as i128 * 1_000_000);
    assert!(
        operator
            .metrics
            .encode()
            .contains("tessera_volume_charge_accrued{")
    );
    operator.stop().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_health_and_readiness_are_served() {
    let cluster = Cluster::start().await;
    let operator = Operator::new(cluster.client.clone(), cluster.config("operator-0"));
    let (addr, _server) = tessera_operator::metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        operator.metrics(),
        operator.health(),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok".into()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while http_get(addr, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.create_class("standard", 0, DataPriority::Low).await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 1_000).await;
    cluster.create_claim("one", "pool", 100, "standard").await;
    cluster.bound("one").await;
    cluster
        .pool_where("pool", "counted", |s| s.allocated_bytes == 100 * ES)
        .await;
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        r#"tessera_pool_bytes{pool="pool",state="allocated"} 6553600"#,
        r#"tessera_pool_claims{pool="pool",phase="Bound"} 1"#,
        "tessera_operator_reconcile_duration_seconds_bucket{",
        "tessera_operator_leader 1",
    ] {
        assert!(body.contains(needle), "{needle} missing from\n{body}");
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
