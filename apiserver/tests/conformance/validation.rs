//! Schema validation of custom resources (422 with causes), through `validation::validate_object`,
//! and metadata.name validation.

use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::*;

fn raw_widget(spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "test.tessera.io/v1", "kind": "Widget", "metadata": {"name": "v"}, "spec": spec})
}

async fn create_raw(
    client: &kube::Client,
    obj: serde_json::Value,
) -> Result<kube::api::DynamicObject, kube::Error> {
    let ar = kube::api::ApiResource::erase::<Widget>(&());
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(obj).unwrap(),
    )
    .await
}

/// The fields of the causes, without the `<nil>` cause the real server adds when schema errors
/// kept CEL rules from running ("some validation rules were not checked ...").
fn cause_fields(s: &kube::core::Status) -> Vec<String> {
    s.details
        .as_ref()
        .map(|d| {
            d.causes
                .iter()
                .filter(|c| c.field != "<nil>")
                .map(|c| c.field.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn invalid_enum_value_is_422() {
    let (_ts, client) = setup().await;
    let s = api_error(
        create_raw(
            &client,
            raw_widget(json!({"sizeBytes": 1, "mode": "Bogus"})),
        )
        .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(cause_fields(&s), ["spec.mode"]);
    let d = s.details.as_ref().unwrap();
    assert_eq!(
        (d.name.as_str(), d.group.as_str(), d.kind.as_str()),
        ("v", "test.tessera.io", "Widget")
    );
    assert_eq!(d.causes[0].reason, "FieldValueNotSupported");
    assert_eq!(
        d.causes[0].message,
        "Unsupported value: \"Bogus\": supported values: \"Fast\", \"Slow\""
    );
    assert!(
        s.message.starts_with(
            "Widget.test.tessera.io \"v\" is invalid: [spec.mode: Unsupported value: \"Bogus\": supported values: \"Fast\", \"Slow\", "
        ),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn missing_required_field_is_422() {
    let (_ts, client) = setup().await;
    let s = api_error(create_raw(&client, raw_widget(json!({"mode": "Fast"}))).await);
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(cause_fields(&s), ["spec.sizeBytes"]);
    assert_eq!(
        s.details.as_ref().unwrap().causes[0].reason,
        "FieldValueRequired"
    );
    assert!(
        s.message.contains("spec.sizeBytes: Required value"),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn cel_rule_violation_is_422_on_create_and_update() {
    let (_ts, client) = setup().await;
    let s = api_error(
        create_raw(
            &client,
            raw_widget(json!({"sizeBytes": 10, "maxBytes": 5, "mode": "Fast"})),
        )
        .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(cause_fields(&s), ["spec"]);

    let widgets: Api<Widget> = Api::namespaced(client, "default");
    widgets
        .create(&PostParams::default(), &widget("ok", 1))
        .await
        .unwrap();
    let s = api_error(
        widgets
            .patch(
                "ok",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"maxBytes": 0}})),
            )
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(cause_fields(&s), ["spec"]);
}

#[tokio::test]
async fn invalid_name_is_422() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client, "default");
    let s = api_error(
        widgets
            .create(&PostParams::default(), &widget("Bad_Name", 1))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(cause_fields(&s), ["metadata.name"]);
    assert!(
        s.message.starts_with(
            "Widget.test.tessera.io \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"
        ),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn unknown_fields_follow_field_validation() {
    use kube::api::ValidationDirective;
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    widgets
        .create(&PostParams::default(), &widget("u", 1))
        .await
        .unwrap();
    let typo = Patch::Apply(json!({
        "apiVersion": "test.tessera.io/v1", "kind": "Widget",
        "spec": {"sizeBytes": 2, "sizeBites": 3},
    }));
    let strict = PatchParams {
        field_validation: Some(ValidationDirective::Strict),
        ..PatchParams::apply("t")
    };
    let s = api_error(widgets.patch("u", &strict, &typo).await);
    assert_eq!((s.code, s.reason.as_str()), (400, "BadRequest"));
    assert_eq!(
        s.message,
        "Widget in version \"v1\" cannot be handled as a Widget: strict decoding error: unknown field \"spec.sizeBites\""
    );
    // Ignore (and the default, Warn) prune the field and go on.
    let ignore = PatchParams {
        field_validation: Some(ValidationDirective::Ignore),
        ..PatchParams::apply("t")
    };
    let out = widgets.patch("u", &ignore, &typo).await.unwrap();
    assert_eq!(out.spec.size_bytes, 2);
    let raw = widgets.get("u").await.unwrap();
    assert!(
        serde_json::to_value(&raw).unwrap()["spec"]
            .get("sizeBites")
            .is_none()
    );
}
