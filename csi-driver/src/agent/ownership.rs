//! The lender's extent ownership ledger: which volume (by `metadata.uid`) each byte range of this
//! node's areas was last handed to. Extents go back to the pool with their old bytes on disk
//! (deletion, reclaim release, D-17); ARCHITECTURE §4 promises that unwritten space reads as
//! zeros, so an extent is **zeroed before it changes owner**, and only then recorded, granted to
//! peers ([`super::grants`]) or opened by the local engine ([`super::staging`]).
//!
//! - Lazy: nothing happens when a volume is deleted; the next owner triggers the zeroing.
//! - Order: zero (durable) → record (atomic file replace) → grant / open. A crash between zeroing
//!   and recording zeroes again next time; the new owner was not granted yet, so that is harmless.
//! - Free (unmapped) ranges keep their last owner.
//! - A missing ledger for an area file that already existed (upgrade, lost state) is **adopted**
//!   from the committed mappings without zeroing: live data is never zeroed. A freshly created
//!   area starts with an empty ledger (its file is new and sparse: zeros already).
//! - Ownership changes are checked against a fresh read of the volume, taken under the ledger
//!   lock: a watch event may be stale (an old owner's last mapping delivered after the range was
//!   released and claimed by its next owner) and must not zero the next owner's data.
//!
//! File: `<state-dir>/areas/<area>.owners.json`, `{"area", "owners": [{"offset", "length",
//! "uid"}]}` (byte runs, coalesced). docs/node-agent.md "Extent ownership", D-35.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use serde::{Deserialize, Serialize};
use tessera_api::model::{AreaId, ExtentMap, Generation};
use tessera_api::v1alpha1::VirtualVolume;
use tessera_nbd::Permission;
use tokio::sync::Mutex;

use super::areas::OpenedArea;
use super::{Agent, AgentError};
use crate::backend::{AreaBackend, BackendError};

/// Byte runs of one area and their last owner (a volume uid). Gaps have no known owner.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// start → (end, uid); runs never overlap and adjacent runs of one owner are merged.
    runs: BTreeMap<u64, (u64, String)>,
}

impl Ledger {
    /// `range` cut at owner boundaries, each part with its owner (`None`: unknown).
    pub fn parts(&self, range: Range<u64>) -> Vec<(Range<u64>, Option<&str>)> {
        let mut out = Vec::new();
        if range.start >= range.end {
            return out;
        }
        let before = self
            .runs
            .range(..range.start)
            .next_back()
            .filter(|(_, (end, _))| *end > range.start);
        let mut cursor = range.start;
        for (&start, (end, uid)) in before
            .into_iter()
            .chain(self.runs.range(range.start..range.end))
        {
            let start = start.max(range.start);
            if start > cursor {
                out.push((cursor..start, None));
            }
            let end = (*end).min(range.end);
            out.push((start..end, Some(uid.as_str())));
            cursor = end;
        }
        if cursor < range.end {
            out.push((cursor..range.end, None));
        }
        out
    }

    /// The parts of `range` not owned by `uid` (merged).
    pub fn foreign(&self, range: Range<u64>, uid: &str) -> Vec<Range<u64>> {
        merge(
            self.parts(range)
                .into_iter()
                .filter(|(_, owner)| *owner != Some(uid))
                .map(|(r, _)| r),
        )
    }

    /// The parts of `range` owned by `uid` (merged).
    pub fn owned(&self, range: Range<u64>, uid: &str) -> Vec<Range<u64>> {
        merge(
            self.parts(range)
                .into_iter()
                .filter(|(_, owner)| *owner == Some(uid))
                .map(|(r, _)| r),
        )
    }

