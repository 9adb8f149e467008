//! The Controller RPCs (CSI spec v1.12). Each handler validates its request first (so a
//! malformed request gets INVALID_ARGUMENT whatever the state), then reads the API and writes
//! the smallest change; errors are typed ([`Error`]) and become gRPC codes in one place.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tessera_api::v1alpha1::{
    AreaPhase, ClaimPhase, StorageArea, StorageClaim, StorageClaimSpec, StoragePool, VirtualVolume,
    VirtualVolumeSpec, VolumeLayout, VolumePhase,
};
use tessera_proto::csi::v1::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest, ControllerGetVolumeResponse, ControllerPublishVolumeRequest,
    ControllerPublishVolumeResponse, ControllerServiceCapability, ControllerUnpublishVolumeRequest,
    ControllerUnpublishVolumeResponse, CreateVolumeRequest, CreateVolumeResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetCapacityRequest, GetCapacityResponse,
    ListVolumesRequest, ListVolumesResponse, Topology, TopologyRequirement,
    ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse, Volume, VolumeCondition,
    controller_server, controller_service_capability, list_volumes_response,
    validate_volume_capabilities_response,
};
use tonic::{Request, Response, Status};

use super::ControllerArgs;
use super::capability::{self, Access};
use super::error::{Error, Result, not_found_as_none};
use super::naming::{self, CSI_NAME_ANNOTATION, CSI_NAME_LABEL};
use crate::csi::{PUBLISH_ACCESS, PUBLISH_GENERATION, TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};

/// StorageClass parameters tessera reads.
pub const PARAM_POOL: &str = "tessera.io/pool";
pub const PARAM_PRIORITY_CLASS: &str = "tessera.io/priorityClass";
pub const PARAM_COPIES: &str = "tessera.io/copies";
pub const PARAM_LAYOUT: &str = "tessera.io/layout";
pub const PARAM_MEDIA_TYPE: &str = "tessera.io/mediaType";
/// Parameters the external-provisioner adds with `--extra-create-metadata`.
pub const PARAM_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PARAM_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// PVC annotation naming the priority class.
pub const PVC_PRIORITY_CLASS_ANNOTATION: &str = "tessera.io/priorityClass";

/// volume_context keys.
pub const CONTEXT_POOL: &str = "tessera.io/pool";
pub const CONTEXT_CLAIM: &str = "tessera.io/claim";
pub const CONTEXT_PRIORITY_CLASS: &str = "tessera.io/priorityClass";

/// Size of a volume whose request names no capacity.
pub const DEFAULT_VOLUME_BYTES: i64 = 1 << 30;
/// Every size in the API is a multiple of this (D-14).
const SIZE_ALIGNMENT: i64 = tessera_api::v1alpha1::SIZE_ALIGNMENT;
/// Prefix of ListVolumes tokens: `v1:<last volume name returned>`.
const TOKEN_PREFIX: &str = "v1:";
/// Condition the operator sets on a claim after a growth (`Expanded`).
const EXPANDED_CONDITION: &str = "Expanded";
/// Attempts of a read-modify-write that lost a resourceVersion race.
const CONFLICT_RETRIES: usize = 8;

/// The Controller service.
#[derive(Clone)]
pub struct ControllerService {
    client: Client,
    args: ControllerArgs,
}

/// What CreateVolume resolved from the request's parameters.
#[derive(Debug, Clone, PartialEq)]
struct Params {
    pool: String,
    namespace: String,
    priority_class: Option<String>,
    copies: i32,
    layout: VolumeLayout,
    media_type: Option<String>,
    pvc: Option<(String, String)>,
}

impl Params {
    fn parse(parameters: &HashMap<String, String>, args: &ControllerArgs) -> Result<Self> {
        let get = |key: &str| parameters.get(key).filter(|v| !v.is_empty()).cloned();
        let copies = match get(PARAM_COPIES) {
            None => 1,
            Some(text) => match text.parse::<i32>() {
                Ok(n @ 1..=3) => n,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "parameter {PARAM_COPIES}={text:?}: copies must be 1, 2 or 3"
                    )));
                }
            },
        };
        let layout = match get(PARAM_LAYOUT).as_deref() {
            None | Some("Concatenated") => VolumeLayout::Concatenated,
            Some("Single") => VolumeLayout::Single,
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "parameter {PARAM_LAYOUT}={other:?}: layout must be Single or Concatenated"
                )));
            }
        };
        let pvc = match (get(PARAM_PVC_NAMESPACE), get(PARAM_PVC_NAME)) {
            (Some(ns), Some(name)) => Some((ns, name)),
            _ => None,
        };
        Ok(Params {
            pool: get(PARAM_POOL).unwrap_or_else(|| args.default_pool.clone()),
            namespace: get(PARAM_PVC_NAMESPACE)
                .unwrap_or_else(|| args.default_claim_namespace.clone()),
            priority_class: get(PARAM_PRIORITY_CLASS),
            copies,
            layout,
            media_type: get(PARAM_MEDIA_TYPE),
            pvc,
        })
    }
}

