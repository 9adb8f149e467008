//! Duplexed volumes (seed 001 [0019], `tessera.io/copies: 2`) with real processes: `tessera
//! local` with three node agents, a 2-copy Block volume attached on node-a under `fio
//! --verify=crc32c`, and the node agent holding one of its replicas killed (SIGKILL) while the
//! load runs.
//!
//! `duplexed_volume_survives_a_killed_replica_node_and_is_rebuilt`: fio ends with no I/O error
//! and no verify error; the volume is marked Degraded once the area goes Offline; the operator
//! rebuilds the replicas of that area from the surviving one onto other areas (an EvacuateArea
//! VolumeRemap); afterwards no extent is on the dead area, Degraded is False, and every replica's
//! area bytes equal what node-a reads.
//!
//! A custom `main` (`harness = false`): this binary is also the child executable of the local
//! cluster. Needs `fio` with its `nbd` engine; without it the scenario prints why it skips.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use support::*;
use tessera::local::{LocalCluster, LocalConfig};
use tessera_api::v1alpha1::{RemapPhase, VirtualVolume, VolumeRemap};
use tessera_e2e::co::{Orchestrator, VolumeRequest};
use tessera_e2e::io::VolumeIo;
use tessera_e2e::{Environment, Options};

const AREA_SIZE: u64 = 256 << 20;
/// 16 extents of 4 MiB, two replicas each.
const VOLUME_SIZE: u64 = 64 << 20;
const NAME: &str = "duplexed_volume_survives_a_killed_replica_node_and_is_rebuilt";

