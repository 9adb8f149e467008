//! This node's areas: the `--areas-file`, opening each file or device, the StorageArea objects
//! and their status (seed 001 registration [0022]–[0023]; seed 002 liveness [0108]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_api::model::{AreaId, SECTOR_SIZE};
use tessera_api::v1alpha1::{AreaPhase, StorageArea, StorageAreaSpec, StoragePool};

use super::{Agent, AgentConfig, AgentError};
use crate::backend::{AreaBackend, LocalArea, LocalAreaOptions};

/// One entry of the `--areas-file` YAML list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AreaConfig {
    pub name: String,
    pub path: PathBuf,
    /// Files are created sparse at this size; for a block device, omit it for the whole device.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default = "default_media")]
    pub media_type: String,
    pub pool_name: String,
    #[serde(default)]
    pub domain: Option<String>,
}

fn default_media() -> String {
    "ssd".into()
}

/// Reads the areas file.
pub fn load_areas_file(path: &Path) -> Result<Vec<AreaConfig>, AgentError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AgentError::io(format!("read {}", path.display()), e))?;
    let areas: Vec<AreaConfig> = serde_yaml::from_str(&text)
        .map_err(|e| AgentError::InvalidConfig(format!("areas file {}: {e}", path.display())))?;
    let mut names = std::collections::BTreeSet::new();
    for area in &areas {
        if area.name.is_empty() || !area.path.is_absolute() {
            return Err(AgentError::InvalidConfig(format!(
                "areas file {}: area {:?} needs a name and an absolute path",
                path.display(),
                area.name
            )));
        }
        if !names.insert(area.name.clone()) {
            return Err(AgentError::InvalidConfig(format!(
                "areas file {}: area {} is listed twice",
                path.display(),
                area.name
            )));
        }
    }
    Ok(areas)
}

/// An area this node opened.
pub struct OpenedArea {
    pub id: AreaId,
    pub config: AreaConfig,
    pub backend: Arc<dyn AreaBackend>,
    /// Identity of the area on this node (kept in `<state-dir>/areas/<name>.uid`).
    pub uid: String,
    /// The file or device existed before this start (it may hold data: an area without an
    /// ownership ledger adopts its owners instead of starting empty, `ownership`).
    pub preexisting: bool,
}

/// Opens (creating sparse files as needed) every configured area.
pub(crate) async fn open_all(config: &AgentConfig) -> Result<Vec<OpenedArea>, AgentError> {
    let mut out = Vec::new();
    for area in &config.areas {
        let area = area.clone();
        let state_dir = config.state_dir.clone();
        let opened = tokio::task::spawn_blocking(move || open_one(&state_dir, area))
            .await
            .map_err(|e| AgentError::InvalidConfig(format!("opening areas: {e}")))??;
        out.push(opened);
    }
    Ok(out)
}

fn open_one(state_dir: &Path, area: AreaConfig) -> Result<OpenedArea, AgentError> {
    if let Some(parent) = area.path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| AgentError::io(format!("create {}", parent.display()), e))?;
    }
    let size = area.size_bytes.map(|s| s - s % SECTOR_SIZE);
    let preexisting = area.path.exists();
    let backend = LocalArea::open(
        area.name.as_str(),
        &area.path,
        &LocalAreaOptions {
            size_bytes: size,
            ..Default::default()
        },
    )
    .map_err(|e| {
        AgentError::io(
            format!("open area {} at {}", area.name, area.path.display()),
            e,
        )
    })?;
    // The area's identity. A header inside the area would follow the device when it moves; the
    // extents start at byte 0 today, so it lives beside the state instead (docs/node-agent.md).
    let uid_path = state_dir.join("areas").join(format!("{}.uid", area.name));
    let uid = match std::fs::read_to_string(&uid_path) {
        Ok(uid) if !uid.trim().is_empty() => uid.trim().to_string(),
        _ => {
            let uid = uuid::Uuid::new_v4().to_string();
            super::cache::write_atomic(&uid_path, uid.as_bytes())?;
            uid
        }
    };
    Ok(OpenedArea {
        id: AreaId::new(area.name.clone()),
        config: area,
        backend: Arc::new(backend),
        uid,
        preexisting,
    })
}

