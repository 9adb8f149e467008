//! `tessera local --demo`: provisions volumes the way Kubernetes would — CreateVolume on the
//! CSI controller, ControllerPublish to a node, NodeStage as a Block volume there — writes a
//! pattern through each volume's NBD export and reads it back, then shows the status tables.
//! Every step is idempotent (CSI CreateVolume is idempotent by name), so a second run finds
//! the volumes of the first and verifies the data it left.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tessera_nbd::NbdClient;
use tessera_proto::csi::v1 as csi;

use crate::csi_client::{self, ControllerClient};
use crate::endpoints::{Endpoints, NodeFile, parse_nbd_unix_uri};

/// One volume the demo provisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoVolume {
    /// The CSI name (what the provisioner derives from the PVC); the claim is named after it.
    pub name: String,
    pub class: String,
    pub size_bytes: u64,
    pub node: String,
}

const EXTENT: u64 = 4 << 20;
const CHUNK: u64 = 1 << 20;

/// The demo's volumes for a cluster of `nodes` nodes with two areas of `area_size` each: a
/// high-priority volume larger than one area (so its mapping spans areas) on the first node,
/// and a low-priority one on the last node (where placement need not have put its extents: its
/// I/O then goes through the lending node's extent server, seed 001).
pub fn plan(nodes: &[String], area_size: u64) -> Vec<DemoVolume> {
    let capacity = nodes.len() as u64 * 2 * area_size;
    let round = |b: u64| (b / EXTENT).max(1) * EXTENT;
    let high = round((area_size * 3 / 2).min(capacity * 2 / 5));
    let low = round(area_size.min(capacity * 3 / 10));
    let second = nodes.last().cloned().unwrap_or_default();
    vec![
        DemoVolume {
            name: "demo-high".into(),
            class: "high".into(),
            size_bytes: high,
            node: nodes.first().cloned().unwrap_or_default(),
        },
        DemoVolume {
            name: "demo-low".into(),
            class: "low".into(),
            size_bytes: low,
            node: second,
        },
    ]
}

/// A provisioned, staged and verified volume.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub volume: DemoVolume,
    pub volume_id: String,
    pub nbd_uri: String,
    /// The pattern of a previous run was found intact before writing.
    pub resumed: bool,
}

/// Provisions, stages and verifies every volume of `plan`; progress goes to stderr.
pub async fn provision(
    endpoints: &Endpoints,
    data_dir: &Path,
    plan: &[DemoVolume],
) -> Result<Vec<Provisioned>> {
    let mut done = Vec::new();
    for vol in plan {
        eprint!(
            "demo: {} ({}, class {}) on {}: CreateVolume",
            vol.name,
            crate::units::bytes(vol.size_bytes as i64),
            vol.class,
            vol.node
        );
        let (volume_id, context) = create_volume(&endpoints.controller.csi_socket, vol).await?;
        eprint!(" → {volume_id}, ControllerPublish + NodeStage");
        let node = endpoints
            .node(&vol.node)
            .with_context(|| format!("no node {} in endpoints.json", vol.node))?;
        let staging = staging_path(data_dir, &vol.node, &volume_id);
        csi_client::publish_and_stage(
            &endpoints.controller.csi_socket,
            &node.csi_socket,
            &vol.node,
            &volume_id,
            context,
            &staging,
        )
        .await?;
        let nbd_uri = wait_for_export(&node.state_dir, &volume_id).await?;
        eprint!(", verify via {nbd_uri}");
        let resumed = write_and_verify(&nbd_uri, &volume_id, vol.size_bytes).await?;
        eprintln!(
            " ✓{}",
            if resumed {
                " (data of the previous run intact)"
            } else {
                ""
            }
        );
        done.push(Provisioned {
            volume: vol.clone(),
            volume_id,
            nbd_uri,
            resumed,
        });
    }
    Ok(done)
}

async fn create_volume(
    controller: &Path,
    vol: &DemoVolume,
) -> Result<(String, HashMap<String, String>)> {
    let mut ctl =
        ControllerClient::new(csi_client::connect(controller).await.with_context(|| {
            format!(
                "connecting to the CSI controller at {}",
                controller.display()
            )
        })?);
    let parameters = HashMap::from([
        (
            "tessera.io/pool".to_string(),
            crate::local::POOL.to_string(),
        ),
        ("tessera.io/priorityClass".to_string(), vol.class.clone()),
        // What csi-provisioner adds with --extra-create-metadata.
        ("csi.storage.k8s.io/pvc/name".to_string(), vol.name.clone()),
        (
            "csi.storage.k8s.io/pvc/namespace".to_string(),
            "default".to_string(),
        ),
    ]);
    let resp = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: vol.name.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: vol.size_bytes as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![csi_client::block_single_writer()],
            parameters,
            ..Default::default()
        })
        .await
        .map_err(|s| csi_client::status_error(s, &format!("CreateVolume({})", vol.name)))?
        .into_inner();
    let volume = resp.volume.context("CreateVolume returned no volume")?;
    Ok((volume.volume_id, volume.volume_context))
}