fn main() -> ExitCode {
    tessera::component::main_if_requested();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())) {
        return ExitCode::SUCCESS;
    }
    if let Err(why) = fio_with_nbd() {
        println!("{NAME} ... skipped: {why}");
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let start = Instant::now();
    match runtime.block_on(run()) {
        Ok(summary) => {
            println!(
                "{NAME} ... ok ({:.1}s): {summary}",
                start.elapsed().as_secs_f64()
            );
            println!("duplexed volumes: 1 passed, 0 failed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{NAME} ... FAILED ({:.1}s): {e:#}",
                start.elapsed().as_secs_f64()
            );
            println!("duplexed volumes: 0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<String> {
    let mut scratch = tempfile::Builder::new()
        .prefix("tessera-duplex-")
        .tempdir()
        .context("scratch directory")?;
    let data_dir = scratch.path().join("local");
    let config = LocalConfig {
        nodes: 3,
        area_size_bytes: AREA_SIZE,
        heartbeat_seconds: 1,
        frontend: Some("nbd".into()),
        ready_timeout: Duration::from_secs(120),
        ..LocalConfig::new(&data_dir)
    };
    let cluster = LocalCluster::start(config)
        .await
        .context("starting tessera local")?;
    let options = Options {
        kernel_frontend: false,
        ..Options::new(scratch.path().join("work"))
    };
    let result = async {
        let env = Environment::from_endpoints(&data_dir.join("endpoints.json"), options).await?;
        let mut co = Orchestrator::new(&env);
        let outcome = scenario(&env, &mut co, &cluster, &data_dir).await;
        // The killed node cannot take part in the cleanup; that is not the test's verdict.
        let _ = co.cleanup().await;
        outcome
    }
    .await;
    let _ = cluster.stop().await;
    if result.is_err() {
        scratch.disable_cleanup(true);
        println!("component logs kept in {}", data_dir.join("logs").display());
    }
    result
}

async fn scenario(
    env: &Environment,
    co: &mut Orchestrator<'_>,
    cluster: &LocalCluster,
    data_dir: &Path,
) -> Result<String> {
    let mut request = VolumeRequest::block("duplexed", VOLUME_SIZE, "high").on_node("node-a");
    request.copies = Some(2);
    let vol = co.create_volume(&request).await?;
    let volumes: Api<VirtualVolume> = Api::all(env.kube.clone());
    let before = volumes
        .get(&vol.id)
        .await?
        .status
        .and_then(|s| s.mapping)
        .context("no mapping")?;
    let es = before.extent_size_bytes;
    // The node to kill: one holding a replica, not node-a (which runs the load).
    let replica_nodes: BTreeSet<String> = (0..VOLUME_SIZE as i64 / es)
        .flat_map(|e| replicas(&before, e * es))
        .map(|(area, _)| node_of(&area))
        .collect();
    for e in 0..VOLUME_SIZE as i64 / es {
        ensure!(
            replicas(&before, e * es).len() == 2,
            "extent {e} does not have two replicas: {before:?}"
        );
    }
    let victim = replica_nodes
        .iter()
        .find(|n| n.as_str() != "node-a")
        .cloned()
        .with_context(|| format!("every replica is on node-a: {replica_nodes:?}"))?;
    let dead_areas: BTreeSet<String> = (0..VOLUME_SIZE as i64 / es)
        .flat_map(|e| replicas(&before, e * es))
        .map(|(area, _)| area)
        .filter(|area| node_of(area) == victim)
        .collect();

    let attached = co.attach(&vol, "node-a").await?;
    let (socket, export) = co.nbd_export(&vol.id, "node-a")?;
    let fio = spawn_fio_verify("duplex-load", &socket, &export, VOLUME_SIZE, 12)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = *cluster
        .pids()
        .get(&victim)
        .with_context(|| format!("no process for {victim}: {:?}", cluster.pids()))?;
    // SIGKILL: no goodbye, no unstage, its extent server vanishes mid-I/O.
    // SAFETY: kill(2) on a pid of our own child.
    ensure!(
        unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0,
        "kill {victim} ({pid})"
    );
    let killed_at = Instant::now();

    let out = fio.wait_with_output().await.context("waiting for fio")?;
    let report = FioReport::parse(&out.stdout)
        .with_context(|| format!("fio:\n{}", tail(&String::from_utf8_lossy(&out.stderr), 30)))?;
    ensure!(
        out.status.success() && report.errors == 0 && report.error_code == 0 && report.writes > 0,
        "fio on node-a failed after {victim} was killed ({}, {report:?}):\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), 30)
    );

    // Degraded (the node reports the replica it stopped writing, or the area goes Offline),
    // then rebuilt by an EvacuateArea remap: the RebuildStarted warning says it was noticed,
    // however fast the rebuild is.
    let remaps: Api<VolumeRemap> = Api::all(env.kube.clone());
    let rebuilt = wait_volume(
        &volumes,
        &vol.id,
        Duration::from_secs(120),
        "rebuilt off the dead node",
        |v| {
            let Some(mapping) = v.status.as_ref().and_then(|s| s.mapping.as_ref()) else {
                return false;
            };
            (0..VOLUME_SIZE as i64 / es).all(|e| {
                let r = replicas(mapping, e * es);
                r.len() == 2 && r.iter().all(|(area, _)| !dead_areas.contains(area))
            }) && condition(v, "Degraded") == Some(false)
        },
    )
    .await;
    let rebuilt = match rebuilt {
        Ok(v) => v,
        Err(e) => {
            let remaps: Vec<String> = remaps
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .map(|r| {
                    let status = r.status.unwrap_or_default();
                    format!(
                        "{}: {:?} {}",
                        r.metadata.name.unwrap_or_default(),
                        status.phase,
                        status.message.unwrap_or_default()
                    )
                })
                .collect();
            return Err(e.context(format!("remaps: {remaps:?}")));
        }
    };
    let rebuilt_after = killed_at.elapsed().as_secs_f64();
    let events: Api<Event> = Api::all(env.kube.clone());
    let warned = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("RebuildStarted")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(vol.id.as_str())
        })
        .filter_map(|e| e.note)
        .next()
        .context("no RebuildStarted warning on the volume")?;
    let rebuilds: Vec<VolumeRemap> = remaps
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|r| r.spec.volume_name == vol.id)
        .collect();
    ensure!(
        rebuilds.iter().any(|r| r
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("rebuild-"))
            && r.status.as_ref().and_then(|s| s.phase) == Some(RemapPhase::Succeeded)),
        "no rebuild VolumeRemap succeeded: {:?}",
        rebuilds
            .iter()
            .map(|r| (
                r.metadata.name.clone(),
                r.status.as_ref().and_then(|s| s.phase)
            ))
            .collect::<Vec<_>>()
    );
    let mapping = rebuilt
        .status
        .and_then(|s| s.mapping)
        .context("no mapping after the rebuild")?;
    let io = VolumeIo::open_nbd(&socket, &export).await?;
    let compared = compare_with_areas(&io, &mapping, data_dir, VOLUME_SIZE).await?;
    io.close().await;
    co.detach(&attached).await?;
    Ok(format!(
        "killed {victim} under fio ({} verified writes, 0 errors); {warned}; rebuilt off \
         {dead_areas:?} {rebuilt_after:.1} s after the kill; {} MiB of replicas equal what node-a \
         reads",
        report.writes,
        compared >> 20
    ))
}

/// `node-b-area-0` → `node-b`.
fn node_of(area: &str) -> String {
    area.rsplit_once("-area-")
        .map_or(area, |(node, _)| node)
        .to_string()
}

fn condition(volume: &VirtualVolume, type_: &str) -> Option<bool> {
    volume
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status == "True")
}

async fn wait_volume(
    volumes: &Api<VirtualVolume>,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&VirtualVolume) -> bool,
) -> Result<VirtualVolume> {
    let deadline = Instant::now() + timeout;
    loop {
        let volume = volumes.get(name).await?;
        if done(&volume) {
            return Ok(volume);
        }
        if Instant::now() > deadline {
            bail!(
                "volume {name}: {what}: not reached in {timeout:?}: {:?}",
                volume.status
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
