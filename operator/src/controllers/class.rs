//! StoragePriorityClass: counts its volumes and refuses deletion while a claim or a volume uses
//! it (the class decides the data priority of seed 000 flag 424 and what reclaim may take,
//! [0033], [0053]–[0058]; D-16, D-19).

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tessera_api::v1alpha1::{StorageClaim, StoragePriorityClass, VirtualVolume};

use super::support::{CLASS_FINALIZER, patch_status, reference};
use super::{Config, Context, Error, Informers, Result};

/// Controller name in metrics.
pub const NAME: &str = "class";

pub fn controller(informers: &Informers, _config: &Config) -> Controller<StoragePriorityClass> {
    Controller::for_stream(informers.classes.subscribe(), informers.classes.store())
        .watches_stream(informers.volumes.subscribe(), |volume: VirtualVolume| {
            Some(ObjectRef::new(&volume.spec.priority_class_name))
        })
        .watches_stream(informers.claims.subscribe(), |claim: StorageClaim| {
            Some(ObjectRef::new(&claim.spec.priority_class_name))
        })
}

pub async fn reconcile(class: Arc<StoragePriorityClass>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(NAME);
    ctx.stores.ready().await?;
    let api: Api<StoragePriorityClass> = Api::all(ctx.client.clone());
    finalizer(&api, CLASS_FINALIZER, class, |event| async {
        match event {
            Finalizer::Apply(class) => apply(&class, &ctx).await,
            Finalizer::Cleanup(class) => cleanup(&class, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

pub fn error_policy(_class: Arc<StoragePriorityClass>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy_for(NAME, error, &ctx)
}

/// The claims and volumes that name the class.
fn users(class: &StoragePriorityClass, ctx: &Context) -> (Vec<String>, Vec<String>) {
    let name = class.name_any();
    let claims = ctx
        .stores
        .claims
        .state()
        .iter()
        .filter(|c| c.spec.priority_class_name == name)
        .map(|c| format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()))
        .collect();
    let volumes = ctx
        .stores
        .volumes
        .state()
        .iter()
        .filter(|v| v.spec.priority_class_name == name)
        .map(|v| v.name_any())
        .collect();
    (claims, volumes)
}

async fn apply(class: &StoragePriorityClass, ctx: &Context) -> Result<Action> {
    let (_, volumes) = users(class, ctx);
    let status = class.status.clone().unwrap_or_default();
    let count = volumes.len() as i64;
    if status.volumes != Some(count) || status.observed_generation != class.metadata.generation {
        patch_status(
            &Api::<StoragePriorityClass>::all(ctx.client.clone()),
            &class.name_any(),
            json!({ "volumes": count, "observedGeneration": class.metadata.generation }),
            None,
        )
        .await?;
    }
    Ok(Action::requeue(ctx.config.resync))
}

async fn cleanup(class: &StoragePriorityClass, ctx: &Context) -> Result<Action> {
    let (claims, volumes) = users(class, ctx);
    if claims.is_empty() && volumes.is_empty() {
        return Ok(Action::await_change());
    }
    let sample = |names: &[String]| {
        let mut shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        if names.len() > 5 {
            shown.push_str(", …");
        }
        shown
    };
    let message = format!(
        "priority class {} is used by {} claims ({}) and {} volumes ({})",
        class.name_any(),
        claims.len(),
        sample(&claims),
        volumes.len(),
        sample(&volumes)
    );
    ctx.publish(
        &reference(class),
        EventType::Warning,
        "ClassInUse",
        "Delete",
        message.clone(),
        None,
    )
    .await;
    Err(Error::Blocked(message))
}
