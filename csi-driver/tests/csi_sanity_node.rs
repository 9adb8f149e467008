//! A Rust port of the node cases of the kubernetes-csi sanity suite (`pkg/sanity/node.go`), run
//! against `tessera-csi --mode node` over its unix socket: Identity in node mode, every Node RPC's
//! argument checks with the gRPC code the suite expects, and the staged/published flows on
//! fuse-loop (root only; those skip with a printed reason otherwise). The controller side of the
//! suite's flows (CreateVolume, ControllerPublish) is replaced by writing the VirtualVolume and its
//! `status.mapping` directly and setting `spec.accessNode`, which is what the controller and the
//! operator would do.
//!
//! A few tessera cases follow the suite's (unknown volume, not the borrower, Mount without a
//! kernel frontend), named after what they check.

mod node_support;

use node_support::*;
use tessera_csi::agent::FrontendChoice;
use tessera_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeExpandVolumeRequest,
    NodeGetCapabilitiesRequest, NodeGetInfoRequest, NodeGetVolumeStatsRequest,
    NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, ProbeRequest, node_service_capability, plugin_capability,
};
use tonic::Code;

const VOL: &str = "vol-sanity";

/// A node (`node-a`, one 64 MiB area) and a 32 MiB volume published to it.
async fn setup(frontend: FrontendChoice) -> (Cluster, Node) {
    let cluster = Cluster::start().await;
    let node = cluster
        .start_node(cluster.node_args("node-a", 1, 64 * ES, frontend))
        .await;
    let extents: Vec<Option<(&str, u64)>> =
        (0..32u64).map(|i| Some(("node-a-area-0", i))).collect();
    cluster
        .create_volume(VOL, 32 * ES, 1, &extents, Some("node-a"))
        .await;
    (cluster, node)
}

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => {
            eprintln!("status: {status:?}");
            status.code()
        }
    }
}

// ---- Identity (node mode) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_in_node_mode_reports_the_driver_and_is_ready() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let mut identity = node.identity.clone();
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.name, "csi.tessera.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect("capabilities")
        .into_inner();
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(!services.contains(&(plugin_capability::service::Type::ControllerService as i32)));
    let probe = identity
        .probe(ProbeRequest {})
        .await
        .expect("probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    node.stop().await;
}

// ---- NodeGetCapabilities / NodeGetInfo ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_get_capabilities_should_return_appropriate_capabilities() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let caps = node
        .csi
        .clone()
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .expect("capabilities")
        .into_inner();
    use node_service_capability::rpc::Type;
    let mut types: Vec<i32> = caps
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(node_service_capability::Type::Rpc(rpc)) => rpc.r#type,
            None => panic!("capability without an RPC type"),
        })
        .collect();
    types.sort_unstable();
    assert_eq!(
        types,
        vec![
            Type::StageUnstageVolume as i32,
            Type::GetVolumeStats as i32,
            Type::ExpandVolume as i32,
            Type::VolumeCondition as i32,
        ]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_get_info_should_return_appropriate_values() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let info = node
        .csi
        .clone()
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    assert_eq!(info.max_volumes_per_node, 16);
    let topology = info
        .accessible_topology
        .expect("topology (accessibility constraints are advertised)");
    assert_eq!(
        topology
            .segments
            .get("topology.tessera.io/node")
            .map(String::as_str),
        Some("node-a")
    );
    assert_eq!(
        topology
            .segments
            .get("topology.kubernetes.io/zone")
            .map(String::as_str),
        Some("zone-1")
    );
    node.stop().await;
}

// ---- NodePublishVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_publish_volume_should_fail_when_no_volume_id_is_provided() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_publish_volume(NodePublishVolumeRequest::default())
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_publish_volume_should_fail_when_no_target_path_is_provided() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: VOL.into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_publish_volume_should_fail_when_no_volume_capability_is_provided() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: VOL.into(),
            target_path: cluster.path("target").display().to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_publish_volume_of_an_unknown_or_unstaged_volume_is_refused() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let staging = cluster.path("staging");
    let target = cluster.path("target");
    let unknown = node
        .publish("vol-unknown", &staging, &target, block_cap(), false)
        .await;
    assert_eq!(code(unknown), Code::NotFound);
    let unstaged = node
        .publish(VOL, &staging, &target, block_cap(), false)
        .await;
    assert_eq!(code(unstaged), Code::FailedPrecondition);
    // Staged, but the Block volume has no kernel device on an NBD-only node.
    node.stage(VOL, &staging, block_cap()).await.expect("stage");
    let other_staging = node
        .publish(VOL, &cluster.path("elsewhere"), &target, block_cap(), false)
        .await;
    assert_eq!(code(other_staging), Code::FailedPrecondition);
    let no_device = node
        .publish(VOL, &staging, &target, block_cap(), false)
        .await;
    assert_eq!(code(no_device), Code::FailedPrecondition);
    node.unstage(VOL, &staging).await.expect("unstage");
    node.stop().await;
}

