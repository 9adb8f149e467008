//! Restart persistence: objects, uids and the resourceVersion sequence survive a restart, and a
//! watch from a resourceVersion taken before the restart resumes with exactly the missed events.

use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn restart_keeps_objects_uids_and_resource_versions() {
    let (mut ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let a = widgets
        .create(&PostParams::default(), &widget("a", 1))
        .await
        .unwrap();
    widgets
        .create(&PostParams::default(), &widget("b", 2))
        .await
        .unwrap();
    let b = widgets
        .patch_status(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}})),
        )
        .await
        .unwrap();
    let before = ts.server().resource_version();

    ts.restart().await;
    let widgets: Api<Widget> = Api::namespaced(ts.client(), "default");
    let list = widgets.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    let a2 = widgets.get("a").await.unwrap();
    let b2 = widgets.get("b").await.unwrap();
    assert_eq!(
        (a2.uid(), a2.resource_version()),
        (a.uid(), a.resource_version())
    );
    assert_eq!(
        (b2.uid(), b2.resource_version()),
        (b.uid(), b.resource_version())
    );
    assert_eq!(b2.status.unwrap().phase.as_deref(), Some("Ready"));
    assert_eq!(list.metadata.resource_version.unwrap(), before.to_string());

    // The CRDs came back too, and new writes continue the sequence.
    let c = widgets
        .create(&PostParams::default(), &widget("c", 3))
        .await
        .unwrap();
    assert!(c.resource_version().unwrap().parse::<u64>().unwrap() > before);
}

#[tokio::test]
async fn watch_resumes_across_a_restart() {
    let (mut ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    widgets
        .create(&PostParams::default(), &widget("keep", 1))
        .await
        .unwrap();
    let taken = ts.server().resource_version().to_string();

    ts.restart().await;
    let widgets: Api<Widget> = Api::namespaced(ts.client(), "default");
    widgets
        .create(&PostParams::default(), &widget("new", 1))
        .await
        .unwrap();
    widgets
        .patch(
            "keep",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sizeBytes": 2}})),
        )
        .await
        .unwrap();
    widgets
        .delete("new", &DeleteParams::default())
        .await
        .unwrap();

    ts.restart().await;
    let widgets: Api<Widget> = Api::namespaced(ts.client(), "default");
    let stream = widgets
        .watch(
            &WatchParams::default().disable_bookmarks().timeout(5),
            &taken,
        )
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(match next(&mut stream).await.unwrap() {
            WatchEvent::Added(w) => format!("ADDED {}", w.name_any()),
            WatchEvent::Modified(w) => format!("MODIFIED {} {}", w.name_any(), w.spec.size_bytes),
            WatchEvent::Deleted(w) => format!("DELETED {}", w.name_any()),
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(got, ["ADDED new", "MODIFIED keep 2", "DELETED new"]);
    // Nothing else was missed.
    let extra = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        futures::StreamExt::next(&mut stream),
    )
    .await;
    assert!(extra.is_err(), "unexpected extra event: {extra:?}");
}
