//! limit/continue through `Api::list` and `kube::runtime::watcher`, consistent snapshots, and
//! 410 for an expired continue token.

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn list_pagination_is_a_consistent_snapshot() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    for i in 0..7 {
        widgets
            .create(&PostParams::default(), &widget(&format!("w{i}"), i))
            .await
            .unwrap();
    }
    let first = widgets.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(first.items.len(), 3);
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    let token = first.metadata.continue_.clone().expect("continue token");
    let snapshot_rv = first.metadata.resource_version.clone();

    // Changes after the first page do not show up in later pages.
    widgets
        .delete("w4", &DeleteParams::default())
        .await
        .unwrap();
    widgets
        .patch(
            "w5",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sizeBytes": 99}})),
        )
        .await
        .unwrap();
    widgets
        .create(&PostParams::default(), &widget("w9", 9))
        .await
        .unwrap();

    let mut names: Vec<String> = first.items.iter().map(|w| w.name_any()).collect();
    let mut token = Some(token);
    while let Some(t) = token {
        let page = widgets
            .list(&ListParams::default().limit(3).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(page.metadata.resource_version, snapshot_rv);
        for w in &page.items {
            if w.name_any() == "w5" {
                assert_eq!(w.spec.size_bytes, 5, "page shows the snapshot state");
            }
        }
        names.extend(page.items.iter().map(|w| w.name_any()));
        token = page.metadata.continue_.filter(|c| !c.is_empty());
    }
    assert_eq!(names, ["w0", "w1", "w2", "w3", "w4", "w5", "w6"]);

    // A fresh list sees the new state.
    let now = widgets.list(&ListParams::default()).await.unwrap();
    let now: Vec<String> = now.items.iter().map(|w| w.name_any()).collect();
    assert_eq!(now, ["w0", "w1", "w2", "w3", "w5", "w6", "w9"]);
}

#[tokio::test]
async fn continue_token_outside_the_window_is_410() {
    let ts = TestServer::start_with(fast_builder().history_window(5)).await;
    let client = ts.client();
    install_crds(&client).await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    for i in 0..4 {
        widgets
            .create(&PostParams::default(), &widget(&format!("w{i}"), i))
            .await
            .unwrap();
    }
    let first = widgets.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first.metadata.continue_.unwrap();
    for i in 0..6 {
        widgets
            .patch(
                "w0",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"sizeBytes": 100 + i}})),
            )
            .await
            .unwrap();
    }
    let s = api_error(
        widgets
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
    assert!(
        s.message
            .starts_with("The provided continue parameter is too old")
    );
}

async fn collect_init(
    stream: impl futures::Stream<Item = Result<watcher::Event<Widget>, watcher::Error>>,
) -> Vec<String> {
    let mut stream = std::pin::pin!(stream);
    let mut names = Vec::new();
    loop {
        match next(&mut stream).await.unwrap() {
            watcher::Event::Init => {}
            watcher::Event::InitApply(w) => names.push(w.name_any()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    names.sort();
    names
}

#[tokio::test]
async fn watcher_paginates_and_streams() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let mut expected = Vec::new();
    for i in 0..7 {
        widgets
            .create(&PostParams::default(), &widget(&format!("w{i}"), i))
            .await
            .unwrap();
        expected.push(format!("w{i}"));
    }
    // ListWatch with a page size smaller than the collection: several list calls.
    let paged = watcher(
        widgets.clone(),
        watcher::Config::default().page_size(2).timeout(5),
    );
    assert_eq!(collect_init(paged).await, expected);

    // Streaming list (sendInitialEvents + the initial-events-end bookmark).
    let streaming = watcher(
        widgets.clone(),
        watcher::Config::default().streaming_lists().timeout(5),
    );
    let mut streaming = std::pin::pin!(streaming);
    let mut names = Vec::new();
    loop {
        match next(&mut streaming).await.unwrap() {
            watcher::Event::Init => {}
            watcher::Event::InitApply(w) => names.push(w.name_any()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    names.sort();
    assert_eq!(names, expected);
    // ... and it keeps watching after the initial list.
    widgets
        .create(&PostParams::default(), &widget("late", 1))
        .await
        .unwrap();
    match next(&mut streaming).await.unwrap() {
        watcher::Event::Apply(w) => assert_eq!(w.name_any(), "late"),
        other => panic!("unexpected {other:?}"),
    }
}
