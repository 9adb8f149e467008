//! What the agent writes into the API besides areas: the node Lease (the node registry,
//! ARCHITECTURE §8), `VirtualVolume.status.attachments`, and the usage-report annotation
//! (docs/operator.md "Usage channel").

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams, PostParams};
use roaring::RoaringBitmap;
use serde_json::json;
use tessera_api::v1alpha1::usage_report::UsageReport;
use tessera_api::v1alpha1::{AttachmentState, VirtualVolume, VolumeAttachment};

use super::{Agent, AgentError};
use crate::engine::Volume;

/// The annotation the node writes its usage view into (format: docs/operator.md).
pub use tessera_api::v1alpha1::usage_report::USAGE_REPORT_ANNOTATION;
/// Lease annotation with the node-control endpoint.
pub const CONTROL_ENDPOINT_ANNOTATION: &str = "tessera.io/control-endpoint";

/// Name of a node's Lease.
pub fn lease_name(node_id: &str) -> String {
    format!("tessera-node-{node_id}")
}

/// Creates or renews the Lease `tessera-node-<id>`: holder = node id, the node-control
/// endpoint in an annotation, duration four heartbeats.
pub(crate) async fn renew_lease(agent: &Agent) -> Result<(), AgentError> {
    let api: Api<Lease> = Api::namespaced(agent.client.clone(), &agent.config.namespace);
    let name = lease_name(&agent.config.node_id);
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let duration = (agent.config.heartbeat.as_secs().max(1) * 4) as i32;
    let body = json!({
        "metadata": {
            "name": name,
            "annotations": {CONTROL_ENDPOINT_ANNOTATION: agent.control_endpoint()},
            "labels": {"app.kubernetes.io/name": "tessera", "tessera.io/node": agent.config.node_id},
        },
        "spec": {
            "holderIdentity": agent.config.node_id,
            "leaseDurationSeconds": duration,
            "renewTime": now,
        },
    });
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let mut lease: Lease = serde_json::from_value(body)
                .map_err(|e| AgentError::InvalidConfig(format!("lease body: {e}")))?;
            lease.spec.get_or_insert_with(Default::default).acquire_time = Some(now);
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(AgentError::api(format!("create Lease {name}"), e)),
            }
        }
        Err(e) => Err(AgentError::api(format!("renew Lease {name}"), e)),
    }
}

/// Sets (`Some(generation)`) or removes (`None`) this node's entry in
/// `status.attachments`: a merge patch conditional on the resourceVersion, retried on conflict.
pub(crate) async fn set_attachment(
    agent: &Agent,
    volume: &str,
    generation: Option<i64>,
) -> Result<(), AgentError> {
    set_attachment_state(agent, volume, generation, AttachmentState::Running).await
}

/// [`set_attachment`] with the gate's state (Held during a remap hold, Fenced once excluded).
pub(crate) async fn set_attachment_state(
    agent: &Agent,
    volume: &str,
    generation: Option<i64>,
    state: AttachmentState,
) -> Result<(), AgentError> {
    let node = agent.config.node_id.clone();
    update_attachments(agent, volume, |attachments| {
        // What this node reported about its replicas stays until the health report changes it.
        let unhealthy_areas = attachments
            .iter()
            .find(|a| a.node == node)
            .map(|a| a.unhealthy_areas.clone())
            .unwrap_or_default();
        attachments.retain(|a| a.node != node);
        if let Some(generation) = generation {
            attachments.push(VolumeAttachment {
                node: node.clone(),
                applied_generation: generation,
                state,
                unhealthy_areas,
            });
            attachments.sort_by(|a, b| a.node.cmp(&b.node));
        }
    })
    .await
}

/// Read-modify-write of `status.attachments`: a merge patch conditional on the
/// resourceVersion, retried on conflict; nothing is written when `change` changes nothing.
async fn update_attachments(
    agent: &Agent,
    volume: &str,
    change: impl Fn(&mut Vec<VolumeAttachment>),
) -> Result<(), AgentError> {
    let api: Api<VirtualVolume> = Api::all(agent.client.clone());
    for attempt in 0..10 {
        let Some(current) = api
            .get_opt(volume)
            .await
            .map_err(|e| AgentError::api(format!("get VirtualVolume {volume}"), e))?
        else {
            // Gone: nothing to record.
            return Ok(());
        };
        let mut attachments: Vec<VolumeAttachment> = current
            .status
            .as_ref()
            .map(|s| s.attachments.clone())
            .unwrap_or_default();
        let before = attachments.clone();
        change(&mut attachments);
        if attachments == before {
            return Ok(());
        }
        let patch = json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "status": {"attachments": attachments},
        });
        match api
            .patch_status(volume, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tokio::time::sleep(Duration::from_millis(20 * (attempt + 1))).await;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => {
                return Err(AgentError::api(
                    format!("patch VirtualVolume {volume} attachments"),
                    e,
                ));
            }
        }
    }
    Err(AgentError::Unsupported(format!(
        "VirtualVolume {volume}: attachments kept conflicting"
    )))
}

