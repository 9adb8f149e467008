//! The status subresource and metadata.generation.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn status_subresource_isolation() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    // Status sent on create is dropped.
    let mut w = widget("s", 1);
    w.status = Some(WidgetStatus {
        phase: Some("Bogus".into()),
        observed_generation: None,
    });
    let w = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(w.status, None);

    // Status changes through the main resource are ignored.
    let out = widgets
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Main"}, "spec": {"sizeBytes": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(out.status, None);
    assert_eq!(out.spec.size_bytes, 2);

    // Spec and metadata changes through /status are ignored; status applies.
    let out = widgets
        .patch_status(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}, "spec": {"sizeBytes": 99}, "metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(out.status.as_ref().unwrap().phase.as_deref(), Some("Ready"));
    assert_eq!(out.spec.size_bytes, 2);
    assert!(out.labels().is_empty());

    // PUT on /status.
    let mut cur = widgets.get("s").await.unwrap();
    cur.status = Some(WidgetStatus {
        phase: Some("Done".into()),
        observed_generation: Some(2),
    });
    cur.spec.size_bytes = 50;
    let out = widgets
        .replace_status("s", &PostParams::default(), &cur)
        .await
        .unwrap();
    assert_eq!(out.status.unwrap().phase.as_deref(), Some("Done"));
    assert_eq!(out.spec.size_bytes, 2);
    assert_eq!(widgets.get_status("s").await.unwrap().spec.size_bytes, 2);
}

#[tokio::test]
async fn generation_bumps_only_on_spec_changes() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    let w = widgets
        .create(&PostParams::default(), &widget("g", 1))
        .await
        .unwrap();
    assert_eq!(w.metadata.generation, Some(1));
    let meta_only = widgets
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(meta_only.metadata.generation, Some(1));
    let status_only = widgets
        .patch_status(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "X"}})),
        )
        .await
        .unwrap();
    assert_eq!(status_only.metadata.generation, Some(1));
    let spec = widgets
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sizeBytes": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(spec.metadata.generation, Some(2));
    // A no-op update changes nothing at all.
    let noop = widgets
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sizeBytes": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(noop.resource_version(), spec.resource_version());

    // Without a status subresource, any non-metadata change bumps the generation.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.test.tessera.io"},
        "spec": {
            "group": "test.tessera.io",
            "scope": "Namespaced",
            "names": {"plural": "things", "kind": "Thing"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.tessera.io", "v1", "Thing"),
        "things",
    );
    let things: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
    let mut t = DynamicObject::new("t", &ar);
    t.data = json!({"status": {"a": 1}});
    let t = things.create(&PostParams::default(), &t).await.unwrap();
    assert_eq!(
        t.data["status"]["a"], 1,
        "no status subresource: status is kept on create"
    );
    let t = things
        .patch(
            "t",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"a": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(t.metadata.generation, Some(2));
}
