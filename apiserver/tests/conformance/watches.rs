//! Watches: ordered events from a resourceVersion, bookmarks, 410 for an expired
//! resourceVersion, selector transitions, and RV "0"/absent semantics.

use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::support::*;

fn kinds(evs: &[WatchEvent<Widget>]) -> Vec<String> {
    evs.iter()
        .map(|e| match e {
            WatchEvent::Added(w) => format!("ADDED {}", w.name_any()),
            WatchEvent::Modified(w) => format!("MODIFIED {}", w.name_any()),
            WatchEvent::Deleted(w) => format!("DELETED {}", w.name_any()),
            WatchEvent::Bookmark(_) => "BOOKMARK".into(),
            WatchEvent::Error(e) => format!("ERROR {}", e.code),
        })
        .collect()
}

#[tokio::test]
async fn watch_from_resource_version_in_order() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let w = widgets
        .create(&PostParams::default(), &widget("before", 1))
        .await
        .unwrap();
    let from = w.resource_version().unwrap();

    widgets
        .create(&PostParams::default(), &widget("a", 1))
        .await
        .unwrap();
    widgets
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sizeBytes": 2}})),
        )
        .await
        .unwrap();
    widgets.delete("a", &DeleteParams::default()).await.unwrap();

    let params = WatchParams::default().disable_bookmarks().timeout(5);
    let stream = widgets.watch(&params, &from).await.unwrap();
    let mut stream = std::pin::pin!(stream);
    let mut evs = Vec::new();
    for _ in 0..3 {
        evs.push(next(&mut stream).await.unwrap());
    }
    assert_eq!(kinds(&evs), ["ADDED a", "MODIFIED a", "DELETED a"]);
    // resourceVersions increase, the DELETED one carries the deletion's resourceVersion.
    let rvs: Vec<u64> = evs
        .iter()
        .map(|e| match e {
            WatchEvent::Added(w) | WatchEvent::Modified(w) | WatchEvent::Deleted(w) => {
                w.resource_version().unwrap().parse().unwrap()
            }
            _ => 0,
        })
        .collect();
    assert!(rvs.windows(2).all(|p| p[0] < p[1]), "{rvs:?}");

    // Live events keep coming.
    widgets
        .create(&PostParams::default(), &widget("live", 1))
        .await
        .unwrap();
    assert_eq!(kinds(&[next(&mut stream).await.unwrap()]), ["ADDED live"]);
}

#[tokio::test]
async fn rv_zero_and_absent_start_with_the_current_state() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    widgets
        .create(&PostParams::default(), &widget("x", 1))
        .await
        .unwrap();
    for rv in ["0", ""] {
        let params = WatchParams::default().disable_bookmarks().timeout(5);
        let stream = widgets.watch(&params, rv).await.unwrap();
        let mut stream = std::pin::pin!(stream);
        assert_eq!(kinds(&[next(&mut stream).await.unwrap()]), ["ADDED x"]);
    }
}

#[tokio::test]
async fn periodic_bookmarks_carry_the_latest_resource_version() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    let w = widgets
        .create(&PostParams::default(), &widget("x", 1))
        .await
        .unwrap();
    let rv = w.resource_version().unwrap();
    // Changes elsewhere advance the bookmark's resourceVersion.
    let gadgets: Api<Gadget> = Api::all(client);
    let g = gadgets
        .create(
            &PostParams::default(),
            &Gadget::new("g", GadgetSpec { color: "c".into() }),
        )
        .await
        .unwrap();
    let params = WatchParams::default().timeout(5);
    let stream = widgets.watch(&params, &rv).await.unwrap();
    let mut stream = std::pin::pin!(stream);
    match next(&mut stream).await.unwrap() {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, g.resource_version().unwrap())
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn bookmark_at_timeout_then_end_of_stream() {
    // Periodic bookmarks far away: the only bookmark is the one sent at timeoutSeconds.
    let ts =
        TestServer::start_with(fast_builder().bookmark_interval(Duration::from_secs(60))).await;
    let client = ts.client();
    install_crds(&client).await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let w = widgets
        .create(&PostParams::default(), &widget("x", 1))
        .await
        .unwrap();
    let rv = w.resource_version().unwrap();
    let started = tokio::time::Instant::now();
    let stream = widgets
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    let mut evs = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream ends")
    {
        evs.push(ev.unwrap());
    }
    assert_eq!(kinds(&evs), ["BOOKMARK"]);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn expired_resource_version_is_410_gone() {
    let ts = TestServer::start_with(fast_builder().history_window(5)).await;
    let client = ts.client();
    install_crds(&client).await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let w = widgets
        .create(&PostParams::default(), &widget("x", 0))
        .await
        .unwrap();
    let old = w.resource_version().unwrap();
    for i in 1..10 {
        widgets
            .patch(
                "x",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"sizeBytes": i}})),
            )
            .await
            .unwrap();
    }
    let stream = widgets
        .watch(&WatchParams::default().timeout(5), &old)
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    match next(&mut stream).await.unwrap() {
        WatchEvent::Error(s) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert!(
                s.message.starts_with("too old resource version"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 410, got {other:?}"),
    }
    // A list at an exact resourceVersion outside the window is a 410 as well.
    let lp = kube::api::ListParams::default()
        .at(&old)
        .matching(kube::api::VersionMatch::Exact);
    assert_eq!(api_error(widgets.list(&lp).await).code, 410);
}

#[tokio::test]
async fn selector_watch_sees_objects_leave_and_enter() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let mut w = widget("x", 1);
    w.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
    let w = widgets.create(&PostParams::default(), &w).await.unwrap();
    let params = WatchParams::default()
        .labels("app=web")
        .disable_bookmarks()
        .timeout(5);
    let stream = widgets
        .watch(&params, &w.resource_version().unwrap())
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    let relabel = |v: &str| Patch::Merge(json!({"metadata": {"labels": {"app": v}}}));
    widgets
        .patch("x", &PatchParams::default(), &relabel("db"))
        .await
        .unwrap();
    widgets
        .patch("x", &PatchParams::default(), &relabel("web"))
        .await
        .unwrap();
    widgets
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sizeBytes": 5}})),
        )
        .await
        .unwrap();
    let mut evs = Vec::new();
    for _ in 0..3 {
        evs.push(next(&mut stream).await.unwrap());
    }
    assert_eq!(kinds(&evs), ["DELETED x", "ADDED x", "MODIFIED x"]);
}
