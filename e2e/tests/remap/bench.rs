//! The remap benchmark (docs/benchmarks/remap.md): a 1 GiB MULTI_NODE_MULTI_WRITER Block
//! volume on three node agents, 4 KiB random writes at iodepth 32 through each node's NBD export
//! (one third each), and a VolumeRemap that moves all of it. Prints:
//!
//! - the hold window of every node (Quiesce that set the hold → Resume that cleared it, from
//!   the node's `hold released … hold_us=` log line): p50, p99, max;
//! - write IOPS over the remap against the same load without a remap (steady state);
//! - the migration's copy throughput (`extents copied … copy_us=` lines) under load and
//!   without load, against `nbdcopy` of the same bytes between the same area files, each
//!   exported by `nbdkit file` over a unix socket.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kube::Api;
use kube::api::PostParams;
use tessera::local::{LocalCluster, LocalConfig};
use tessera_api::v1alpha1::{
    CopyPolicy, ReclaimTier, ReleaseRanges, RemapOperation, RemapOperationType, RemapPhase,
    RemapPolicy, VirtualVolume, VolumeRange, VolumeRemap, VolumeRemapSpec,
};
use tessera_e2e::co::{Access, Orchestrator, VolumeRequest};
use tessera_e2e::{Environment, Options};
use tokio::process::Command;

use super::support::mapping_of;
use super::{NODES, wait_final};

const AREA: u64 = 1 << 30;
const VOLUME: u64 = 1 << 30;
const STEADY_SECONDS: u64 = 15;

pub async fn run() -> Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("tessera-remap-bench-")
        .tempdir()?;
    let data_dir = scratch.path().join("local");
    let cluster = LocalCluster::start(LocalConfig {
        nodes: NODES.len(),
        area_size_bytes: AREA,
        heartbeat_seconds: 5,
        frontend: Some("nbd".into()),
        ready_timeout: Duration::from_secs(120),
        ..LocalConfig::new(&data_dir)
    })
    .await?;
    let result = body(&data_dir, &scratch.path().join("work")).await;
    let _ = cluster.stop().await;
    if std::env::var_os("TESSERA_BENCH_KEEP").is_some() {
        let kept = scratch.keep();
        println!("logs kept in {}", kept.join("local/logs").display());
    }
    result
}