// ---- NodeUnpublishVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_unpublish_volume_should_fail_when_no_volume_id_is_provided() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_unpublish_volume(NodeUnpublishVolumeRequest::default())
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_unpublish_volume_should_fail_when_no_target_path_is_provided() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: VOL.into(),
            target_path: String::new(),
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

/// CSI spec: unpublishing a volume that is not published there is a success (idempotency).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_unpublish_volume_of_a_volume_not_published_succeeds() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let target = cluster.path("never-published");
    node.unpublish("vol-unknown", &target)
        .await
        .expect("unknown volume");
    node.unpublish(VOL, &target).await.expect("not published");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_unpublish_volume_should_remove_target_path() {
    require_root!();
    let _serial = KERNEL_LOCK.lock().await;
    let (cluster, node) = setup(FrontendChoice::FuseLoop).await;
    let staging = cluster.path("staging");
    let target = cluster.path("mnt/target");
    node.stage(VOL, &staging, mount_cap(""))
        .await
        .expect("stage");
    node.publish(VOL, &staging, &target, mount_cap(""), false)
        .await
        .expect("publish");
    assert!(target.exists(), "the driver created the target path");
    node.unpublish(VOL, &target).await.expect("unpublish");
    assert!(!target.exists(), "the target path was removed");
    node.unstage(VOL, &staging).await.expect("unstage");
    node.stop().await;
}

// ---- NodeStageVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_stage_volume_should_fail_when_no_volume_id_is_provided() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_stage_volume(NodeStageVolumeRequest {
            staging_target_path: cluster.path("staging").display().to_string(),
            volume_capability: Some(mount_cap("")),
            publish_context: [("device".to_string(), "/dev/mock".to_string())].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_stage_volume_should_fail_when_no_staging_target_path_is_provided() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: VOL.into(),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_stage_volume_should_fail_when_no_volume_capability_is_provided() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: VOL.into(),
            staging_target_path: cluster.path("staging").display().to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_stage_volume_of_an_unknown_volume_is_not_found() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .stage("vol-unknown", &cluster.path("staging"), block_cap())
        .await;
    assert_eq!(code(result), Code::NotFound);
    node.stop().await;
}

/// Seed 001 [0028]: one borrower at a time; a node the volume is not published to is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_stage_volume_on_a_node_that_is_not_the_borrower_fails_precondition() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    cluster.set_access_node(VOL, Some("node-z")).await;
    let result = node.stage(VOL, &cluster.path("staging"), block_cap()).await;
    assert_eq!(code(result), Code::FailedPrecondition);
    cluster.set_access_node(VOL, None).await;
    let result = node.stage(VOL, &cluster.path("staging"), block_cap()).await;
    assert_eq!(code(result), Code::FailedPrecondition);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_stage_volume_of_a_mount_volume_without_a_kernel_frontend_fails_precondition() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let err = node
        .stage(VOL, &cluster.path("staging"), mount_cap(""))
        .await
        .expect_err("no kernel device");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("/dev/fuse"), "{}", err.message());
    // Nothing was left staged.
    assert!(
        !node
            .state_dir()
            .join(format!("mappings/{VOL}.json"))
            .exists()
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_stage_volume_is_idempotent_and_refuses_a_different_staging() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let staging = cluster.path("staging");
    node.stage(VOL, &staging, block_cap()).await.expect("stage");
    node.stage(VOL, &staging, block_cap())
        .await
        .expect("stage again");
    let other_path = node.stage(VOL, &cluster.path("other"), block_cap()).await;
    assert_eq!(code(other_path), Code::AlreadyExists);
    node.unstage(VOL, &staging).await.expect("unstage");
    node.unstage(VOL, &staging).await.expect("unstage again");
    node.stop().await;
}

