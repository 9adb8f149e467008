//! Merge patch, JSON patch (with a failing `test`), server-side apply (field manager recorded,
//! create through apply, fieldManager required), strategic merge patch on a built-in.

use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn merge_patch() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let mut w = widget("m", 1);
    w.metadata.labels = Some([("a".into(), "1".into()), ("b".into(), "2".into())].into());
    widgets.create(&PostParams::default(), &w).await.unwrap();
    let p = json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"maxBytes": 10}});
    let out = widgets
        .patch("m", &PatchParams::default(), &Patch::Merge(&p))
        .await
        .unwrap();
    assert_eq!(
        out.labels().clone(),
        [
            ("b".to_string(), "2".to_string()),
            ("c".to_string(), "3".to_string())
        ]
        .into()
    );
    assert_eq!(out.spec.max_bytes, Some(10));
    assert_eq!(out.spec.size_bytes, 1);
    // A patch on a missing object is a 404.
    let s = api_error(
        widgets
            .patch("nope", &PatchParams::default(), &Patch::Merge(&p))
            .await,
    );
    assert_eq!(s.code, 404);
    // A stale resourceVersion inside the patch is a conflict.
    let s = api_error(
        widgets
            .patch(
                "m",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}})),
            )
            .await,
    );
    assert_eq!(s.code, 409);
}

#[tokio::test]
async fn json_patch_and_failed_test() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    widgets
        .create(&PostParams::default(), &widget("j", 1))
        .await
        .unwrap();
    let ok: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/sizeBytes", "value": 1},
        {"op": "replace", "path": "/spec/sizeBytes", "value": 7},
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}},
    ]))
    .unwrap();
    let out = widgets
        .patch("j", &PatchParams::default(), &Patch::Json::<()>(ok))
        .await
        .unwrap();
    assert_eq!(out.spec.size_bytes, 7);
    assert_eq!(out.labels().get("x").map(String::as_str), Some("y"));

    let failing: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/sizeBytes", "value": 1},
        {"op": "replace", "path": "/spec/sizeBytes", "value": 8},
    ]))
    .unwrap();
    let s = api_error(
        widgets
            .patch("j", &PatchParams::default(), &Patch::Json::<()>(failing))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        s.message,
        "the server rejected our request due to an error in our request"
    );
    assert_eq!(
        widgets.get("j").await.unwrap().spec.size_bytes,
        7,
        "nothing applied"
    );
}

#[tokio::test]
async fn server_side_apply_is_a_merge_recorded_in_managed_fields() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let applied = json!({
        "apiVersion": "test.tessera.io/v1",
        "kind": "Widget",
        "metadata": {"name": "a", "labels": {"team": "x"}},
        "spec": {"sizeBytes": 3, "mode": "Slow"},
    });
    // Apply creates a missing object.
    let created = widgets
        .patch("a", &PatchParams::apply("tester"), &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(created.spec.size_bytes, 3);
    let mf = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(mf.len(), 1);
    assert_eq!(mf[0].manager.as_deref(), Some("tester"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    let fields = &mf[0].fields_v1.as_ref().unwrap().0;
    assert_eq!(fields["f:spec"]["f:sizeBytes"], json!({}));
    assert_eq!(fields["f:metadata"]["f:labels"]["f:team"], json!({}));

    // Applying again merges; an identical apply is a no-op (same resourceVersion).
    let again = widgets
        .patch("a", &PatchParams::apply("tester"), &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(again.resource_version(), created.resource_version());
    let more =
        json!({"apiVersion": "test.tessera.io/v1", "kind": "Widget", "spec": {"maxBytes": 9}});
    let out = widgets
        .patch(
            "a",
            &PatchParams::apply("other").force(),
            &Patch::Apply(&more),
        )
        .await
        .unwrap();
    assert_eq!((out.spec.size_bytes, out.spec.max_bytes), (3, Some(9)));
    let managers: Vec<_> = out
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["tester", "other"]);

    // fieldManager is required for apply (422 on PatchOptions, like the real server).
    let s = api_error(
        widgets
            .patch("a", &PatchParams::default(), &Patch::Apply(&applied))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert!(
        s.message.contains("fieldManager: Required value"),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn strategic_merge_patch_on_builtin() {
    let (_ts, client) = setup().await;
    let namespaces: Api<Namespace> = Api::all(client);
    let out = namespaces
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"team": "storage"}, "$setElementOrder/finalizers": []}})),
        )
        .await
        .unwrap();
    assert_eq!(
        out.labels().get("team").map(String::as_str),
        Some("storage")
    );
}