/// The size a request asks for: `required_bytes` (or [`DEFAULT_VOLUME_BYTES`] capped by the
/// limit) rounded up to 4096, and the limit (0: none).
fn requested_size(range: Option<&CapacityRange>) -> Result<(i64, i64)> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Error::InvalidArgument(format!(
            "capacity_range must not be negative (required {required}, limit {limit})"
        )));
    }
    if limit > 0 && limit < required {
        return Err(Error::InvalidArgument(format!(
            "capacity_range limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    let wanted = match (required, limit) {
        (0, 0) => DEFAULT_VOLUME_BYTES,
        (0, limit) => DEFAULT_VOLUME_BYTES.min(limit),
        (required, _) => required,
    };
    let size = wanted
        .checked_add(SIZE_ALIGNMENT - 1)
        .map(|v| v / SIZE_ALIGNMENT * SIZE_ALIGNMENT)
        .ok_or_else(|| Error::OutOfRange(format!("{wanted} bytes is too large")))?;
    if limit > 0 && size > limit {
        return Err(Error::OutOfRange(format!(
            "sizes are multiples of {SIZE_ALIGNMENT} bytes: {wanted} rounds up to {size}, above \
             limit_bytes {limit}"
        )));
    }
    Ok((size, limit))
}

/// The node the CO would like the volume near: the first preferred (else requisite) segment
/// naming a tessera node. Placement tries it first (`spec.preferredNode`).
fn preferred_node(requirement: Option<&TopologyRequirement>) -> Option<String> {
    let requirement = requirement?;
    requirement
        .preferred
        .iter()
        .chain(requirement.requisite.iter())
        .find_map(|t| t.segments.get(TOPOLOGY_NODE_KEY).cloned())
}

/// The end of the last run of the volume's committed mapping.
fn mapped_bytes(volume: &VirtualVolume) -> i64 {
    volume
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map_or(0, |m| {
            m.extents
                .iter()
                .map(|r| r.offset + r.length)
                .max()
                .unwrap_or(0)
        })
}

fn mapping_generation(volume: &VirtualVolume) -> Option<i64> {
    volume
        .status
        .as_ref()
        .and_then(|s| s.mapping.as_ref())
        .map(|m| m.generation)
}

/// accessible_topology (docs/decisions.md D-29): one `topology.kubernetes.io/zone` segment per
/// failure domain holding the volume's extents when every holding area has a domain; none (=
/// reachable from every node through the extent servers, seed 001 §4.5) otherwise.
fn accessible_topology(
    volume: &VirtualVolume,
    areas: &BTreeMap<String, StorageArea>,
) -> Vec<Topology> {
    let Some(mapping) = volume.status.as_ref().and_then(|s| s.mapping.as_ref()) else {
        return Vec::new();
    };
    let mut domains = BTreeSet::new();
    for replica in mapping.extents.iter().flat_map(|r| r.replicas.iter()) {
        match areas
            .get(&replica.area)
            .and_then(|a| a.spec.domain.clone())
            .filter(|d| !d.is_empty())
        {
            Some(domain) => {
                domains.insert(domain);
            }
            None => return Vec::new(),
        }
    }
    domains
        .into_iter()
        .map(|d| Topology {
            segments: [(TOPOLOGY_ZONE_KEY.to_owned(), d)].into(),
        })
        .collect()
}

fn volume_context(volume: &VirtualVolume) -> HashMap<String, String> {
    let mut context: HashMap<String, String> = [
        (CONTEXT_POOL.to_owned(), volume.spec.pool_name.clone()),
        (
            CONTEXT_PRIORITY_CLASS.to_owned(),
            volume.spec.priority_class_name.clone(),
        ),
    ]
    .into();
    if let Some(claim) = &volume.spec.claim_ref {
        context.insert(
            CONTEXT_CLAIM.to_owned(),
            format!("{}/{}", claim.namespace, claim.name),
        );
    }
    context
}

fn csi_volume(volume: &VirtualVolume, areas: &BTreeMap<String, StorageArea>) -> Volume {
    Volume {
        capacity_bytes: volume.spec.size_bytes,
        volume_id: volume.name_any(),
        volume_context: volume_context(volume),
        content_source: None,
        accessible_topology: accessible_topology(volume, areas),
    }
}

/// VOLUME_CONDITION: abnormal when the volume is Failed or Degraded (a replica lost).
fn volume_condition(volume: &VirtualVolume) -> VolumeCondition {
    let status = volume.status.clone().unwrap_or_default();
    if status.phase == Some(VolumePhase::Failed) {
        let message = status
            .conditions
            .iter()
            .find(|c| c.status == "False" || c.type_ == "Degraded")
            .map_or("the volume is Failed".to_owned(), |c| c.message.clone());
        return VolumeCondition {
            abnormal: true,
            message,
        };
    }
    match status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
    {
        Some(c) => VolumeCondition {
            abnormal: true,
            message: format!("Degraded: {}", c.message),
        },
        None => VolumeCondition {
            abnormal: false,
            message: "volume is healthy".into(),
        },
    }
}

fn published_nodes(volume: &VirtualVolume) -> Vec<String> {
    volume
        .spec
        .access_nodes()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// What a publish changes in the volume's spec: nothing (already so) or a merge patch of
/// `spec` (seed 001 [0028]: one borrower at a time; Block multi-writers share).
fn publish_patch(spec: &VirtualVolumeSpec, node: &str, access: Access) -> Result<Option<Value>> {
    let busy = |with: &str| {
        Error::FailedPrecondition(format!(
            "the volume is published to {with}; a volume has one borrower at a time (seed 001 \
             [0028]) unless every publish is MULTI_NODE_MULTI_WRITER Block"
        ))
    };
    match access {
        Access::Single => {
            if !spec.shared_access_nodes.is_empty() {
                return Err(busy(&spec.shared_access_nodes.join(", ")));
            }
            match spec.access_node.as_deref() {
                Some(current) if current == node => Ok(None),
                Some(other) => Err(busy(other)),
                None => Ok(Some(json!({ "accessNode": node }))),
            }
        }
        Access::Multi => {
            if let Some(current) = spec.access_node.as_deref() {
                return Err(busy(current));
            }
            if spec.shared_access_nodes.iter().any(|n| n == node) {
                return Ok(None);
            }
            let mut nodes = spec.shared_access_nodes.clone();
            nodes.push(node.to_owned());
            Ok(Some(json!({ "sharedAccessNodes": nodes })))
        }
    }
}

/// What an unpublish changes: `node` (or, with no node, every node) leaves the volume.
fn unpublish_patch(spec: &VirtualVolumeSpec, node: Option<&str>) -> Option<Value> {
    let mut patch = serde_json::Map::new();
    let leaves = |n: &str| node.is_none_or(|node| node == n);
    if spec.access_node.as_deref().is_some_and(leaves) {
        patch.insert("accessNode".into(), Value::Null);
    }
    if spec.shared_access_nodes.iter().any(|n| leaves(n)) {
        let rest: Vec<&String> = spec
            .shared_access_nodes
            .iter()
            .filter(|n| !leaves(n))
            .collect();
        patch.insert("sharedAccessNodes".into(), json!(rest));
    }
    (!patch.is_empty()).then_some(Value::Object(patch))
}

fn capability_entry(t: controller_service_capability::rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

/// Polling cadence while waiting for the operator: quick at first, then every 500 ms.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(25))
    }

    async fn sleep(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_millis(500));
    }
}

impl ControllerService {
    pub fn new(client: Client, args: ControllerArgs) -> Self {
        ControllerService { client, args }
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.args.create_timeout_seconds)
    }

    fn volumes(&self) -> Api<VirtualVolume> {
        Api::all(self.client.clone())
    }

    fn claims(&self, namespace: &str) -> Api<StorageClaim> {
        Api::namespaced(self.client.clone(), namespace)
    }

    async fn volume(&self, id: &str) -> Result<Option<VirtualVolume>> {
        not_found_as_none(self.volumes().get(id).await)
    }

    async fn areas(&self) -> Result<BTreeMap<String, StorageArea>> {
        let areas: Api<StorageArea> = Api::all(self.client.clone());
        Ok(areas
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|a| (a.name_any(), a))
            .collect())
    }

    /// The claim of a volume, if it still exists and is the one the volume was made for.
    async fn claim_of(&self, volume: &VirtualVolume) -> Result<Option<StorageClaim>> {
        let Some(reference) = &volume.spec.claim_ref else {
            return Ok(None);
        };
        let claim =
            not_found_as_none(self.claims(&reference.namespace).get(&reference.name).await)?;
        Ok(claim.filter(|c| reference.uid.is_none() || c.uid() == reference.uid))
    }

    /// The priority class of a new claim: the StorageClass parameter, else the PVC annotation,
    /// else `--default-priority-class` (D-30).
    async fn priority_class(&self, params: &Params) -> String {
        if let Some(class) = &params.priority_class {
            return class.clone();
        }
        if let Some((ns, name)) = &params.pvc {
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
            match pvcs.get_opt(name).await {
                Ok(Some(pvc)) => {
                    if let Some(class) = pvc
                        .annotations()
                        .get(PVC_PRIORITY_CLASS_ANNOTATION)
                        .filter(|c| !c.is_empty())
                    {
                        return class.clone();
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, pvc = %name, "reading the PVC's annotations"),
            }
        }
        self.args.default_priority_class.clone()
    }

    // ---- CreateVolume ----

    pub async fn create_volume(&self, req: CreateVolumeRequest) -> Result<CreateVolumeResponse> {
        if req.name.is_empty() {
            return Err(Error::InvalidArgument("name is required".into()));
        }
        capability::check_all(&req.volume_capabilities)?;
        if req.volume_content_source.is_some() {
            return Err(Error::InvalidArgument(
                "volume_content_source is not supported: tessera has no snapshots or clones".into(),
            ));
        }
        let (size, limit) = requested_size(req.capacity_range.as_ref())?;
        let params = Params::parse(&req.parameters, &self.args)?;
        let name = naming::claim_name(&req.name);
        let api = self.claims(&params.namespace);
        let claim = match api.get_opt(&name).await? {
            Some(existing) => {
                check_compatible(&existing, &req.name, &params, size, limit)?;
                existing
            }
            None => {
                let claim = self.new_claim(&req, &name, &params, size).await;
                match api.create(&PostParams::default(), &claim).await {
                    Ok(created) => {
                        tracing::info!(claim = %name, namespace = %params.namespace, size, "created StorageClaim");
                        created
                    }
                    // A concurrent call for the same name created it first.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        let existing = api.get(&name).await?;
                        check_compatible(&existing, &req.name, &params, size, limit)?;
                        existing
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if claim.metadata.deletion_timestamp.is_some() {
            return Err(Error::Aborted(format!(
                "claim {}/{name} of an earlier attempt is being deleted; retry",
                params.namespace
            )));
        }
        let bound = self.wait_bound(&api, &name).await?;
        let volume_name = bound
            .status
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .ok_or_else(|| Error::Internal("a Bound claim without volumeName".into()))?;
        let volume = self.volume(&volume_name).await?.ok_or_else(|| {
            Error::Internal(format!(
                "claim {name} is Bound to missing volume {volume_name}"
            ))
        })?;
        let areas = self.areas().await?;
        Ok(CreateVolumeResponse {
            volume: Some(csi_volume(&volume, &areas)),
        })
    }

    async fn new_claim(
        &self,
        req: &CreateVolumeRequest,
        name: &str,
        params: &Params,
        size: i64,
    ) -> StorageClaim {
        let mut annotations: BTreeMap<String, String> =
            [(CSI_NAME_ANNOTATION.to_owned(), req.name.clone())].into();
        if let Some((ns, pvc)) = &params.pvc {
            annotations.insert("tessera.io/pvc".into(), format!("{ns}/{pvc}"));
        }
        StorageClaim {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(params.namespace.clone()),
                labels: Some(
                    [(CSI_NAME_LABEL.to_owned(), naming::csi_name_label(&req.name))].into(),
                ),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: StorageClaimSpec {
                pool_name: params.pool.clone(),
                size_bytes: size,
                priority_class_name: self.priority_class(params).await,
                media_type: params.media_type.clone(),
                copies: params.copies,
                layout: params.layout,
                preferred_node: preferred_node(req.accessibility_requirements.as_ref()),
            },
            status: None,
        }
    }

    /// Waits until the claim is Bound. A Rejected claim is deleted (nothing was allocated for
    /// it, seed 000 [0046]) so that the CO's retry asks the operator afresh, and the call
    /// answers RESOURCE_EXHAUSTED with the operator's reason.
    async fn wait_bound(&self, api: &Api<StorageClaim>, name: &str) -> Result<StorageClaim> {
        let deadline = tokio::time::Instant::now() + self.timeout();
        let mut backoff = Backoff::new();
        loop {
            let claim = api.get_opt(name).await?.ok_or_else(|| {
                Error::Aborted(format!("claim {name} disappeared while waiting for it"))
            })?;
            let status = claim.status.clone().unwrap_or_default();
            match status.phase {
                Some(ClaimPhase::Bound) if status.volume_name.is_some() => return Ok(claim),
                Some(ClaimPhase::Rejected)
                    if status.observed_generation == claim.metadata.generation =>
                {
                    match api.delete(name, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                    return Err(Error::Rejected {
                        reason: status.reason.unwrap_or_else(|| "Rejected".into()),
                        message: status.message.unwrap_or_default(),
                    });
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "claim {name} is still {:?} after {} s: {}",
                    status.phase.unwrap_or_default(),
                    self.args.create_timeout_seconds,
                    status.message.unwrap_or_default()
                )));
            }
            backoff.sleep().await;
        }
    }

    // ---- DeleteVolume ----

    pub async fn delete_volume(&self, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let Some(volume) = self.volume(&req.volume_id).await? else {
            return Ok(DeleteVolumeResponse {});
        };
        let nodes = published_nodes(&volume);
        if !nodes.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is still published to {}",
                req.volume_id,
                nodes.join(", ")
            )));
        }
        if volume.metadata.deletion_timestamp.is_none() {
            match self.claim_of(&volume).await? {
                // The operator deletes the volume when its claim goes (D-6).
                Some(claim) => {
                    let api = self.claims(&claim.namespace().unwrap_or_default());
                    if claim.metadata.deletion_timestamp.is_none() {
                        not_found_as_none(
                            api.delete(&claim.name_any(), &DeleteParams::default())
                                .await,
                        )?;
                    }
                }
                None => {
                    not_found_as_none(
                        self.volumes()
                            .delete(&req.volume_id, &DeleteParams::default())
                            .await,
                    )?;
                }
            }
        }
        // The volume's finalizer returns its extents to the pool; the call answers once that
        // happened, so a ListVolumes right after no longer shows it.
        let deadline = tokio::time::Instant::now() + self.timeout();
        let mut backoff = Backoff::new();
        while self.volume(&req.volume_id).await?.is_some() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "volume {} is still being released after {} s",
                    req.volume_id, self.args.create_timeout_seconds
                )));
            }
            backoff.sleep().await;
        }
        Ok(DeleteVolumeResponse {})
    }

    // ---- ControllerPublish / Unpublish ----

    pub async fn publish(
        &self,
        req: ControllerPublishVolumeRequest,
    ) -> Result<ControllerPublishVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        if req.node_id.is_empty() {
            return Err(Error::InvalidArgument("node_id is required".into()));
        }
        let capability = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?;
        let access = capability::check(capability)?;
        if req.readonly {
            return Err(Error::InvalidArgument(
                "readonly publish is not supported (PUBLISH_READONLY is not advertised)".into(),
            ));
        }
        let mut volume = self
            .volume(&req.volume_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {} does not exist", req.volume_id)))?;
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.args.node_namespace);
        let lease = crate::agent::status::lease_name(&req.node_id);
        if leases.get_opt(&lease).await?.is_none() {
            return Err(Error::NotFound(format!(
                "node {} is not a tessera node (no Lease {}/{lease})",
                req.node_id, self.args.node_namespace
            )));
        }
        for _ in 0..CONFLICT_RETRIES {
            if volume.metadata.deletion_timestamp.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is being deleted",
                    req.volume_id
                )));
            }
            let Some(spec) = publish_patch(&volume.spec, &req.node_id, access)? else {
                return publish_context(&volume, access);
            };
            match self.patch_spec(&volume, spec).await {
                Ok(updated) => {
                    tracing::info!(volume = %req.volume_id, node = %req.node_id, access = access.as_str(), "published");
                    return publish_context(&updated, access);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    volume = self.volume(&req.volume_id).await?.ok_or_else(|| {
                        Error::NotFound(format!("volume {} does not exist", req.volume_id))
                    })?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Aborted(format!(
            "volume {} kept changing while publishing; retry",
            req.volume_id
        )))
    }

    pub async fn unpublish(
        &self,
        req: ControllerUnpublishVolumeRequest,
    ) -> Result<ControllerUnpublishVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let node = (!req.node_id.is_empty()).then_some(req.node_id.as_str());
        for _ in 0..CONFLICT_RETRIES {
            let Some(volume) = self.volume(&req.volume_id).await? else {
                return Ok(ControllerUnpublishVolumeResponse {});
            };
            let Some(spec) = unpublish_patch(&volume.spec, node) else {
                return Ok(ControllerUnpublishVolumeResponse {});
            };
            match self.patch_spec(&volume, spec).await {
                Ok(_) => {
                    tracing::info!(volume = %req.volume_id, node = ?node, "unpublished");
                    return Ok(ControllerUnpublishVolumeResponse {});
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Aborted(format!(
            "volume {} kept changing while unpublishing; retry",
            req.volume_id
        )))
    }

    /// A merge patch of the volume's spec, conditional on the resourceVersion read: two
    /// concurrent publishes of a single-writer volume cannot both win (the loser gets 409 and
    /// re-reads).
    async fn patch_spec(
        &self,
        volume: &VirtualVolume,
        spec: Value,
    ) -> Result<VirtualVolume, kube::Error> {
        let body = json!({
            "metadata": { "resourceVersion": volume.resource_version() },
            "spec": spec,
        });
        self.volumes()
            .patch(
                &volume.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await
    }

    // ---- ValidateVolumeCapabilities ----

    pub async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities must not be empty".into(),
            ));
        }
        if self.volume(&req.volume_id).await?.is_none() {
            return Err(Error::NotFound(format!(
                "volume {} does not exist",
                req.volume_id
            )));
        }
        Ok(match capability::check_all(&req.volume_capabilities) {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(e) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        })
    }

    // ---- ListVolumes / ControllerGetVolume ----

    pub async fn list_volumes(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse> {
        if req.max_entries < 0 {
            return Err(Error::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        let after = if req.starting_token.is_empty() {
            None
        } else {
            Some(
                req.starting_token
                    .strip_prefix(TOKEN_PREFIX)
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| {
                        Error::Aborted(format!(
                            "starting_token {:?} was not issued by this plugin",
                            req.starting_token
                        ))
                    })?
                    .to_owned(),
            )
        };
        let mut volumes: Vec<VirtualVolume> = self
            .volumes()
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|v| v.metadata.deletion_timestamp.is_none())
            .collect();
        volumes.sort_by_key(|v| v.name_any());
        // Names are unique and ordered, so "after the last name returned" survives deletions
        // and additions between pages without repeating an entry.
        let start = after.map_or(0, |after| {
            volumes.partition_point(|v| v.name_any() <= after)
        });
        let max = if req.max_entries == 0 {
            usize::MAX
        } else {
            req.max_entries as usize
        };
        let page: Vec<&VirtualVolume> = volumes.iter().skip(start).take(max).collect();
        let next_token = if start + page.len() < volumes.len() {
            page.last()
                .map(|v| format!("{TOKEN_PREFIX}{}", v.name_any()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let areas = self.areas().await?;
        Ok(ListVolumesResponse {
            entries: page
                .into_iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(csi_volume(v, &areas)),
                    status: Some(list_volumes_response::VolumeStatus {
                        published_node_ids: published_nodes(v),
                        volume_condition: Some(volume_condition(v)),
                    }),
                })
                .collect(),
            next_token,
        })
    }

    pub async fn get_volume(
        &self,
        req: ControllerGetVolumeRequest,
    ) -> Result<ControllerGetVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let volume = self
            .volume(&req.volume_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {} does not exist", req.volume_id)))?;
        let areas = self.areas().await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&volume, &areas)),
            status: Some(
                tessera_proto::csi::v1::controller_get_volume_response::VolumeStatus {
                    published_node_ids: published_nodes(&volume),
                    volume_condition: Some(volume_condition(&volume)),
                },
            ),
        })
    }

    // ---- GetCapacity ----

    /// Free bytes (whole extents) of the pool's Online areas, restricted to the areas of the
    /// requested topology segment, divided by the copies the parameters ask for.
    pub async fn get_capacity(&self, req: GetCapacityRequest) -> Result<GetCapacityResponse> {
        for capability in &req.volume_capabilities {
            if capability::check(capability).is_err() {
                return Ok(GetCapacityResponse {
                    available_capacity: 0,
                    maximum_volume_size: None,
                    minimum_volume_size: None,
                });
            }
        }
        let params = Params::parse(&req.parameters, &self.args)?;
        let pools: Api<StoragePool> = Api::all(self.client.clone());
        let Some(pool) = not_found_as_none(pools.get(&params.pool).await)? else {
            return Ok(GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: None,
                minimum_volume_size: None,
            });
        };
        let es = pool.spec.extent_size_bytes.max(SIZE_ALIGNMENT);
        let segment = req
            .accessible_topology
            .as_ref()
            .map(|t| t.segments.clone())
            .unwrap_or_default();
        let in_segment = |area: &StorageArea| {
            segment.iter().all(|(key, value)| match key.as_str() {
                TOPOLOGY_ZONE_KEY => area.spec.domain.as_deref() == Some(value.as_str()),
                TOPOLOGY_NODE_KEY => area.spec.node_name == *value,
                _ => false,
            })
        };
        let free_extents: i64 = self
            .areas()
            .await?
            .values()
            .filter(|a| a.spec.pool_name == params.pool && a.metadata.deletion_timestamp.is_none())
            .filter(|a| a.status.as_ref().and_then(|s| s.phase) == Some(AreaPhase::Online))
            .filter(|a| in_segment(a))
            .map(|a| {
                let status = a.status.clone().unwrap_or_default();
                let capacity = status.capacity_bytes.or(a.spec.size_bytes).unwrap_or(0);
                let allocated = status.allocated_bytes.unwrap_or(0);
                (capacity / es - (allocated + es - 1) / es).max(0)
            })
            .sum();
        let copies = i64::from(params.copies);
        Ok(GetCapacityResponse {
            available_capacity: free_extents / copies * es,
            maximum_volume_size: None,
            minimum_volume_size: None,
        })
    }

    // ---- ControllerExpandVolume ----

    pub async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
        if range.required_bytes <= 0 && range.limit_bytes <= 0 {
            return Err(Error::InvalidArgument(
                "capacity_range must set required_bytes".into(),
            ));
        }
        if let Some(capability) = &req.volume_capability {
            capability::check(capability)?;
        }
        let (size, limit) = requested_size(Some(range))?;
        let volume = self
            .volume(&req.volume_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {} does not exist", req.volume_id)))?;
        if limit > 0 && volume.spec.size_bytes > limit {
            return Err(Error::OutOfRange(format!(
                "volume {} is already {} bytes, above limit_bytes {limit}; volumes never shrink",
                req.volume_id, volume.spec.size_bytes
            )));
        }
        let node_expansion_required =
            capability::needs_node_expansion(req.volume_capability.as_ref());
        if size <= volume.spec.size_bytes && mapped_bytes(&volume) >= volume.spec.size_bytes {
            // Already that large (a retried or smaller request): volumes never shrink.
            return Ok(ControllerExpandVolumeResponse {
                capacity_bytes: volume.spec.size_bytes,
                node_expansion_required,
            });
        }
        let claim = self.claim_of(&volume).await?.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {} has no StorageClaim to grow",
                req.volume_id
            ))
        })?;
        let namespace = claim.namespace().unwrap_or_default();
        let api = self.claims(&namespace);
        let target = size.max(claim.spec.size_bytes);
        if size > claim.spec.size_bytes {
            api.patch(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "sizeBytes": size } })),
            )
            .await?;
            tracing::info!(volume = %req.volume_id, size, "claim grown");
        }
        let deadline = tokio::time::Instant::now() + self.timeout();
        let mut backoff = Backoff::new();
        loop {
            let volume = self
                .volume(&req.volume_id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("volume {} disappeared", req.volume_id)))?;
            // Nodes may use the new size once both the mapping and the size say so.
            if volume.spec.size_bytes >= target && mapped_bytes(&volume) >= target {
                return Ok(ControllerExpandVolumeResponse {
                    capacity_bytes: volume.spec.size_bytes,
                    node_expansion_required,
                });
            }
            if let Some(claim) = not_found_as_none(api.get(&claim.name_any()).await)? {
                let rejected = claim.status.as_ref().and_then(|s| {
                    s.conditions.iter().find(|c| {
                        c.type_ == EXPANDED_CONDITION
                            && c.status == "False"
                            && c.observed_generation == claim.metadata.generation
                    })
                });
                if let Some(c) = rejected {
                    return Err(Error::Rejected {
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                    });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "volume {} did not grow to {target} bytes in {} s",
                    req.volume_id, self.args.create_timeout_seconds
                )));
            }
            backoff.sleep().await;
        }
    }
}

