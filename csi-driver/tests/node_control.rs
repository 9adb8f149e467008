//! The node-control gRPC server of the node agent: bearer-token authentication, ApplyMapping
//! (growth only, idempotent, stale generations refused), ReportUsage and MountInquiry. These run
//! without root: the node uses `--frontend nbd` and Block volumes.

mod node_support;

use bytes::Bytes;
use node_support::*;
use roaring::RoaringBitmap;
use tessera_csi::agent::FrontendChoice;
use tessera_proto::csi::v1::{NodeStageVolumeRequest, NodeUnstageVolumeRequest};
use tessera_proto::node_control::v1::node_control_client::NodeControlClient;
use tessera_proto::node_control::v1::{
    ApplyMappingRequest, MappedRun, Mapping, MountInquiryRequest, OperationRef, Replica,
    ReportUsageRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

async fn control_channel(node: &Node) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", node.agent.control_addr()))
        .expect("endpoint")
        .connect()
        .await
        .expect("node-control connects")
}

type Authed = NodeControlClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>,
    >,
>;

fn client_with_token(channel: Channel, token: &'static str) -> Authed {
    NodeControlClient::with_interceptor(
        channel,
        Box::new(move |mut request: Request<()>| {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("metadata"),
            );
            Ok(request)
        }) as Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>,
    )
}

