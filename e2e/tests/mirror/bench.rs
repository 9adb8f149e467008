//! The mirror benchmark (docs/benchmarks/mirror.md): a 1 GiB Block primary attached on node-a
//! (NBD export) and a 1 GiB secondary placed on node-b, on `tessera local` with three node
//! agents. Prints:
//!
//! - 4 KiB random writes (iodepth 32: IOPS; iodepth 1: completion latency, mean and p99) on the
//!   primary unpaired, then Paired (every write mirrored to the secondary), then unpaired again
//!   after the pair is deleted; the ratio Paired / unpaired;
//! - the formation copy (bytes and seconds from the `FormationCopyCompleted` event);
//! - resync time against dirty bytes: split, write N distinct bytes on the primary, resync;
//!   the `ResyncCompleted` events' bytes and seconds and the wall time from the request to
//!   Paired, against `nbdcopy` of the same N bytes between the same area files (primary's area
//!   range → secondary's area range, each exported by `nbdkit file` on a unix socket).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use tessera::local::{LocalCluster, LocalConfig};
use tessera_api::v1alpha1::{
    MirrorPair, MirrorPairSpec, MirrorPhase, MirrorState, MountCheckPolicy, VirtualVolume,
    VolumeMapping,
};
use tessera_e2e::co::{Orchestrator, VolumeRequest};
use tessera_e2e::{Environment, Options};
use tokio::process::Command;

use super::support::{FioReport, mapping_of, tail};
use super::{PAIR, event_notes, set_desired, wait_for, wait_gone, wait_phase};

/// Two sparse areas of 2 GiB per node: a 1 GiB volume fits in one area.
const AREA: u64 = 2 << 30;
const VOLUME: u64 = 1 << 30;
const FIO_SECONDS: u64 = 15;
/// Dirty amounts of the resync measurements.
const DIRTY: [u64; 3] = [64 << 20, 256 << 20, 1 << 30];
const MIB: f64 = (1 << 20) as f64;

pub async fn run() -> Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("tessera-mirror-bench-")
        .tempdir()?;
    let data_dir = scratch.path().join("local");
    let cluster = LocalCluster::start(LocalConfig {
        nodes: 3,
        area_size_bytes: AREA,
        heartbeat_seconds: 5,
        frontend: Some("nbd".into()),
        ready_timeout: Duration::from_secs(120),
        ..LocalConfig::new(&data_dir)
    })
    .await
    .context("starting tessera local")?;
    let result = body(&data_dir, &scratch.path().join("work")).await;
    let _ = cluster.stop().await;
    if std::env::var_os("TESSERA_BENCH_KEEP").is_some() || result.is_err() {
        let kept = scratch.keep();
        println!("logs kept in {}", kept.join("local/logs").display());
    }
    result
}

/// One fio job's write results.
#[derive(Debug, Clone)]
struct FioRun {
    iops: f64,
    /// Completion latency (`write.clat_ns`), µs.
    mean_us: f64,
    p99_us: f64,
    /// fio's own CPU (usr + sys), percent of one core.
    fio_cpu: f64,
    /// CPU use of every process over the run.
    cpu: Cpu,
}

/// The two 4 KiB random write runs of one state.
#[derive(Debug, Clone)]
struct Load {
    qd32: FioRun,
    qd1: FioRun,
}

struct Resync {
    dirty: u64,
    /// From the `desiredState: Paired` patch to phase Paired.
    wall_s: f64,
    /// Sums over the ResyncCompleted events of this resync.
    passes: usize,
    extents: u64,
    bytes: u64,
    copy_s: f64,
    nbdcopy_bytes: u64,
    nbdcopy_s: f64,
    /// CPU over the resync (request to Paired) and over the nbdcopy.
    cpu: Cpu,
    nbdcopy_cpu: Cpu,
}

