//! Shared test fixtures: the test CRDs (derived with kube), a server on a temporary data
//! directory, and small helpers.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::{Client, CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tessera_apiserver::{ApiServer, ApiServerBuilder, RunningServer};

/// A namespaced kind with a status subresource, printer columns, a CEL rule, an enum, a required
/// field and i64 sizes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "test.tessera.io",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    shortname = "wg",
    category = "tessera",
    // Raw JSON columns: the structured form trips clippy's duplicated_attributes.
    printcolumn = r#"{"name": "Size", "type": "integer", "jsonPath": ".spec.sizeBytes"}"#,
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mode"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    selectable = ".spec.mode"
)]
#[x_kube(validation = "!has(self.maxBytes) || self.sizeBytes <= self.maxBytes")]
#[serde(rename_all = "camelCase")]
pub struct WidgetSpec {
    pub size_bytes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<i64>,
    pub mode: Mode,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    Fast,
    Slow,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WidgetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A cluster-scoped kind with a status subresource.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "test.tessera.io",
    version = "v1",
    kind = "Gadget",
    status = "GadgetStatus",
    shortname = "gd",
    printcolumn(name = "Color", type_ = "string", json_path = ".spec.color")
)]
pub struct GadgetSpec {
    pub color: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct GadgetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}

pub fn widget(name: &str, size: i64) -> Widget {
    Widget::new(
        name,
        WidgetSpec {
            size_bytes: size,
            max_bytes: None,
            mode: Mode::Fast,
        },
    )
}

/// A server on its own temporary data directory.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub dir: tempfile::TempDir,
    pub builder: ApiServerBuilder,
}

pub fn fast_builder() -> ApiServerBuilder {
    ApiServer::builder()
        .bookmark_interval(Duration::from_millis(300))
        .default_watch_timeout(Duration::from_secs(30))
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(fast_builder()).await
    }

    pub async fn start_with(builder: ApiServerBuilder) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = builder
            .clone()
            .data_dir(dir.path())
            .start()
            .await
            .expect("server starts");
        TestServer {
            server: Some(server),
            dir,
            builder,
        }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("running")
    }

    pub fn client(&self) -> Client {
        self.server().client()
    }

    /// Stops the server and starts a new one on the same data directory.
    pub async fn restart(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.server = Some(
            self.builder
                .clone()
                .data_dir(self.dir.path())
                .start()
                .await
                .expect("server restarts"),
        );
    }
}

/// Registers the test CRDs through the API (as any controller test would) and waits until
/// they are established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [Widget::crd(), Gadget::crd()] {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("CRD created");
    }
    for crd in [Widget::crd(), Gadget::crd()] {
        let name = crd.metadata.name.clone().expect("named");
        let cond = kube::runtime::wait::conditions::is_crd_established();
        tokio::time::timeout(
            Duration::from_secs(5),
            kube::runtime::wait::await_condition(crds.clone(), &name, cond),
        )
        .await
        .expect("CRD established in time")
        .expect("await_condition");
    }
}

/// A server with the CRDs installed.
pub async fn setup() -> (TestServer, Client) {
    let ts = TestServer::start().await;
    let client = ts.client();
    install_crds(&client).await;
    (ts, client)
}

/// The `kube::Error::Api` status, or a panic with the unexpected result.
pub fn api_error<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Next item of a stream, failing the test after 5 s.
pub async fn next<S: futures::Stream + Unpin>(s: &mut S) -> S::Item {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("stream item within 5 s")
        .expect("stream not ended")
}
