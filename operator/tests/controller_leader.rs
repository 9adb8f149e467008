//! Two operator replicas: only the holder of the Lease acts. A graceful stop hands over at once
//! (the Lease is released); a killed leader is replaced once its Lease expires.

mod controller_support;

use std::time::{Duration, Instant};

use controller_support::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams};
use serde_json::json;
use tessera_api::v1alpha1::DataPriority;

const CONTROLLERS: [&str; 6] = ["area", "pool", "class", "claim", "volume", "remap"];

async fn holder(cluster: &Cluster) -> Option<String> {
    Api::<Lease>::namespaced(cluster.client.clone(), "default")
        .get_opt("tessera-operator")
        .await
        .unwrap()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

async fn wait_holder(cluster: &Cluster, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder(cluster).await.as_deref() != Some(want) {
        assert!(Instant::now() < deadline, "{want} never took the lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every event the operator published, by reporting instance.
async fn reporters(cluster: &Cluster) -> Vec<String> {
    let mut instances: Vec<String> = Api::<K8sEvent>::namespaced(cluster.client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reporting_instance)
        .collect();
    instances.sort();
    instances.dedup();
    instances
}

fn reconciles(operator: &OperatorHandle) -> usize {
    CONTROLLERS
        .iter()
        .map(|c| operator.metrics.reconcile_count(c))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_leader_acts_and_a_standby_takes_over() {
    let cluster = Cluster::start().await;
    let first = cluster.spawn(cluster.config("replica-a"));
    wait_holder(&cluster, "replica-a").await;
    let second = cluster.spawn(cluster.config("replica-b"));

    cluster
        .create_class("standard", 0, DataPriority::High)
        .await;
    cluster.create_pool("pool", json!({})).await;
    cluster.create_area("area-a", "node-a", "pool", 1_000).await;
    cluster.create_claim("one", "pool", 100, "standard").await;
    cluster.bound("one").await;
    cluster.event("one", "Bound").await;

    // The standby did nothing at all: no reconcile, no event, no Lease.
    assert_eq!(reconciles(&second), 0);
    assert!(reconciles(&first) > 0);
    assert_eq!(reporters(&cluster).await, ["replica-a"]);
    assert_eq!(holder(&cluster).await.as_deref(), Some("replica-a"));
    assert!(first.metrics.encode().contains("tessera_operator_leader 1"));
    assert!(
        second
            .metrics
            .encode()
            .contains("tessera_operator_leader 0")
    );

    // A graceful stop releases the Lease: the standby takes over without waiting for expiry.
    let stopped = Instant::now();
    first.stop().await;
    wait_holder(&cluster, "replica-b").await;
    assert!(
        stopped.elapsed() < Duration::from_millis(1500),
        "handover took {:?}",
        stopped.elapsed()
    );
    cluster.create_claim("two", "pool", 100, "standard").await;
    cluster.bound("two").await;
    cluster.event("two", "Bound").await;
    assert_eq!(reporters(&cluster).await, ["replica-a", "replica-b"]);

    // A killed leader keeps the Lease until it expires; then a new replica leads.
    second.kill().await;
    let killed = Instant::now();
    let third = cluster.spawn(cluster.config("replica-c"));
    cluster.create_claim("three", "pool", 100, "standard").await;
    cluster.bound("three").await;
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "replica-c acted {:?} after the kill, before the 2 s lease expired",
        killed.elapsed()
    );
    assert_eq!(holder(&cluster).await.as_deref(), Some("replica-c"));
    cluster.assert_no_extent_mapped_twice().await;
    third.stop().await;
}
