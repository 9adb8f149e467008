//! The node agent end to end against the embedded API server: area registration and
//! heartbeats, the node Lease and node.json, staging Mount and Block volumes on fuse-loop,
//! volumes whose extents live on another node (reached through its extent server, seed 001
//! §4.5), volume conditions, expansion, and restart recovery from the mapping cache.
//! Tests that need kernel devices skip when not root.

mod node_support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};

use bytes::Bytes;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use node_support::*;
use tessera_api::v1alpha1::{AreaPhase, StorageArea};
use tessera_csi::agent::FrontendChoice;
use tessera_proto::csi::v1::{NodeExpandVolumeRequest, NodeGetVolumeStatsRequest, volume_usage};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn areas_are_registered_online_and_heartbeat_with_lease_and_node_json() {
    let cluster = Cluster::start().await;
    let node = cluster
        .start_node(cluster.node_args("node-a", 2, 64 * ES, FrontendChoice::Nbd))
        .await;
    let areas: Api<StorageArea> = Api::all(cluster.client.clone());
    let mut first_beat = Vec::new();
    for i in 0..2 {
        let name = format!("node-a-area-{i}");
        let area = areas.get(&name).await.expect("area registered");
        assert_eq!(area.spec.node_name, "node-a");
        assert_eq!(area.spec.pool_name, POOL);
        assert_eq!(area.spec.size_bytes, Some((64 * ES) as i64));
        let status = area.status.expect("status");
        assert_eq!(status.phase, Some(AreaPhase::Online));
        assert_eq!(status.capacity_bytes, Some((64 * ES) as i64));
        assert_eq!(
            status.extent_server.as_deref(),
            Some(node.agent.extent_endpoint().as_str())
        );
        assert!(status.area_uid.as_deref().is_some_and(|u| !u.is_empty()));
        first_beat.push(status.last_heartbeat_time.expect("heartbeat"));
        // The file is created sparse at the configured size.
        let file = std::fs::metadata(&area.spec.path).expect("area file");
        assert_eq!(file.len(), 64 * ES);
        assert!(file.blocks() * 512 < ES, "area file is sparse");
    }
    // Heartbeats move lastHeartbeatTime (1 s period; the API keeps seconds).
    eventually(5, "a later heartbeat", || async {
        let area = areas.get("node-a-area-0").await.ok()?;
        let beat = area.status?.last_heartbeat_time?;
        (beat.0 > first_beat[0].0).then_some(())
    })
    .await;

    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), "default");
    let lease = leases.get("tessera-node-node-a").await.expect("lease");
    assert_eq!(
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("node-a")
    );
    assert_eq!(
        lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("tessera.io/control-endpoint"))
            .map(String::as_str),
        Some(node.agent.control_endpoint().as_str())
    );

    let json = node.node_json();
    assert_eq!(json["nodeId"], "node-a");
    assert_eq!(json["csiSocket"], node.socket.display().to_string());
    assert_eq!(json["extentServer"], node.agent.extent_endpoint());
    assert_eq!(json["controlEndpoint"], node.agent.control_endpoint());
    assert!(json["volumes"].as_object().is_some_and(|v| v.is_empty()));

    // A restart keeps the areas' identities.
    let uid = areas
        .get("node-a-area-1")
        .await
        .expect("area")
        .status
        .and_then(|s| s.area_uid);
    let args = node.args.clone();
    node.stop().await;
    let node = cluster.start_node(args).await;
    let again = areas
        .get("node-a-area-1")
        .await
        .expect("area")
        .status
        .and_then(|s| s.area_uid);
    assert_eq!(uid, again);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extents_on_another_node_are_reached_through_its_extent_server() {
    let cluster = Cluster::start().await;
    let a = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let b = cluster
        .start_node(cluster.node_args("node-b", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    // Extents 0–3 on node-a's area (slots 2–5), 4–7 on node-b's; node-b borrows first.
    let extents: Vec<Option<(&str, u64)>> = (0..8u64)
        .map(|i| {
            Some(if i < 4 {
                ("node-a-area-0", 2 + i)
            } else {
                ("node-b-area-0", i)
            })
        })
        .collect();
    cluster
        .create_volume("vol-shared", 8 * ES, 1, &extents, Some("node-b"))
        .await;
    let staging_b = cluster.path("b/staging/vol-shared");
    b.stage("vol-shared", &staging_b, block_cap())
        .await
        .expect("stage on the borrower");
    let data = pattern(7, (8 * ES) as usize);
    {
        let nbd = b.nbd("vol-shared").await;
        for chunk in 0..8u64 {
            let at = (chunk * ES) as usize;
            nbd.write(
                chunk * ES,
                Bytes::copy_from_slice(&data[at..at + ES as usize]),
                false,
            )
            .await
            .expect("write through node-b");
        }
        nbd.flush().await.expect("flush");
        nbd.disconnect().await;
    }
    // Extent 1's bytes are in node-a's area file, at slot 3 as the mapping says.
    let area_a = std::fs::File::open(cluster.path("node-a/areas/area-0.img")).expect("area file");
    let mut on_disk = vec![0u8; ES as usize];
    area_a
        .read_exact_at(&mut on_disk, 3 * ES)
        .expect("read area");
    assert!(on_disk == data[ES as usize..2 * ES as usize]);

    // node-a grants node-b exactly the volume's ranges on its area.
    let auth = a.agent.extent_authorization().expect("extent server");
    let (read, write) = auth.area_ranges("node-b", "node-a-area-0");
    assert_eq!(read, vec![2 * ES..6 * ES]);
    assert_eq!(write, vec![2 * ES..6 * ES]);

    b.unstage("vol-shared", &staging_b)
        .await
        .expect("unstage on node-b");
    assert!(!b.state_dir().join("nbd/vol-shared.sock").exists());
    // The borrower moves to node-a: node-b loses its grant, node-a reads everything.
    cluster.set_access_node("vol-shared", Some("node-a")).await;
    eventually(5, "node-b's grant revoked", || async {
        auth.area_ranges("node-b", "node-a-area-0")
            .0
            .is_empty()
            .then_some(())
    })
    .await;
    let err = b
        .stage("vol-shared", &staging_b, block_cap())
        .await
        .expect_err("node-b is no longer the borrower");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    let staging_a = cluster.path("a/staging/vol-shared");
    a.stage("vol-shared", &staging_a, block_cap())
        .await
        .expect("stage on node-a");
    let nbd = a.nbd("vol-shared").await;
    for chunk in 0..8u64 {
        let got = nbd
            .read(chunk * ES, ES as u32)
            .await
            .expect("read through node-a");
        let at = (chunk * ES) as usize;
        assert!(
            got[..] == data[at..at + ES as usize],
            "extent {chunk} differs"
        );
    }
    nbd.disconnect().await;
    a.unstage("vol-shared", &staging_a).await.expect("unstage");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volume_condition_is_abnormal_when_a_replica_is_unreachable() {
    let cluster = Cluster::start().await;
    let a = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let b = cluster
        .start_node(cluster.node_args("node-b", 1, 16 * ES, FrontendChoice::Nbd))
        .await;
    let extents: Vec<Vec<(&str, u64)>> = (0..4u64)
        .map(|i| vec![("node-a-area-0", i), ("node-b-area-0", i)])
        .collect();
    cluster
        .create_volume_with("vol-mirror", 4 * ES, 1, 2, &extents, Some("node-a"))
        .await;
    let staging = cluster.path("a/staging/vol-mirror");
    std::fs::create_dir_all(&staging).expect("staging dir");
    a.stage("vol-mirror", &staging, block_cap())
        .await
        .expect("stage");
    let stats = |node: &Node| {
        let mut csi = node.csi.clone();
        let path = staging.display().to_string();
        async move {
            csi.node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "vol-mirror".into(),
                volume_path: path,
                staging_target_path: String::new(),
            })
            .await
            .expect("stats")
            .into_inner()
        }
    };
    let healthy = stats(&a).await;
    assert!(!healthy.volume_condition.expect("condition").abnormal);
    assert_eq!(healthy.usage[0].total, (4 * ES) as i64);

    let nbd = a.nbd("vol-mirror").await;
    nbd.write(0, Bytes::from(pattern(1, 4096)), true)
        .await
        .expect("mirrored write");
    // node-b goes away: the next write lands on node-a only, node-b's replica is unhealthy.
    b.stop().await;
    nbd.write(ES, Bytes::from(pattern(2, 4096)), true)
        .await
        .expect("write with one replica left");
    let degraded = stats(&a).await;
    let condition = degraded.volume_condition.expect("condition");
    assert!(condition.abnormal, "{condition:?}");
    assert!(
        condition.message.contains("node-b-area-0"),
        "{}",
        condition.message
    );
    // Reads still come from the healthy replica.
    assert_eq!(
        &nbd.read(ES, 4096).await.expect("read")[..],
        &pattern(2, 4096)[..]
    );
    // The operator learns it from the attachment (it rebuilds the replica, docs/mirror.md §8).
    let volumes = cluster.volumes();
    eventually(15, "node-a to report node-b-area-0 unhealthy", || {
        let volumes = volumes.clone();
        async move {
            let volume = volumes.get("vol-mirror").await.ok()?;
            let status = volume.status?;
            let entry = status.attachments.iter().find(|a| a.node == "node-a")?;
            (entry.unhealthy_areas == ["node-b-area-0"]).then_some(())
        }
    })
    .await;
    nbd.disconnect().await;
    a.unstage("vol-mirror", &staging).await.expect("unstage");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mount_volume_keeps_its_data_across_unstage_and_stage() {
    require_root!();
    let _serial = KERNEL_LOCK.lock().await;
    let cluster = Cluster::start().await;
    let node = cluster
        .start_node(cluster.node_args("node-a", 1, 64 * ES, FrontendChoice::FuseLoop))
        .await;
    let extents: Vec<Option<(&str, u64)>> =
        (0..32u64).map(|i| Some(("node-a-area-0", i))).collect();
    cluster
        .create_volume("vol-fs", 32 * ES, 1, &extents, Some("node-a"))
        .await;
    let staging = cluster.path("kubelet/staging/vol-fs");
    let target = cluster.path("kubelet/pods/p1/vol-fs");
    node.stage("vol-fs", &staging, mount_cap("ext4"))
        .await
        .expect("stage");
    // Idempotent; another capability is refused.
    node.stage("vol-fs", &staging, mount_cap("ext4"))
        .await
        .expect("stage again");
    let err = node
        .stage("vol-fs", &staging, block_cap())
        .await
        .expect_err("other capability");
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");

    let table = tessera_csi::agent::mounts::mount_table();
    let staged = table
        .iter()
        .find(|m| m.mount_point == staging)
        .expect("staging path mounted");
    assert_eq!(staged.fs_type, "ext4");
    assert!(staged.source.starts_with("/dev/loop"), "{}", staged.source);
    let json = node.node_json();
    assert_eq!(json["volumes"]["vol-fs"]["device"], staged.source);
    assert_eq!(
        json["volumes"]["vol-fs"]["stagingPath"],
        staging.display().to_string()
    );
    let attachment = eventually(5, "attachment recorded", || async {
        cluster
            .volumes()
            .get("vol-fs")
            .await
            .ok()?
            .status?
            .attachments
            .first()
            .cloned()
    })
    .await;
    assert_eq!(attachment.node, "node-a");
    assert_eq!(attachment.applied_generation, 1);

    node.publish("vol-fs", &staging, &target, mount_cap("ext4"), false)
        .await
        .expect("publish");
    node.publish("vol-fs", &staging, &target, mount_cap("ext4"), false)
        .await
        .expect("publish again");
    {
        let mut file = std::fs::File::create(target.join("hello.txt")).expect("create file");
        file.write_all(b"tessera keeps this").expect("write");
        file.sync_all().expect("fsync");
    }
    node.unpublish("vol-fs", &target).await.expect("unpublish");
    assert!(!target.exists(), "unpublish removes the target");
    node.unpublish("vol-fs", &target)
        .await
        .expect("unpublish again");
    node.unstage("vol-fs", &staging).await.expect("unstage");
    node.unstage("vol-fs", &staging)
        .await
        .expect("unstage again");
    let (mounts, loops) = leftovers(cluster.dir.path());
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "left behind: {mounts:?} {loops:?}"
    );
    assert!(!node.state_dir().join("mappings/vol-fs.json").exists());
    assert!(!node.state_dir().join("nbd/vol-fs.sock").exists());
    eventually(5, "attachment removed", || async {
        let v = cluster.volumes().get("vol-fs").await.ok()?;
        v.status
            .is_none_or(|s| s.attachments.is_empty())
            .then_some(())
    })
    .await;

    // Stage again: the filesystem is not made again, the file is there; read-only publish.
    node.stage("vol-fs", &staging, mount_cap("ext4"))
        .await
        .expect("stage again");
    node.publish("vol-fs", &staging, &target, mount_cap("ext4"), true)
        .await
        .expect("publish read-only");
    let text = std::fs::read_to_string(target.join("hello.txt")).expect("file survived");
    assert_eq!(text, "tessera keeps this");
    let err = std::fs::File::create(target.join("new.txt")).expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    node.unpublish("vol-fs", &target).await.expect("unpublish");
    node.unstage("vol-fs", &staging).await.expect("unstage");
    let (mounts, loops) = leftovers(cluster.dir.path());
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "left behind: {mounts:?} {loops:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn block_volume_is_published_as_a_device_node() {
    require_root!();
    let _serial = KERNEL_LOCK.lock().await;
    let cluster = Cluster::start().await;
    let node = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::FuseLoop))
        .await;
    let extents: Vec<Option<(&str, u64)>> =
        (0..8u64).map(|i| Some(("node-a-area-0", 7 - i))).collect();
    cluster
        .create_volume("vol-blk", 8 * ES, 1, &extents, Some("node-a"))
        .await;
    let staging = cluster.path("kubelet/staging/vol-blk");
    let target = cluster.path("kubelet/pods/p1/dev/vol-blk");
    node.stage("vol-blk", &staging, block_cap())
        .await
        .expect("stage");
    node.publish("vol-blk", &staging, &target, block_cap(), false)
        .await
        .expect("publish");
    let meta = std::fs::metadata(&target).expect("target");
    assert!(std::os::unix::fs::FileTypeExt::is_block_device(
        &meta.file_type()
    ));
    let data = pattern(3, 64 * 1024);
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .expect("open device");
        assert_eq!(dev.seek(SeekFrom::End(0)).expect("size"), 8 * ES);
        dev.seek(SeekFrom::Start(3 * ES)).expect("seek");
        dev.write_all(&data).expect("write device");
        dev.sync_all().expect("fsync device");
        let mut back = vec![0u8; data.len()];
        dev.seek(SeekFrom::Start(3 * ES)).expect("seek");
        dev.read_exact(&mut back).expect("read device");
        assert!(back == data);
    }
    // The NBD export of the same volume sees the bytes (one engine volume behind both).
    let nbd = node.nbd("vol-blk").await;
    assert!(nbd.read(3 * ES, data.len() as u32).await.expect("nbd read")[..] == data[..]);
    nbd.disconnect().await;
    node.unpublish("vol-blk", &target).await.expect("unpublish");
    assert!(!target.exists());
    node.unstage("vol-blk", &staging).await.expect("unstage");
    let (mounts, loops) = leftovers(cluster.dir.path());
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "left behind: {mounts:?} {loops:?}"
    );
    node.stop().await;
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn bytes_usage(
    response: &tessera_proto::csi::v1::NodeGetVolumeStatsResponse,
) -> tessera_proto::csi::v1::VolumeUsage {
    response
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .cloned()
        .expect("bytes usage")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expansion_grows_the_device_and_the_filesystem() {
    require_root!();
    let _serial = KERNEL_LOCK.lock().await;
    let cluster = Cluster::start().await;
    let node = cluster
        .start_node(cluster.node_args("node-a", 1, 64 * ES, FrontendChoice::FuseLoop))
        .await;
    let area = "node-a-area-0";
    let small: Vec<Option<(&str, u64)>> = (0..16u64).map(|i| Some((area, i))).collect();
    cluster
        .create_volume("vol-grow", 16 * ES, 1, &small, Some("node-a"))
        .await;
    let staging = cluster.path("kubelet/staging/vol-grow");
    let target = cluster.path("kubelet/pods/p1/vol-grow");
    node.stage("vol-grow", &staging, mount_cap(""))
        .await
        .expect("stage");
    node.publish("vol-grow", &staging, &target, mount_cap(""), false)
        .await
        .expect("publish");
    std::fs::write(target.join("before.txt"), b"before growth").expect("write");
    let stats = |path: std::path::PathBuf| {
        let mut csi = node.csi.clone();
        async move {
            csi.node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "vol-grow".into(),
                volume_path: path.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .expect("stats")
            .into_inner()
        }
    };
    let before = stats(target.clone()).await;
    let bytes = bytes_usage(&before);
    assert!(
        bytes.total > 0 && bytes.used > 0 && bytes.available > 0,
        "{bytes:?}"
    );
    assert!(
        before
            .usage
            .iter()
            .any(|u| u.unit == volume_usage::Unit::Inodes as i32 && u.total > 0),
        "inodes reported for a Mount volume"
    );

    // The operator appended 16 extents (generation 2); the node applies it and grows ext4.
    let large: Vec<Option<(&str, u64)>> = (0..32u64).map(|i| Some((area, i))).collect();
    cluster.set_mapping("vol-grow", 32 * ES, 2, &large).await;
    let expanded = node
        .csi
        .clone()
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "vol-grow".into(),
            volume_path: target.display().to_string(),
            capacity_range: Some(tessera_proto::csi::v1::CapacityRange {
                required_bytes: (32 * ES) as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    // Online ext4 growth is an ioctl that needs CAP_SYS_RESOURCE, which some sandboxes drop
    // even for root; the device must have grown either way.
    let can_resize = has_cap_sys_resource();
    match &expanded {
        Ok(response) => assert_eq!(response.get_ref().capacity_bytes, (32 * ES) as i64),
        Err(status) if !can_resize => {
            eprintln!(
                "no CAP_SYS_RESOURCE: online growth refused, checking growth at the next stage ({status:?})"
            );
            assert!(status.message().contains("CAP_SYS_RESOURCE"), "{status:?}");
        }
        Err(status) => panic!("expand: {status:?}"),
    }
    let device = node.node_json()["volumes"]["vol-grow"]["device"]
        .as_str()
        .expect("device")
        .to_string();
    let sectors: u64 = std::fs::read_to_string(format!(
        "/sys/block/{}/size",
        device.trim_start_matches("/dev/")
    ))
    .expect("sysfs size")
    .trim()
    .parse()
    .expect("sectors");
    assert_eq!(sectors * 512, 32 * ES, "the loop device follows the volume");
    if expanded.is_err() {
        // Without online growth the filesystem follows at the next stage, unmounted.
        node.unpublish("vol-grow", &target)
            .await
            .expect("unpublish");
        node.unstage("vol-grow", &staging).await.expect("unstage");
        node.stage("vol-grow", &staging, mount_cap(""))
            .await
            .expect("stage the grown volume");
        node.publish("vol-grow", &staging, &target, mount_cap(""), false)
            .await
            .expect("publish");
    }
    let grown = bytes_usage(&stats(target.clone()).await);
    assert!(
        grown.total > bytes.total + 12 * ES as i64,
        "{bytes:?} -> {grown:?}"
    );
    std::fs::write(target.join("after.txt"), vec![9u8; (20 * ES) as usize])
        .expect("the new space is usable");
    assert_eq!(
        std::fs::read_to_string(target.join("before.txt")).expect("file"),
        "before growth"
    );
    let cached: serde_json::Value = serde_json::from_slice(
        &std::fs::read(node.state_dir().join("mappings/vol-grow.json")).expect("cache"),
    )
    .expect("json");
    assert_eq!(cached["mapping"]["generation"], 2);

    node.unpublish("vol-grow", &target)
        .await
        .expect("unpublish");
    node.unstage("vol-grow", &staging).await.expect("unstage");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_serves_its_volumes_from_the_mapping_cache() {
    let root = nix::unistd::geteuid().is_root();
    let _serial = KERNEL_LOCK.lock().await;
    let frontend = if root {
        FrontendChoice::FuseLoop
    } else {
        eprintln!("not root: checking the NBD side only");
        FrontendChoice::Nbd
    };
    let cluster = Cluster::start().await;
    let node = cluster
        .start_node(cluster.node_args("node-a", 1, 16 * ES, frontend))
        .await;
    let extents: Vec<Option<(&str, u64)>> = (0..4u64).map(|i| Some(("node-a-area-0", i))).collect();
    cluster
        .create_volume("vol-keep", 4 * ES, 1, &extents, Some("node-a"))
        .await;
    let staging = cluster.path("kubelet/staging/vol-keep");
    node.stage("vol-keep", &staging, block_cap())
        .await
        .expect("stage");
    let data = pattern(9, 8192);
    {
        let nbd = node.nbd("vol-keep").await;
        nbd.write(2 * ES, Bytes::from(data.clone()), true)
            .await
            .expect("write");
        nbd.disconnect().await;
    }
    let args = node.args.clone();
    node.stop().await;
    // The kernel side is gone with the process; the cache is not.
    let (mounts, loops) = leftovers(cluster.dir.path());
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "left behind: {mounts:?} {loops:?}"
    );
    assert!(args.state_dir.join("mappings/vol-keep.json").exists());

    let node = cluster.start_node(args).await;
    let json = node.node_json();
    let entry = &json["volumes"]["vol-keep"];
    assert!(
        entry["nbdUri"]
            .as_str()
            .is_some_and(|u| u.starts_with("nbd+unix:///vol-keep?socket=")),
        "{entry}"
    );
    assert!(
        entry.get("device").is_none(),
        "no kernel device after a restart: {entry}"
    );
    let nbd = node.nbd("vol-keep").await;
    assert!(nbd.read(2 * ES, data.len() as u32).await.expect("read")[..] == data[..]);
    nbd.disconnect().await;

    // The CO stages again: the kernel side comes back.
    node.stage("vol-keep", &staging, block_cap())
        .await
        .expect("stage after restart");
    if root {
        let json = node.node_json();
        assert!(
            json["volumes"]["vol-keep"]["device"]
                .as_str()
                .is_some_and(|d| d.starts_with("/dev/loop")),
            "{json}"
        );
    }
    node.unstage("vol-keep", &staging).await.expect("unstage");
    assert!(!node.state_dir().join("mappings/vol-keep.json").exists());
    node.stop().await;
}

/// A killed plugin leaves loop devices over its (dead) FUSE files; the next start detaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_node_plugin_detaches_loop_devices_a_killed_one_left() {
    require_root!();
    let _serial = KERNEL_LOCK.lock().await;
    let cluster = Cluster::start().await;
    let args = cluster.node_args("node-a", 1, 16 * ES, FrontendChoice::FuseLoop);
    // What a killed plugin leaves: a loop device whose backing file is under <state>/fuse.
    let leftover = args.state_dir.join("fuse/vol-dead.1.0/mnt");
    std::fs::create_dir_all(&leftover).expect("dir");
    let file = leftover.join("volume");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(ES))
        .expect("backing file");
    let output = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&file)
        .output()
        .expect("losetup");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(leftovers(cluster.dir.path()).1.len(), 1);
    let node = cluster.start_node(args).await;
    assert!(
        leftovers(cluster.dir.path()).1.is_empty(),
        "the stale loop device was detached"
    );
    node.stop().await;
}
