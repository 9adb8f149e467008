//! Built-in kinds: Namespaces (lifecycle), Nodes, core/v1 and events.k8s.io/v1 Events, Leases
//! with optimistic concurrency.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Namespace, Node};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::*;

fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn namespaces_lifecycle() {
    let (_ts, client) = setup().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert!(names.contains(&"default".to_string()) && names.contains(&"kube-system".to_string()));

    let ns = namespaces
        .create(
            &PostParams::default(),
            &from(json!({"metadata": {"name": "team-a"}})),
        )
        .await
        .unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));
    let bad = api_error(
        namespaces
            .create(
                &PostParams::default(),
                &from(json!({"metadata": {"name": "a.b"}})),
            )
            .await,
    );
    assert_eq!(bad.code, 422, "namespace names are DNS labels");

    // Objects in it; one with a finalizer keeps the namespace Terminating.
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "team-a");
    widgets
        .create(&PostParams::default(), &widget("plain", 1))
        .await
        .unwrap();
    let mut held = widget("held", 1);
    held.metadata.finalizers = Some(vec!["test.tessera.io/hold".into()]);
    widgets.create(&PostParams::default(), &held).await.unwrap();

    let terminating = namespaces
        .delete("team-a", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = terminating.left().unwrap();
    assert_eq!(
        terminating.status.unwrap().phase.as_deref(),
        Some("Terminating")
    );
    assert_eq!(api_error(widgets.get("plain").await).code, 404);
    assert!(
        widgets
            .get("held")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    let s = api_error(
        widgets
            .create(&PostParams::default(), &widget("new", 1))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));

    widgets
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert_eq!(
        api_error(namespaces.get("team-a").await).code,
        404,
        "namespace gone once empty"
    );

    let s = api_error(namespaces.delete("default", &DeleteParams::default()).await);
    assert_eq!(s.code, 403);
}

#[tokio::test]
async fn nodes_crud_and_status() {
    let (_ts, client) = setup().await;
    let nodes: Api<Node> = Api::all(client);
    let n = nodes
        .create(
            &PostParams::default(),
            &from(json!({"metadata": {"name": "node-1", "labels": {"zone": "a"}}})),
        )
        .await
        .unwrap();
    assert_eq!(n.name_any(), "node-1");
    let out = nodes
        .patch_status(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .unwrap();
    assert_eq!(out.status.unwrap().conditions.unwrap()[0].status, "True");
    assert_eq!(
        nodes
            .list(&ListParams::default().labels("zone=a"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    nodes
        .delete("node-1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn core_and_events_k8s_io_events() {
    let (_ts, client) = setup().await;
    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let e = core
        .create(
            &PostParams::default(),
            &from(json!({
                "metadata": {"name": "w.1"},
                "involvedObject": {"kind": "Widget", "name": "w", "namespace": "default"},
                "reason": "Tested", "message": "hello", "type": "Normal",
            })),
        )
        .await
        .unwrap();
    assert_eq!(e.reason.as_deref(), Some("Tested"));
    let by_object = core
        .list(&ListParams::default().fields("involvedObject.name=w"))
        .await
        .unwrap();
    assert_eq!(by_object.items.len(), 1);
    core.delete("w.1", &DeleteParams::default()).await.unwrap();

    let events: Api<Event> = Api::namespaced(client, "default");
    let e = events
        .create(
            &PostParams::default(),
            &from(json!({
                "metadata": {"name": "w.2"},
                "eventTime": "2025-01-01T00:00:00.000000Z",
                "reportingController": "test", "reportingInstance": "test-1",
                "action": "Act", "reason": "Tested", "type": "Normal", "note": "hi",
                "regarding": {"kind": "Widget", "name": "w", "namespace": "default"},
            })),
        )
        .await
        .unwrap();
    assert_eq!(e.note.as_deref(), Some("hi"));
    let patched = events
        .patch(
            "w.2",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"series": {"count": 2, "lastObservedTime": "2025-01-01T00:00:01.000000Z"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(patched.series.unwrap().count, 2);
    assert_eq!(
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn leases_optimistic_concurrency() {
    let (_ts, client) = setup().await;
    let leases: Api<Lease> = Api::namespaced(client, "kube-system");
    let l = leases
        .create(
            &PostParams::default(),
            &from(json!({"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}})),
        )
        .await
        .unwrap();
    // Two candidates race from the same version: one wins, the other gets 409.
    let mut b = l.clone();
    b.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let mut c = l.clone();
    c.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let won = leases
        .replace("leader", &PostParams::default(), &b)
        .await
        .unwrap();
    assert_eq!(won.spec.unwrap().holder_identity.as_deref(), Some("b"));
    let s = api_error(leases.replace("leader", &PostParams::default(), &c).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        leases
            .get("leader")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );
}
