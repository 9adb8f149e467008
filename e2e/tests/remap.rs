//! Seed 004 with real processes and real I/O: `tessera local` with three node agents, one
//! MULTI_NODE_MULTI_WRITER Block volume staged on all three, `fio --verify=crc32c` writing
//! through each node's NBD export (disjoint thirds of the volume, verified continuously with
//! `verify_backlog`), and a VolumeRemap that moves every extent to other areas while the load
//! runs.
//!
//! - `remap_moves_every_extent_under_fio_verify_on_three_nodes`: Succeeded; no verify error, no
//!   I/O error; every extent on another area; the volume's bytes equal the area bytes the new
//!   mapping points at.
//! - `remap_excludes_and_fences_a_node_killed_inside_the_quiesce` (AS-08 with a real crash:
//!   fail point `tessera-node-quiesce-crash` aborts node-c after it set its hold): node-c is
//!   excluded and fenced, the other two carry on, their fio sees no error.
//! - `remap_rolls_back_everywhere_when_one_node_fails_its_commit` (AS-12: fail point
//!   `tessera-node-commit` refuses node-b's first commit): rolled back everywhere, Failed, the
//!   mapping unchanged, nothing lost.
//!
//! A custom `main` (`harness = false`): this binary is also the child executable of the local
//! cluster. Arguments select scenarios by name; `--list` lists them. Needs `fio` with its `nbd`
//! engine (CI installs it); without it the scenarios print why they skip.
//!
//! `--bench` runs the benchmark of docs/benchmarks/remap.md instead (build with `--release`):
//! `cargo test --release -p tessera-e2e --test remap -- --bench`.

#[path = "remap/bench.rs"]
mod bench;
mod support;

use support::*;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube::Api;
use kube::api::PostParams;
use tessera::local::{LocalCluster, LocalConfig};
use tessera_api::v1alpha1::{
    AttachmentState, CopyMode, CopyPolicy, MoveRanges, RemapOperation, RemapOperationType,
    RemapPhase, RemapPolicy, VirtualVolume, VolumeMapping, VolumeRange, VolumeRemap,
    VolumeRemapSpec,
};
use tessera_e2e::co::{Access, Orchestrator, VolumeRequest};
use tessera_e2e::io::VolumeIo;
use tessera_e2e::{Environment, Options};
use tokio::process::Command;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// 6 areas of 256 MiB (sparse files).
const AREA_SIZE: u64 = 256 << 20;
/// 48 extents of 4 MiB; each node writes one third (64 MiB).
const VOLUME_SIZE: u64 = 192 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Not a fault: the volume is used by no node (AS-28), no load.
    Unused,
    /// Not a fault: EvacuateArea of an attached volume's area, no load.
    Evacuate,
    /// node-c aborts inside its first Quiesce, after setting the hold.
    KillInsideQuiesce,
    /// node-b refuses its first Commit.
    CommitFails,
}

struct Scenario {
    name: &'static str,
    fault: Fault,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "remap_moves_every_extent_under_fio_verify_on_three_nodes",
            fault: Fault::None,
        },
        Scenario {
            name: "remap_excludes_and_fences_a_node_killed_inside_the_quiesce",
            fault: Fault::KillInsideQuiesce,
        },
        Scenario {
            name: "remap_rolls_back_everywhere_when_one_node_fails_its_commit",
            fault: Fault::CommitFails,
        },
        Scenario {
            name: "remap_moves_a_volume_no_node_uses_as28",
            fault: Fault::Unused,
        },
        Scenario {
            name: "remap_evacuates_the_area_of_an_attached_volume",
            fault: Fault::Evacuate,
        },
    ]
}

