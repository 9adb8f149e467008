//! Seed 003 with real processes and real I/O: `tessera local` with three node agents, a primary
//! Block volume attached on node-a under `fio --verify=crc32c`, and a MirrorPair to a second
//! volume with `mountCheck: Block`.
//!
//! `mirror_split_mount_check_and_resync_copy_only_dirty_extents`:
//! 1. The pair forms under the write load (formation copy with writes mirrored) and is split
//!    under it (the cut holds node-a); fio sees no error.
//! 2. The secondary is attached on node-b and written there (it changed while split).
//! 3. A resync is requested: a Warning `SecondaryVolumeMounted` names node-b, the condition
//!    `SecondaryMounted` is True, and while node-b keeps it nothing is copied (the pair stays
//!    Split, the secondary's bytes do not change, no copy is reported).
//! 4. node-b lets it go: the resync runs; it copies exactly the extents fio dirtied after the
//!    cut plus the one node-b changed (counted from the `ResyncCompleted` event); afterwards the
//!    secondary's area bytes equal the primary byte for byte.
//!
//! A custom `main` (`harness = false`): this binary is also the child executable of the local
//! cluster. Needs `fio` with its `nbd` engine (CI installs it); without it the scenario prints
//! why it skips.
//!
//! `--bench` runs the benchmark of docs/benchmarks/mirror.md instead (build with `--release`):
//! `cargo test --release -p tessera-e2e --test mirror -- --bench`.

#[path = "mirror/bench.rs"]
mod bench;
mod support;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;
use tessera::local::{LocalCluster, LocalConfig};
use tessera_api::v1alpha1::{
    MirrorPair, MirrorPairSpec, MirrorPhase, MirrorState, MountCheckPolicy, VirtualVolume,
};
use tessera_e2e::co::{Orchestrator, VolumeRequest};
use tessera_e2e::io::VolumeIo;
use tessera_e2e::{Environment, Options};

/// 4 areas of 256 MiB per node (sparse files).
const AREA_SIZE: u64 = 256 << 20;
/// 16 extents of 4 MiB.
const VOLUME_SIZE: u64 = 64 << 20;
/// fio writes the first 4 extents only, so the dirty set after the cut is known.
const LOAD_SIZE: u64 = 16 << 20;
/// The extent node-b writes on the secondary while split.
const SECONDARY_EXTENT: u64 = 10;
const PAIR: &str = "pair-e2e";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    SplitAndResync,
    UnusedPrimary,
}

const SCENARIOS: [(&str, Scenario); 2] = [
    (
        "mirror_split_mount_check_and_resync_copy_only_dirty_extents",
        Scenario::SplitAndResync,
    ),
    (
        "mirror_pairs_a_volume_no_node_uses_through_a_private_copier",
        Scenario::UnusedPrimary,
    ),
];

