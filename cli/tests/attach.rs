//! `tessera attach` (root): a volume provisioned through CSI and written through its NBD
//! export becomes a kernel block device showing the same bytes; stopping the cluster detaches
//! it. Skips with a reason when not root or without FUSE and loop devices.

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use tessera::local::{LocalCluster, LocalConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_gives_a_kernel_device_with_the_volume_data() {
    if let Some(reason) = tessera::attach::kernel_frontend_problem() {
        eprintln!("skipping: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = LocalConfig::new(dir.path());
    config.nodes = 1;
    config.area_size_bytes = 256 << 20;
    config.exe = Some(env!("CARGO_BIN_EXE_tessera").into());
    config.frontend = Some("fuse-loop".into());
    config.heartbeat_seconds = 1;
    config.ready_timeout = Duration::from_secs(90);
    let cluster = LocalCluster::start(config).await.expect("cluster starts");

    // The body runs under catch_unwind so a failed assertion still stops the node agent
    // cleanly (SIGTERM: it detaches its loop device and unmounts FUSE), then re-panics.
    let body = async {
        let endpoints = cluster.endpoints();
        let plan = tessera::demo::plan(&["node-a".to_string()], 256 << 20);
        let provisioned = tessera::demo::provision(&endpoints, cluster.data_dir(), &plan[..1])
            .await
            .expect("volume provisioned and verified over NBD");
        let vol = &provisioned[0];
        // By claim name, as a person would type it.
        let attached = tessera::attach::attach(cluster.data_dir(), &vol.volume.name, None)
            .await
            .expect("attach");
        assert_eq!(attached.volume_id, vol.volume_id);
        assert_eq!(attached.node, "node-a");
        let mut dev = std::fs::File::open(&attached.device).expect("device opens");
        let size = dev.seek(SeekFrom::End(0)).unwrap();
        assert_eq!(size, vol.volume.size_bytes, "device size");
        // What went in through NBD comes out of the kernel device.
        for off in tessera::demo::offsets(size) {
            let mut buf = vec![0u8; 1 << 20];
            dev.seek(SeekFrom::Start(off)).unwrap();
            dev.read_exact(&mut buf).unwrap();
            assert!(
                buf == tessera::demo::pattern(&vol.volume_id, off),
                "data at {off} differs through {}",
                attached.device
            );
        }
        // Attaching elsewhere while published here is refused (one borrower, seed 001).
        let err = tessera::attach::attach(cluster.data_dir(), &vol.volume_id, Some("node-x"))
            .await
            .expect_err("unknown node");
        assert!(err.to_string().contains("no node node-x"), "{err:#}");
        attached.device
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(body)).await;
    let report = cluster.stop().await;
    let result = match outcome {
        Ok(device) => device,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    assert!(report.clean(), "{report:?}");
    // The loop device no longer has a backing file once the node agent stopped.
    let name = result.trim_start_matches("/dev/");
    let backing = std::path::Path::new("/sys/block")
        .join(name)
        .join("loop/backing_file");
    assert!(
        !backing.exists(),
        "{result} still attached to {:?}",
        std::fs::read_to_string(&backing)
    );
}