/// Creates each StorageArea if absent (spec from the file, `nodeName` = this node) and writes
/// its first status.
pub(crate) async fn register_all(agent: &Agent, areas: &[OpenedArea]) -> Result<(), AgentError> {
    let api: Api<StorageArea> = Api::all(agent.client.clone());
    for area in areas {
        let name = area.id.as_str();
        match api
            .get_opt(name)
            .await
            .map_err(|e| AgentError::api(format!("get StorageArea {name}"), e))?
        {
            Some(existing) if existing.spec.node_name != agent.config.node_id => {
                return Err(AgentError::InvalidConfig(format!(
                    "StorageArea {name} belongs to node {}, not {}",
                    existing.spec.node_name, agent.config.node_id
                )));
            }
            Some(_) => {}
            None => {
                let object = StorageArea::new(
                    name,
                    StorageAreaSpec {
                        node_name: agent.config.node_id.clone(),
                        path: area.config.path.display().to_string(),
                        size_bytes: area.config.size_bytes.map(|s| s as i64),
                        media_type: area.config.media_type.clone(),
                        domain: area.config.domain.clone(),
                        pool_name: area.config.pool_name.clone(),
                    },
                );
                match api.create(&PostParams::default(), &object).await {
                    Ok(_) => tracing::info!(area = name, "StorageArea created"),
                    // Created concurrently (a restart racing itself): fine.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => {
                        return Err(AgentError::api(format!("create StorageArea {name}"), e));
                    }
                }
            }
        }
        heartbeat(agent, area).await?;
    }
    Ok(())
}

/// Whole extents of the pool the area holds (the pool's extent size; sectors when the pool is
/// not there yet).
async fn capacity(agent: &Agent, area: &OpenedArea) -> u64 {
    let size = area.backend.size_bytes();
    let pools: Api<StoragePool> = Api::all(agent.client.clone());
    let extent = match pools.get_opt(&area.config.pool_name).await {
        Ok(Some(pool)) => u64::try_from(pool.spec.extent_size_bytes).unwrap_or(SECTOR_SIZE),
        _ => SECTOR_SIZE,
    }
    .max(1);
    size - size % extent
}

/// One heartbeat of an area: Online, capacity, identity, extent server, time.
pub(crate) async fn heartbeat(agent: &Agent, area: &OpenedArea) -> Result<(), AgentError> {
    let api: Api<StorageArea> = Api::all(agent.client.clone());
    let capacity = capacity(agent, area).await;
    let patch = json!({"status": {
        "phase": AreaPhase::Online,
        "capacityBytes": capacity,
        "areaUid": area.uid,
        "extentServer": agent.extent_endpoint(),
        "lastHeartbeatTime": Time(k8s_openapi::jiff::Timestamp::now()),
    }});
    api.patch_status(
        area.id.as_str(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|e| AgentError::api(format!("heartbeat StorageArea {}", area.id), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_areas_file_parses_and_rejects_duplicates_and_relative_paths() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("areas.yaml");
        std::fs::write(
            &file,
            "- name: a0\n  path: /data/a0.img\n  sizeBytes: 1048576\n  poolName: default\n  domain: z1\n\
             - name: a1\n  path: /dev/sdb\n  mediaType: nvme\n  poolName: fast\n",
        )
        .expect("write");
        let areas = load_areas_file(&file).expect("parses");
        assert_eq!(areas.len(), 2);
        assert_eq!(areas[0].size_bytes, Some(1 << 20));
        assert_eq!(areas[0].media_type, "ssd");
        assert_eq!(areas[0].domain.as_deref(), Some("z1"));
        assert_eq!(areas[1].size_bytes, None);
        assert_eq!(areas[1].media_type, "nvme");

        std::fs::write(
            &file,
            "- {name: a, path: /x, poolName: p}\n- {name: a, path: /y, poolName: p}\n",
        )
        .expect("write");
        assert!(matches!(
            load_areas_file(&file),
            Err(AgentError::InvalidConfig(_))
        ));
        std::fs::write(&file, "- {name: a, path: rel/x, poolName: p}\n").expect("write");
        assert!(matches!(
            load_areas_file(&file),
            Err(AgentError::InvalidConfig(_))
        ));
        std::fs::write(&file, "- {name: a, path: /x, poolName: p, bogus: 1}\n").expect("write");
        assert!(matches!(
            load_areas_file(&file),
            Err(AgentError::InvalidConfig(_))
        ));
    }
}