/// The NBD URI the node publishes for a staged volume in its `node.json`.
pub async fn wait_for_export(state_dir: &Path, volume_id: &str) -> Result<String> {
    let path = state_dir.join("node.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(file) = NodeFile::load(&path)
            && let Some(v) = file.volumes.get(volume_id)
            && !v.nbd_uri.is_empty()
        {
            return Ok(v.nbd_uri.clone());
        }
        if Instant::now() > deadline {
            bail!(
                "{} does not list {volume_id} 30 s after NodeStage",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deterministic contents of the chunk at `offset` of volume `id`: a reader can tell whose
/// data and which offset it is, and stale or misplaced extents show up as a mismatch.
pub fn pattern(id: &str, offset: u64) -> Vec<u8> {
    let mut state = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }) ^ offset.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(CHUNK as usize);
    while out.len() < CHUNK as usize {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out
}

/// The offsets the demo writes: the first, a middle and the last MiB of the volume (so the
/// data lands on different extents and, for a volume spanning areas, on different areas).
pub fn offsets(size: u64) -> Vec<u64> {
    let last = size.saturating_sub(CHUNK) / CHUNK * CHUNK;
    let mut v = vec![0, size / 2 / CHUNK * CHUNK, last];
    v.dedup();
    v
}

/// Writes the pattern through the NBD export and reads it back. Returns whether the pattern
/// of a previous run was already there (checked before writing).
pub async fn write_and_verify(nbd_uri: &str, volume_id: &str, size: u64) -> Result<bool> {
    let (socket, export) = parse_nbd_unix_uri(nbd_uri)?;
    let client = NbdClient::connect_unix(&socket, &export)
        .await
        .with_context(|| format!("connecting to {nbd_uri}"))?;
    if client.size() < size {
        bail!(
            "{nbd_uri} exports {} bytes, less than the volume's {size}",
            client.size()
        );
    }
    let mut resumed = true;
    for &off in &offsets(size) {
        let got = client.read(off, CHUNK as u32).await?;
        if got[..] != pattern(volume_id, off)[..] {
            resumed = false;
        }
    }
    for &off in &offsets(size) {
        client
            .write(off, Bytes::from(pattern(volume_id, off)), false)
            .await
            .with_context(|| format!("writing at {off} through {nbd_uri}"))?;
    }
    client.flush().await.context("flushing")?;
    for &off in &offsets(size) {
        let got = client
            .read(off, CHUNK as u32)
            .await
            .with_context(|| format!("reading at {off} through {nbd_uri}"))?;
        if got[..] != pattern(volume_id, off)[..] {
            bail!("data read back at offset {off} of {volume_id} differs from what was written");
        }
    }
    Ok(resumed)
}

/// Where the demo's volumes are, for the footer of the status view.
pub fn footer(endpoints: &Endpoints, data_dir: &Path, provisioned: &[Provisioned]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "kubectl --kubeconfig {} get tessera -A\nendpoints: {}\n",
        endpoints.kubeconfig.display(),
        data_dir.join("endpoints.json").display()
    ));
    for p in provisioned {
        out.push_str(&format!(
            "{} ({}): {}\n",
            p.volume.name, p.volume_id, p.nbd_uri
        ));
    }
    out
}

/// The staging directory `tessera local` uses for a volume on a node.
pub fn staging_path(data_dir: &Path, node: &str, volume_id: &str) -> PathBuf {
    data_dir.join(node).join("staging").join(volume_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_fits_the_pool_and_spans_areas() {
        let nodes: Vec<String> = ["node-a", "node-b", "node-c"].map(String::from).to_vec();
        let p = plan(&nodes, 1 << 30);
        assert_eq!(p[0].size_bytes, 3 << 29);
        assert_eq!(p[0].node, "node-a");
        assert_eq!(p[1].size_bytes, 1 << 30);
        assert_eq!(p[1].node, "node-c");
        let one = plan(&nodes[..1], 1 << 30);
        let total: u64 = one.iter().map(|v| v.size_bytes).sum();
        assert!(total <= 2 << 30, "{one:?}");
        assert!(
            one.iter()
                .all(|v| v.size_bytes % EXTENT == 0 && v.node == "node-a")
        );
    }

    #[test]
    fn pattern_depends_on_volume_and_offset() {
        assert_eq!(pattern("v", 0), pattern("v", 0));
        assert_ne!(pattern("v", 0), pattern("v", CHUNK));
        assert_ne!(pattern("v", 0), pattern("w", 0));
        assert_eq!(pattern("v", 0).len(), CHUNK as usize);
        assert_eq!(offsets(3 << 29), vec![0, 768 << 20, (1536 - 1) << 20]);
    }
}
