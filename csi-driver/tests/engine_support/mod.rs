//! Shared fixtures of the engine tests: temp-file areas wrapped in fault injectors, maps.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use tempfile::TempDir;
use tessera_api::model::{ExtentMap, ExtentSize, Generation, ReplicaLocation, Run};
use tessera_csi::backend::fault::FaultyArea;
use tessera_csi::backend::{AreaBackend, AreaRegistry, IoDriver, LocalArea, LocalAreaOptions};

pub const ES: u64 = 4096;

pub fn es() -> ExtentSize {
    ExtentSize::new(ES).expect("valid extent size")
}

/// Areas `names`, each a sparse temp file of `area_bytes`, registered behind fault injectors.
pub struct Rig {
    pub dir: TempDir,
    pub registry: Arc<AreaRegistry>,
    pub faulty: BTreeMap<String, Arc<FaultyArea>>,
    pub local: BTreeMap<String, Arc<LocalArea>>,
}

impl Rig {
    /// Areas on the default driver (io_uring where the kernel allows it).
    pub fn new(names: &[&str], area_bytes: u64) -> Rig {
        Rig::with_driver(names, area_bytes, IoDriver::Auto)
    }

    pub fn with_driver(names: &[&str], area_bytes: u64, driver: IoDriver) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = Arc::new(AreaRegistry::new());
        let mut faulty = BTreeMap::new();
        let mut local = BTreeMap::new();
        for name in names {
            let options = LocalAreaOptions {
                driver,
                size_bytes: Some(area_bytes),
                ..LocalAreaOptions::default()
            };
            let area = Arc::new(
                LocalArea::open(*name, dir.path().join(format!("{name}.img")), &options)
                    .expect("open area"),
            );
            let wrapper = Arc::new(FaultyArea::new(area.clone() as Arc<dyn AreaBackend>));
            registry.insert(wrapper.clone() as Arc<dyn AreaBackend>);
            faulty.insert(name.to_string(), wrapper);
            local.insert(name.to_string(), area);
        }
        Rig {
            dir,
            registry,
            faulty,
            local,
        }
    }

    pub fn fault(&self, name: &str) -> &FaultyArea {
        self.faulty.get(name).expect("known area")
    }

    pub fn area(&self, name: &str) -> &Arc<LocalArea> {
        self.local.get(name).expect("known area")
    }

    pub fn clear_calls(&self) {
        for area in self.faulty.values() {
            area.clear_calls();
        }
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

pub fn loc(area: &str, slot: u64) -> ReplicaLocation {
    ReplicaLocation::new(area, slot * ES)
}

/// A map of `size` bytes at generation 1 from `(extent_start, extent_count, replicas)` runs;
/// everything else is a hole.
pub fn map(size: u64, mapped: &[(u64, u64, Vec<ReplicaLocation>)]) -> Arc<ExtentMap> {
    let mut runs = Vec::new();
    let mut cursor = 0;
    for (start, count, replicas) in mapped {
        let offset = start * ES;
        if offset > cursor {
            runs.push(Run::hole(cursor, offset - cursor));
        }
        let end = ((start + count) * ES).min(size);
        runs.push(Run::new(offset, end - offset, replicas.clone()));
        cursor = end;
    }
    if cursor < size {
        runs.push(Run::hole(cursor, size - cursor));
    }
    Arc::new(ExtentMap::from_runs(size, es(), Generation(1), runs).expect("valid map"))
}

/// A deterministic pattern for `len` bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_mul(31)
                .wrapping_add((i as u8).wrapping_mul(7))
                ^ (i >> 8) as u8
        })
        .collect()
}
