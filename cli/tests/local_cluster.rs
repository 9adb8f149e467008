//! A real `tessera local` with two nodes, every component a child process of this package's
//! own `tessera` binary: areas come Online, the pool becomes Ready, a second start resumes
//! from the data directory, a child that dies is reported, and stopping leaves nothing running
//! or listening.

use std::path::Path;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::Api;
use tessera::local::{LocalCluster, LocalConfig};
use tessera_api::v1alpha1::{AreaPhase, StorageArea, StoragePool};

fn config(dir: &Path) -> LocalConfig {
    let mut config = LocalConfig::new(dir);
    config.nodes = 2;
    config.area_size_bytes = 256 << 20;
    config.exe = Some(env!("CARGO_BIN_EXE_tessera").into());
    config.heartbeat_seconds = 1;
    config.ready_timeout = Duration::from_secs(90);
    config
}

/// Polls until every area of both nodes is Online and pool `default` is Ready; returns the
/// areas' uids by name.
async fn wait_online(cluster: &LocalCluster) -> Vec<(String, String)> {
    let areas: Api<StorageArea> = Api::all(cluster.client());
    let pools: Api<StoragePool> = Api::all(cluster.client());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let list = areas.list(&Default::default()).await.expect("areas list");
        let mut online: Vec<(String, String)> = list
            .items
            .iter()
            .filter(|a| a.status.as_ref().and_then(|s| s.phase) == Some(AreaPhase::Online))
            .map(|a| (a.name_any(), a.uid().unwrap_or_default()))
            .collect();
        online.sort();
        let ready = pools
            .get_opt("default")
            .await
            .expect("pool get")
            .and_then(|p| p.status)
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .unwrap_or(false);
        let names: Vec<&str> = online.iter().map(|(n, _)| n.as_str()).collect();
        if ready
            && names
                == [
                    "node-a-area-0",
                    "node-a-area-1",
                    "node-b-area-0",
                    "node-b-area-1",
                ]
        {
            return online;
        }
        assert!(
            Instant::now() < deadline,
            "areas online {names:?}, pool ready {ready}; logs in {}",
            cluster.data_dir().join("logs").display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Nothing answers on any endpoint the cluster published.
async fn nothing_listening(endpoints: &tessera::endpoints::Endpoints) {
    let api = endpoints
        .apiserver
        .trim_start_matches("http://")
        .to_string();
    assert!(
        tokio::net::TcpStream::connect(&api).await.is_err(),
        "API server {api} still listening"
    );
    let mut sockets = vec![endpoints.controller.csi_socket.clone()];
    let mut tcp = Vec::new();
    for n in &endpoints.nodes {
        sockets.push(n.csi_socket.clone());
        tcp.extend(
            [&n.extent_server, &n.control_endpoint]
                .into_iter()
                .filter(|a| !a.is_empty())
                .cloned(),
        );
    }
    for s in sockets {
        assert!(
            tokio::net::UnixStream::connect(&s).await.is_err(),
            "{} still accepting",
            s.display()
        );
    }
    for addr in tcp {
        assert!(
            tokio::net::TcpStream::connect(&addr).await.is_err(),
            "{addr} still listening"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cluster_starts_resumes_reports_deaths_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();

    // First start: a fresh data directory.
    let cluster = LocalCluster::start(config(dir.path()))
        .await
        .expect("local cluster starts");
    let pids = cluster.pids();
    assert_eq!(
        pids.keys().map(String::as_str).collect::<Vec<_>>(),
        ["apiserver", "controller", "node-a", "node-b", "operator"]
    );
    let endpoints = cluster.endpoints();
    assert_eq!(
        endpoints.kubeconfig,
        cluster.data_dir().join("kubeconfig"),
        "kubectl --kubeconfig <data-dir>/kubeconfig"
    );
    let on_disk = tessera::endpoints::Endpoints::load(&cluster.data_dir().join("endpoints.json"))
        .expect("endpoints.json written");
    assert_eq!(on_disk.nodes.len(), 2);
    assert_eq!(on_disk.apiserver, endpoints.apiserver);
    assert!(
        cluster.data_dir().join("node-a/areas.yaml").exists(),
        "areas file of node-a"
    );
    // A second `tessera local` on the same directory is refused while this one runs.
    match LocalCluster::start(config(dir.path())).await {
        Err(tessera::local::LocalError::Locked(_)) => {}
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a second cluster started on the same data directory"),
    }
    let first_uids = wait_online(&cluster).await;
    let endpoints = cluster.refresh_endpoints().unwrap();
    assert!(
        endpoints.nodes.iter().all(|n| !n.extent_server.is_empty()),
        "{endpoints:?}"
    );
    let report = cluster.stop().await;
    assert!(report.clean(), "every child stopped on SIGTERM: {report:?}");
    assert_eq!(report.children.len(), 5);
    for pid in pids.values() {
        assert!(!alive(*pid), "pid {pid} still running");
    }
    nothing_listening(&endpoints).await;

    // Second start on the same directory: the API server's state and the areas are found.
    let cluster = LocalCluster::start(config(dir.path()))
        .await
        .expect("local cluster resumes");
    let second_uids = wait_online(&cluster).await;
    assert_eq!(
        first_uids, second_uids,
        "the same StorageArea objects, not new ones"
    );

    // A child that dies is reported, with its name.
    let node_b = cluster.pids()["node-b"];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(node_b as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let death = tokio::time::timeout(Duration::from_secs(10), cluster.unexpected_exit())
        .await
        .expect("the death is reported");
    assert_eq!(death.component, "node-b");
    assert!(
        death.status.contains("SIGKILL") || death.status.contains('9'),
        "{death}"
    );

    let endpoints = cluster.refresh_endpoints().unwrap();
    let pids = cluster.pids();
    let report = cluster.stop().await;
    assert_eq!(report.children.len(), 5, "{report:?}");
    for pid in pids.values() {
        assert!(!alive(*pid), "pid {pid} still running");
    }
    nothing_listening(&endpoints).await;
}
