//! Create / get / list / replace / delete, generateName, conflicts and error statuses.

use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn crud_and_generate_name() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");

    let created = widgets
        .create(&PostParams::default(), &widget("w1", 10))
        .await
        .unwrap();
    assert!(!created.uid().unwrap().is_empty());
    assert!(created.creation_timestamp().is_some());
    assert_eq!(created.metadata.generation, Some(1));
    let rv1: u64 = created.resource_version().unwrap().parse().unwrap();

    let got = widgets.get("w1").await.unwrap();
    assert_eq!(got.spec, created.spec);
    assert_eq!(got.uid(), created.uid());

    // generateName gets a random 5-character suffix.
    let mut template = widget("", 5);
    template.metadata = ObjectMeta {
        generate_name: Some("gen-".into()),
        ..ObjectMeta::default()
    };
    let g = widgets
        .create(&PostParams::default(), &template)
        .await
        .unwrap();
    let name = g.name_any();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    // AlreadyExists.
    let s = api_error(
        widgets
            .create(&PostParams::default(), &widget("w1", 1))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(s.message, "widgets.test.tessera.io \"w1\" already exists");

    // Replace bumps the resourceVersion.
    let mut w = got.clone();
    w.spec.size_bytes = 20;
    let replaced = widgets
        .replace("w1", &PostParams::default(), &w)
        .await
        .unwrap();
    let rv2: u64 = replaced.resource_version().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    assert_eq!(replaced.spec.size_bytes, 20);

    // List (namespaced and cluster-wide) with the list resourceVersion.
    let list = widgets.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    let list_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert!(list_rv >= rv2);
    let all: Api<Widget> = Api::all(client.clone());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );

    // Delete returns the object; then 404 with the real server's message.
    let deleted = widgets
        .delete("w1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(deleted.left().is_some());
    let s = api_error(widgets.get("w1").await);
    assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
    assert_eq!(s.message, "widgets.test.tessera.io \"w1\" not found");

    // dryRun=All validates but does not persist.
    let dry = widgets
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &widget("dry", 1),
        )
        .await
        .unwrap();
    assert_eq!(dry.name_any(), "dry");
    assert_eq!(api_error(widgets.get("dry").await).code, 404);
}

#[tokio::test]
async fn stale_update_conflicts_and_empty_rv_is_unconditional() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let w = widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();

    let mut first = w.clone();
    first.spec.size_bytes = 2;
    widgets
        .replace("w", &PostParams::default(), &first)
        .await
        .unwrap();

    // Same (now stale) resourceVersion again: 409 Conflict.
    let mut stale = w.clone();
    stale.spec.size_bytes = 3;
    let s = api_error(widgets.replace("w", &PostParams::default(), &stale).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        s.message,
        "Operation cannot be fulfilled on widgets.test.tessera.io \"w\": the object has been modified; please apply your changes to the latest version and try again"
    );

    // No resourceVersion: unconditional update.
    stale.metadata.resource_version = None;
    let out = widgets
        .replace("w", &PostParams::default(), &stale)
        .await
        .unwrap();
    assert_eq!(out.spec.size_bytes, 3);
}

