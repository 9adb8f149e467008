//! The status tables of `tessera get` and of `tessera local --demo`: pools with capacity by
//! state (seed 000's accounting: allocated, in use, high-priority, unallocated), areas, claims,
//! and volumes with their mapping runs and usage. Rendering is pure (objects in, `String` out).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tessera_api::v1alpha1::{StorageArea, StorageClaim, StoragePool, VirtualVolume, VolumeMapping};

use crate::units::bytes;

/// Column-aligned text; a cell may hold several lines (the row grows, other cells stay blank).
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                for line in cell.lines() {
                    widths[i] = widths[i].max(line.chars().count());
                }
            }
        }
        let mut out = String::new();
        let mut emit = |cells: &[&str]| {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < cells.len() {
                    line.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count()));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        };
        let headers: Vec<&str> = self.headers.iter().map(String::as_str).collect();
        emit(&headers);
        for row in &self.rows {
            let lines: Vec<Vec<&str>> = (0..cols)
                .map(|i| row.get(i).map(|c| c.lines().collect()).unwrap_or_default())
                .collect();
            let height = lines.iter().map(Vec::len).max().unwrap_or(0).max(1);
            for l in 0..height {
                let cells: Vec<&str> = lines
                    .iter()
                    .map(|c| c.get(l).copied().unwrap_or(""))
                    .collect();
                emit(&cells);
            }
        }
        out
    }
}

fn condition_status(conditions: &[Condition], kind: &str) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "-".into())
}

fn or_dash(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

/// Pools: capacity by state and readiness.
pub fn pools(pools: &[StoragePool]) -> String {
    let mut t = Table::new(&[
        "POOL",
        "TOTAL",
        "ALLOCATED",
        "IN USE",
        "HIGH PRIO",
        "UNALLOCATED",
        "AREAS",
        "VOLUMES",
        "READY",
    ]);
    for p in pools {
        let s = p.status.clone().unwrap_or_default();
        t.row(vec![
            p.name_any(),
            bytes(s.total_bytes),
            bytes(s.allocated_bytes),
            bytes(s.in_use_bytes),
            bytes(s.high_priority_bytes),
            bytes(s.unallocated_bytes),
            format!("{}/{} online", s.online_areas, s.areas),
            s.volumes.to_string(),
            condition_status(&s.conditions, "Ready"),
        ]);
    }
    t.render()
}

/// Areas: where the pool's capacity comes from.
pub fn areas(areas: &[StorageArea]) -> String {
    let mut t = Table::new(&[
        "AREA",
        "NODE",
        "POOL",
        "MEDIA",
        "CAPACITY",
        "ALLOCATED",
        "PHASE",
        "EXTENT SERVER",
    ]);
    for a in areas {
        let s = a.status.clone().unwrap_or_default();
        t.row(vec![
            a.name_any(),
            a.spec.node_name.clone(),
            a.spec.pool_name.clone(),
            a.spec.media_type.clone(),
            s.capacity_bytes.map(bytes).unwrap_or_else(|| "-".into()),
            s.allocated_bytes.map(bytes).unwrap_or_else(|| "-".into()),
            s.phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "-".into()),
            or_dash(s.extent_server.as_deref()),
        ]);
    }
    t.render()
}

/// Claims: what was asked for and what became of it.
pub fn claims(claims: &[StorageClaim]) -> String {
    let mut t = Table::new(&["CLAIM", "SIZE", "CLASS", "PHASE", "VOLUME"]);
    for c in claims {
        let s = c.status.clone().unwrap_or_default();
        let mut phase = s
            .phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "Pending".into());
        if let Some(reason) = s.reason.as_deref().filter(|r| !r.is_empty()) {
            phase = format!("{phase} ({reason})");
        }
        t.row(vec![
            format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()),
            bytes(c.spec.size_bytes),
            c.spec.priority_class_name.clone(),
            phase,
            or_dash(s.volume_name.as_deref()),
        ]);
    }
    t.render()
}

/// One line per mapped run: `0-1GiB→node-a-area-0@0` (replicas joined with `+`).
pub fn mapping_runs(mapping: &VolumeMapping) -> Vec<String> {
    mapping
        .extents
        .iter()
        .map(|run| {
            let replicas = if run.replicas.is_empty() {
                "unplaced".to_string()
            } else {
                run.replicas
                    .iter()
                    .map(|r| format!("{}@{}", r.area, bytes(r.area_offset)))
                    .collect::<Vec<_>>()
                    .join("+")
            };
            format!(
                "{}-{}→{}",
                bytes(run.offset),
                bytes(run.offset + run.length),
                replicas
            )
        })
        .collect()
}

/// Volumes: phase, where they are attached, the committed mapping and usage.
pub fn volumes(volumes: &[VirtualVolume]) -> String {
    let mut t = Table::new(&[
        "VOLUME",
        "SIZE",
        "CLASS",
        "PHASE",
        "NODE",
        "GEN",
        "MAPPING",
        "USAGE (in-use/high)",
    ]);
    for v in volumes {
        let s = v.status.clone().unwrap_or_default();
        let nodes = v.spec.access_nodes();
        let (generation, mapping) = match &s.mapping {
            Some(m) => (m.generation.to_string(), mapping_runs(m).join("\n")),
            None => ("-".into(), "-".into()),
        };
        let usage = s
            .usage
            .as_ref()
            .map(|u| format!("{}/{}", bytes(u.in_use_bytes), bytes(u.high_priority_bytes)))
            .unwrap_or_else(|| "-".into());
        t.row(vec![
            v.name_any(),
            bytes(v.spec.size_bytes),
            v.spec.priority_class_name.clone(),
            s.phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Pending".into()),
            if nodes.is_empty() {
                "-".into()
            } else {
                nodes.join(",")
            },
            generation,
            if mapping.is_empty() {
                "-".into()
            } else {
                mapping
            },
            usage,
        ]);
    }
    t.render()
}

/// Everything the status view shows, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub pools: Vec<StoragePool>,
    pub areas: Vec<StorageArea>,
    pub claims: Vec<StorageClaim>,
    pub volumes: Vec<VirtualVolume>,
}

impl Snapshot {
    pub async fn fetch(client: &kube::Client) -> Result<Self, kube::Error> {
        let lp = ListParams::default();
        let mut snap = Snapshot {
            pools: Api::<StoragePool>::all(client.clone())
                .list(&lp)
                .await?
                .items,
            areas: Api::<StorageArea>::all(client.clone())
                .list(&lp)
                .await?
                .items,
            claims: Api::<StorageClaim>::all(client.clone())
                .list(&lp)
                .await?
                .items,
            volumes: Api::<VirtualVolume>::all(client.clone())
                .list(&lp)
                .await?
                .items,
        };
        snap.pools.sort_by_key(|p| p.name_any());
        snap.areas.sort_by_key(|a| a.name_any());
        snap.claims
            .sort_by_key(|c| (c.namespace().unwrap_or_default(), c.name_any()));
        snap.volumes.sort_by_key(|v| v.name_any());
        Ok(snap)
    }

    /// The full status view: pools, areas, claims, volumes.
    pub fn render(&self) -> String {
        format!(
            "POOLS\n{}\nAREAS\n{}\nCLAIMS\n{}\nVOLUMES\n{}",
            pools(&self.pools),
            areas(&self.areas),
            claims(&self.claims),
            volumes(&self.volumes)
        )
    }
}