async fn body(data_dir: &Path, work_dir: &Path) -> Result<()> {
    let _ = LOGS.set(data_dir.join("logs"));
    let env = Environment::from_endpoints(
        &data_dir.join("endpoints.json"),
        Options {
            kernel_frontend: false,
            ..Options::new(work_dir)
        },
    )
    .await?;
    let mut co = Orchestrator::new(&env);
    let primary = co
        .create_volume(
            &VolumeRequest::block("mirror-bench-primary", VOLUME, "high").on_node("node-a"),
        )
        .await?;
    let secondary = co
        .create_volume(
            &VolumeRequest::block("mirror-bench-secondary", VOLUME, "high").on_node("node-b"),
        )
        .await?;
    let attached = co.attach(&primary, "node-a").await?;
    let (socket, export) = co.nbd_export(&primary.id, "node-a")?;
    let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
    let volumes: Api<VirtualVolume> = Api::all(env.kube.clone());

    // Real data everywhere: the formation copy moves written bytes, the random writes land on
    // allocated blocks of the area files.
    let started = Instant::now();
    fio(
        &uri,
        &[
            "--rw=write",
            "--bs=1m",
            "--iodepth=4",
            "--offset=0",
            &format!("--size={VOLUME}"),
        ],
    )
    .await
    .context("prefill")?;
    println!(
        "prefill: 1 GiB sequential write in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let primary_map = mapping_of(&volumes, &primary.id).await?;
    println!(
        "primary {} (1 GiB, attached on node-a, NBD export): {}",
        primary.id,
        placement(&primary_map)
    );

    let unpaired = load(&uri).await.context("unpaired load")?;
    print_load("unpaired", &unpaired);

    // Formation.
    let pairs: Api<MirrorPair> = Api::all(env.kube.clone());
    let events: Api<Event> = Api::all(env.kube.clone());
    let spec = MirrorPairSpec {
        primary: primary.id.clone(),
        secondary: Some(secondary.id.clone()),
        secondary_selection: None,
        desired_state: MirrorState::Paired,
        mount_check: MountCheckPolicy::Block,
        override_mount_check: false,
    };
    let started = Instant::now();
    pairs
        .create(&PostParams::default(), &MirrorPair::new(PAIR, spec))
        .await
        .context("creating the MirrorPair")?;
    wait_phase(&pairs, MirrorPhase::Paired, Duration::from_secs(900)).await?;
    let formation_wall = started.elapsed().as_secs_f64();
    let formation = event_notes(&events, "FormationCopyCompleted").await?;
    let note = formation
        .first()
        .context("Paired without a FormationCopyCompleted event")?;
    let (f_extents, f_bytes, f_seconds) = copy_report(note)?;
    let secondary_map = mapping_of(&volumes, &secondary.id).await?;
    println!(
        "secondary {} (1 GiB, unattached): {}",
        secondary.id,
        placement(&secondary_map)
    );
    println!(
        "formation copy: {f_extents} extents, {} MiB in {f_seconds:.2} s = {:.0} MiB/s \
         (event); {formation_wall:.1} s from the MirrorPair's creation to Paired",
        f_bytes >> 20,
        f_bytes as f64 / MIB / f_seconds
    );

    let paired = load(&uri).await.context("paired load")?;
    print_load("paired", &paired);

    // Resync against dirty bytes.
    let mut resyncs = Vec::new();
    for dirty in DIRTY {
        let r = resync(
            data_dir,
            &uri,
            &pairs,
            &events,
            &volumes,
            &primary.id,
            &secondary.id,
            dirty,
        )
        .await
        .with_context(|| format!("resync of {} MiB", dirty >> 20))?;
        println!(
            "resync of {} MiB dirty: {} pass(es), {} extents, {} MiB in {:.2} s = {:.0} MiB/s \
             (events); {:.1} s from the request to Paired; nbdcopy {} MiB in {:.2} s = {:.0} MiB/s",
            r.dirty >> 20,
            r.passes,
            r.extents,
            r.bytes >> 20,
            r.copy_s,
            r.bytes as f64 / MIB / r.copy_s,
            r.wall_s,
            r.nbdcopy_bytes >> 20,
            r.nbdcopy_s,
            r.nbdcopy_bytes as f64 / MIB / r.nbdcopy_s
        );
        println!("  CPU over the resync: {}", r.cpu);
        println!("  CPU over the nbdcopy: {}", r.nbdcopy_cpu);
        resyncs.push(r);
    }

    // Unpaired again (pair deleted): the baseline after, to bracket the paired runs.
    pairs
        .delete(PAIR, &DeleteParams::default())
        .await
        .context("deleting the MirrorPair")?;
    wait_gone(&pairs, PAIR).await?;
    let after = load(&uri).await.context("unpaired load after the pair")?;
    print_load("unpaired after the pair was deleted", &after);

    co.detach(&attached).await?;
    co.cleanup().await.context("cleanup")?;

    // Summary.
    println!();
    println!("== 4 KiB random writes on node-a's NBD export ({FIO_SECONDS} s each) ==");
    println!(
        "{:<28} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "state", "IOPS qd32", "mean µs qd32", "p99 µs qd32", "mean µs qd1", "p99 µs qd1"
    );
    for (name, l) in [
        ("unpaired (before)", &unpaired),
        ("paired", &paired),
        ("unpaired (after)", &after),
    ] {
        println!(
            "{name:<28} {:>10.0} {:>12.0} {:>12.0} {:>12.0} {:>12.0}",
            l.qd32.iops, l.qd32.mean_us, l.qd32.p99_us, l.qd1.mean_us, l.qd1.p99_us
        );
    }
    let base = (unpaired.qd32.iops + after.qd32.iops) / 2.0;
    println!(
        "paired / unpaired IOPS (qd32): {:.2} against the run before, {:.2} against the run \
         after, {:.2} against their mean (target ≥ 0.80); qd1 IOPS {:.0} / {:.0} / {:.0}",
        paired.qd32.iops / unpaired.qd32.iops,
        paired.qd32.iops / after.qd32.iops,
        paired.qd32.iops / base,
        unpaired.qd1.iops,
        paired.qd1.iops,
        after.qd1.iops
    );
    println!();
    println!("== resync against dirty bytes ==");
    println!(
        "{:>9} {:>7} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9}",
        "dirty MiB",
        "passes",
        "copy s",
        "wall s",
        "MiB/s",
        "nbdcopy s",
        "nbdcopy/s",
        "ratio",
        "s per GiB"
    );
    for r in &resyncs {
        let rate = r.bytes as f64 / MIB / r.copy_s;
        let peer = r.nbdcopy_bytes as f64 / MIB / r.nbdcopy_s;
        println!(
            "{:>9} {:>7} {:>9.2} {:>9.1} {:>9.0} {:>10.2} {:>10.0} {:>6.0}% {:>9.2}",
            r.dirty >> 20,
            r.passes,
            r.copy_s,
            r.wall_s,
            rate,
            r.nbdcopy_s,
            peer,
            100.0 * rate / peer,
            r.copy_s / (r.dirty as f64 / (1u64 << 30) as f64)
        );
    }
    println!(
        "(copy s: the ResyncCompleted events' seconds, from the copy's start to the end of the \
         final pass under the hold; wall s: from the desiredState patch to phase Paired; ratio: \
         MiB/s against nbdcopy's, target ≥ 80 %; s per GiB: copy s scaled, constant when \
         proportional)"
    );
    Ok(())
}

/// Split, write `dirty` bytes at [0, dirty) on the primary, wait until the pair counts them,
/// resync; then nbdcopy of the same bytes between the same area files.
#[allow(clippy::too_many_arguments)]
async fn resync(
    data_dir: &Path,
    uri: &str,
    pairs: &Api<MirrorPair>,
    events: &Api<Event>,
    volumes: &Api<VirtualVolume>,
    primary: &str,
    secondary: &str,
    dirty: u64,
) -> Result<Resync> {
    set_desired(pairs, MirrorState::Split).await?;
    wait_phase(pairs, MirrorPhase::Split, Duration::from_secs(120)).await?;
    fio(
        uri,
        &[
            "--rw=write",
            "--bs=1m",
            "--iodepth=4",
            "--offset=0",
            &format!("--size={dirty}"),
        ],
    )
    .await
    .context("writing the dirty bytes")?;
    let last = std::cell::Cell::new(None);
    let counted = wait_for(
        Duration::from_secs(120),
        "the pair's dirty bytes",
        || async {
            let status = pairs.get(PAIR).await?.status.unwrap_or_default();
            last.set(status.dirty_bytes);
            Ok(status.dirty_bytes == Some(dirty as i64))
        },
    )
    .await;
    counted.with_context(|| format!("dirtyBytes is {:?}, expected {dirty}", last.get()))?;

    let before = event_notes(events, "ResyncCompleted").await?;
    let sampler = CpuSampler::start();
    let started = Instant::now();
    set_desired(pairs, MirrorState::Paired).await?;
    wait_phase(pairs, MirrorPhase::Paired, Duration::from_secs(900)).await?;
    let wall_s = started.elapsed().as_secs_f64();
    let cpu = sampler.stop();
    // The events are recorded before the phase is written; list until they show.
    let mut new = Vec::new();
    for _ in 0..20 {
        new = event_notes(events, "ResyncCompleted")
            .await?
            .into_iter()
            .filter(|n| !before.contains(n))
            .collect();
        if !new.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(
        !new.is_empty(),
        "Paired without a new ResyncCompleted event"
    );
    let (mut extents, mut bytes, mut copy_s) = (0, 0, 0.0);
    for note in &new {
        let (e, b, s) = copy_report(note)?;
        extents += e;
        bytes += b;
        copy_s += s;
    }
    ensure!(
        bytes >= dirty,
        "the resync copied {bytes} bytes, fewer than the {dirty} dirty: {new:?}"
    );

    let from = mapping_of(volumes, primary).await?;
    let to = mapping_of(volumes, secondary).await?;
    let sampler = CpuSampler::start();
    let (nbdcopy_bytes, nbdcopy_s) =
        super::support::nbdcopy_between(data_dir, &from, &to, dirty, true).await?;
    let nbdcopy_cpu = sampler.stop();
    Ok(Resync {
        dirty,
        wall_s,
        passes: new.len(),
        extents,
        bytes,
        copy_s,
        nbdcopy_bytes,
        nbdcopy_s,
        cpu,
        nbdcopy_cpu,
    })
}

/// 4 KiB random writes over the whole volume: iodepth 32 (IOPS), then iodepth 1 (latency).
async fn load(uri: &str) -> Result<Load> {
    let mut runs = Vec::new();
    for depth in [32, 1] {
        runs.push(
            fio(
                uri,
                &[
                    "--rw=randwrite",
                    "--bs=4k",
                    &format!("--iodepth={depth}"),
                    "--offset=0",
                    &format!("--size={VOLUME}"),
                    "--time_based",
                    &format!("--runtime={FIO_SECONDS}"),
                ],
            )
            .await
            .with_context(|| format!("randwrite iodepth {depth}"))?,
        );
    }
    let qd1 = runs.pop().context("no qd1 run")?;
    let qd32 = runs.pop().context("no qd32 run")?;
    Ok(Load { qd32, qd1 })
}

fn print_load(what: &str, l: &Load) {
    println!(
        "{what}: qd32 {:.0} IOPS (clat mean {:.0} µs, p99 {:.0} µs); qd1 {:.0} IOPS (clat mean \
         {:.0} µs, p99 {:.0} µs)",
        l.qd32.iops, l.qd32.mean_us, l.qd32.p99_us, l.qd1.iops, l.qd1.mean_us, l.qd1.p99_us
    );
    for (depth, run) in [("qd32", &l.qd32), ("qd1", &l.qd1)] {
        println!(
            "  CPU over the {depth} run: {}; fio {:.0} % of a core; {:.0} µs of CPU per write",
            run.cpu,
            run.fio_cpu,
            run.cpu.busy_s / (run.iops * FIO_SECONDS as f64) * 1e6
        );
    }
}

/// CPU use over an interval: the machine's (from /proc/stat) and each `tessera local`
/// component's (processes whose stdout is `<data>/logs/<component>.log`).
#[derive(Debug, Clone, Default)]
struct Cpu {
    seconds: f64,
    /// CPU seconds busy (all cores), and waiting for I/O.
    busy_s: f64,
    iowait_s: f64,
    components: BTreeMap<String, f64>,
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        write!(
            f,
            "{:.0} % of {cores} cores busy, iowait {:.0} %",
            100.0 * self.busy_s / (self.seconds * cores),
            100.0 * self.iowait_s / (self.seconds * cores)
        )?;
        let mut rest = self.busy_s;
        for (name, s) in &self.components {
            if *s >= 0.05 * self.seconds {
                write!(f, ", {name} {:.0} %", 100.0 * s / self.seconds)?;
            }
            rest -= s;
        }
        write!(
            f,
            ", everything else (fio included) {:.0} %",
            100.0 * rest / self.seconds
        )
    }
}

struct CpuSampler {
    started: Instant,
    stat: (u64, u64),
    components: BTreeMap<String, u64>,
}

static LOGS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

impl CpuSampler {
    fn start() -> Self {
        CpuSampler {
            started: Instant::now(),
            stat: proc_stat(),
            components: component_ticks(),
        }
    }

    fn stop(&self) -> Cpu {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let stat = proc_stat();
        let now = component_ticks();
        Cpu {
            seconds: self.started.elapsed().as_secs_f64(),
            busy_s: stat.0.saturating_sub(self.stat.0) as f64 / hz,
            iowait_s: stat.1.saturating_sub(self.stat.1) as f64 / hz,
            components: now
                .iter()
                .map(|(name, t)| {
                    let before = self.components.get(name).copied().unwrap_or(0);
                    (name.clone(), t.saturating_sub(before) as f64 / hz)
                })
                .collect(),
        }
    }
}

/// (busy, iowait) ticks of all cores.
fn proc_stat() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    (get(0) + get(1) + get(2) + get(5) + get(6) + get(7), get(4))
}

