//! Data-path benchmark helper (driven by `scripts/bench-datapath.sh`, which writes
//! `docs/benchmarks/datapath.md`). Not a test: it prints numbers.
//!
//! ```text
//! # Serve a volume over area files as NBD on a unix socket until SIGINT/SIGTERM:
//! bench_datapath serve --socket /tmp/e.sock --layout single --area /tmp/raw.img --size 1073741824
//! bench_datapath serve --socket /tmp/f.sock --layout fragmented --extent 1048576 \
//!     --area a0.img --area a1.img --area a2.img --area a3.img --size 1073741824
//! # The same, every area reached through an extent server over loopback TCP (in-process):
//! bench_datapath serve --socket /tmp/r.sock --layout fragmented --remote \
//!     --area a0.img --area a1.img --area a2.img --area a3.img --size 1073741824
//! # Resident memory of a process holding N open volumes over sparse files:
//! bench_datapath rss --dir /tmp/rss --volumes 100 --size 10737418240
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use tessera_api::model::{ExtentMap, ExtentSize, Generation, ReplicaLocation, Run};
use tessera_csi::backend::remote::{RemoteArea, RemoteAreaConfig};
use tessera_csi::backend::{
    AreaBackend, AreaRegistry, DirectIo, IoDriver, LocalArea, LocalAreaOptions,
};
use tessera_csi::engine::{UsageInit, Volume, VolumeOptions};
use tessera_csi::extent_server::{ExtentServer, ExtentServerConfig, ExtentServerHandle};
use tessera_csi::frontend::nbd::NbdUnixFrontend;
use tessera_nbd::{Credentials, Permission};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Layout {
    /// One extent covering the whole volume, on the first area at offset 0.
    Single,
    /// `size / extent` extents spread over every area in a shuffled order.
    Fragmented,
}

#[derive(Clone, Copy, ValueEnum)]
enum Driver {
    Auto,
    Pool,
    Uring,
}

impl From<Driver> for IoDriver {
    fn from(d: Driver) -> IoDriver {
        match d {
            Driver::Auto => IoDriver::Auto,
            Driver::Pool => IoDriver::ThreadPool,
            Driver::Uring => IoDriver::IoUring,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, value_enum)]
        layout: Layout,
        /// Area files (existing; their size is kept).
        #[arg(long = "area", required = true)]
        areas: Vec<PathBuf>,
        #[arg(long)]
        size: u64,
        /// Extent size of the fragmented layout.
        #[arg(long, default_value_t = 1 << 20)]
        extent: u64,
        /// `O_DIRECT` for aligned pieces (`auto`) or always the page cache (`off`).
        #[arg(long, default_value = "off")]
        direct: String,
        #[arg(long, value_enum, default_value = "auto")]
        driver: Driver,
        /// Tokio worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Serve the areas through an in-process extent server on 127.0.0.1 and build the
        /// volume over `RemoteArea`s to it (every extent remote, NBD over loopback TCP).
        #[arg(long)]
        remote: bool,
    },
    Rss {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 100)]
        volumes: usize,
        #[arg(long, default_value_t = 10 << 30)]
        size: u64,
        #[arg(long, value_enum, default_value = "auto")]
        driver: Driver,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Serve {
            socket,
            layout,
            areas,
            size,
            extent,
            direct,
            driver,
            workers,
            remote,
        } => {
            let direct = match direct.as_str() {
                "auto" => DirectIo::Auto,
                "off" => DirectIo::Off,
                other => bail!("--direct {other}: expected auto or off"),
            };
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.enable_all();
            if let Some(n) = workers {
                builder.worker_threads(n);
            }
            let runtime = builder.build()?;
            runtime.block_on(serve(
                socket,
                layout,
                areas,
                size,
                extent,
                LocalAreaOptions {
                    driver: driver.into(),
                    direct,
                    size_bytes: None,
                },
                remote,
            ))
        }
        Cmd::Rss {
            dir,
            volumes,
            size,
            driver,
        } => rss(dir, volumes, size, driver.into()),
    }
}

/// An area's name and size.
type AreaInfo = (String, u64);
type Backends = Vec<Arc<dyn AreaBackend>>;

fn open_areas(
    paths: &[PathBuf],
    options: &LocalAreaOptions,
) -> anyhow::Result<(Backends, Vec<AreaInfo>)> {
    let mut backends = Vec::new();
    let mut areas = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let name = format!("area{i}");
        let area = LocalArea::open(name.as_str(), path, options)
            .with_context(|| format!("open {}", path.display()))?;
        areas.push((name, area.size_bytes()));
        backends.push(Arc::new(area) as Arc<dyn AreaBackend>);
    }
    Ok((backends, areas))
}

const PEER: &str = "bench-node";
const TOKEN: &[u8] = b"bench-token";

/// Serves `locals` from an extent server on loopback, grants `PEER` read-write on all of each
/// area for `volume`, and returns the areas as `RemoteArea`s to it (default config).
async fn remote_areas(
    locals: Backends,
    areas: &[AreaInfo],
    volume: &str,
    generation: Generation,
) -> anyhow::Result<(ExtentServerHandle, Backends)> {
    let server = ExtentServer::start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        locals,
        ExtentServerConfig::new().with_peer(PEER, TOKEN),
    )
    .await?;
    server.authorization().grant_volume(
        PEER,
        volume,
        generation,
        areas
            .iter()
            .map(|(name, size)| (name.as_str().into(), 0..*size, Permission::ReadWrite))
            .collect(),
    )?;
    let mut remotes = Vec::new();
    for (name, _) in areas {
        let remote = RemoteArea::connect(
            name.as_str(),
            server.addr().to_string(),
            Credentials::new(PEER, TOKEN.to_vec()),
            RemoteAreaConfig::default(),
        )
        .await?;
        remotes.push(Arc::new(remote) as Arc<dyn AreaBackend>);
    }
    Ok((server, remotes))
}