/// The wire mapping of consecutive 1 MiB extents on `area` (`None`: hole).
fn wire_mapping(generation: i64, size: u64, area: &str, extents: &[Option<u64>]) -> Mapping {
    Mapping {
        generation,
        extent_size_bytes: ES as i64,
        size_bytes: size as i64,
        runs: extents
            .iter()
            .enumerate()
            .map(|(i, e)| MappedRun {
                offset: (i as u64 * ES) as i64,
                length: ES as i64,
                replicas: e
                    .iter()
                    .map(|index| Replica {
                        area: area.into(),
                        area_offset: (index * ES) as i64,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn apply(volume: &str, op: &str, attempt: u32, mapping: Mapping) -> ApplyMappingRequest {
    ApplyMappingRequest {
        operation: Some(OperationRef {
            volume: volume.into(),
            operation_id: op.into(),
            attempt,
            generation: mapping.generation,
        }),
        mapping: Some(mapping),
    }
}

/// A node with one 16 MiB area, and a 4 MiB Block volume staged on it (NBD only) whose
/// extent 3 is a hole.
async fn staged_block_volume(cluster: &Cluster) -> (Node, std::path::PathBuf) {
    let node = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let area = "node-a-area-0";
    cluster
        .create_volume(
            "vol-ctl",
            4 * ES,
            1,
            &[Some((area, 0)), Some((area, 1)), Some((area, 2)), None],
            Some("node-a"),
        )
        .await;
    let staging = cluster.path("staging/vol-ctl");
    node.csi
        .clone()
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: "vol-ctl".into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .expect("stage");
    (node, staging)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_control_refuses_calls_without_the_bearer_token() {
    let cluster = Cluster::start().await;
    let node = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let channel = control_channel(&node).await;

    let err = NodeControlClient::new(channel.clone())
        .mount_inquiry(MountInquiryRequest {
            volume: "vol-x".into(),
        })
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    let err = client_with_token(channel.clone(), "not-the-token")
        .mount_inquiry(MountInquiryRequest {
            volume: "vol-x".into(),
        })
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    let answer = client_with_token(channel, TOKEN)
        .mount_inquiry(MountInquiryRequest {
            volume: "vol-x".into(),
        })
        .await
        .expect("right token")
        .into_inner();
    assert!(!answer.staged && !answer.published && !answer.mounted);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_mapping_takes_growth_refuses_other_changes_and_is_idempotent() {
    let cluster = Cluster::start().await;
    let (node, staging) = staged_block_volume(&cluster).await;
    let mut control = client_with_token(control_channel(&node).await, TOKEN);
    let area = "node-a-area-0";
    let grown = wire_mapping(
        2,
        6 * ES,
        area,
        &[Some(0), Some(1), Some(2), Some(3), Some(4), Some(5)],
    );

    // Growth: the hole filled and two extents appended.
    let answer = control
        .apply_mapping(apply("vol-ctl", "op-1", 1, grown.clone()))
        .await
        .expect("growth applies")
        .into_inner();
    assert_eq!(answer.applied_generation, 2);
    let socket = node.state_dir().join("nbd/vol-ctl.sock");
    let nbd = tessera_nbd::NbdClient::connect_unix(&socket, "vol-ctl")
        .await
        .expect("NBD export");
    assert_eq!(nbd.size(), 6 * ES, "the export serves the grown volume");
    // The former hole is writable now.
    nbd.write(3 * ES, Bytes::from(vec![7u8; 4096]), true)
        .await
        .expect("write into the filled hole");
    nbd.disconnect().await;
    let cached: serde_json::Value = serde_json::from_slice(
        &std::fs::read(node.state_dir().join("mappings/vol-ctl.json")).expect("cache file"),
    )
    .expect("cache json");
    assert_eq!(cached["mapping"]["generation"], 2);
    let attachments = eventually(5, "attachment at generation 2", || async {
        let v = cluster.volumes().get("vol-ctl").await.ok()?;
        let a = v.status?.attachments;
        (a.len() == 1 && a[0].applied_generation == 2).then_some(a)
    })
    .await;
    assert_eq!(attachments[0].node, "node-a");

    // A repeat of the same operation, and the same generation under another operation: success.
    for (op, attempt) in [("op-1", 1), ("op-2", 1)] {
        let again = control
            .apply_mapping(apply("vol-ctl", op, attempt, grown.clone()))
            .await
            .expect("repeat is idempotent")
            .into_inner();
        assert_eq!(again.applied_generation, 2);
    }

    // An older generation: FAILED_PRECONDITION.
    let stale = wire_mapping(1, 4 * ES, area, &[Some(0), Some(1), Some(2), None]);
    let err = control
        .apply_mapping(apply("vol-ctl", "op-3", 1, stale))
        .await
        .expect_err("stale");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    // Moving a mapped extent needs a hold: FAILED_PRECONDITION, and nothing changes.
    let moved = wire_mapping(
        3,
        6 * ES,
        area,
        &[Some(9), Some(1), Some(2), Some(3), Some(4), Some(5)],
    );
    let err = control
        .apply_mapping(apply("vol-ctl", "op-4", 1, moved.clone()))
        .await
        .expect_err("move refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    // The refusal is remembered for the same attempt.
    let err = control
        .apply_mapping(apply("vol-ctl", "op-4", 1, moved))
        .await
        .expect_err("same answer");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let inquiry = control
        .mount_inquiry(MountInquiryRequest {
            volume: "vol-ctl".into(),
        })
        .await
        .expect("inquiry")
        .into_inner();
    assert!(
        inquiry.detail.contains("generation 2"),
        "{}",
        inquiry.detail
    );

    // Unknown volume: NOT_FOUND-like refusal (not staged here).
    let err = control
        .apply_mapping(apply("vol-none", "op-5", 1, grown))
        .await
        .expect_err("not staged");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    node.csi
        .clone()
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "vol-ctl".into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("unstage");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn report_usage_and_the_usage_annotation_follow_the_engine_bitmaps() {
    let cluster = Cluster::start().await;
    let (node, staging) = staged_block_volume(&cluster).await;
    let mut control = client_with_token(control_channel(&node).await, TOKEN);

    let empty = control
        .report_usage(ReportUsageRequest {
            volume: "vol-ctl".into(),
        })
        .await
        .expect("usage")
        .into_inner();
    let bits = RoaringBitmap::deserialize_from(&empty.in_use_extents[..]).expect("roaring");
    assert!(
        bits.is_empty(),
        "a fresh volume has no extent in use: {bits:?}"
    );

    let nbd =
        tessera_nbd::NbdClient::connect_unix(node.state_dir().join("nbd/vol-ctl.sock"), "vol-ctl")
            .await
            .expect("NBD export");
    nbd.write(ES + 512, Bytes::from(vec![1u8; 1024]), false)
        .await
        .expect("write extent 1");
    nbd.write(2 * ES, Bytes::from(vec![2u8; 4096]), true)
        .await
        .expect("write extent 2");
    nbd.disconnect().await;

    let first = control
        .report_usage(ReportUsageRequest {
            volume: "vol-ctl".into(),
        })
        .await
        .expect("usage")
        .into_inner();
    assert_eq!(first.generation, 1);
    let in_use = RoaringBitmap::deserialize_from(&first.in_use_extents[..]).expect("roaring");
    assert_eq!(in_use.iter().collect::<Vec<_>>(), vec![1, 2]);
    let high = RoaringBitmap::deserialize_from(&first.high_priority_extents[..]).expect("roaring");
    assert_eq!(high, in_use, "the class `standard` has high data priority");
    let second = control
        .report_usage(ReportUsageRequest {
            volume: "vol-ctl".into(),
        })
        .await
        .expect("usage")
        .into_inner();
    assert!(second.sequence > first.sequence);

    // The heartbeat writes the same view into the annotation.
    let report = eventually(10, "usage annotation with extents 1 and 2", || async {
        let v = cluster.volumes().get("vol-ctl").await.ok()?;
        let value = v
            .metadata
            .annotations?
            .get("tessera.io/usage-report")?
            .clone();
        let (in_use, _) = tessera_csi::agent::status::parse_usage_report(&value)?;
        (in_use.iter().collect::<Vec<_>>() == vec![1, 2]).then_some(value)
    })
    .await;
    let json: serde_json::Value = serde_json::from_str(&report).expect("report json");
    assert_eq!(json["node"], "node-a");

    let err = control
        .report_usage(ReportUsageRequest {
            volume: "vol-other".into(),
        })
        .await
        .expect_err("not staged");
    assert_eq!(err.code(), Code::FailedPrecondition);

    node.csi
        .clone()
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "vol-ctl".into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("unstage");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mount_inquiry_answers_from_the_records() {
    let cluster = Cluster::start().await;
    let (node, staging) = staged_block_volume(&cluster).await;
    let mut control = client_with_token(control_channel(&node).await, TOKEN);
    let answer = control
        .mount_inquiry(MountInquiryRequest {
            volume: "vol-ctl".into(),
        })
        .await
        .expect("inquiry")
        .into_inner();
    assert!(answer.staged);
    assert!(!answer.published);
    assert!(!answer.mounted, "NBD only: nothing in the mount table");
    assert!(
        answer.paths.contains(&staging.display().to_string()),
        "{:?}",
        answer.paths
    );
    assert!(
        answer.detail.contains("NBD export only"),
        "{}",
        answer.detail
    );

    node.csi
        .clone()
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "vol-ctl".into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("unstage");
    let answer = control
        .mount_inquiry(MountInquiryRequest {
            volume: "vol-ctl".into(),
        })
        .await
        .expect("inquiry")
        .into_inner();
    assert!(!answer.staged);
    node.stop().await;
}
