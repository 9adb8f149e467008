//! Local files of the agent: the mapping cache `<state-dir>/mappings/<id>.json` (ARCHITECTURE
//! §4: a restarted node plugin serves its volumes at the cached generation even while the API is
//! unreachable, §8), `<state-dir>/node.json` (what `tessera local` publishes) and the dirty bits
//! of unstaged mirror volumes `<state-dir>/dirty/<id>.bits` (seed 003; `agent::mirror`).
//!
//! Every file is replaced atomically: written to a temporary file, fsynced, renamed, and the
//! directory fsynced, so a crash leaves the old or the new content, never a torn one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};
use tessera_api::model::{ExtentMap, Generation};
use tessera_api::v1alpha1::VolumeMapping;

use crate::engine::gate::{HoldRecord, HoldScope, OpRef};

use super::staging::Capability;
use super::{Agent, AgentError};

/// One cached staged volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedVolume {
    pub volume_id: String,
    pub size_bytes: i64,
    /// The applied mapping (its generation is the applied generation).
    pub mapping: VolumeMapping,
    pub staging_path: PathBuf,
    pub capability: Capability,
    /// Targets the volume was published at.
    #[serde(default)]
    pub published: Vec<PathBuf>,
    /// The I/O gate's hold record while a remap holds the volume (seed 004 §11.4): a restarted
    /// plugin comes back held from it. `mapping` is then the hold's active map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<CachedHold>,
    /// The volume had a mirror leg (seed 003): a restart must set it up again before serving.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mirror_primary: bool,
    /// The volume was staged as a mirror secondary, its writes tracked (seed 003 §4.1 step 3):
    /// a restart tracks again even when the VirtualVolume cannot be read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mirror_secondary: bool,
}

/// [`HoldRecord`] in the cache file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedHold {
    pub operation_id: String,
    pub attempt: u32,
    pub generation: u64,
    /// Held extent index ranges `[start, end)`; absent: the whole volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extents: Option<Vec<[u64; 2]>>,
    /// The map from before the hold's commit, while a rollback is still possible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<SizedMapping>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<SizedMapping>,
    #[serde(default)]
    pub fenced: bool,
    #[serde(default)]
    pub rolled_back: bool,
}

/// A mapping with the volume size it was made for (maps of one hold may differ in size).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SizedMapping {
    pub size_bytes: i64,
    pub mapping: VolumeMapping,
}

impl CachedHold {
    pub fn from_record(record: &HoldRecord) -> Result<CachedHold, String> {
        let wire = |map: &Option<Arc<ExtentMap>>| {
            map.as_ref()
                .map(|m| {
                    Ok::<_, String>(SizedMapping {
                        size_bytes: m.size_bytes() as i64,
                        mapping: VolumeMapping::from_model(m).map_err(|e| e.to_string())?,
                    })
                })
                .transpose()
        };
        Ok(CachedHold {
            operation_id: record.op.operation_id.clone(),
            attempt: record.op.attempt,
            generation: record.op.generation.get(),
            extents: match &record.scope {
                HoldScope::WholeVolume => None,
                HoldScope::Extents(ranges) => {
                    Some(ranges.iter().map(|r| [r.start, r.end]).collect())
                }
            },
            previous: wire(&record.previous)?,
            staged: wire(&record.staged)?,
            fenced: record.fenced,
            rolled_back: record.rolled_back,
        })
    }

    /// The gate's record; `active` is the cached volume's mapping.
    pub fn to_record(&self, volume: &str, active: Arc<ExtentMap>) -> Result<HoldRecord, String> {
        let model = |m: &Option<SizedMapping>| -> Result<Option<Arc<ExtentMap>>, String> {
            m.as_ref()
                .map(|m| {
                    m.mapping
                        .to_model(m.size_bytes)
                        .map(Arc::new)
                        .map_err(|e| e.to_string())
                })
                .transpose()
        };
        Ok(HoldRecord {
            volume: volume.to_string(),
            op: OpRef::new(
                self.operation_id.clone(),
                self.attempt,
                Generation(self.generation),
            ),
            scope: match &self.extents {
                None => HoldScope::WholeVolume,
                Some(ranges) => HoldScope::extents(ranges.iter().map(|[s, e]| *s..*e).collect()),
            },
            active,
            previous: model(&self.previous)?,
            staged: model(&self.staged)?,
            fenced: self.fenced,
            rolled_back: self.rolled_back,
        })
    }
}

/// `<dir>/<file>` replaced atomically (see the module docs).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AgentError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| AgentError::io(format!("write {}", path.display()), e))
}

fn mapping_path(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join("mappings").join(format!("{volume}.json"))
}

pub(crate) fn store(state_dir: &Path, entry: &CachedVolume) -> Result<(), AgentError> {
    let data = serde_json::to_vec_pretty(entry)
        .map_err(|e| AgentError::InvalidConfig(format!("serializing the mapping cache: {e}")))?;
    write_atomic(&mapping_path(state_dir, &entry.volume_id), &data)
}

pub(crate) fn remove(state_dir: &Path, volume: &str) -> Result<(), AgentError> {
    let path = mapping_path(state_dir, volume);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(AgentError::io(format!("remove {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Every cached volume; unreadable entries are logged and skipped.
pub fn load_all(state_dir: &Path) -> Vec<CachedVolume> {
    let dir = state_dir.join("mappings");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|data| {
                serde_json::from_slice::<CachedVolume>(&data).map_err(|e| e.to_string())
            }) {
            Ok(cached) => out.push(cached),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "unreadable mapping cache entry")
            }
        }
    }
    out.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    out
}