/// A deterministic permutation of `0..n` (Fisher–Yates with a fixed LCG).
fn shuffled(n: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..v.len()).rev() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = (state >> 33) as usize % (i + 1);
        v.swap(i, j);
    }
    v
}

fn build_map(
    layout: Layout,
    areas: &[AreaInfo],
    size: u64,
    extent: u64,
) -> anyhow::Result<ExtentMap> {
    let runs = match layout {
        Layout::Single => {
            ensure!(areas[0].1 >= size, "area smaller than the volume");
            vec![Run::new(
                0,
                size,
                vec![ReplicaLocation::new(areas[0].0.as_str(), 0)],
            )]
        }
        Layout::Fragmented => {
            ensure!(
                size.is_multiple_of(extent),
                "size must be a multiple of the extent"
            );
            let extents = size / extent;
            // Volume extent i goes to slot `order[i]` of the concatenated areas: neighbours
            // land on different areas and never contiguously.
            let slots_per_area: Vec<u64> = areas.iter().map(|(_, s)| s / extent).collect();
            ensure!(
                slots_per_area.iter().sum::<u64>() >= extents,
                "areas too small for {extents} extents"
            );
            let order = shuffled(extents);
            let mut runs = Vec::with_capacity(extents as usize);
            for (i, slot) in order.iter().enumerate() {
                // Slot `s` is position `s / areas` of area `s % areas`: a bijection, so every
                // area holds `extents / areas` extents and no slot is used twice.
                let area = (slot % areas.len() as u64) as usize;
                let within = slot / areas.len() as u64;
                ensure!(within < slots_per_area[area], "slot out of area");
                runs.push(Run::new(
                    i as u64 * extent,
                    extent,
                    vec![ReplicaLocation::new(
                        areas[area].0.as_str(),
                        within * extent,
                    )],
                ));
            }
            runs
        }
    };
    let extent_size = match layout {
        Layout::Single => size.next_power_of_two(),
        Layout::Fragmented => extent,
    };
    Ok(ExtentMap::from_runs(
        size,
        ExtentSize::new(extent_size)?,
        Generation(1),
        runs,
    )?)
}

async fn serve(
    socket: PathBuf,
    layout: Layout,
    paths: Vec<PathBuf>,
    size: u64,
    extent: u64,
    options: LocalAreaOptions,
    remote: bool,
) -> anyhow::Result<()> {
    let (locals, areas) = open_areas(&paths, &options)?;
    let map = build_map(layout, &areas, size, extent)?;
    let runs = map.runs().len();
    let (server, backends) = if remote {
        let (server, remotes) = remote_areas(locals, &areas, "vol", map.generation()).await?;
        (Some(server), remotes)
    } else {
        (None, locals)
    };
    let registry = Arc::new(AreaRegistry::new());
    for backend in backends {
        registry.insert(backend);
    }
    let volume = Volume::open(
        "vol",
        Arc::new(map),
        registry,
        VolumeOptions {
            usage: UsageInit::AllMapped,
            ..VolumeOptions::default()
        },
    )?;
    let handle = NbdUnixFrontend::start(Arc::new(volume), &socket)?;
    match &server {
        Some(s) => println!(
            "ready {} ({runs} runs, remote via {})",
            handle.uri(),
            s.addr()
        ),
        None => println!("ready {} ({runs} runs)", handle.uri()),
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    handle.stop().await?;
    if let Some(server) = server {
        server.stop().await?;
    }
    Ok(())
}

fn rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

fn rss(dir: PathBuf, count: usize, size: u64, driver: IoDriver) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    std::fs::create_dir_all(&dir)?;
    let before = rss_kib()?;
    let extent = ExtentSize::DEFAULT;
    let registry = Arc::new(AreaRegistry::new());
    let mut volumes = Vec::with_capacity(count);
    {
        // Opening io_uring areas needs the runtime context (completion threads wake tasks).
        let _enter = runtime.enter();
        for i in 0..count {
            let name = format!("area{i}");
            let area = LocalArea::open(
                name.as_str(),
                dir.join(format!("{name}.img")),
                &LocalAreaOptions {
                    driver,
                    size_bytes: Some(size),
                    ..LocalAreaOptions::default()
                },
            )?;
            registry.insert(Arc::new(area) as Arc<dyn AreaBackend>);
            let map = ExtentMap::from_runs(
                size,
                extent,
                Generation(1),
                vec![Run::new(
                    0,
                    size,
                    vec![ReplicaLocation::new(name.as_str(), 0)],
                )],
            )?;
            volumes.push(Arc::new(Volume::open(
                format!("vol{i}"),
                Arc::new(map),
                registry.clone(),
                VolumeOptions::default(),
            )?));
        }
    }
    // Touch every volume once so lazily built state exists.
    runtime.block_on(async {
        for v in &volumes {
            v.read(0, 4096).await?;
        }
        anyhow::Ok(())
    })?;
    let after = rss_kib()?;
    println!(
        "rss volumes={count} size_bytes={size} extents_per_volume={} rss_before_kib={before} rss_after_kib={after} rss_mib={:.1}",
        size / extent.get(),
        after as f64 / 1024.0
    );
    drop(volumes);
    Ok(())
}
