//! Label selectors (every operator) and field selectors.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};

use crate::support::*;

async fn names(api: &Api<Widget>, lp: ListParams) -> Vec<String> {
    let mut v: Vec<String> = api
        .list(&lp)
        .await
        .unwrap()
        .items
        .iter()
        .map(|w| w.name_any())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn label_selector_operators() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    for (name, labels) in [
        ("a", vec![("app", "web"), ("tier", "front")]),
        ("b", vec![("app", "db"), ("tier", "back")]),
        ("c", vec![("app", "cache")]),
        ("d", vec![]),
    ] {
        let mut w = widget(name, 1);
        w.metadata.labels = Some(
            labels
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        widgets.create(&PostParams::default(), &w).await.unwrap();
    }
    let q = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(&widgets, q("app=web")).await, ["a"]);
    assert_eq!(names(&widgets, q("app==db")).await, ["b"]);
    assert_eq!(names(&widgets, q("app!=web")).await, ["b", "c", "d"]);
    assert_eq!(names(&widgets, q("app in (web,db)")).await, ["a", "b"]);
    assert_eq!(names(&widgets, q("app notin (web, db)")).await, ["c", "d"]);
    assert_eq!(names(&widgets, q("tier")).await, ["a", "b"]);
    assert_eq!(names(&widgets, q("!tier")).await, ["c", "d"]);
    assert_eq!(names(&widgets, q("app,!tier")).await, ["c"]);
    assert_eq!(names(&widgets, q("app in (web,db),tier=back")).await, ["b"]);
    assert_eq!(names(&widgets, q("")).await, ["a", "b", "c", "d"]);
    let s = api_error(widgets.list(&q("app in web")).await);
    assert_eq!((s.code, s.reason.as_str()), (400, "BadRequest"));
}

#[tokio::test]
async fn field_selectors() {
    let (_ts, client) = setup().await;
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": "other"}})).unwrap(),
    )
    .await
    .unwrap();
    let default: Api<Widget> = Api::namespaced(client.clone(), "default");
    let other: Api<Widget> = Api::namespaced(client.clone(), "other");
    default
        .create(&PostParams::default(), &widget("a", 1))
        .await
        .unwrap();
    default
        .create(&PostParams::default(), &widget("b", 1))
        .await
        .unwrap();
    let mut slow = widget("a", 1);
    slow.spec.mode = Mode::Slow;
    other.create(&PostParams::default(), &slow).await.unwrap();
    let all: Api<Widget> = Api::all(client);
    let f = |s: &str| ListParams::default().fields(s);
    let got = |l: Vec<Widget>| {
        let mut v: Vec<String> = l
            .iter()
            .map(|w| format!("{}/{}", w.namespace().unwrap(), w.name_any()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        got(all.list(&f("metadata.name=a")).await.unwrap().items),
        ["default/a", "other/a"]
    );
    assert_eq!(
        got(all
            .list(&f("metadata.namespace=other"))
            .await
            .unwrap()
            .items),
        ["other/a"]
    );
    assert_eq!(
        got(all
            .list(&f("metadata.name==a,metadata.namespace!=other"))
            .await
            .unwrap()
            .items),
        ["default/a"]
    );
    // A CRD `selectableFields` entry is selectable too.
    assert_eq!(
        got(all.list(&f("spec.mode=Slow")).await.unwrap().items),
        ["other/a"]
    );
    // Anything else is a 400, like the real server.
    let s = api_error(all.list(&f("spec.sizeBytes=1")).await);
    assert_eq!((s.code, s.reason.as_str()), (400, "BadRequest"));
    assert_eq!(s.message, "field label not supported: spec.sizeBytes");
}
