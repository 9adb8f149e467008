//! Fast-path cost of the engine's request admission (the I/O gate, docs/remap.md): 4 KiB reads
//! and writes against a null backend (no data movement), so what is measured is the engine's
//! own per-request work. Prints ns per request for 1 and 4 concurrent tasks.
//!
//! `cargo run --release -p tessera-csi --example bench_gate`

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tessera_api::model::{AreaId, ExtentMap, ExtentSize, Generation, ReplicaLocation, Run};
use tessera_csi::backend::{AreaBackend, AreaRegistry, BackendFuture};
use tessera_csi::engine::{UsageInit, Volume, VolumeOptions};

#[derive(Debug)]
struct Null {
    id: AreaId,
    size: u64,
}

impl AreaBackend for Null {
    fn area(&self) -> &AreaId {
        &self.id
    }
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn read(&self, _: Generation, _: u64, length: usize) -> BackendFuture<'_, Bytes> {
        Box::pin(async move { Ok(Bytes::from(vec![0u8; length])) })
    }
    fn write(&self, _: Generation, _: u64, _: Bytes, _: bool) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, _: Generation, _: u64, _: u64, _: bool) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn trim(&self, _: Generation, _: u64, _: u64) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn flush(&self, _: Generation) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

const EXTENT: u64 = 1 << 20;
const EXTENTS: u64 = 256;
const OPS: u64 = 400_000;

fn main() -> anyhow::Result<()> {
    let registry = Arc::new(AreaRegistry::new());
    registry.insert(Arc::new(Null {
        id: AreaId::new("null"),
        size: EXTENT * EXTENTS,
    }));
    let runs = (0..EXTENTS)
        .map(|i| {
            Run::new(
                i * EXTENT,
                EXTENT,
                vec![ReplicaLocation::new("null", (EXTENTS - 1 - i) * EXTENT)],
            )
        })
        .collect();
    let map = ExtentMap::from_runs(
        EXTENT * EXTENTS,
        ExtentSize::new(EXTENT)?,
        Generation(1),
        runs,
    )?;
    let volume = Arc::new(Volume::open(
        "bench",
        Arc::new(map),
        registry,
        VolumeOptions {
            usage: UsageInit::Empty,
            ..VolumeOptions::default()
        },
    )?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()?;
    let data = Bytes::from(vec![7u8; 4096]);
    for tasks in [1u64, 4] {
        for kind in ["read", "write"] {
            let started = Instant::now();
            runtime.block_on(async {
                let handles: Vec<_> = (0..tasks)
                    .map(|t| {
                        let volume = Arc::clone(&volume);
                        let data = data.clone();
                        tokio::spawn(async move {
                            let mut x = t.wrapping_mul(0x9E37_79B9);
                            for _ in 0..OPS / tasks {
                                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                                let offset = (x >> 20) % (EXTENT * EXTENTS / 4096) * 4096;
                                if kind == "read" {
                                    volume.read(offset, 4096).await.expect("read");
                                } else {
                                    volume
                                        .write(offset, data.clone(), false)
                                        .await
                                        .expect("write");
                                }
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.await.expect("task");
                }
            });
            let ns = started.elapsed().as_nanos() as f64 / OPS as f64;
            println!("{kind:5} tasks={tasks}: {ns:7.1} ns/request");
        }
    }
    Ok(())
}