/// utime + stime ticks of each component process of the cluster.
fn component_ticks() -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Some(logs) = LOGS.get() else {
        return out;
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Ok(stdout) = std::fs::read_link(path.join("fd/1")) else {
            continue;
        };
        if stdout.parent() != Some(logs.as_path()) {
            continue;
        }
        let Some(name) = stdout.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the command name (which ends with the last ')'): utime is the 12th.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<u64> = after
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|f| f.parse().ok())
            .collect();
        *out.entry(name.to_string()).or_default() += fields.iter().sum::<u64>();
    }
    out
}

/// One fio job on `uri` (JSON output); fails on any I/O error.
async fn fio(uri: &str, extra: &[&str]) -> Result<FioRun> {
    let sampler = CpuSampler::start();
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--output-format=json",
        ])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .context("spawning fio")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = FioReport::parse(&out.stdout)
        .with_context(|| format!("fio {extra:?}: {}", tail(&stderr, 10)))?;
    ensure!(
        out.status.success() && report.errors == 0 && report.error_code == 0 && report.writes > 0,
        "fio {extra:?} failed ({}, {report:?}):\n{}",
        out.status,
        tail(&stderr, 10)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&text[text.find('{').unwrap_or(0)..]).context("fio JSON")?;
    let job = &json["jobs"][0];
    let clat = &job["write"]["clat_ns"];
    Ok(FioRun {
        iops: report.iops,
        mean_us: clat["mean"].as_f64().unwrap_or(0.0) / 1e3,
        p99_us: clat["percentile"]["99.000000"].as_f64().unwrap_or(0.0) / 1e3,
        fio_cpu: job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0),
        cpu: sampler.stop(),
    })
}