/// CreateVolume for a name that already has a claim: the same volume only if it matches.
fn check_compatible(
    claim: &StorageClaim,
    csi_name: &str,
    params: &Params,
    size: i64,
    limit: i64,
) -> Result<()> {
    let key = format!(
        "claim {}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    );
    let owner = claim.annotations().get(CSI_NAME_ANNOTATION);
    if owner.map(String::as_str) != Some(csi_name) {
        return Err(Error::AlreadyExists(format!(
            "{key} exists but was not created for CSI volume {csi_name:?}"
        )));
    }
    if claim.spec.pool_name != params.pool {
        return Err(Error::AlreadyExists(format!(
            "{key} exists in pool {}, the request asks for pool {}",
            claim.spec.pool_name, params.pool
        )));
    }
    let current = claim.spec.size_bytes;
    if current < size || (limit > 0 && current > limit) {
        return Err(Error::AlreadyExists(format!(
            "{key} exists with {current} bytes, the request asks for {size}{}",
            if limit > 0 {
                format!(" up to {limit}")
            } else {
                String::new()
            }
        )));
    }
    Ok(())
}

fn publish_context(
    volume: &VirtualVolume,
    access: Access,
) -> Result<ControllerPublishVolumeResponse> {
    let generation = mapping_generation(volume).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "volume {} has no committed mapping yet",
            volume.name_any()
        ))
    })?;
    Ok(ControllerPublishVolumeResponse {
        publish_context: [
            (PUBLISH_GENERATION.to_owned(), generation.to_string()),
            (PUBLISH_ACCESS.to_owned(), access.as_str().to_owned()),
        ]
        .into(),
    })
}