fn main() -> ExitCode {
    tessera::component::main_if_requested();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in SCENARIOS {
            println!("{name}: test");
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
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<(&str, Scenario)> = SCENARIOS
        .into_iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    if let Err(why) = fio_with_nbd() {
        for (name, _) in &selected {
            println!("{name} ... skipped: {why}");
        }
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut failed = 0;
    for (name, scenario) in &selected {
        let start = Instant::now();
        match runtime.block_on(run(*scenario)) {
            Ok(summary) => println!(
                "{name} ... ok ({:.1}s): {summary}",
                start.elapsed().as_secs_f64()
            ),
            Err(e) => {
                failed += 1;
                println!(
                    "{name} ... FAILED ({:.1}s): {e:#}",
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    println!(
        "mirror pairs: {} passed, {failed} failed",
        selected.len() - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run(which: Scenario) -> Result<String> {
    let mut scratch = tempfile::Builder::new()
        .prefix("tessera-mirror-")
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
        let outcome = match which {
            Scenario::SplitAndResync => scenario(&env, &mut co, &data_dir).await,
            Scenario::UnusedPrimary => unused_primary(&env, &mut co, &data_dir).await,
        };
        let pairs: Api<MirrorPair> = Api::all(env.kube.clone());
        let _ = pairs.delete(PAIR, &DeleteParams::default()).await;
        let _ = wait_gone(&pairs, PAIR).await;
        let cleanup = co.cleanup().await;
        let summary = outcome?;
        cleanup.context("cleanup")?;
        Ok::<String, anyhow::Error>(summary)
    }
    .await;
    let _ = cluster.stop().await;
    if result.is_err() {
        scratch.disable_cleanup(true);
        println!("component logs kept in {}", data_dir.join("logs").display());
    }
    result
}

async fn scenario(env: &Environment, co: &mut Orchestrator<'_>, data_dir: &Path) -> Result<String> {
    let es = tessera_e2e::cluster::extent_size(env).await?;
    let primary = co
        .create_volume(&VolumeRequest::block("mirror-primary", VOLUME_SIZE, "high"))
        .await?;
    let secondary = co
        .create_volume(&VolumeRequest::block(
            "mirror-secondary",
            VOLUME_SIZE,
            "high",
        ))
        .await?;
    let at_a = co.attach(&primary, "node-a").await?;
    let (socket, export) = co.nbd_export(&primary.id, "node-a")?;
    let fio = spawn_fio_verify("mirror-load", &socket, &export, LOAD_SIZE, 15)?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. Formation and split, both under the load.
    let pairs: Api<MirrorPair> = Api::all(env.kube.clone());
    let spec = MirrorPairSpec {
        primary: primary.id.clone(),
        secondary: Some(secondary.id.clone()),
        secondary_selection: None,
        desired_state: MirrorState::Paired,
        mount_check: MountCheckPolicy::Block,
        override_mount_check: false,
    };
    pairs
        .create(&PostParams::default(), &MirrorPair::new(PAIR, spec))
        .await
        .context("creating the MirrorPair")?;
    let formed = Instant::now();
    wait_phase(&pairs, MirrorPhase::Paired, Duration::from_secs(60)).await?;
    let formation_s = formed.elapsed().as_secs_f64();
    set_desired(&pairs, MirrorState::Split).await?;
    wait_phase(&pairs, MirrorPhase::Split, Duration::from_secs(60)).await?;
    let out = fio.wait_with_output().await.context("waiting for fio")?;
    let report = FioReport::parse(&out.stdout)
        .with_context(|| format!("fio:\n{}", tail(&String::from_utf8_lossy(&out.stderr), 30)))?;
    ensure!(
        out.status.success() && report.errors == 0 && report.error_code == 0 && report.writes > 0,
        "fio on node-a failed ({}, {report:?}):\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), 30)
    );
    // Every extent fio wrote after the cut is dirty (collected from node-a every few seconds).
    let load_extents = LOAD_SIZE / es;
    wait_for(
        Duration::from_secs(30),
        "the primary's dirty bytes",
        || async {
            let status = pairs.get(PAIR).await?.status.unwrap_or_default();
            Ok(status.dirty_bytes == Some((load_extents * es) as i64))
        },
    )
    .await?;

    // 2. The secondary is used on its own on node-b.
    let at_b = co.attach(&secondary, "node-b").await?;
    let (socket_b, export_b) = co.nbd_export(&secondary.id, "node-b")?;
    let io_b = VolumeIo::open_nbd(&socket_b, &export_b).await?;
    let marker = tessera_e2e::io::pattern(77, 0, 4096);
    io_b.write_at(SECONDARY_EXTENT * es, &marker).await?;
    let image = io_b.read_at(0, LOAD_SIZE).await?;

    // 3. Resync requested while node-b has it: warned, held.
    set_desired(&pairs, MirrorState::Paired).await?;
    let events: Api<Event> = Api::all(env.kube.clone());
    let warning =
        wait_for_event(&events, "SecondaryVolumeMounted", Duration::from_secs(30)).await?;
    ensure!(
        warning.contains("node-b"),
        "the SecondaryVolumeMounted warning does not name node-b: {warning}"
    );
    let status = pairs.get(PAIR).await?.status.unwrap_or_default();
    ensure!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "SecondaryMounted" && c.status == "True"),
        "condition SecondaryMounted is not True: {:?}",
        status.conditions
    );
    // Longer than the controller's poll: the held resync is re-checked, and still held.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let status = pairs.get(PAIR).await?.status.unwrap_or_default();
    ensure!(
        status.phase == Some(MirrorPhase::Split),
        "with mountCheck: Block the pair left Split while node-b has the secondary: {status:?}"
    );
    ensure!(
        io_b.read_at(0, LOAD_SIZE).await? == image,
        "the secondary changed while the resync was held"
    );
    ensure!(
        copy_reports(&events).await?.len() == 1,
        "a copy ran while the resync was held: {:?}",
        copy_reports(&events).await?
    );
    io_b.close().await;

    // 4. node-b lets it go: the resync runs, and copies only what changed.
    co.detach(&at_b).await?;
    let resynced = Instant::now();
    wait_phase(&pairs, MirrorPhase::Paired, Duration::from_secs(60)).await?;
    let resync_s = resynced.elapsed().as_secs_f64();
    let reports = copy_reports(&events).await?;
    let resync = reports
        .iter()
        .find(|r| r.contains("resync pass"))
        .with_context(|| format!("no ResyncCompleted event: {reports:?}"))?;
    let copied = copied_extents(resync)?;
    ensure!(
        copied == load_extents + 1,
        "the resync copied {copied} extents; expected the {load_extents} fio dirtied plus extent \
         {SECONDARY_EXTENT} node-b changed: {resync}"
    );
    let volumes: Api<VirtualVolume> = Api::all(env.kube.clone());
    let mapping = volumes
        .get(&secondary.id)
        .await?
        .status
        .and_then(|s| s.mapping)
        .context("the secondary has no mapping")?;
    let io_a = VolumeIo::open_nbd(&socket, &export).await?;
    let compared = compare_with_areas(&io_a, &mapping, data_dir, VOLUME_SIZE).await?;
    io_a.close().await;
    co.detach(&at_a).await?;
    Ok(format!(
        "formed in {formation_s:.1} s under fio ({} verified writes, 0 errors); SecondaryVolumeMounted \
         named node-b and the resync waited; resync in {resync_s:.1} s copied {copied} extents \
         ({load_extents} dirty + 1 changed on the secondary); {} MiB of the secondary equal the \
         primary",
        report.writes,
        compared >> 20
    ))
}

/// A pair of a primary no node uses: the formation copy runs through a private engine on the
/// node of the primary's first area (docs/mirror.md M-23); afterwards the secondary holds the
/// primary's bytes, and a node that stages the primary mirrors its writes.
async fn unused_primary(
    env: &Environment,
    co: &mut Orchestrator<'_>,
    data_dir: &Path,
) -> Result<String> {
    let primary = co
        .create_volume(&VolumeRequest::block("unused-primary", VOLUME_SIZE, "high"))
        .await?;
    let secondary = co
        .create_volume(&VolumeRequest::block(
            "unused-secondary",
            VOLUME_SIZE,
            "high",
        ))
        .await?;
    // Data written on node-a, then nobody uses the primary.
    let at_a = co.attach(&primary, "node-a").await?;
    let (socket, export) = co.nbd_export(&primary.id, "node-a")?;
    let io = VolumeIo::open_nbd(&socket, &export).await?;
    let data = tessera_e2e::io::pattern(5, 0, VOLUME_SIZE);
    io.write_at(0, &data).await?;
    io.close().await;
    co.detach(&at_a).await?;

    let pairs: Api<MirrorPair> = Api::all(env.kube.clone());
    let spec = MirrorPairSpec {
        primary: primary.id.clone(),
        secondary: Some(secondary.id.clone()),
        secondary_selection: None,
        desired_state: MirrorState::Paired,
        mount_check: MountCheckPolicy::Warn,
        override_mount_check: false,
    };
    pairs
        .create(&PostParams::default(), &MirrorPair::new(PAIR, spec))
        .await
        .context("creating the MirrorPair")?;
    wait_phase(&pairs, MirrorPhase::Paired, Duration::from_secs(60)).await?;
    let events: Api<Event> = Api::all(env.kube.clone());
    let reports = copy_reports(&events).await?;
    let formation = reports
        .iter()
        .find(|r| r.contains("formation copy"))
        .with_context(|| format!("no FormationCopyCompleted event: {reports:?}"))?;
    let volumes: Api<VirtualVolume> = Api::all(env.kube.clone());
    let mapping = volumes
        .get(&secondary.id)
        .await?
        .status
        .and_then(|s| s.mapping)
        .context("the secondary has no mapping")?;

    // Staged again on node-b: it reads the data, and its writes reach the secondary too.
    let at_b = co.attach(&primary, "node-b").await?;
    let (socket_b, export_b) = co.nbd_export(&primary.id, "node-b")?;
    let io_b = VolumeIo::open_nbd(&socket_b, &export_b).await?;
    if let Some(i) = tessera_e2e::io::first_difference(&io_b.read_at(0, VOLUME_SIZE).await?, &data)
    {
        bail!("the primary lost its data at byte {i}");
    }
    io_b.write_at(4096, &tessera_e2e::io::pattern(6, 4096, 8192))
        .await?;
    let compared = compare_with_areas(&io_b, &mapping, data_dir, VOLUME_SIZE).await?;
    io_b.close().await;
    co.detach(&at_b).await?;
    Ok(format!(
        "{formation}; {} MiB of the secondary equal the primary, a write from node-b included",
        compared >> 20
    ))
}

async fn set_desired(pairs: &Api<MirrorPair>, desired: MirrorState) -> Result<()> {
    pairs
        .patch(
            PAIR,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "desiredState": desired } })),
        )
        .await
        .context("patching desiredState")?;
    Ok(())
}

async fn wait_phase(pairs: &Api<MirrorPair>, phase: MirrorPhase, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = pairs.get(PAIR).await?.status.unwrap_or_default();
        if status.phase == Some(phase) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pair did not reach {phase:?} in {timeout:?}: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    while !probe().await? {
        if Instant::now() > deadline {
            bail!("{what}: not reached in {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

async fn wait_gone(pairs: &Api<MirrorPair>, name: &str) -> Result<()> {
    wait_for(
        Duration::from_secs(30),
        "the MirrorPair's deletion",
        || async { Ok(pairs.get_opt(name).await?.is_none()) },
    )
    .await
}

/// Notes of the events of `reason` about the pair.
async fn event_notes(events: &Api<Event>, reason: &str) -> Result<Vec<String>> {
    Ok(events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(PAIR)
        })
        .filter_map(|e| e.note)
        .collect())
}

async fn wait_for_event(events: &Api<Event>, reason: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(note) = event_notes(events, reason).await?.into_iter().next() {
            return Ok(note);
        }
        if Instant::now() > deadline {
            bail!("no {reason} event in {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The copy reports: the formation copy, then each resync pass.
async fn copy_reports(events: &Api<Event>) -> Result<Vec<String>> {
    let mut notes = event_notes(events, "FormationCopyCompleted").await?;
    notes.extend(event_notes(events, "ResyncCompleted").await?);
    Ok(notes)
}

/// "... copied N extents ..." of a copy report.
fn copied_extents(note: &str) -> Result<u64> {
    let after = note
        .split_once(" copied ")
        .with_context(|| format!("unexpected CopyCompleted note: {note}"))?
        .1;
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected CopyCompleted note: {note}"))
}
