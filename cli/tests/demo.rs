//! The demo against a real two-node `tessera local`: volumes provisioned through CSI (create,
//! publish, stage), data written and verified through their NBD exports, `endpoints.json`
//! listing them; a second run on the same data directory finds the same volumes and the data
//! the first run wrote.

use std::time::Duration;

use kube::api::Api;
use tessera::local::{LocalCluster, LocalConfig};
use tessera::tables::Snapshot;
use tessera_api::v1alpha1::{ClaimPhase, StorageClaim};

fn config(dir: &std::path::Path) -> LocalConfig {
    let mut config = LocalConfig::new(dir);
    config.nodes = 2;
    config.area_size_bytes = 256 << 20;
    config.exe = Some(env!("CARGO_BIN_EXE_tessera").into());
    // The NBD export only: no FUSE or loop device needed (and none left behind).
    config.frontend = Some("nbd".into());
    config.heartbeat_seconds = 1;
    config.ready_timeout = Duration::from_secs(90);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_provisions_through_csi_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(config(dir.path()))
        .await
        .expect("local cluster starts");
    let endpoints = cluster.endpoints();
    let nodes: Vec<String> = endpoints.nodes.iter().map(|n| n.name.clone()).collect();
    let plan = tessera::demo::plan(&nodes, 256 << 20);
    let first = tessera::demo::provision(&endpoints, cluster.data_dir(), &plan)
        .await
        .expect("demo provisions");
    assert_eq!(first.len(), 2);
    assert!(
        first.iter().all(|p| !p.resumed),
        "fresh volumes hold no pattern yet"
    );

    // The claims the CSI controller created, Bound to the volumes it returned.
    let claims: Api<StorageClaim> = Api::namespaced(cluster.client(), "default");
    for p in &first {
        let claim = claims.get(&p.volume.name).await.expect("claim exists");
        assert_eq!(claim.spec.priority_class_name, p.volume.class);
        let status = claim.status.unwrap_or_default();
        assert_eq!(status.phase, Some(ClaimPhase::Bound));
        assert_eq!(status.volume_name.as_deref(), Some(p.volume_id.as_str()));
    }
    // endpoints.json lists each staged volume on its node, with the URI the data went through.
    let endpoints = cluster.refresh_endpoints().unwrap();
    let on_disk =
        tessera::endpoints::Endpoints::load(&cluster.data_dir().join("endpoints.json")).unwrap();
    for p in &first {
        let v = &on_disk.volumes[&p.volume_id];
        assert_eq!(v.node, p.volume.node);
        assert_eq!(v.nbd_uri, p.nbd_uri);
        assert_eq!(endpoints.volumes[&p.volume_id], *v);
    }
    // The status view shows both volumes attached on their nodes.
    let snap = Snapshot::fetch(&cluster.client()).await.unwrap();
    let volumes = tessera::tables::volumes(&snap.volumes);
    for p in &first {
        let row = volumes
            .lines()
            .find(|l| l.starts_with(&p.volume_id))
            .unwrap_or_else(|| panic!("{} missing:\n{volumes}", p.volume_id));
        assert!(row.contains(&p.volume.node), "{row}");
        assert!(row.contains('→'), "mapping shown: {row}");
    }
    let report = cluster.stop().await;
    assert!(report.clean(), "{report:?}");

    // Second run: same volume ids (CreateVolume is idempotent by name), data still there.
    let cluster = LocalCluster::start(config(dir.path()))
        .await
        .expect("local cluster resumes");
    let endpoints = cluster.endpoints();
    let second = tessera::demo::provision(&endpoints, cluster.data_dir(), &plan)
        .await
        .expect("demo resumes");
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.volume_id, b.volume_id);
        assert!(b.resumed, "{} lost the data of the first run", b.volume_id);
    }
    let report = cluster.stop().await;
    assert!(report.clean(), "{report:?}");
}