#[tonic::async_trait]
impl controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        Ok(Response::new(
            ControllerService::create_volume(self, request.into_inner()).await?,
        ))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        Ok(Response::new(
            ControllerService::delete_volume(self, request.into_inner()).await?,
        ))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Ok(Response::new(self.publish(request.into_inner()).await?))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Ok(Response::new(self.unpublish(request.into_inner()).await?))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        Ok(Response::new(self.validate(request.into_inner()).await?))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        Ok(Response::new(
            ControllerService::list_volumes(self, request.into_inner()).await?,
        ))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        Ok(Response::new(
            ControllerService::get_capacity(self, request.into_inner()).await?,
        ))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: [
                Type::CreateDeleteVolume,
                Type::PublishUnpublishVolume,
                Type::ListVolumes,
                Type::GetCapacity,
                Type::ExpandVolume,
                Type::ListVolumesPublishedNodes,
                Type::GetVolume,
                Type::VolumeCondition,
                Type::SingleNodeMultiWriter,
            ]
            .into_iter()
            .map(capability_entry)
            .collect(),
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand(request.into_inner()).await?))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        Ok(Response::new(self.get_volume(request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(access: Option<&str>, shared: &[&str]) -> VirtualVolumeSpec {
        VirtualVolumeSpec {
            size_bytes: 4096,
            pool_name: "p".into(),
            priority_class_name: "c".into(),
            copies: 1,
            layout: VolumeLayout::Concatenated,
            claim_ref: None,
            access_node: access.map(str::to_owned),
            shared_access_nodes: shared.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn sizes_round_up_to_4096_within_the_limit() {
        let range = |required, limit| CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        };
        assert_eq!(requested_size(None).unwrap(), (DEFAULT_VOLUME_BYTES, 0));
        assert_eq!(requested_size(Some(&range(1, 0))).unwrap(), (4096, 0));
        assert_eq!(
            requested_size(Some(&range(8192, 8192))).unwrap(),
            (8192, 8192)
        );
        assert!(matches!(
            requested_size(Some(&range(8192, 4096))),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            requested_size(Some(&range(4097, 5000))),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            requested_size(Some(&range(-1, 0))),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(requested_size(Some(&range(0, 8192))).unwrap(), (8192, 8192));
    }

    #[test]
    fn one_borrower_at_a_time_unless_every_publish_is_multi_writer_block() {
        assert_eq!(
            publish_patch(&spec(None, &[]), "a", Access::Single).unwrap(),
            Some(json!({"accessNode": "a"}))
        );
        assert_eq!(
            publish_patch(&spec(Some("a"), &[]), "a", Access::Single).unwrap(),
            None
        );
        assert!(matches!(
            publish_patch(&spec(Some("a"), &[]), "b", Access::Single),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            publish_patch(&spec(None, &["a"]), "b", Access::Single),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(
            publish_patch(&spec(None, &["a"]), "b", Access::Multi).unwrap(),
            Some(json!({"sharedAccessNodes": ["a", "b"]}))
        );
        assert_eq!(
            publish_patch(&spec(None, &["a"]), "a", Access::Multi).unwrap(),
            None
        );
        assert!(matches!(
            publish_patch(&spec(Some("a"), &[]), "b", Access::Multi),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn unpublish_removes_one_node_or_all() {
        assert_eq!(
            unpublish_patch(&spec(Some("a"), &[]), Some("a")),
            Some(json!({"accessNode": null}))
        );
        assert_eq!(unpublish_patch(&spec(Some("a"), &[]), Some("b")), None);
        assert_eq!(
            unpublish_patch(&spec(None, &["a", "b"]), Some("a")),
            Some(json!({"sharedAccessNodes": ["b"]}))
        );
        assert_eq!(
            unpublish_patch(&spec(None, &["a", "b"]), None),
            Some(json!({"sharedAccessNodes": []}))
        );
        assert_eq!(unpublish_patch(&spec(None, &[]), None), None);
    }

    #[test]
    fn topology_hint_names_the_preferred_node() {
        let segment = |k: &str, v: &str| Topology {
            segments: [(k.to_owned(), v.to_owned())].into(),
        };
        let requirement = TopologyRequirement {
            requisite: vec![segment(TOPOLOGY_NODE_KEY, "node-b")],
            preferred: vec![
                segment(TOPOLOGY_ZONE_KEY, "zone-a"),
                segment(TOPOLOGY_NODE_KEY, "node-a"),
            ],
        };
        assert_eq!(preferred_node(Some(&requirement)), Some("node-a".into()));
        assert_eq!(preferred_node(None), None);
    }
}