fn main() -> ExitCode {
    tessera::component::main_if_requested();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let selected: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.name.contains(f)))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for s in &selected {
            println!("{}: test", s.name);
        }
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--bench") {
        if let Err(why) = fio_with_nbd() {
            eprintln!("the benchmark needs fio with its nbd engine: {why}");
            return ExitCode::FAILURE;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        return match runtime.block_on(bench::run()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("benchmark failed: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(why) = fio_with_nbd() {
        for s in &selected {
            println!("{} ... skipped: {why}", s.name);
        }
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut failed = 0;
    for s in &selected {
        let start = Instant::now();
        match runtime.block_on(run_scenario(s)) {
            Ok(summary) => println!(
                "{} ... ok ({:.1}s): {summary}",
                s.name,
                start.elapsed().as_secs_f64()
            ),
            Err(e) => {
                failed += 1;
                println!(
                    "{} ... FAILED ({:.1}s): {e:#}",
                    s.name,
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    println!(
        "remap under load: {} passed, {failed} failed",
        selected.len() - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run_scenario(s: &Scenario) -> Result<String> {
    let mut scratch = tempfile::Builder::new()
        .prefix("tessera-remap-")
        .tempdir()
        .context("scratch directory")?;
    let data_dir = scratch.path().join("local");
    let failpoints = match s.fault {
        Fault::None | Fault::Unused | Fault::Evacuate => None,
        Fault::KillInsideQuiesce => Some("tessera-node-quiesce-crash=1*return(node-c)"),
        Fault::CommitFails => Some("tessera-node-commit=1*return(node-b)"),
    };
    let config = LocalConfig {
        nodes: NODES.len(),
        area_size_bytes: AREA_SIZE,
        heartbeat_seconds: 1,
        // The NBD exports carry the load; no kernel device is needed.
        frontend: Some("nbd".into()),
        ready_timeout: Duration::from_secs(120),
        env: failpoints
            .map(|f| vec![("FAILPOINTS".to_string(), f.to_string())])
            .unwrap_or_default(),
        ..LocalConfig::new(&data_dir)
    };
    let cluster = LocalCluster::start(config)
        .await
        .context("starting tessera local")?;
    let result = scenario_body(s, &data_dir, &scratch.path().join("work")).await;
    let _ = cluster.stop().await;
    if result.is_err() {
        scratch.disable_cleanup(true);
        println!("component logs kept in {}", data_dir.join("logs").display());
    }
    result
}

async fn scenario_body(s: &Scenario, data_dir: &Path, work_dir: &Path) -> Result<String> {
    let options = Options {
        kernel_frontend: false,
        ..Options::new(work_dir)
    };
    let env = Environment::from_endpoints(&data_dir.join("endpoints.json"), options).await?;
    let mut co = Orchestrator::new(&env);
    let outcome = match s.fault {
        Fault::Unused => remap_unused(&env, &mut co, data_dir).await,
        Fault::Evacuate => evacuate(&env, &mut co, data_dir).await,
        _ => load_and_remap(s, &env, &mut co, data_dir).await,
    };
    // A killed node cannot unstage: its part of the cleanup fails and is not the test's verdict.
    if let Err(e) = co.cleanup().await
        && s.fault != Fault::KillInsideQuiesce
        && outcome.is_ok()
    {
        return Err(e).context("cleanup");
    }
    outcome
}

async fn load_and_remap(
    s: &Scenario,
    env: &Environment,
    co: &mut Orchestrator<'_>,
    data_dir: &Path,
) -> Result<String> {
    let mut request = VolumeRequest::block("remap-under-load", VOLUME_SIZE, "high");
    request.access = Access::SharedBlock;
    let vol = co.create_volume(&request).await?;
    for node in NODES {
        let context = co.controller_publish(&vol, node).await?;
        co.node_stage(&vol, node, &context).await?;
    }
    let volumes: Api<VirtualVolume> = Api::all(env.kube.clone());
    let before = mapping_of(&volumes, &vol.id).await?;

    // fio on every node: its third of the volume, written at random and verified as it goes.
    let third = VOLUME_SIZE / NODES.len() as u64;
    let mut fios = Vec::new();
    for (i, node) in NODES.iter().enumerate() {
        let (socket, export) = co.nbd_export(&vol.id, node)?;
        fios.push((*node, spawn_fio(&socket, &export, i as u64 * third, third)?));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Move every extent to other areas while the load runs.
    let remaps: Api<VolumeRemap> = Api::all(env.kube.clone());
    let name = format!("move-all-{}", &vol.id[vol.id.len() - 8..]);
    let spec = move_all_spec(
        &vol.id,
        VOLUME_SIZE,
        RemapPolicy {
            quiesce_timeout_ms: 3_000,
            ..RemapPolicy::default()
        },
    );
    remaps
        .create(&PostParams::default(), &VolumeRemap::new(&name, spec))
        .await
        .context("creating the VolumeRemap")?;
    let remap = wait_final(&remaps, &name, Duration::from_secs(180)).await?;
    let status = remap.status.clone().unwrap_or_default();
    let phase = status.phase.context("no phase")?;

    // The load ends by itself (runtime); every surviving node's fio must be clean.
    let mut fio_lines = Vec::new();
    for (node, child) in fios {
        let out = child.wait_with_output().await.context("waiting for fio")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let killed = s.fault == Fault::KillInsideQuiesce && node == "node-c";
        if killed {
            continue;
        }
        let report = FioReport::parse(&out.stdout)
            .with_context(|| format!("fio on {node}:\n{}", tail(&text, 30)))?;
        let writes = report.writes;
        ensure!(
            out.status.success() && report.errors == 0 && report.error_code == 0,
            "fio on {node} failed ({}, {report:?}):\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 30)
        );
        ensure!(
            writes > 0,
            "fio on {node} wrote nothing:\n{}",
            tail(&text, 30)
        );
        fio_lines.push(format!("{node} {writes} writes"));
    }

    let (after_volume, after) = settled_volume(&volumes, &vol.id).await?;
    let message = status.message.clone().unwrap_or_default();
    match s.fault {
        Fault::None | Fault::Unused | Fault::Evacuate | Fault::KillInsideQuiesce => {
            ensure!(
                phase == RemapPhase::Succeeded,
                "remap ended {phase:?}: {message}"
            );
            ensure!(
                after.generation > before.generation,
                "generation did not move"
            );
            let moved = every_extent_moved(&before, &after, VOLUME_SIZE)?;
            ensure!(moved == 48, "{moved} of 48 extents moved");
        }
        Fault::CommitFails => {
            ensure!(
                phase == RemapPhase::Failed,
                "remap ended {phase:?} although node-b refused its commit: {message}"
            );
            ensure!(
                after == before,
                "mapping changed although the commit was rolled back: {before:?} → {after:?}"
            );
        }
    }
    if s.fault == Fault::KillInsideQuiesce {
        ensure!(
            message.contains("node-c"),
            "the outcome does not name the excluded node-c: {message}"
        );
        let attachments = after_volume
            .status
            .as_ref()
            .map(|s| s.attachments.clone())
            .unwrap_or_default();
        ensure!(
            attachments
                .iter()
                .any(|a| a.node == "node-c" && a.state == AttachmentState::Fenced),
            "node-c is not marked Fenced: {attachments:?}"
        );
    }
    // Every byte as the volume shows it (node-a's export) is where the mapping points.
    let (socket, export) = co.nbd_export(&vol.id, "node-a")?;
    let io = VolumeIo::open_nbd(&socket, &export).await?;
    let compared = compare_with_areas(&io, &after, data_dir, VOLUME_SIZE).await?;
    io.close().await;
    Ok(format!(
        "{phase:?}, generation {} → {}, {}; {} MiB compared against the areas; {}",
        before.generation,
        after.generation,
        fio_lines.join(", "),
        compared >> 20,
        message
    ))
}

/// AS-28 on real nodes: a volume written on node-a, then detached from every node, is moved
/// without any hold (the copier named in `status.incoming` copies it through a private engine);
/// attached on node-b afterwards it reads back what node-a wrote, from the new areas.
async fn remap_unused(
    env: &Environment,
    co: &mut Orchestrator<'_>,
    data_dir: &Path,
) -> Result<String> {
    let size = 64u64 << 20;
    let vol = co
        .create_volume(&VolumeRequest::block("remap-unused", size, "high"))
        .await?;
    let att = co.attach(&vol, "node-a").await?;
    let (socket, export) = co.nbd_export(&vol.id, "node-a")?;
    let io = VolumeIo::open_nbd(&socket, &export).await?;
    let seed = 28;
    io.write_at(0, &tessera_e2e::io::pattern(seed, 0, size))
        .await?;
    io.close().await;
    co.detach(&att).await?;
    let volumes: Api<VirtualVolume> = Api::all(env.kube.clone());
    let before = mapping_of(&volumes, &vol.id).await?;
    let remaps: Api<VolumeRemap> = Api::all(env.kube.clone());
    let name = "move-unused";
    remaps
        .create(
            &PostParams::default(),
            &VolumeRemap::new(name, move_all_spec(&vol.id, size, RemapPolicy::default())),
        )
        .await?;
    let remap = wait_final(&remaps, name, Duration::from_secs(120)).await?;
    let status = remap.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(RemapPhase::Succeeded),
        "remap ended {:?}: {:?}",
        status.phase,
        status.message
    );
    let (_, after) = settled_volume(&volumes, &vol.id).await?;
    let moved = every_extent_moved(&before, &after, size)?;
    let att = co.attach(&vol, "node-b").await?;
    let (socket, export) = co.nbd_export(&vol.id, "node-b")?;
    let io = VolumeIo::open_nbd(&socket, &export).await?;
    let got = io.read_at(0, size).await?;
    if let Some(i) =
        tessera_e2e::io::first_difference(&got, &tessera_e2e::io::pattern(seed, 0, size))
    {
        bail!("after the move, byte {i} differs from what node-a wrote");
    }
    let compared = compare_with_areas(&io, &after, data_dir, size).await?;
    io.close().await;
    co.detach(&att).await?;
    Ok(format!(
        "generation {} → {}, {moved} extents moved with no node attached; node-b reads node-a's \
         {} MiB back; {} MiB compared against the areas",
        before.generation,
        after.generation,
        size >> 20,
        compared >> 20
    ))
}

/// EvacuateArea on real nodes: a 64 MiB volume attached on node-a with a pattern written; the
/// area of its first extent is evacuated while it stays attached; afterwards no extent is on
/// that area and node-a reads the pattern back from the new areas.
async fn evacuate(env: &Environment, co: &mut Orchestrator<'_>, data_dir: &Path) -> Result<String> {
    let size = 64u64 << 20;
    let vol = co
        .create_volume(&VolumeRequest::block("remap-evacuate", size, "high"))
        .await?;
    let att = co.attach(&vol, "node-a").await?;
    let (socket, export) = co.nbd_export(&vol.id, "node-a")?;
    let io = VolumeIo::open_nbd(&socket, &export).await?;
    let seed = 7;
    io.write_at(0, &tessera_e2e::io::pattern(seed, 0, size))
        .await?;
    let volumes: Api<VirtualVolume> = Api::all(env.kube.clone());
    let before = mapping_of(&volumes, &vol.id).await?;
    let (area, _) = replicas(&before, 0)
        .into_iter()
        .next()
        .context("extent 0 is a hole")?;
    let remaps: Api<VolumeRemap> = Api::all(env.kube.clone());
    let name = "evacuate-area";
    let spec = VolumeRemapSpec {
        volume_name: vol.id.clone(),
        operation: RemapOperation {
            type_: RemapOperationType::EvacuateArea,
            r#move: None,
            evacuate_area: Some(tessera_api::v1alpha1::EvacuateArea {
                area: area.clone(),
                other_nodes_only: false,
            }),
            release_ranges: None,
        },
        copy: CopyPolicy {
            mode: CopyMode::Online,
            ..CopyPolicy::default()
        },
        policy: RemapPolicy::default(),
    };
    remaps
        .create(&PostParams::default(), &VolumeRemap::new(name, spec))
        .await?;
    let remap = wait_final(&remaps, name, Duration::from_secs(120)).await?;
    let status = remap.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(RemapPhase::Succeeded),
        "evacuation ended {:?}: {:?}",
        status.phase,
        status.message
    );
    let (_, after) = settled_volume(&volumes, &vol.id).await?;
    let es = after.extent_size_bytes;
    let mut moved = 0;
    for e in 0..(size as i64 / es) {
        let now: Vec<String> = replicas(&after, e * es).into_iter().map(|r| r.0).collect();
        ensure!(
            !now.contains(&area),
            "extent {e} is still on the evacuated {area}"
        );
        if replicas(&before, e * es).iter().any(|r| r.0 == area) {
            moved += 1;
        }
    }
    let got = io.read_at(0, size).await?;
    if let Some(i) =
        tessera_e2e::io::first_difference(&got, &tessera_e2e::io::pattern(seed, 0, size))
    {
        bail!("after the evacuation, byte {i} differs from what node-a wrote");
    }
    let compared = compare_with_areas(&io, &after, data_dir, size).await?;
    io.close().await;
    co.detach(&att).await?;
    Ok(format!(
        "{area} evacuated under a quiesce of node-a: {moved} extents moved, generation {} → {}; \
         node-a reads its pattern back; {} MiB compared against the areas",
        before.generation,
        after.generation,
        compared >> 20
    ))
}

/// The volume after its remap ended, and its mapping; a move must leave no `status.incoming`.
/// The coordinator removes it right after it records the final phase (`finish`), so it is
/// given a few seconds.
async fn settled_volume(
    volumes: &Api<VirtualVolume>,
    id: &str,
) -> Result<(VirtualVolume, VolumeMapping)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let volume = volumes.get(id).await?;
        let status = volume.status.clone().unwrap_or_default();
        let mapping = status.mapping.context("no mapping after the remap")?;
        if status.incoming.is_none() {
            return Ok((volume, mapping));
        }
        ensure!(
            Instant::now() < deadline,
            "status.incoming left behind 10 s after the remap ended: {:?}",
            status.incoming
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Move of `[0, size)` with an online copy.
pub(crate) fn move_all_spec(volume: &str, size: u64, policy: RemapPolicy) -> VolumeRemapSpec {
    VolumeRemapSpec {
        volume_name: volume.into(),
        operation: RemapOperation {
            type_: RemapOperationType::Move,
            r#move: Some(MoveRanges {
                ranges: vec![VolumeRange {
                    offset: 0,
                    length: size as i64,
                }],
                target_areas: Vec::new(),
            }),
            evacuate_area: None,
            release_ranges: None,
        },
        copy: CopyPolicy {
            mode: CopyMode::Online,
            ..CopyPolicy::default()
        },
        policy,
    }
}

fn spawn_fio(socket: &Path, export: &str, offset: u64, size: u64) -> Result<tokio::process::Child> {
    let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
    Command::new("fio")
        .args([
            "--name=remap-load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--offset={offset}"),
            &format!("--size={size}"),
            "--verify=crc32c",
            "--verify_backlog=512",
            "--verify_fatal=1",
            // A killed job would leave a `*-verify.state` file in the working directory.
            "--verify_state_save=0",
            "--loops=100",
            "--runtime=25",
            "--output-format=json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning fio")
}

pub(crate) async fn wait_final(
    remaps: &Api<VolumeRemap>,
    name: &str,
    timeout: Duration,
) -> Result<VolumeRemap> {
    let deadline = Instant::now() + timeout;
    loop {
        let remap = remaps.get(name).await?;
        if remap
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(RemapPhase::is_final)
        {
            return Ok(remap);
        }
        if Instant::now() > deadline {
            bail!(
                "remap {name} did not end in {timeout:?}: {:?}",
                remap.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every extent's replicas are on other areas than before; returns the extents checked.
fn every_extent_moved(before: &VolumeMapping, after: &VolumeMapping, size: u64) -> Result<usize> {
    let es = before.extent_size_bytes;
    let mut moved = 0;
    for e in 0..(size as i64 / es) {
        let old: BTreeSet<String> = replicas(before, e * es).into_iter().map(|r| r.0).collect();
        let new = replicas(after, e * es);
        ensure!(!new.is_empty(), "extent {e} is a hole after the move");
        for (area, _) in &new {
            ensure!(
                !old.contains(area),
                "extent {e} is still on {area} (before: {old:?})"
            );
        }
        moved += 1;
    }
    Ok(moved)
}
