//! Representations: `meta.k8s.io/v1` Tables (what kubectl asks for), PartialObjectMetadata,
//! deletecollection, and the health endpoints.

use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::support::*;

async fn get(client: &Client, path: &str, accept: &str) -> (u16, String, Value) {
    use http_body_util::BodyExt;
    let req = axum::http::Request::builder()
        .uri(path)
        .header("Accept", accept)
        .body(kube::client::Body::empty())
        .unwrap();
    let resp = client.send(req).await.expect("request sent");
    let code = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)));
    (code, ct, body)
}

const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

#[tokio::test]
async fn tables_with_printer_columns() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    widgets
        .create(&PostParams::default(), &widget("t", 42))
        .await
        .unwrap();
    let base = "/apis/test.tessera.io/v1/namespaces/default/widgets";

    let (code, ct, table) = get(&client, base, TABLE).await;
    assert_eq!(code, 200);
    assert!(ct.starts_with("application/json;as=Table"), "{ct}");
    assert_eq!(
        (table["kind"].as_str(), table["apiVersion"].as_str()),
        (Some("Table"), Some("meta.k8s.io/v1"))
    );
    let cols: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["Name", "Size", "Mode", "Phase", "Age"]);
    let row = &table["rows"][0];
    assert_eq!(row["cells"][0], "t");
    assert_eq!(row["cells"][1], 42);
    assert_eq!(row["cells"][2], "Fast");
    assert_eq!(row["cells"][3], Value::Null);
    assert!(row["cells"][4].as_str().unwrap().ends_with('s'));
    assert_eq!(row["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(row["object"]["metadata"]["name"], "t");
    assert!(table["metadata"]["resourceVersion"].is_string());

    let (_, _, table) = get(&client, &format!("{base}/t?includeObject=Object"), TABLE).await;
    assert_eq!(table["rows"][0]["object"]["spec"]["sizeBytes"], 42);
    let (_, _, table) = get(&client, &format!("{base}?includeObject=None"), TABLE).await;
    assert!(table["rows"][0].get("object").is_none());

    // Built-ins have tables too.
    let (_, _, table) = get(&client, "/api/v1/namespaces", TABLE).await;
    let cols: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["Name", "Status", "Age"]);

    // Only protobuf acceptable: 406.
    let (code, _, _) = get(&client, base, "application/vnd.kubernetes.protobuf").await;
    assert_eq!(code, 406);
}

#[tokio::test]
async fn partial_object_metadata_and_deletecollection() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    for (name, app) in [("a", "x"), ("b", "x"), ("c", "y")] {
        let mut w = widget(name, 1);
        w.metadata.labels = Some([("app".to_string(), app.to_string())].into());
        widgets.create(&PostParams::default(), &w).await.unwrap();
    }
    let metas = widgets.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(metas.items.len(), 3);
    assert_eq!(metas.items[0].name_any(), "a");
    let m = widgets.get_metadata("c").await.unwrap();
    assert_eq!(m.labels().get("app").map(String::as_str), Some("y"));

    let deleted = widgets
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app=x"),
        )
        .await
        .unwrap();
    let deleted = deleted.left().expect("list of deleted objects");
    assert_eq!(deleted.items.len(), 2);
    let left: Vec<String> = widgets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|w| w.name_any())
        .collect();
    assert_eq!(left, ["c"]);
}

#[tokio::test]
async fn health_endpoints() {
    let ts = TestServer::start().await;
    let client = ts.client();
    for path in ["/healthz", "/readyz", "/livez", "/readyz?verbose"] {
        let (code, ct, body) = get(&client, path, "*/*").await;
        assert_eq!((code, body.as_str()), (200, Some("ok")), "{path}");
        assert!(ct.starts_with("text/plain"));
    }
}