async fn body(data_dir: &Path, work_dir: &Path) -> Result<()> {
    let env = Environment::from_endpoints(
        &data_dir.join("endpoints.json"),
        Options {
            kernel_frontend: false,
            ..Options::new(work_dir)
        },
    )
    .await?;
    let mut co = Orchestrator::new(&env);
    let mut request = VolumeRequest::block("remap-bench", VOLUME, "high");
    request.access = Access::SharedBlock;
    let vol = co.create_volume(&request).await?;
    let mut exports = Vec::new();
    for node in NODES {
        let context = co.controller_publish(&vol, node).await?;
        co.node_stage(&vol, node, &context).await?;
        let (socket, export) = co.nbd_export(&vol.id, node)?;
        exports.push(format!("nbd+unix:///{export}?socket={}", socket.display()));
    }
    println!(
        "volume {} (1 GiB, shared by {}), areas of 1 GiB",
        vol.id,
        NODES.join(", ")
    );
    // Real data everywhere, so every copy moves written bytes.
    let fill = fio(
        &exports[0],
        0,
        VOLUME,
        &["--rw=write", "--bs=1m", "--iodepth=4"],
        None,
    )
    .await?;
    ensure!(fill.0 > 0, "prefill wrote nothing");

    // Steady state: the same load without a remap.
    let steady = load(&exports, Some(STEADY_SECONDS), None).await?;
    let steady_iops: f64 = steady.iter().map(|r| r.1).sum();
    println!("steady state: {steady_iops:.0} write IOPS (sum of 3 nodes, {STEADY_SECONDS} s)");

    let volumes: Api<VirtualVolume> = Api::all(env.kube.clone());
    let remaps: Api<VolumeRemap> = Api::all(env.kube.clone());
    let logs = data_dir.join("logs");
    let marks = log_marks(&logs)?;

    // The remap under load.
    let before = mapping_of(&volumes, &vol.id).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loads = tokio::spawn({
        let exports = exports.clone();
        async move { load(&exports, None, Some(stop_rx)).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let name = "bench-move-under-load";
    remaps
        .create(&PostParams::default(), &move_all(name, &vol.id))
        .await?;
    let remap = wait_final(&remaps, name, Duration::from_secs(900)).await?;
    let remap_seconds = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let during = loads.await??;
    let phase = remap.status.as_ref().and_then(|s| s.phase);
    ensure!(
        phase == Some(RemapPhase::Succeeded),
        "remap ended {phase:?}: {:?}",
        remap.status
    );
    let during_iops: f64 = during.iter().map(|r| r.1).sum();
    let errors: u64 = during.iter().map(|r| r.2).sum();
    let after = mapping_of(&volumes, &vol.id).await?;
    println!(
        "remap under load: {remap_seconds:.1} s, generation {} → {}; {during_iops:.0} write IOPS \
         during the remap ({:.0}% of steady state); I/O errors: {errors}",
        before.generation,
        after.generation,
        100.0 * during_iops / steady_iops
    );
    let holds = read_holds(&logs, &marks)?;
    print_holds(&holds);
    let (bytes, micros) = read_copies(&logs, &marks)?;
    let loaded_copy = bytes as f64 / (micros as f64 / 1e6) / (1 << 20) as f64;
    println!(
        "copy under load: {} MiB in {:.2} s of CopyExtents = {loaded_copy:.0} MiB/s",
        bytes >> 20,
        micros as f64 / 1e6
    );

    // The same move without load (back to other areas again): the copy alone.
    let marks = log_marks(&logs)?;
    let name = "bench-move-idle";
    let started = Instant::now();
    remaps
        .create(&PostParams::default(), &move_all(name, &vol.id))
        .await?;
    let remap = wait_final(&remaps, name, Duration::from_secs(900)).await?;
    ensure!(
        remap.status.as_ref().and_then(|s| s.phase) == Some(RemapPhase::Succeeded),
        "idle remap ended {:?}",
        remap.status
    );
    let idle_seconds = started.elapsed().as_secs_f64();
    let (bytes, micros) = read_copies(&logs, &marks)?;
    let idle_copy = bytes as f64 / (micros as f64 / 1e6) / (1 << 20) as f64;
    let idle_holds = read_holds(&logs, &marks)?;
    println!(
        "remap without load: {idle_seconds:.1} s; copy {} MiB in {:.2} s of CopyExtents = \
         {idle_copy:.0} MiB/s",
        bytes >> 20,
        micros as f64 / 1e6
    );
    print_holds(&idle_holds);

    // A switch without a copy: releases of unused extents (reclaim of an attached volume),
    // one hold each, the map staged inside the hold after the usage re-check.
    let marks = log_marks(&logs)?;
    let mut request = VolumeRequest::block("remap-bench-release", 64 << 20, "high");
    request.access = Access::SharedBlock;
    let small = co.create_volume(&request).await?;
    for node in NODES {
        let context = co.controller_publish(&small, node).await?;
        co.node_stage(&small, node, &context).await?;
    }
    let es = mapping_of(&volumes, &small.id).await?.extent_size_bytes;
    for e in 0..(64 << 20) / es {
        let name = format!("bench-release-{e}");
        remaps
            .create(
                &PostParams::default(),
                &release(&name, &small.id, e * es, es),
            )
            .await?;
        let remap = wait_final(&remaps, &name, Duration::from_secs(60)).await?;
        ensure!(
            remap.status.as_ref().and_then(|s| s.phase) == Some(RemapPhase::Succeeded),
            "release {name} ended {:?}",
            remap.status
        );
    }
    println!("releases of unused extents (no copy; 16 remaps, one hold each):");
    print_holds(&read_holds(&logs, &marks)?);

    // nbdcopy of the same bytes between the same area files (after the volume is no longer
    // needed: it overwrites the areas the first move vacated).
    let last = mapping_of(&volumes, &vol.id).await?;
    co.cleanup().await?;
    let (bytes, seconds) =
        super::support::nbdcopy_between(data_dir, &last, &after, VOLUME, false).await?;
    let peer = bytes as f64 / seconds / (1 << 20) as f64;
    println!(
        "nbdcopy: {} MiB in {seconds:.2} s = {peer:.0} MiB/s; tessera's copy: {:.0}% of it \
         without load, {:.0}% under load",
        bytes >> 20,
        100.0 * idle_copy / peer,
        100.0 * loaded_copy / peer
    );
    Ok(())
}

fn release(name: &str, volume: &str, offset: i64, length: i64) -> VolumeRemap {
    VolumeRemap::new(
        name,
        VolumeRemapSpec {
            volume_name: volume.into(),
            operation: RemapOperation {
                type_: RemapOperationType::ReleaseRanges,
                r#move: None,
                evacuate_area: None,
                release_ranges: Some(ReleaseRanges {
                    ranges: vec![VolumeRange { offset, length }],
                    tier: ReclaimTier::Unused,
                    discard: false,
                }),
            },
            copy: CopyPolicy::default(),
            policy: RemapPolicy::default(),
        },
    )
}

fn move_all(name: &str, volume: &str) -> VolumeRemap {
    VolumeRemap::new(
        name,
        super::move_all_spec(volume, VOLUME, RemapPolicy::default()),
    )
}

/// 4 KiB random writes, iodepth 32, one third of the volume per node; for `seconds`, or until
/// `stop` turns true (fio is interrupted and reports what it did). Per node: (writes, IOPS,
/// errors).
async fn load(
    exports: &[String],
    seconds: Option<u64>,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<Vec<(u64, f64, u64)>> {
    // Thirds rounded down to whole MiB: fio stops with EINVAL at an unaligned region end.
    let third = VOLUME / exports.len() as u64 / (1 << 20) * (1 << 20);
    let runs = exports.iter().enumerate().map(|(i, uri)| {
        let stop = stop.clone();
        async move {
            fio(
                uri,
                i as u64 * third,
                third,
                &[
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=32",
                    "--time_based",
                    &format!("--runtime={}", seconds.unwrap_or(3600)),
                ],
                stop,
            )
            .await
        }
    });
    futures::future::try_join_all(runs).await
}

/// One fio job on `uri`; JSON output. Returns (writes, write IOPS, total errors).
async fn fio(
    uri: &str,
    offset: u64,
    size: u64,
    extra: &[&str],
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<(u64, f64, u64)> {
    let mut child = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--offset={offset}"),
            &format!("--size={size}"),
            "--output-format=json",
        ])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning fio")?;
    if let Some(mut stop) = stop {
        let pid = child.id().context("fio pid")?;
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                // SIGINT: fio stops and prints its report.
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe { libc::kill(pid as i32, libc::SIGINT) };
            }
            _ = child.wait() => {}
        }
    }
    let out = child.wait_with_output().await?;
    let report = super::FioReport::parse(&out.stdout).with_context(|| {
        format!(
            "fio on {uri}: {}",
            super::tail(&String::from_utf8_lossy(&out.stderr), 10)
        )
    })?;
    let errors = report.errors + u64::from(report.error_code != 0);
    if errors > 0 {
        println!(
            "  fio on {uri}: {report:?}; stderr:\n{}",
            super::tail(&String::from_utf8_lossy(&out.stderr), 10)
        );
    }
    Ok((report.writes, report.iops, errors))
}

/// The length of every node log now: lines after it belong to the next measurement.
fn log_marks(logs: &Path) -> Result<BTreeMap<String, usize>> {
    let mut marks = BTreeMap::new();
    for node in NODES {
        let text = std::fs::read_to_string(logs.join(format!("{node}.log")))?;
        marks.insert(node.to_string(), text.len());
    }
    Ok(marks)
}

fn new_lines(logs: &Path, node: &str, marks: &BTreeMap<String, usize>) -> Result<String> {
    let text = std::fs::read_to_string(logs.join(format!("{node}.log")))?;
    Ok(text[marks.get(node).copied().unwrap_or(0)..].to_string())
}

fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Hold windows (µs) per node since `marks`.
fn read_holds(logs: &Path, marks: &BTreeMap<String, usize>) -> Result<BTreeMap<String, Vec<u64>>> {
    let mut out = BTreeMap::new();
    for node in NODES {
        let holds: Vec<u64> = new_lines(logs, node, marks)?
            .lines()
            .filter(|l| l.contains("hold released"))
            .filter_map(|l| field(l, "hold_us"))
            .collect();
        out.insert(node.to_string(), holds);
    }
    Ok(out)
}

/// (bytes, µs) of every CopyExtents since `marks`, over all nodes.
fn read_copies(logs: &Path, marks: &BTreeMap<String, usize>) -> Result<(u64, u64)> {
    let (mut bytes, mut micros) = (0, 0);
    for node in NODES {
        for line in new_lines(logs, node, marks)?
            .lines()
            .filter(|l| l.contains("extents copied"))
        {
            bytes += field(line, "copied").unwrap_or(0);
            micros += field(line, "copy_us").unwrap_or(0);
        }
    }
    Ok((bytes, micros.max(1)))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_holds(holds: &BTreeMap<String, Vec<u64>>) {
    println!("  hold window per node (µs): node, holds, p50, p99, max");
    for (node, values) in holds {
        let mut v = values.clone();
        v.sort_unstable();
        println!(
            "  {node}: {} holds, p50 {} µs, p99 {} µs, max {} µs",
            v.len(),
            percentile(&v, 50.0),
            percentile(&v, 99.0),
            v.last().copied().unwrap_or(0)
        );
    }
}