/// `(in_use, high_priority)` extent bitmaps of a volume.
pub type UsageView = (RoaringBitmap, RoaringBitmap);

/// Portable roaring serialization.
pub fn bitmap_bytes(bitmap: &RoaringBitmap) -> Vec<u8> {
    let mut optimized = bitmap.clone();
    optimized.optimize();
    let mut bytes = Vec::with_capacity(optimized.serialized_size());
    // Writing into a Vec cannot fail.
    let _ = optimized.serialize_into(&mut bytes);
    bytes
}

/// The annotation value (the wire format of `tessera_api::v1alpha1::usage_report`).
pub fn usage_report_json(
    sequence: u64,
    node: &str,
    in_use: &RoaringBitmap,
    high_priority: &RoaringBitmap,
) -> String {
    UsageReport {
        sequence,
        node: node.to_string(),
        in_use: in_use.clone(),
        high_priority: high_priority.clone(),
    }
    .encode()
}

/// Parses an annotation value back into `(in_use, high_priority)` (restoring usage on stage).
pub fn parse_usage_report(value: &str) -> Option<(RoaringBitmap, RoaringBitmap)> {
    let report = UsageReport::decode(value).ok()?;
    Some((report.in_use, report.high_priority))
}

/// Writes the usage report of one volume.
pub(crate) async fn write_usage_report(
    agent: &Agent,
    volume: &Volume,
    in_use: &RoaringBitmap,
    high: &RoaringBitmap,
) -> Result<(), AgentError> {
    let api: Api<VirtualVolume> = Api::all(agent.client.clone());
    let value = usage_report_json(
        agent.next_usage_sequence(),
        &agent.config.node_id,
        in_use,
        high,
    );
    let patch = json!({"metadata": {"annotations": {USAGE_REPORT_ANNOTATION: value}}});
    api.patch(
        volume.name(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|e| AgentError::api(format!("usage report of {}", volume.name()), e))?;
    Ok(())
}

/// This node's `unhealthyAreas` in `status.attachments` (only its existing entry).
pub(crate) async fn set_attachment_health(
    agent: &Agent,
    volume: &str,
    unhealthy: &[String],
) -> Result<(), AgentError> {
    let node = &agent.config.node_id;
    update_attachments(agent, volume, |attachments| {
        if let Some(entry) = attachments.iter_mut().find(|a| &a.node == node) {
            entry.unhealthy_areas = unhealthy.to_vec();
        }
    })
    .await
}

/// Every heartbeat, per staged volume: the areas whose replicas this node stopped writing
/// (a failed replica is not written again until it is rebuilt, so the operator must know even
/// when the area itself came back Online), when they changed since the last report.
pub(crate) async fn report_health_all(agent: &Arc<Agent>) {
    let volumes: Vec<(Arc<Volume>, Option<Vec<String>>)> = {
        let staged = agent.staged.lock().await;
        staged
            .volumes
            .values()
            .map(|v| (Arc::clone(&v.volume), v.last_health.clone()))
            .collect()
    };
    for (volume, last) in volumes {
        let now: Vec<String> = volume
            .health()
            .unhealthy_areas
            .iter()
            .map(|a| a.as_str().to_string())
            .collect();
        if last.as_ref() == Some(&now) {
            continue;
        }
        match set_attachment_health(agent, volume.name(), &now).await {
            Ok(()) => {
                let mut staged = agent.staged.lock().await;
                if let Some(entry) = staged.volumes.get_mut(volume.name()) {
                    entry.last_health = Some(now);
                }
            }
            Err(error) => tracing::warn!(volume = volume.name(), %error, "health report failed"),
        }
    }
}

/// Every heartbeat: a report for each staged volume whose bitmaps changed since the last one.
pub(crate) async fn report_usage_all(agent: &Arc<Agent>) {
    let volumes: Vec<(Arc<Volume>, Option<UsageView>)> = {
        let staged = agent.staged.lock().await;
        staged
            .volumes
            .values()
            .map(|v| (Arc::clone(&v.volume), v.last_report.clone()))
            .collect()
    };
    for (volume, last) in volumes {
        let now = (volume.in_use_extents(), volume.high_priority_extents());
        if last.as_ref() == Some(&now) {
            continue;
        }
        match write_usage_report(agent, &volume, &now.0, &now.1).await {
            Ok(()) => {
                let mut staged = agent.staged.lock().await;
                if let Some(entry) = staged.volumes.get_mut(volume.name()) {
                    entry.last_report = Some(now);
                }
            }
            Err(error) => tracing::warn!(volume = volume.name(), %error, "usage report failed"),
        }
    }
}