// ---- NodeUnstageVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_unstage_volume_should_fail_when_no_volume_id_is_provided() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: cluster.path("staging").display().to_string(),
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_unstage_volume_should_fail_when_no_staging_target_path_is_provided() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: VOL.into(),
            staging_target_path: String::new(),
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

// ---- NodeGetVolumeStats ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_get_volume_stats_should_fail_when_no_volume_id_is_provided() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_get_volume_stats_should_fail_when_no_volume_path_is_provided() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: VOL.into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_get_volume_stats_should_fail_when_volume_is_not_found() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-unknown".into(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::NotFound);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_get_volume_stats_should_fail_when_volume_does_not_exist_on_the_specified_path() {
    require_root!();
    let _serial = KERNEL_LOCK.lock().await;
    let (cluster, node) = setup(FrontendChoice::FuseLoop).await;
    let staging = cluster.path("staging");
    let target = cluster.path("mnt/target");
    node.stage(VOL, &staging, mount_cap(""))
        .await
        .expect("stage");
    node.publish(VOL, &staging, &target, mount_cap(""), false)
        .await
        .expect("publish");
    let result = node
        .csi
        .clone()
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: VOL.into(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::NotFound);
    node.unpublish(VOL, &target).await.expect("unpublish");
    node.unstage(VOL, &staging).await.expect("unstage");
    node.stop().await;
}

// ---- NodeExpandVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_expand_volume_should_fail_when_no_volume_id_is_provided() {
    let (cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_path: cluster.path("mnt").display().to_string(),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_expand_volume_should_fail_when_no_volume_path_is_provided() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: VOL.into(),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_expand_volume_should_fail_when_volume_is_not_found() {
    let (_cluster, node) = setup(FrontendChoice::Nbd).await;
    let result = node
        .csi
        .clone()
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "vol-unknown".into(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(result), Code::NotFound);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_expand_volume_should_work_if_node_expand_is_called_after_node_publish() {
    require_root!();
    let _serial = KERNEL_LOCK.lock().await;
    let (cluster, node) = setup(FrontendChoice::FuseLoop).await;
    let staging = cluster.path("staging");
    let target = cluster.path("mnt/target");
    node.stage(VOL, &staging, mount_cap(""))
        .await
        .expect("stage");
    node.publish(VOL, &staging, &target, mount_cap(""), false)
        .await
        .expect("publish");
    // No controller expansion here: the volume already has the requested size, so the node
    // has nothing to grow (resize2fs on a filesystem that fills its device is a no-op).
    let response = node
        .csi
        .clone()
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: VOL.into(),
            volume_path: target.display().to_string(),
            capacity_range: Some(tessera_proto::csi::v1::CapacityRange {
                required_bytes: (32 * ES) as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    match response {
        Ok(r) => assert_eq!(r.into_inner().capacity_bytes, (32 * ES) as i64),
        // resize2fs of a full-size ext4 answers "Nothing to do" without the ioctl; anything else
        // is a failure.
        Err(status) => panic!("expand after publish: {status:?}"),
    }
    node.unpublish(VOL, &target).await.expect("unpublish");
    node.unstage(VOL, &staging).await.expect("unstage");
    node.stop().await;
}

// ---- The full flow (`runControllerTest`) ----

async fn run_flow(count: usize) {
    let (cluster, node) = setup(FrontendChoice::FuseLoop).await;
    let info = node
        .csi
        .clone()
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert!(!info.node_id.is_empty());
    let staging = cluster.path("staging");
    let target = cluster.path("mnt/target");
    for _ in 0..count {
        node.stage(VOL, &staging, mount_cap(""))
            .await
            .expect("stage");
    }
    for _ in 0..count {
        node.publish(VOL, &staging, &target, mount_cap(""), false)
            .await
            .expect("publish");
    }
    let stats = node
        .csi
        .clone()
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: VOL.into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    assert!(!stats.usage.is_empty());
    for _ in 0..count {
        node.unpublish(VOL, &target).await.expect("unpublish");
    }
    for _ in 0..count {
        node.unstage(VOL, &staging).await.expect("unstage");
    }
    let (mounts, loops) = leftovers(cluster.dir.path());
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "left behind: {mounts:?} {loops:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_service_should_work() {
    require_root!();
    let _serial = KERNEL_LOCK.lock().await;
    run_flow(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_service_should_be_idempotent() {
    require_root!();
    let _serial = KERNEL_LOCK.lock().await;
    run_flow(2).await;
}