    /// Records `uid` as the owner of `range`.
    pub fn assign(&mut self, range: Range<u64>, uid: &str) {
        if range.start >= range.end {
            return;
        }
        let overlapping: Vec<u64> = self
            .runs
            .range(..range.end)
            .rev()
            .take_while(|(_, (end, _))| *end > range.start)
            .map(|(start, _)| *start)
            .collect();
        for start in overlapping {
            let Some((end, owner)) = self.runs.remove(&start) else {
                continue;
            };
            if start < range.start {
                self.runs.insert(start, (range.start, owner.clone()));
            }
            if end > range.end {
                self.runs.insert(range.end, (end, owner));
            }
        }
        let mut start = range.start;
        let mut end = range.end;
        // Merge with neighbours of the same owner.
        if let Some((&prev, (prev_end, owner))) = self.runs.range(..start).next_back()
            && *prev_end == start
            && owner == uid
        {
            start = prev;
            self.runs.remove(&prev);
        }
        if let Some((next_end, owner)) = self.runs.get(&end)
            && owner == uid
        {
            let next_end = *next_end;
            self.runs.remove(&end);
            end = next_end;
        }
        self.runs.insert(start, (end, uid.to_string()));
    }

    fn to_file(&self, area: &AreaId) -> LedgerFile {
        LedgerFile {
            area: area.to_string(),
            owners: self
                .runs
                .iter()
                .map(|(start, (end, uid))| OwnerRun {
                    offset: *start,
                    length: end - start,
                    uid: uid.clone(),
                })
                .collect(),
        }
    }

    fn from_file(file: LedgerFile) -> Ledger {
        let mut ledger = Ledger::default();
        for run in file.owners {
            ledger.assign(run.offset..run.offset.saturating_add(run.length), &run.uid);
        }
        ledger
    }
}

