//! Local backend: thread pool against io_uring (data-path issue part 2).
//!
//! `cargo bench -p tessera-csi --bench local_backend [-- --seconds N --size-mib M --dir D
//! --uring-first]`
//!
//! For each driver and each workload, `depth` tasks issue requests back to back on one area file
//! for a fixed time; prints IOPS and MiB/s as a Markdown table. The file is filled first, so
//! writes overwrite allocated blocks. Without `--bench` (as `cargo test --all-targets` runs it) it
//! only does a short smoke run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_api::model::Generation;
use tessera_csi::backend::{AreaBackend, DirectIo, IoDriver, LocalArea, LocalAreaOptions};

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    block: usize,
    depth: usize,
    write: bool,
    random: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4 KiB random read",
        block: 4096,
        depth: 32,
        write: false,
        random: true,
    },
    Workload {
        name: "4 KiB random write",
        block: 4096,
        depth: 32,
        write: true,
        random: true,
    },
    Workload {
        name: "1 MiB sequential read",
        block: 1 << 20,
        depth: 4,
        write: false,
        random: false,
    },
    Workload {
        name: "1 MiB sequential write",
        block: 1 << 20,
        depth: 4,
        write: true,
        random: false,
    },
];

struct Args {
    seconds: f64,
    size_mib: u64,
    dir: Option<String>,
    full: bool,
    uring_first: bool,
}

fn args() -> Args {
    let mut out = Args {
        seconds: 3.0,
        size_mib: 1024,
        dir: None,
        full: false,
        uring_first: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => out.full = true,
            "--seconds" => {
                out.seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(out.seconds)
            }
            "--size-mib" => {
                out.size_mib = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(out.size_mib)
            }
            "--dir" => out.dir = it.next(),
            "--uring-first" => out.uring_first = true,
            _ => {}
        }
    }
    if !out.full {
        out.seconds = 0.05;
        out.size_mib = 16;
    }
    out
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn run(area: Arc<LocalArea>, w: Workload, size: u64, seconds: f64) -> (u64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let cursor = Arc::new(AtomicU64::new(0));
    let blocks = size / w.block as u64;
    let data = Bytes::from(vec![0xA5u8; w.block]);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for task in 0..w.depth {
        let (area, done, cursor, data) = (area.clone(), done.clone(), cursor.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (task as u64 + 1);
            while Instant::now() < deadline {
                let block = if w.random {
                    xorshift(&mut rng) % blocks
                } else {
                    cursor.fetch_add(1, Ordering::Relaxed) % blocks
                };
                let offset = block * w.block as u64;
                let result = if w.write {
                    area.write(Generation(1), offset, data.clone(), false)
                        .await
                        .map(|_| ())
                } else {
                    area.read(Generation(1), offset, w.block).await.map(|_| ())
                };
                if let Err(e) = result {
                    eprintln!("I/O error: {e}");
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    (done.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

fn main() -> std::io::Result<()> {
    let args = args();
    let dir = match &args.dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir_in(std::env::temp_dir())?,
    };
    let path = dir.path().join("area.img");
    let size = args.size_mib << 20;
    {
        // Fill the area so that writes overwrite allocated blocks and reads hit real data.
        use std::io::Write;
        let mut file = std::fs::File::create(&path)?;
        let chunk = vec![0x5Au8; 1 << 20];
        for _ in 0..args.size_mib {
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "kernel {}, {} CPUs, area file {} MiB in {}, {} s per cell, O_DIRECT",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        args.size_mib,
        dir.path().display(),
        args.seconds
    );
    if !args.full {
        println!("(smoke run under `cargo test`: tiny file and time slices, not a measurement)");
    }
    println!();
    println!("| driver | workload | depth | IOPS | MiB/s |");
    println!("|---|---|---|---|---|");
    let mut drivers = [
        ("thread pool", IoDriver::ThreadPool),
        ("io_uring", IoDriver::IoUring),
    ];
    if args.uring_first {
        drivers.reverse();
    }
    for (label, driver) in drivers {
        let options = LocalAreaOptions {
            driver,
            direct: DirectIo::Auto,
            size_bytes: None,
        };
        let area = match LocalArea::open("bench", &path, &options) {
            Ok(area) => Arc::new(area),
            Err(e) => {
                println!("| {label} | unavailable: {e} | | | |");
                continue;
            }
        };
        if !area.direct_io_active() {
            println!("(O_DIRECT unavailable here: buffered I/O)");
        }
        for w in WORKLOADS {
            let (ops, secs) = runtime.block_on(run(area.clone(), w, size, args.seconds));
            let iops = ops as f64 / secs;
            let mib = iops * w.block as f64 / (1u64 << 20) as f64;
            println!(
                "| {label} | {} | {} | {iops:.0} | {mib:.1} |",
                w.name, w.depth
            );
        }
    }
    Ok(())
}