#[tokio::test]
async fn cluster_scoped_kind() {
    let (_ts, client) = setup().await;
    let gadgets: Api<Gadget> = Api::all(client.clone());
    let g = Gadget::new(
        "g1",
        GadgetSpec {
            color: "red".into(),
        },
    );
    let created = gadgets.create(&PostParams::default(), &g).await.unwrap();
    assert_eq!(created.namespace(), None);
    assert_eq!(
        gadgets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    gadgets
        .delete("g1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        gadgets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// Sends a raw request; returns the HTTP code and the JSON body (exactly as served).
pub async fn raw(
    client: &Client,
    method: &str,
    path: &str,
    ct: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("Content-Type", ct)
        .body(kube::client::Body::from(body.as_bytes().to_vec()))
        .unwrap();
    let resp = client.send(req).await.expect("request sent");
    let code = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap_or(json!(null)))
}

#[tokio::test]
async fn bad_requests_get_status_objects() {
    let (_ts, client) = setup().await;
    let base = "/apis/test.tessera.io/v1/namespaces/default/widgets";

    // Malformed JSON body: 400.
    let (code, s) = raw(&client, "POST", base, "application/json", "{not json").await;
    assert_eq!(code, 400);
    assert_eq!(s["kind"], "Status");
    assert_eq!(s["reason"], "BadRequest");

    // Unknown body media type: 415.
    let (code, s) = raw(
        &client,
        "POST",
        base,
        "application/vnd.kubernetes.protobuf",
        "x",
    )
    .await;
    assert_eq!(
        (code, s["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let (code, _) = raw(&client, "PATCH", &format!("{base}/x"), "text/plain", "{}").await;
    assert_eq!(code, 415);

    // Method not allowed on a collection.
    let (code, s) = raw(&client, "PUT", base, "application/json", "{}").await;
    assert_eq!(
        (code, s["reason"].as_str()),
        (405, Some("MethodNotAllowed"))
    );

    // Unknown resource: 404.
    let (code, s) = raw(
        &client,
        "GET",
        "/apis/test.tessera.io/v1/nothings",
        "application/json",
        "",
    )
    .await;
    assert_eq!((code, s["reason"].as_str()), (404, Some("NotFound")));

    // Name mismatch between body and URL: 400.
    let body = json!({"apiVersion": "test.tessera.io/v1", "kind": "Widget",
        "metadata": {"name": "a"}, "spec": {"sizeBytes": 1, "mode": "Fast"}});
    raw(&client, "POST", base, "application/json", &body.to_string()).await;
    let mut other = body.clone();
    other["metadata"]["name"] = json!("b");
    let (code, s) = raw(
        &client,
        "PUT",
        &format!("{base}/a"),
        "application/json",
        &other.to_string(),
    )
    .await;
    assert_eq!((code, s["reason"].as_str()), (400, Some("BadRequest")));

    // Bad label selector: 400.
    let (code, _) = raw(
        &client,
        "GET",
        &format!("{base}?labelSelector=a%20in%20b"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 400);

    // A namespaced object in a missing namespace: 404 on the namespace.
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "nope");
    let s = api_error(
        widgets
            .create(&PostParams::default(), &widget("x", 1))
            .await,
    );
    assert_eq!(s.code, 404);
    assert_eq!(s.message, "namespaces \"nope\" not found");
}

#[tokio::test]
async fn deleting_a_crd_removes_its_custom_resources() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    widgets
        .create(&PostParams::default(), &widget("plain", 1))
        .await
        .unwrap();
    let mut held = widget("held", 1);
    held.metadata.finalizers = Some(vec!["test.tessera.io/hold".into()]);
    widgets.create(&PostParams::default(), &held).await.unwrap();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = "widgets.test.tessera.io";
    let crd = crds
        .delete(name, &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert!(crd.metadata.deletion_timestamp.is_some());
    let conds = crd.status.unwrap().conditions.unwrap();
    assert!(
        conds
            .iter()
            .any(|c| c.type_ == "Terminating" && c.status == "True")
    );
    // Still served while terminating (so finalizers can be removed), but no creates.
    assert_eq!(api_error(widgets.get("plain").await).code, 404);
    assert_eq!(
        api_error(
            widgets
                .create(&PostParams::default(), &widget("new", 1))
                .await
        )
        .code,
        405
    );
    widgets
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert_eq!(api_error(crds.get(name).await).code, 404);
    assert_eq!(api_error(widgets.list(&Default::default()).await).code, 404);
}

#[tokio::test]
async fn malformed_input_is_a_client_error() {
    let (_ts, client) = setup().await;
    let base = "/apis/test.tessera.io/v1/namespaces/default/widgets";
    let body = json!({"apiVersion": "test.tessera.io/v1", "kind": "Widget",
        "metadata": {"name": "a"}, "spec": {"sizeBytes": 1, "mode": "Fast"}});
    raw(&client, "POST", base, "application/json", &body.to_string()).await;
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "PATCH",
            format!("{base}/a"),
            "application/json-patch+json",
            "{\"op\": 1}",
        ),
        (
            "PATCH",
            format!("{base}/a"),
            "application/json-patch+json",
            "[{\"op\": \"add\"}]",
        ),
        (
            "PATCH",
            format!("{base}/a"),
            "application/json-patch+json",
            "[{\"op\": \"remove\", \"path\": \"/x/9999999999999999999999\"}]",
        ),
        (
            "PATCH",
            format!("{base}/a"),
            "application/merge-patch+json",
            "[1,2]",
        ),
        (
            "PATCH",
            format!("{base}/a"),
            "application/merge-patch+json",
            "{\"metadata\": 5}",
        ),
        (
            "PATCH",
            format!("{base}/a"),
            "application/merge-patch+json",
            "{\"metadata\": {\"labels\": {\"a\": 5}}}",
        ),
        (
            "PATCH",
            format!("{base}/a?fieldManager=x"),
            "application/apply-patch+yaml",
            "- not\n- an object",
        ),
        (
            "PATCH",
            format!("{base}/a?fieldManager=x"),
            "application/apply-patch+yaml",
            "{{{",
        ),
        ("PUT", format!("{base}/a"), "application/json", "[]"),
        (
            "PUT",
            format!("{base}/a"),
            "application/json",
            "{\"metadata\": {\"resourceVersion\": \"abc\"}}",
        ),
        (
            "POST",
            base.to_string(),
            "application/json",
            "{\"kind\": \"Gadget\"}",
        ),
        (
            "POST",
            base.to_string(),
            "application/json",
            "{\"metadata\": {\"generateName\": \"ééééééééééééééééééééééééééééééééééééé\"}}",
        ),
        ("POST", base.to_string(), "application/yaml", "a: [unclosed"),
        (
            "DELETE",
            format!("{base}/a"),
            "application/json",
            "{\"preconditions\": 5, \"dryRun\": [\"Nope\"]}",
        ),
        (
            "DELETE",
            format!("{base}/a"),
            "application/json",
            "not json",
        ),
        ("GET", format!("{base}?limit=-5x"), "", ""),
        ("GET", format!("{base}?continue=%%%"), "", ""),
        ("GET", format!("{base}?continue=eyJydiI6MX0"), "", ""),
        ("GET", format!("{base}?watch=1&timeoutSeconds=-1"), "", ""),
        ("GET", format!("{base}?watch=1&resourceVersion=abc"), "", ""),
        (
            "GET",
            format!("{base}?watch=1&sendInitialEvents=true"),
            "",
            "",
        ),
        (
            "GET",
            format!("{base}?resourceVersion=1&resourceVersionMatch=Sometimes"),
            "",
            "",
        ),
        ("GET", format!("{base}?fieldSelector=metadata.name"), "", ""),
        ("GET", format!("{base}?labelSelector=!!!"), "", ""),
        (
            "GET",
            "/apis/test.tessera.io/v1/namespaces//widgets".to_string(),
            "",
            "",
        ),
        ("GET", format!("{base}/a/scale"), "", ""),
        (
            "GET",
            "/apis/test.tessera.io/v9/widgets".to_string(),
            "",
            "",
        ),
        ("GET", "/api/v2".to_string(), "", ""),
        (
            "POST",
            "/apis/test.tessera.io/v1/widgets".to_string(),
            "application/json",
            "{}",
        ),
    ];
    for (method, path, ct, body) in cases {
        let (code, s) = raw(&client, method, &path, ct, body).await;
        assert!(
            (400..500).contains(&code),
            "{method} {path} {body}: {code} {s}"
        );
        assert_eq!(s["kind"], "Status", "{method} {path}: {s}");
        assert_eq!(s["code"], code, "{method} {path}");
    }
    // The object survived all of it.
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    assert_eq!(widgets.get("a").await.unwrap().spec.size_bytes, 1);
}