/// Sorted, merged ranges.
fn merge(ranges: impl IntoIterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// `range` minus `cover` (sorted, merged).
fn subtract(range: Range<u64>, cover: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut cursor = range.start;
    for c in cover {
        if c.end <= cursor || c.start >= range.end {
            continue;
        }
        if c.start > cursor {
            out.push(cursor..c.start);
        }
        cursor = cursor.max(c.end);
    }
    if cursor < range.end {
        out.push(cursor..range.end);
    }
    out
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LedgerFile {
    area: String,
    owners: Vec<OwnerRun>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OwnerRun {
    offset: u64,
    length: u64,
    uid: String,
}

struct AreaLedger {
    backend: Arc<dyn AreaBackend>,
    ledger: Ledger,
    /// No ledger file yet and the area held data before: owners come from the mappings.
    adopt: bool,
}

/// The ledgers of this node's areas, behind one lock: zeroing and recording of one change is
/// never interleaved with another change of the same ranges.
pub struct Ownership {
    dir: PathBuf,
    areas: Mutex<BTreeMap<AreaId, AreaLedger>>,
    /// Volume name → uid of the last fresh read ([`Ownership::claim_for_engine`]'s fast path).
    uids: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn ledger_path(dir: &Path, area: &AreaId) -> PathBuf {
    dir.join(format!("{area}.owners.json"))
}

/// Atomic replace (temporary file, fsync, rename, directory fsync).
fn persist(dir: &Path, area: &AreaId, ledger: &Ledger) -> Result<(), AgentError> {
    let data = serde_json::to_vec(&ledger.to_file(area))
        .map_err(|e| AgentError::InvalidConfig(format!("serializing the ledger: {e}")))?;
    super::cache::write_atomic(&ledger_path(dir, area), &data)
}

/// Non-hole ranges of `map` on `areas`, per area (merged).
fn local_ranges(
    map: &ExtentMap,
    is_local: impl Fn(&AreaId) -> bool,
) -> BTreeMap<AreaId, Vec<Range<u64>>> {
    let mut out: BTreeMap<AreaId, Vec<Range<u64>>> = BTreeMap::new();
    for run in map.runs().iter().filter(|r| !r.is_hole()) {
        for replica in run.replicas.iter().filter(|r| is_local(&r.area)) {
            out.entry(replica.area.clone())
                .or_default()
                .push(replica.area_offset..replica.area_offset + run.length);
        }
    }
    out.into_iter().map(|(a, r)| (a, merge(r))).collect()
}

/// The ranges of this node's areas a volume holds: its committed mapping and the destinations
/// of its unfinished remap (`status.incoming`, reserved for it by the operator).
fn volume_ranges(
    volume: &VirtualVolume,
    committed: &ExtentMap,
    is_local: impl Fn(&AreaId) -> bool,
) -> BTreeMap<AreaId, Vec<Range<u64>>> {
    let mut out = local_ranges(committed, &is_local);
    for (area, range) in super::grants::incoming_ranges(volume) {
        if is_local(&area) {
            out.entry(area).or_default().push(range);
        }
    }
    out.into_iter().map(|(a, r)| (a, merge(r))).collect()
}

fn committed_map(volume: &VirtualVolume) -> Option<ExtentMap> {
    let mapping = volume.status.as_ref()?.mapping.as_ref()?;
    mapping.to_model_committed(volume.spec.size_bytes).ok()
}

fn backend_io(error: BackendError) -> std::io::Error {
    match error {
        BackendError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

impl Ownership {
    /// Loads the ledger of every area; an area without one starts empty when its file was just
    /// created and is marked for adoption otherwise ([`Ownership::adopt`]).
    pub(crate) fn open(state_dir: &Path, areas: &[OpenedArea]) -> Result<Ownership, AgentError> {
        let dir = state_dir.join("areas");
        let mut ledgers = BTreeMap::new();
        for area in areas {
            let path = ledger_path(&dir, &area.id);
            let (ledger, adopt) = match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<LedgerFile>(&bytes) {
                    Ok(file) => (Ledger::from_file(file), false),
                    Err(error) => {
                        // Treated as lost: adopting never zeroes live data.
                        tracing::warn!(area = %area.id, path = %path.display(), %error,
                            "unreadable ownership ledger; adopting owners from the mappings");
                        (Ledger::default(), true)
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    (Ledger::default(), area.preexisting)
                }
                Err(e) => return Err(AgentError::io(format!("read {}", path.display()), e)),
            };
            if !adopt && !path.exists() {
                persist(&dir, &area.id, &ledger)?;
            }
            ledgers.insert(
                area.id.clone(),
                AreaLedger {
                    backend: Arc::clone(&area.backend),
                    ledger,
                    adopt,
                },
            );
        }
        Ok(Ownership {
            dir,
            areas: Mutex::new(ledgers),
            uids: Mutex::default(),
        })
    }

    fn persist(&self, area: &AreaId, ledger: &Ledger) -> Result<(), AgentError> {
        persist(&self.dir, area, ledger)
    }

    /// Adopts, for areas marked so, the owners the committed mappings name (no zeroing), and
    /// writes their ledgers. Runs at start, before anything is granted or staged.
    pub(crate) async fn adopt(&self, client: &kube::Client) -> Result<(), AgentError> {
        let mut areas = self.areas.lock().await;
        if !areas.values().any(|a| a.adopt) {
            return Ok(());
        }
        let api: Api<VirtualVolume> = Api::all(client.clone());
        let volumes = api
            .list(&Default::default())
            .await
            .map_err(|e| AgentError::api("list VirtualVolumes (ownership adoption)", e))?;
        for volume in &volumes.items {
            let (Some(uid), Some(map)) = (volume.uid(), committed_map(volume)) else {
                continue;
            };
            let ranges = local_ranges(&map, |a| areas.get(a).is_some_and(|l| l.adopt));
            for (area, ranges) in ranges {
                if let Some(entry) = areas.get_mut(&area) {
                    for range in ranges {
                        entry.ledger.assign(range, &uid);
                    }
                }
            }
        }
        for (id, entry) in areas.iter_mut().filter(|(_, a)| a.adopt) {
            self.persist(id, &entry.ledger)?;
            entry.adopt = false;
            tracing::info!(area = %id, runs = entry.ledger.runs.len(),
                "ownership ledger adopted from the committed mappings (nothing zeroed)");
        }
        Ok(())
    }

    /// Zeroes `parts` (durably), then records `uid` as their owner. Returns the bytes zeroed.
    async fn zero_and_record(
        &self,
        areas: &mut BTreeMap<AreaId, AreaLedger>,
        uid: &str,
        parts: BTreeMap<AreaId, Vec<Range<u64>>>,
        generation: Generation,
    ) -> Result<u64, AgentError> {
        let mut zeroed = 0;
        for (area, ranges) in parts {
            if ranges.is_empty() {
                continue;
            }
            let Some(entry) = areas.get_mut(&area) else {
                continue;
            };
            for range in &ranges {
                let length = range.end - range.start;
                entry
                    .backend
                    .write_zeroes(generation, range.start, length, true)
                    .await
                    .map_err(|e| {
                        AgentError::io(
                            format!("zero {area} {range:?} for its next owner"),
                            backend_io(e),
                        )
                    })?;
                zeroed += length;
            }
            entry
                .backend
                .flush(generation)
                .await
                .map_err(|e| AgentError::io(format!("flush {area}"), backend_io(e)))?;
            for range in ranges {
                entry.ledger.assign(range, uid);
            }
            self.persist(&area, &entry.ledger)?;
        }
        Ok(zeroed)
    }

    /// The watch's step for a committed mapping it saw: ranges of this node's areas the volume
    /// does not own yet are zeroed and recorded — after confirming with a fresh read that the
    /// volume (same uid) still maps them. Returns the bytes zeroed.
    pub(crate) async fn settle_committed(
        &self,
        client: &kube::Client,
        volume: &VirtualVolume,
    ) -> Result<u64, AgentError> {
        let (Some(uid), Some(map)) = (volume.uid(), committed_map(volume)) else {
            return Ok(0);
        };
        let mut areas = self.areas.lock().await;
        let seen = volume_ranges(volume, &map, |a| areas.contains_key(a));
        if !has_foreign(&areas, &seen, &uid) {
            return Ok(0);
        }
        let name = volume.name_any();
        let api: Api<VirtualVolume> = Api::all(client.clone());
        let fresh = api
            .get_opt(&name)
            .await
            .map_err(|e| AgentError::api(format!("get VirtualVolume {name}"), e))?;
        let Some(fresh) = fresh.filter(|f| f.uid().as_deref() == Some(uid.as_str())) else {
            return Ok(0); // Gone or recreated: the event was stale.
        };
        let Some(map) = committed_map(&fresh) else {
            return Ok(0);
        };
        let current = volume_ranges(&fresh, &map, |a| areas.contains_key(a));
        let parts = foreign_parts(&areas, &current, &uid);
        self.zero_and_record(&mut areas, &uid, parts, map.generation())
            .await
    }

    /// Before this node's engine opens `map` of `volume`: ranges of this node's areas the volume
    /// does not own yet are zeroed and recorded. A committed map is checked against a fresh read
    /// of the volume when that read is at least as new (a range it no longer maps is refused); a
    /// newer generation (node-control ApplyMapping ahead of the API read) and a staged map (seed
    /// 004 StageMapping: destinations the operator reserved) are trusted. Returns the bytes
    /// zeroed.
    pub(crate) async fn claim_for_engine(
        &self,
        client: &kube::Client,
        volume: &str,
        map: &ExtentMap,
        committed: bool,
    ) -> Result<u64, AgentError> {
        let mut areas = self.areas.lock().await;
        let wanted = local_ranges(map, |a| areas.contains_key(a));
        if wanted.is_empty() {
            return Ok(0);
        }
        // Fast path (a Stage inside a remap's hold must not wait for the API): every wanted
        // range is already recorded for the uid this volume name had at its last fresh read.
        // Volume names carry a UUID and are never reused, so the name → uid memo cannot
        // stand for another volume.
        if let Some(uid) = self.uids.lock().await.get(volume)
            && foreign_parts(&areas, &wanted, uid).is_empty()
        {
            return Ok(0);
        }
        let api: Api<VirtualVolume> = Api::all(client.clone());
        let fresh = api
            .get_opt(volume)
            .await
            .map_err(|e| AgentError::api(format!("get VirtualVolume {volume}"), e))?
            .ok_or_else(|| AgentError::VolumeNotFound(volume.into()))?;
        let uid = fresh
            .uid()
            .ok_or_else(|| AgentError::VolumeNotFound(volume.into()))?;
        self.uids
            .lock()
            .await
            .insert(volume.to_string(), uid.clone());
        let parts = foreign_parts(&areas, &wanted, &uid);
        if parts.values().all(Vec::is_empty) {
            return Ok(0);
        }
        let current = committed_map(&fresh);
        // The fresh read can only refute a map it is at least as new as: a newer generation
        // offered by the operator (node-control ApplyMapping) is trusted like a staged map.
        let verifiable = current
            .as_ref()
            .is_some_and(|c| c.generation() >= map.generation());
        if committed && verifiable {
            let current_ranges = current
                .as_ref()
                .map(|m| local_ranges(m, |a| areas.contains_key(a)))
                .unwrap_or_default();
            for (area, ranges) in &parts {
                let cover = current_ranges.get(area).map(Vec::as_slice).unwrap_or(&[]);
                if let Some(range) = ranges
                    .iter()
                    .find(|r| !subtract((*r).clone(), cover).is_empty())
                {
                    let current_generation = current.as_ref().map(ExtentMap::generation);
                    return Err(match current_generation {
                        Some(g) if g > map.generation() => AgentError::StaleGeneration {
                            volume: volume.into(),
                            offered: map.generation(),
                            current: g,
                        },
                        _ => AgentError::InvalidMapping {
                            volume: volume.into(),
                            reason: format!(
                                "{area} {range:?} is not in the volume's committed mapping"
                            ),
                        },
                    });
                }
            }
        }
        self.zero_and_record(&mut areas, &uid, parts, map.generation())
            .await
    }

    /// Before a remap copies `volume` into `ranges` of this node's areas (CopyExtents): the
    /// parts the volume does not own yet are zeroed and recorded. The destinations are the
    /// operator's reservation (`status.incoming`), trusted like a staged map; claiming them
    /// before the copy is what keeps the later Stage (or the lender's watch) from zeroing the
    /// copied bytes. Returns the bytes zeroed.
    pub(crate) async fn claim_destinations(
        &self,
        client: &kube::Client,
        volume: &str,
        ranges: Vec<(AreaId, Range<u64>)>,
        generation: Generation,
    ) -> Result<u64, AgentError> {
        let mut areas = self.areas.lock().await;
        let mut wanted: BTreeMap<AreaId, Vec<Range<u64>>> = BTreeMap::new();
        for (area, range) in ranges {
            if areas.contains_key(&area) {
                wanted.entry(area).or_default().push(range);
            }
        }
        if wanted.is_empty() {
            return Ok(0);
        }
        let wanted = wanted.into_iter().map(|(a, r)| (a, merge(r))).collect();
        let api: Api<VirtualVolume> = Api::all(client.clone());
        let uid = api
            .get_opt(volume)
            .await
            .map_err(|e| AgentError::api(format!("get VirtualVolume {volume}"), e))?
            .and_then(|v| v.uid())
            .ok_or_else(|| AgentError::VolumeNotFound(volume.into()))?;
        let parts = foreign_parts(&areas, &wanted, &uid);
        self.zero_and_record(&mut areas, &uid, parts, generation)
            .await
    }

    /// The parts of `ranges` the ledger records as owned by `uid` (what may be granted).
    pub(crate) async fn owned_only(
        &self,
        uid: &str,
        ranges: Vec<(AreaId, Range<u64>, Permission)>,
    ) -> Vec<(AreaId, Range<u64>, Permission)> {
        let areas = self.areas.lock().await;
        let mut out = Vec::new();
        for (area, range, permission) in ranges {
            let Some(entry) = areas.get(&area) else {
                continue;
            };
            for part in entry.ledger.owned(range, uid) {
                out.push((area.clone(), part, permission));
            }
        }
        out
    }

    /// A copy of one area's ledger (tests, diagnostics).
    pub async fn ledger(&self, area: &AreaId) -> Option<Ledger> {
        self.areas.lock().await.get(area).map(|a| a.ledger.clone())
    }
}

fn has_foreign(
    areas: &BTreeMap<AreaId, AreaLedger>,
    ranges: &BTreeMap<AreaId, Vec<Range<u64>>>,
    uid: &str,
) -> bool {
    ranges.iter().any(|(area, ranges)| {
        areas.get(area).is_some_and(|entry| {
            ranges
                .iter()
                .any(|r| !entry.ledger.foreign(r.clone(), uid).is_empty())
        })
    })
}

fn foreign_parts(
    areas: &BTreeMap<AreaId, AreaLedger>,
    ranges: &BTreeMap<AreaId, Vec<Range<u64>>>,
    uid: &str,
) -> BTreeMap<AreaId, Vec<Range<u64>>> {
    ranges
        .iter()
        .filter_map(|(area, ranges)| {
            let entry = areas.get(area)?;
            let parts = merge(
                ranges
                    .iter()
                    .flat_map(|r| entry.ledger.foreign(r.clone(), uid)),
            );
            (!parts.is_empty()).then(|| (area.clone(), parts))
        })
        .collect()
}

impl Agent {
    /// The ownership step before this node's engine opens (or grows to) `map` of `volume`: local
    /// backends bypass the extent server's grants, so the zeroing must happen here.
    pub(crate) async fn claim_local_extents(
        &self,
        volume: &str,
        map: &ExtentMap,
        committed: bool,
    ) -> Result<(), AgentError> {
        let zeroed = self
            .ownership
            .claim_for_engine(&self.client, volume, map, committed)
            .await?;
        if zeroed > 0 {
            tracing::info!(
                volume,
                zeroed,
                "extents of this node's areas zeroed for their new owner"
            );
        }
        Ok(())
    }

    /// The ownership ledgers of this node's areas.
    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one-range answers are the point here
    fn assign_splits_and_merges_runs() {
        let mut l = Ledger::default();
        l.assign(0..100, "a");
        l.assign(40..60, "b");
        assert_eq!(
            l.parts(0..100),
            vec![
                (0..40, Some("a")),
                (40..60, Some("b")),
                (60..100, Some("a"))
            ]
        );
        l.assign(40..60, "a");
        assert_eq!(l.runs.len(), 1, "{l:?}");
        assert_eq!(l.parts(0..120), vec![(0..100, Some("a")), (100..120, None)]);
        l.assign(100..120, "a");
        l.assign(130..140, "c");
        assert_eq!(l.foreign(90..150, "a"), vec![120..150]);
        assert_eq!(l.owned(90..150, "a"), vec![90..120]);
        assert_eq!(l.owned(0..200, "c"), vec![130..140]);
    }

    #[test]
    fn assign_over_several_runs_replaces_them() {
        let mut l = Ledger::default();
        l.assign(0..10, "a");
        l.assign(10..20, "b");
        l.assign(20..30, "c");
        l.assign(5..25, "d");
        assert_eq!(
            l.parts(0..30),
            vec![(0..5, Some("a")), (5..25, Some("d")), (25..30, Some("c"))]
        );
        let file = l.to_file(&AreaId::new("x"));
        assert_eq!(Ledger::from_file(file), l);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one-range covers are the point here
    fn subtract_leaves_the_uncovered_parts() {
        assert_eq!(subtract(0..10, &[2..4, 6..8]), vec![0..2, 4..6, 8..10]);
        assert_eq!(subtract(0..10, &[0..10]), Vec::<Range<u64>>::new());
        assert_eq!(subtract(5..10, &[0..6]), vec![6..10]);
    }
}
