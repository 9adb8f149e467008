//! Shared fixtures of the frontend tests: volumes over temp-file areas.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::TempDir;
use tessera_api::model::{ExtentMap, ExtentSize, Generation, ReplicaLocation, Run};
use tessera_csi::backend::{AreaBackend, AreaRegistry, LocalArea, LocalAreaOptions};
use tessera_csi::engine::{UsageInit, Volume, VolumeOptions};

/// A volume over temp-file areas, and the areas' files.
pub struct TestVolume {
    pub dir: TempDir,
    pub volume: Arc<Volume>,
    pub areas: Vec<(String, PathBuf)>,
    pub extent: u64,
}

/// `extents` extents of `extent` bytes, extent `i` on area `i % areas` at a shuffled slot (so
/// neighbours are never contiguous anywhere), the last `holes` extents unmapped.
pub fn striped_volume(
    dir_in: Option<&Path>,
    areas: usize,
    extent: u64,
    extents: u64,
    holes: u64,
) -> TestVolume {
    let dir = match dir_in {
        Some(base) => tempfile::tempdir_in(base).expect("temp dir"),
        None => tempfile::tempdir().expect("temp dir"),
    };
    let registry = Arc::new(AreaRegistry::new());
    let per_area = extents.div_ceil(areas as u64);
    let mut files = Vec::new();
    for a in 0..areas {
        let name = format!("area{a}");
        let path = dir.path().join(format!("{name}.img"));
        let area = LocalArea::open(
            name.as_str(),
            &path,
            &LocalAreaOptions {
                size_bytes: Some(per_area * extent),
                ..LocalAreaOptions::default()
            },
        )
        .expect("open area");
        registry.insert(Arc::new(area) as Arc<dyn AreaBackend>);
        files.push((name, path));
    }
    let mapped = extents - holes;
    let mut runs = Vec::new();
    for i in 0..mapped {
        let area = (i % areas as u64) as usize;
        let index_on_area = i / areas as u64;
        // Reverse order on each area: extent i+areas sits *before* extent i.
        let slot = per_area - 1 - index_on_area;
        runs.push(Run::new(
            i * extent,
            extent,
            vec![ReplicaLocation::new(files[area].0.as_str(), slot * extent)],
        ));
    }
    if holes > 0 {
        runs.push(Run::hole(mapped * extent, holes * extent));
    }
    let map = ExtentMap::from_runs(
        extents * extent,
        ExtentSize::new(extent).expect("extent size"),
        Generation(1),
        runs,
    )
    .expect("map");
    let volume = Volume::open(
        "vol",
        Arc::new(map),
        registry,
        VolumeOptions {
            usage: UsageInit::Empty,
            ..VolumeOptions::default()
        },
    )
    .expect("open volume");
    TestVolume {
        dir,
        volume: Arc::new(volume),
        areas: files,
        extent,
    }
}

/// Whether `tool` is on PATH (or /usr/sbin, /sbin); prints why a test skips otherwise.
pub fn have(tool: &str) -> bool {
    let found = tessera_csi::frontend::find_in_path(tool).is_some();
    if !found {
        println!("skipping: {tool} not installed");
    }
    found
}

/// A deterministic pattern.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_mul(29)
                .wrapping_add((i as u8).wrapping_mul(13))
                ^ (i >> 9) as u8
        })
        .collect()
}
