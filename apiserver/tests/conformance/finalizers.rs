//! Finalizers and deletion: deletionTimestamp, no new finalizers while deleting, removal of
//! the last finalizer deletes (DELETED event), delete preconditions.

use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions, WatchEvent, WatchParams,
};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn delete_with_finalizers_waits_for_them() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let mut w = widget("f", 1);
    w.metadata.finalizers = Some(vec!["test.tessera.io/a".into(), "test.tessera.io/b".into()]);
    let w = widgets.create(&PostParams::default(), &w).await.unwrap();
    let stream = widgets
        .watch(
            &WatchParams::default().disable_bookmarks().timeout(10),
            &w.resource_version().unwrap(),
        )
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);

    // Delete: the object stays, with deletionTimestamp + grace period, as a MODIFIED event.
    let marked = widgets
        .delete("f", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("object returned");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(0));
    assert!(
        matches!(next(&mut stream).await.unwrap(), WatchEvent::Modified(m) if m.metadata.deletion_timestamp.is_some())
    );
    assert!(widgets.get("f").await.is_ok());

    // Deleting again changes nothing.
    let again = widgets
        .delete("f", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(again.resource_version(), marked.resource_version());

    // No new finalizers on an object being deleted (422 Forbidden, like the real server).
    let s = api_error(
        widgets
            .patch(
                "f",
                &PatchParams::default(),
                &Patch::Json::<()>(serde_json::from_value(json!([
                    {"op": "add", "path": "/metadata/finalizers/-", "value": "test.tessera.io/c"}
                ]))
                .unwrap()),
            )
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(s.details.unwrap().causes[0].field, "metadata.finalizers");

    // Removing one finalizer is an update; removing the last one deletes.
    widgets
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["test.tessera.io/b"]}})),
        )
        .await
        .unwrap();
    assert!(matches!(
        next(&mut stream).await.unwrap(),
        WatchEvent::Modified(_)
    ));
    widgets
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    match next(&mut stream).await.unwrap() {
        WatchEvent::Deleted(d) => assert_eq!(d.name_any(), "f"),
        other => panic!("expected DELETED, got {other:?}"),
    }
    assert_eq!(api_error(widgets.get("f").await).code, 404);
}

#[tokio::test]
async fn delete_preconditions_are_honoured() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let w = widgets
        .create(&PostParams::default(), &widget("p", 1))
        .await
        .unwrap();
    let wrong_uid = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("not-the-uid".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let s = api_error(widgets.delete("p", &wrong_uid).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert!(
        s.message
            .contains("Precondition failed: UID in precondition: not-the-uid"),
        "{}",
        s.message
    );
    let wrong_rv = DeleteParams {
        preconditions: Some(Preconditions {
            uid: None,
            resource_version: Some("1".into()),
        }),
        ..DeleteParams::default()
    };
    assert_eq!(api_error(widgets.delete("p", &wrong_rv).await).code, 409);
    let right = DeleteParams {
        preconditions: Some(Preconditions {
            uid: w.uid(),
            resource_version: w.resource_version(),
        }),
        ..DeleteParams::default()
    };
    widgets.delete("p", &right).await.unwrap();
    assert_eq!(api_error(widgets.get("p").await).code, 404);
}