/// Dirty bits of a tracked volume (mirror primary or secondary) that were not acknowledged when
/// it was unstaged: CollectDirty answers from them until the operator acknowledges `sequence`.
#[derive(Debug, Clone, PartialEq)]
pub struct DirtyFile {
    /// The sequence of the answer these bits are; its acknowledgement deletes the file.
    pub sequence: u64,
    /// False when the node could not vouch for its bits (restarted while tracking).
    pub complete: bool,
    pub extents: RoaringBitmap,
}

/// `magic | sequence (u64 LE) | complete (u8) | portable roaring`.
const DIRTY_MAGIC: &[u8; 8] = b"TSDIRTY1";
const DIRTY_HEADER: usize = DIRTY_MAGIC.len() + 8 + 1;

impl DirtyFile {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DIRTY_HEADER + self.extents.serialized_size());
        out.extend_from_slice(DIRTY_MAGIC);
        out.extend_from_slice(&self.sequence.to_le_bytes());
        out.push(u8::from(self.complete));
        self.extents
            .serialize_into(&mut out)
            .expect("writing to a Vec does not fail");
        out
    }

    pub fn decode(data: &[u8]) -> Result<DirtyFile, String> {
        if data.len() < DIRTY_HEADER || &data[..DIRTY_MAGIC.len()] != DIRTY_MAGIC {
            return Err("not a dirty-bits file".into());
        }
        let mut sequence = [0u8; 8];
        sequence.copy_from_slice(&data[DIRTY_MAGIC.len()..DIRTY_MAGIC.len() + 8]);
        let complete = match data[DIRTY_HEADER - 1] {
            0 => false,
            1 => true,
            other => return Err(format!("complete flag {other}")),
        };
        let extents =
            RoaringBitmap::deserialize_from(&data[DIRTY_HEADER..]).map_err(|e| e.to_string())?;
        Ok(DirtyFile {
            sequence: u64::from_le_bytes(sequence),
            complete,
            extents,
        })
    }
}

fn dirty_path(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join("dirty").join(format!("{volume}.bits"))
}

pub(crate) fn store_dirty(
    state_dir: &Path,
    volume: &str,
    file: &DirtyFile,
) -> Result<(), AgentError> {
    write_atomic(&dirty_path(state_dir, volume), &file.encode())
}

/// The dirty file of `volume`, if any. An unreadable one says "incomplete" (the operator then
/// treats every extent as dirty) rather than nothing: its bits are unknown, not absent.
pub(crate) fn load_dirty(state_dir: &Path, volume: &str) -> Option<DirtyFile> {
    let path = dirty_path(state_dir, volume);
    let decoded = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => Err(e.to_string()),
        Ok(data) => DirtyFile::decode(&data),
    };
    Some(decoded.unwrap_or_else(|error| {
        tracing::warn!(path = %path.display(), %error, "unreadable dirty-bits file");
        DirtyFile {
            sequence: 1,
            complete: false,
            extents: RoaringBitmap::new(),
        }
    }))
}

pub(crate) fn remove_dirty(state_dir: &Path, volume: &str) -> Result<(), AgentError> {
    let path = dirty_path(state_dir, volume);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(AgentError::io(format!("remove {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// The `volumes` entries of node.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeJsonVolume {
    pub nbd_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub staging_path: String,
}

/// `<state-dir>/node.json` (contract in docs/node-agent.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeJson {
    pub node_id: String,
    pub csi_socket: String,
    pub extent_server: String,
    pub control_endpoint: String,
    pub volumes: BTreeMap<String, NodeJsonVolume>,
}

/// Rewrites node.json from the staged registry.
pub(crate) async fn write_node_json(agent: &Agent) -> Result<(), AgentError> {
    let volumes = {
        let staged = agent.staged.lock().await;
        staged.node_json_volumes()
    };
    write_node_json_with(agent, volumes)
}

pub(crate) fn write_node_json_with(
    agent: &Agent,
    volumes: BTreeMap<String, NodeJsonVolume>,
) -> Result<(), AgentError> {
    let doc = NodeJson {
        node_id: agent.config.node_id.clone(),
        csi_socket: agent.config.csi_socket.display().to_string(),
        extent_server: agent.extent_endpoint(),
        control_endpoint: agent.control_endpoint(),
        volumes,
    };
    let data = serde_json::to_vec_pretty(&doc)
        .map_err(|e| AgentError::InvalidConfig(format!("serializing node.json: {e}")))?;
    write_atomic(&agent.config.state_dir.join("node.json"), &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dirty_file_round_trips_and_an_unreadable_one_reads_as_incomplete() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(load_dirty(dir.path(), "v"), None);
        let file = DirtyFile {
            sequence: 1_700_000_000_000_007,
            complete: true,
            extents: [0u32, 3, 70_000].into_iter().collect(),
        };
        store_dirty(dir.path(), "v", &file).expect("stored");
        assert_eq!(load_dirty(dir.path(), "v"), Some(file));
        // Torn or foreign content: its bits are unknown, so the answer must say incomplete.
        std::fs::write(dir.path().join("dirty/v.bits"), b"TSDIRTY1\x01").expect("write");
        let unreadable = load_dirty(dir.path(), "v").expect("still reported");
        assert!(!unreadable.complete && unreadable.extents.is_empty());
        remove_dirty(dir.path(), "v").expect("removed");
        remove_dirty(dir.path(), "v").expect("removing twice is fine");
        assert_eq!(load_dirty(dir.path(), "v"), None);
    }
}