/// "MiB per area" of a mapping.
fn placement(mapping: &VolumeMapping) -> String {
    let mut per_area: BTreeMap<&str, i64> = BTreeMap::new();
    let mut holes = 0;
    for run in &mapping.extents {
        if run.replicas.is_empty() {
            holes += run.length;
        }
        for r in &run.replicas {
            *per_area.entry(r.area.as_str()).or_default() += run.length;
        }
    }
    let mut parts: Vec<String> = per_area
        .iter()
        .map(|(area, bytes)| format!("{} MiB on {area}", bytes >> 20))
        .collect();
    if holes > 0 {
        parts.push(format!("{} MiB unallocated", holes >> 20));
    }
    parts.join(", ")
}

/// "... copied N extents (B bytes) in S s ..." of a copy report: (N, B, S).
fn copy_report(note: &str) -> Result<(u64, u64, f64)> {
    let parse = || -> Option<(u64, u64, f64)> {
        let after = note.split_once(" copied ")?.1;
        let mut words = after.split_whitespace();
        let extents = words.next()?.parse().ok()?;
        let bytes = after
            .split_once('(')?
            .1
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let seconds = after
            .split_once(" in ")?
            .1
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some((extents, bytes, seconds))
    };
    match parse() {
        Some(r) => Ok(r),
        None => bail!("unexpected copy report: {note}"),
    }
}
