//! Names, conditions, events and status writes shared by the controllers.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tessera_api::v1alpha1::StorageClaim;

use super::{Context, Error, FIELD_MANAGER, Result};

/// Finalizers, `tessera.io/<kind>-protection` (ARCHITECTURE §3, docs/api.md §3).
pub const AREA_FINALIZER: &str = "tessera.io/storagearea-protection";
pub const POOL_FINALIZER: &str = "tessera.io/storagepool-protection";
pub const CLASS_FINALIZER: &str = "tessera.io/storagepriorityclass-protection";
pub const CLAIM_FINALIZER: &str = "tessera.io/storageclaim-protection";
pub const VOLUME_FINALIZER: &str = "tessera.io/virtualvolume-protection";

/// The mapping placement chose, written on the VirtualVolume when it is created, so that the
/// extents are recorded in the same write that creates the volume (a status cannot be set on
/// create). Copied into `status.mapping` right after; see docs/operator.md "Intent recording".
pub const PLANNED_MAPPING_ANNOTATION: &str = "tessera.io/planned-mapping";
pub use tessera_api::v1alpha1::usage_report::USAGE_REPORT_ANNOTATION;

/// Labels of objects the operator creates.
pub const POOL_LABEL: &str = "tessera.io/pool";
pub const CLAIM_UID_LABEL: &str = "tessera.io/claim-uid";
pub const CLAIM_NAME_LABEL: &str = "tessera.io/claim-name";
pub const CLAIM_NAMESPACE_LABEL: &str = "tessera.io/claim-namespace";
pub const RECLAIM_STEP_LABEL: &str = "tessera.io/reclaim-step";

/// The VirtualVolume of a claim: `vol-<claim uid>`. Deterministic, so a retried or restarted
/// allocation finds the volume it already created (create → AlreadyExists → adopt) instead of
/// allocating twice; unique, because UIDs are.
pub fn volume_name_for(claim: &StorageClaim) -> Result<String> {
    let uid = claim.uid().ok_or(Error::MissingField("metadata.uid"))?;
    Ok(format!("vol-{uid}"))
}

/// The `step`-th area return of a claim's reclaim: `reclaim-<claim uid>-<step>`.
pub fn reclaim_remap_name(claim_uid: &str, step: usize) -> String {
    format!("reclaim-{claim_uid}-{step}")
}

pub fn now() -> Timestamp {
    Timestamp::now()
}

/// Whole seconds of a time (metav1.Time has second precision on the wire).
pub fn unix_seconds(time: &Time) -> i64 {
    time.0.as_second()
}

pub fn time_from_seconds(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Sets condition `type_` in `conditions`, keeping `lastTransitionTime` when the status did not
/// change (metav1.Condition conventions, ARCHITECTURE §11).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now());
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message;
            c.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            observed_generation,
            last_transition_time: Time(now()),
        }),
    }
}

/// Whether condition `type_` is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// A merge patch of `/status`. With `resource_version`, the write only succeeds if the object
/// did not change since it was read (a 409 otherwise), which is what makes read-modify-write of
/// counters (charging) exactly-once.
pub async fn patch_status<K>(
    api: &Api<K>,
    name: &str,
    status: Value,
    resource_version: Option<&str>,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut body = json!({ "status": status });
    if let Some(rv) = resource_version {
        body["metadata"] = json!({ "resourceVersion": rv });
    }
    Ok(api
        .patch_status(name, &field_manager(), &Patch::Merge(&body))
        .await?)
}

/// Patch parameters naming the operator's field manager.
pub fn field_manager() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// The reference of a claim named by the labels of an object the operator created for it.
pub fn claim_reference_from_labels(obj: &impl ResourceExt) -> Option<ObjectReference> {
    let labels = obj.labels();
    Some(ObjectReference {
        api_version: Some("tessera.io/v1alpha1".into()),
        kind: Some("StorageClaim".into()),
        name: Some(labels.get(CLAIM_NAME_LABEL)?.clone()),
        namespace: Some(labels.get(CLAIM_NAMESPACE_LABEL)?.clone()),
        uid: labels.get(CLAIM_UID_LABEL).cloned(),
        ..ObjectReference::default()
    })
}

/// The object reference events point at.
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    obj.object_ref(&())
}

impl Context {
    /// Publishes an event (events.k8s.io/v1) with reason and action (ARCHITECTURE §11). A
    /// failure to publish is logged, never fails the reconcile.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        related: Option<ObjectReference>,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1024)),
            action: action.to_owned(),
            secondary: related,
        };
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - 1;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Bytes as a short human string (GiB/MiB/KiB with up to two decimals).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            let whole = bytes / size;
            let hundredths = (bytes % size) * 100 / size;
            return if hundredths == 0 {
                format!("{whole} {unit}")
            } else {
                format!("{whole}.{hundredths:02} {unit}")
            };
        }
    }
    format!("{bytes} B")
}
