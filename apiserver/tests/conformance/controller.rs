//! A whole `kube::runtime::Controller` against the server: the finalizer helper (JSON patches
//! with `test`), status through server-side apply, a `Recorder` publishing events, and cleanup
//! on deletion.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::wait::await_condition;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::support::*;

const FINALIZER: &str = "test.tessera.io/cleanup";
const MANAGER: &str = "widget-controller";

struct Ctx {
    client: Client,
    recorder: Recorder,
    cleanups: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct ReconcileError(#[from] kube::Error);

async fn reconcile(
    w: Arc<Widget>,
    ctx: Arc<Ctx>,
) -> Result<Action, finalizer::Error<ReconcileError>> {
    let api: Api<Widget> = Api::namespaced(ctx.client.clone(), &w.namespace().unwrap_or_default());
    let ctx2 = ctx.clone();
    let status_api = api.clone();
    finalizer(&api, FINALIZER, w, |event| async move {
        let api = status_api;
        match event {
            finalizer::Event::Apply(w) => {
                let status = json!({
                    "apiVersion": "test.tessera.io/v1",
                    "kind": "Widget",
                    "status": {"phase": "Ready", "observedGeneration": w.metadata.generation},
                });
                api.patch_status(
                    &w.name_any(),
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&status),
                )
                .await?;
                ctx2.recorder
                    .publish(
                        &Event {
                            type_: EventType::Normal,
                            reason: "Reconciled".into(),
                            note: Some("widget is ready".into()),
                            action: "Reconcile".into(),
                            secondary: None,
                        },
                        &w.object_ref(&()),
                    )
                    .await?;
                Ok(Action::await_change())
            }
            finalizer::Event::Cleanup(w) => {
                ctx2.cleanups.fetch_add(1, Ordering::SeqCst);
                ctx2.recorder
                    .publish(
                        &Event {
                            type_: EventType::Normal,
                            reason: "CleanedUp".into(),
                            note: None,
                            action: "Cleanup".into(),
                            secondary: None,
                        },
                        &w.object_ref(&()),
                    )
                    .await?;
                Ok(Action::await_change())
            }
        }
    })
    .await
}

fn error_policy(_w: Arc<Widget>, err: &finalizer::Error<ReconcileError>, _ctx: Arc<Ctx>) -> Action {
    eprintln!("reconcile error: {err}");
    Action::requeue(Duration::from_millis(100))
}

#[tokio::test]
async fn controller_with_finalizer_status_apply_and_events() {
    let (_ts, client) = setup().await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: None,
            },
        ),
        cleanups: AtomicUsize::new(0),
    });
    let controller = Controller::new(widgets.clone(), watcher::Config::default().timeout(10))
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let handle = tokio::spawn(controller);

    widgets
        .create(&PostParams::default(), &widget("w", 4))
        .await
        .unwrap();
    let ready = |o: Option<&Widget>| {
        o.and_then(|w| w.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Ready")
    };
    let w = tokio::time::timeout(
        Duration::from_secs(10),
        await_condition(widgets.clone(), "w", ready),
    )
    .await
    .expect("reconciled in time")
    .unwrap()
    .unwrap();
    assert_eq!(w.finalizers(), [FINALIZER]);
    assert_eq!(w.status.as_ref().unwrap().observed_generation, Some(1));
    let managed = w.metadata.managed_fields.clone().unwrap_or_default();
    let apply = managed
        .iter()
        .find(|m| m.manager.as_deref() == Some(MANAGER))
        .expect("managedFields entry of the controller");
    assert_eq!(apply.operation.as_deref(), Some("Apply"));
    assert_eq!(apply.subresource.as_deref(), Some("status"));

    let events: Api<K8sEvent> = Api::namespaced(client.clone(), "default");
    let evs = events.list(&ListParams::default()).await.unwrap();
    let ev = evs
        .items
        .iter()
        .find(|e| e.reason.as_deref() == Some("Reconciled"))
        .expect("Reconciled event");
    assert_eq!(ev.regarding.as_ref().unwrap().name.as_deref(), Some("w"));
    assert_eq!(ev.reporting_controller.as_deref(), Some(MANAGER));

    // Deletion runs the cleanup branch, which removes the finalizer: the object goes away.
    widgets.delete("w", &DeleteParams::default()).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        await_condition(
            widgets.clone(),
            "w",
            kube::runtime::wait::conditions::is_deleted(&w.uid().unwrap()),
        ),
    )
    .await
    .expect("deleted in time")
    .unwrap();
    assert_eq!(ctx.cleanups.load(Ordering::SeqCst), 1);
    let evs = events.list(&ListParams::default()).await.unwrap();
    assert!(
        evs.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("CleanedUp"))
    );
    handle.abort();
}
