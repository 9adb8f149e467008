//! Placement: which area extents hold each replica of a new volume — seed 002 Fig. 7 (virtual
//! volume construction, S701–S712, [0119]–[0127]) with seed 001's usage forms ([0017]–[0020]).
//!
//! Inputs are the pool's areas with their free extent lists (in area extents), the pool's
//! placement policy and the claim's size, copies, layout, media type and preferred node. The
//! output lists, per replica, the pieces `(area, area_offset, len)` that cover the volume in
//! order; [`Placement::to_extent_map`] turns it into the volume's [`ExtentMap`].
//!
//! The walk, for each replica in turn (replica 0 first):
//!
//! 1. **Preferred node** (replica 0 only): if the claim's `preferredNode` can hold the whole
//!    replica, the replica goes there.
//! 2. **One domain (S703–S706, S710–S711)**: domains are tried in `domainOrder`, then the
//!    remaining domains by name; for replicas after the first, domains no earlier replica uses
//!    come first ("different domains when possible"). The first domain that can hold the whole
//!    replica gets it. Inside a domain: one area holding the replica in a contiguous free run if
//!    there is one, else one area holding it in several runs, else (`Concatenated` only) several
//!    areas: the area with the most free space whole, repeatedly, until one area can hold the
//!    rest (seed 001's integrated form, [0018]).
//! 3. **Across domains** (`Concatenated` only, S706 "No" → next SAN, inference of seed 002 §4.5):
//!    when no single domain can hold the replica, it is filled domain by domain in the same
//!    order.
//! 4. **Failure (S712)**: a typed [`PlacementError`] says which constraint failed.
//!
//! Among areas that can hold what is needed, `Pack` takes the fullest (least free space: best
//! fit, keeps large areas for large volumes) and `Spread` the emptiest (most free space: worst
//! fit, balances free space). Within an area the smallest free run that holds the piece is used
//! (best fit), so contiguous runs are preferred and large runs are kept. Ties break by area name.
//!
//! Replicas never share a node: a replica avoids every node an earlier replica of the volume
//! uses (seed 001 [0019]: the duplexed form survives the loss of one server). Placement is
//! greedy replica by replica; it does not backtrack, so a placement that exists may be missed
//! when replica 0's choice blocks the others (docs/planners.md, weak points).

use std::collections::{BTreeMap, BTreeSet};

use tessera_api::model::{ExtentMap, ExtentSize, Generation, MapError, ReplicaLocation, Run};
use tessera_api::v1alpha1::{PlacementPolicy, PlacementStrategy, VolumeLayout};

use super::ExtentRange;
use tessera_api::model::AreaId;

/// One area of the pool as placement sees it (`StorageArea`, seed 002 real volume information
/// 230, Fig. 3, [0058]–[0062]). Only `Online` areas should be passed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AreaCandidate {
    pub area: AreaId,
    /// `spec.nodeName`.
    pub node: String,
    /// `spec.domain` (or the node's zone).
    pub domain: String,
    /// `spec.mediaType` (seed 002 real volume type, [0062]).
    pub media_type: String,
    /// Free extents of the area, in area extents (the controller derives them from the area's
    /// capacity minus every volume's `ExtentMap::area_usage` ranges, see [`free_extents`]).
    /// Must not overlap; order does not matter.
    pub free: Vec<ExtentRange>,
}

/// The free ranges of an area of `capacity` extents, given the ranges already used.
pub fn free_extents(
    capacity: u64,
    used: impl IntoIterator<Item = ExtentRange>,
) -> Vec<ExtentRange> {
    let used = super::coalesce(used.into_iter().collect());
    let mut free = Vec::new();
    let mut cursor = 0;
    for range in used {
        if range.start >= capacity {
            break;
        }
        if range.start > cursor {
            free.push(ExtentRange::new(cursor, range.start - cursor));
        }
        cursor = cursor.max(range.end());
    }
    if cursor < capacity {
        free.push(ExtentRange::new(cursor, capacity - cursor));
    }
    free
}

/// The pool's placement policy (`StoragePool.spec.placement`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlacementRules {
    /// Seed 002 priority order ([0121]).
    pub domain_order: Vec<String>,
    pub strategy: PlacementStrategy,
}

impl From<&PlacementPolicy> for PlacementRules {
    fn from(policy: &PlacementPolicy) -> Self {
        PlacementRules {
            domain_order: policy.domain_order.clone(),
            strategy: policy.strategy,
        }
    }
}

/// The construction conditions (seed 002 S702, [0120]) of one claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementRequest {
    /// Volume size in extents (each replica needs this many).
    pub extents: u64,
    /// 1–3.
    pub copies: u8,
    pub layout: VolumeLayout,
    /// Only areas of this media type; `None`: any.
    pub media_type: Option<String>,
    pub preferred_node: Option<String>,
}

/// A stretch of one replica: `len` extents at `area_offset` (in extents) on `area`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Piece {
    pub area: AreaId,
    pub node: String,
    pub domain: String,
    pub area_offset: u64,
    pub len: u64,
}

impl Piece {
    /// The area extents this piece occupies.
    pub const fn area_range(&self) -> ExtentRange {
        ExtentRange::new(self.area_offset, self.len)
    }
}

/// One replica: pieces in volume order, covering `[0, extents)` of the volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ReplicaPlacement {
    pub pieces: Vec<Piece>,
}

impl ReplicaPlacement {
    pub fn extents(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }

    /// Nodes this replica uses, in name order.
    pub fn nodes(&self) -> BTreeSet<&str> {
        self.pieces.iter().map(|p| p.node.as_str()).collect()
    }

    /// Domains this replica uses, in name order.
    pub fn domains(&self) -> BTreeSet<&str> {
        self.pieces.iter().map(|p| p.domain.as_str()).collect()
    }

    /// Areas this replica uses, in name order.
    pub fn areas(&self) -> BTreeSet<&AreaId> {
        self.pieces.iter().map(|p| &p.area).collect()
    }
}

/// A complete placement: one [`ReplicaPlacement`] per copy, replica 0 first (the preferred read
/// target, seed 002 [0075]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Placement {
    pub extents: u64,
    pub replicas: Vec<ReplicaPlacement>,
}

/// Why a placement could not be turned into an [`ExtentMap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToExtentMapError {
    #[error(
        "a volume of {size_bytes} bytes needs {needed} extents of {extent_size} bytes, \
         the placement covers {placed}"
    )]
    SizeMismatch {
        size_bytes: u64,
        extent_size: u64,
        needed: u64,
        placed: u64,
    },
    #[error("replica {replica} has an empty piece")]
    EmptyPiece { replica: usize },
    #[error(transparent)]
    Map(#[from] MapError),
}

impl Placement {
    /// The runs of the volume's mapping: the volume is cut wherever any replica moves to another
    /// piece, and each run lists every replica's location (seed 004 configuration information,
    /// seed 002 [0070]–[0072]). Offsets in bytes; the last run ends at `size_bytes`.
    pub fn to_runs(
        &self,
        size_bytes: u64,
        extent_size: ExtentSize,
    ) -> Result<Vec<Run>, ToExtentMapError> {
        let needed = extent_size.extents_for(size_bytes);
        let mismatch = |placed| ToExtentMapError::SizeMismatch {
            size_bytes,
            extent_size: extent_size.get(),
            needed,
            placed,
        };
        if needed != self.extents {
            return Err(mismatch(self.extents));
        }
        if let Some(bad) = self.replicas.iter().find(|r| r.extents() != needed) {
            return Err(mismatch(bad.extents()));
        }
        if let Some(replica) = self
            .replicas
            .iter()
            .position(|r| r.pieces.iter().any(|p| p.len == 0))
        {
            return Err(ToExtentMapError::EmptyPiece { replica });
        }
        let es = extent_size.get();
        let bytes = |extents: u64| {
            extents.checked_mul(es).ok_or(MapError::RangeOverflow {
                offset: extents,
                length: es,
            })
        };
        // Per replica: (piece index, extents consumed within the piece).
        let mut cursors = vec![(0usize, 0u64); self.replicas.len()];
        let mut runs = Vec::new();
        let mut position = 0u64;
        while position < needed {
            let mut step = needed - position;
            for (replica, (piece, within)) in self.replicas.iter().zip(&cursors) {
                step = step.min(replica.pieces[*piece].len - within);
            }
            let mut replicas = Vec::with_capacity(self.replicas.len());
            for (replica, (piece, within)) in self.replicas.iter().zip(&mut cursors) {
                let p = &replica.pieces[*piece];
                replicas.push(ReplicaLocation::new(
                    p.area.clone(),
                    bytes(p.area_offset + *within)?,
                ));
                *within += step;
                if *within == p.len {
                    *piece += 1;
                    *within = 0;
                }
            }
            let offset = bytes(position)?;
            let end = bytes(position + step)?.min(size_bytes);
            runs.push(Run::new(offset, end - offset, replicas));
            position += step;
        }
        Ok(runs)
    }

    /// The volume's [`ExtentMap`] at [`Generation::INITIAL`]. The map's own validation checks
    /// again that no area byte is used twice.
    pub fn to_extent_map(
        &self,
        size_bytes: u64,
        extent_size: ExtentSize,
    ) -> Result<ExtentMap, ToExtentMapError> {
        let runs = self.to_runs(size_bytes, extent_size)?;
        Ok(ExtentMap::from_runs(
            size_bytes,
            extent_size,
            Generation::INITIAL,
            runs,
        )?)
    }
}

/// Why nothing was placed (seed 002 S712, [0127]: construction-failure notification). Nothing is
/// reserved when placement fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "the claim requests {extents} extents with {copies} copies; need ≥ 1 extent and 1–3 copies"
    )]
    InvalidRequest { extents: u64, copies: u8 },

    #[error("area {area} appears twice in the placement input")]
    DuplicateArea { area: AreaId },

    #[error("free extents of area {area} overlap: {first} and {second}")]
    OverlappingFreeRanges {
        area: AreaId,
        first: ExtentRange,
        second: ExtentRange,
    },

    #[error("the pool has no online areas")]
    NoAreas,

    #[error("no online area has media type {media_type:?}")]
    NoAreaOfMediaType { media_type: String },

    #[error(
        "{copies} copies must be on {copies} different nodes, but only {nodes} node(s) have free \
         {media} space"
    )]
    NotEnoughNodes {
        copies: u8,
        nodes: usize,
        media: String,
    },

    #[error("the claim needs {needed} extents of {media} space, the pool has {free} free")]
    InsufficientCapacity {
        needed: u64,
        free: u64,
        media: String,
    },

    #[error(
        "layout Single needs one area with {needed} free extents of {media} space; the largest \
         has {largest_free}"
    )]
    NoAreaLargeEnough {
        needed: u64,
        largest_free: u64,
        media: String,
    },

    #[error(
        "replica {replica} of {copies} ({needed} extents) does not fit on nodes the other \
         replicas do not use{}",
        if *.single { " in a single area" } else { "" }
    )]
    ReplicaDoesNotFit {
        replica: usize,
        copies: u8,
        needed: u64,
        single: bool,
    },
}

impl PlacementError {
    /// `StorageClaim.status.reason`.
    pub const fn reason(&self) -> &'static str {
        match self {
            PlacementError::InvalidRequest { .. }
            | PlacementError::DuplicateArea { .. }
            | PlacementError::OverlappingFreeRanges { .. } => "InvalidInput",
            PlacementError::NoAreas | PlacementError::NoAreaOfMediaType { .. } => "NoMatchingArea",
            PlacementError::NotEnoughNodes { .. } | PlacementError::ReplicaDoesNotFit { .. } => {
                "NotEnoughNodes"
            }
            PlacementError::InsufficientCapacity { .. } => "InsufficientCapacity",
            PlacementError::NoAreaLargeEnough { .. } => "NoAreaLargeEnough",
        }
    }
}

/// A mutable working copy of one area's free list.
#[derive(Debug, Clone)]
struct AreaWork<'a> {
    candidate: &'a AreaCandidate,
    /// Sorted, coalesced, non-empty.
    free: Vec<ExtentRange>,
    total: u64,
}

impl AreaWork<'_> {
    fn largest_run(&self) -> u64 {
        self.free.iter().map(|r| r.len).max().unwrap_or(0)
    }

    fn piece(&self, area_offset: u64, len: u64) -> Piece {
        Piece {
            area: self.candidate.area.clone(),
            node: self.candidate.node.clone(),
            domain: self.candidate.domain.clone(),
            area_offset,
            len,
        }
    }

    /// Takes `need` extents from this area (which holds at least that many): from the smallest
    /// run that holds all of it, else from the largest runs first.
    fn take(&mut self, need: u64) -> Vec<Piece> {
        debug_assert!(need <= self.total);
        let best_fit = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, r)| r.len >= need)
            .min_by_key(|(_, r)| (r.len, r.start))
            .map(|(i, _)| i);
        let mut pieces = Vec::new();
        match best_fit {
            Some(i) => pieces.push(self.take_from_run(i, need)),
            None => {
                let mut remaining = need;
                while remaining > 0 {
                    let Some((i, run)) = self
                        .free
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, r)| (r.len, std::cmp::Reverse(r.start)))
                    else {
                        break;
                    };
                    let len = run.len.min(remaining);
                    pieces.push(self.take_from_run(i, len));
                    remaining -= len;
                }
            }
        }
        pieces
    }

    /// Takes everything, in area order.
    fn take_all(&mut self) -> Vec<Piece> {
        let pieces = self
            .free
            .iter()
            .map(|r| self.piece(r.start, r.len))
            .collect();
        self.free.clear();
        self.total = 0;
        pieces
    }

    fn take_from_run(&mut self, index: usize, len: u64) -> Piece {
        let run = self.free[index];
        let piece = self.piece(run.start, len);
        if len == run.len {
            self.free.remove(index);
        } else {
            self.free[index] = ExtentRange::new(run.start + len, run.len - len);
        }
        self.total -= len;
        piece
    }
}

/// Seed 002 Fig. 7: places every replica, or says why it cannot.
pub fn plan_placement(
    areas: &[AreaCandidate],
    request: &PlacementRequest,
    rules: &PlacementRules,
) -> Result<Placement, PlacementError> {
    if request.extents == 0 || !(1..=3).contains(&request.copies) {
        return Err(PlacementError::InvalidRequest {
            extents: request.extents,
            copies: request.copies,
        });
    }
    let mut work = validate(areas)?;
    let media = request
        .media_type
        .clone()
        .unwrap_or_else(|| "any".to_owned());
    // S702/S704: only areas of the wanted media type.
    work.retain(|a| {
        request
            .media_type
            .as_ref()
            .is_none_or(|m| *m == a.candidate.media_type)
    });
    if work.is_empty() {
        return Err(match &request.media_type {
            _ if areas.is_empty() => PlacementError::NoAreas,
            Some(m) => PlacementError::NoAreaOfMediaType {
                media_type: m.clone(),
            },
            None => PlacementError::NoAreas,
        });
    }
    work.retain(|a| a.total > 0);
    let free: u64 = work.iter().map(|a| a.total).sum();
    let needed = request.extents.saturating_mul(u64::from(request.copies));
    if free < needed {
        return Err(PlacementError::InsufficientCapacity {
            needed,
            free,
            media,
        });
    }
    let nodes: BTreeSet<&str> = work.iter().map(|a| a.candidate.node.as_str()).collect();
    if nodes.len() < usize::from(request.copies) {
        return Err(PlacementError::NotEnoughNodes {
            copies: request.copies,
            nodes: nodes.len(),
            media,
        });
    }
    let single = request.layout == VolumeLayout::Single;
    if single {
        let largest_free = work.iter().map(|a| a.total).max().unwrap_or(0);
        if largest_free < request.extents {
            return Err(PlacementError::NoAreaLargeEnough {
                needed: request.extents,
                largest_free,
                media,
            });
        }
    }

    let domain_rank = domain_ranks(&work, &rules.domain_order);
    let mut replicas: Vec<ReplicaPlacement> = Vec::with_capacity(usize::from(request.copies));
    for index in 0..usize::from(request.copies) {
        let used_nodes: BTreeSet<String> = replicas
            .iter()
            .flat_map(|r| r.nodes())
            .map(str::to_owned)
            .collect();
        let used_domains: BTreeSet<String> = replicas
            .iter()
            .flat_map(|r| r.domains())
            .map(str::to_owned)
            .collect();
        let preferred = if index == 0 {
            request.preferred_node.as_deref()
        } else {
            None
        };
        let placed = place_replica(
            &mut work,
            request.extents,
            single,
            rules.strategy,
            &domain_rank,
            &used_nodes,
            &used_domains,
            preferred,
        )
        .ok_or(PlacementError::ReplicaDoesNotFit {
            replica: index + 1,
            copies: request.copies,
            needed: request.extents,
            single,
        })?;
        replicas.push(placed);
    }
    Ok(Placement {
        extents: request.extents,
        replicas,
    })
}

fn validate(areas: &[AreaCandidate]) -> Result<Vec<AreaWork<'_>>, PlacementError> {
    let mut seen = BTreeSet::new();
    let mut work = Vec::with_capacity(areas.len());
    for candidate in areas {
        if !seen.insert(&candidate.area) {
            return Err(PlacementError::DuplicateArea {
                area: candidate.area.clone(),
            });
        }
        let mut ranges: Vec<ExtentRange> = candidate
            .free
            .iter()
            .copied()
            .filter(|r| !r.is_empty())
            .collect();
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            if pair[0].overlaps(&pair[1]) || pair[0].start.checked_add(pair[0].len).is_none() {
                return Err(PlacementError::OverlappingFreeRanges {
                    area: candidate.area.clone(),
                    first: pair[0],
                    second: pair[1],
                });
            }
        }
        let free = super::coalesce(ranges);
        let total = super::total_len(&free);
        work.push(AreaWork {
            candidate,
            free,
            total,
        });
    }
    // Name order, so every "first" below is deterministic.
    work.sort_by(|a, b| a.candidate.area.cmp(&b.candidate.area));
    Ok(work)
}

/// Rank of each domain: its first position in `domainOrder`, then the others by name.
fn domain_ranks(work: &[AreaWork<'_>], order: &[String]) -> BTreeMap<String, (usize, String)> {
    let mut ranks = BTreeMap::new();
    for area in work {
        let domain = &area.candidate.domain;
        let position = order.iter().position(|d| d == domain).unwrap_or(usize::MAX);
        ranks.insert(domain.clone(), (position, domain.clone()));
    }
    ranks
}

#[allow(clippy::too_many_arguments)]
fn place_replica(
    work: &mut [AreaWork<'_>],
    need: u64,
    single: bool,
    strategy: PlacementStrategy,
    domain_rank: &BTreeMap<String, (usize, String)>,
    used_nodes: &BTreeSet<String>,
    used_domains: &BTreeSet<String>,
    preferred_node: Option<&str>,
) -> Option<ReplicaPlacement> {
    let allowed = |a: &AreaWork<'_>| a.total > 0 && !used_nodes.contains(&a.candidate.node);

    // 1. The preferred node, if it can hold the whole replica.
    if let Some(node) = preferred_node {
        let group: Vec<usize> = (0..work.len())
            .filter(|&i| allowed(&work[i]) && work[i].candidate.node == node)
            .collect();
        if let Some(pieces) = place_in_group(work, &group, need, single, strategy) {
            return Some(ReplicaPlacement { pieces });
        }
    }

    // Domains: unused by earlier replicas first, then by rank.
    let mut domains: Vec<&String> = domain_rank.keys().collect();
    domains.sort_by_key(|d| (used_domains.contains(*d), &domain_rank[*d]));
    let groups: Vec<Vec<usize>> = domains
        .iter()
        .map(|d| {
            (0..work.len())
                .filter(|&i| allowed(&work[i]) && &work[i].candidate.domain == *d)
                .collect()
        })
        .collect();

    // 2. The first domain that can hold the whole replica.
    for group in &groups {
        if let Some(pieces) = place_in_group(work, group, need, single, strategy) {
            return Some(ReplicaPlacement { pieces });
        }
    }

    // 3. Concatenated across domains, in the same order.
    if single {
        return None;
    }
    let available: u64 = groups.iter().flatten().map(|&i| work[i].total).sum();
    if available < need {
        return None;
    }
    let mut pieces = Vec::new();
    let mut remaining = need;
    for group in &groups {
        if remaining == 0 {
            break;
        }
        let in_group: u64 = group.iter().map(|&i| work[i].total).sum();
        let take = in_group.min(remaining);
        if take == 0 {
            continue;
        }
        pieces.extend(fill(work, group, take, strategy));
        remaining -= take;
    }
    debug_assert_eq!(remaining, 0);
    Some(ReplicaPlacement { pieces })
}

/// Places `need` extents in the areas `group` if they can hold all of it (one area for
/// `single`); otherwise changes nothing and returns `None`.
fn place_in_group(
    work: &mut [AreaWork<'_>],
    group: &[usize],
    need: u64,
    single: bool,
    strategy: PlacementStrategy,
) -> Option<Vec<Piece>> {
    if single {
        let i = choose_holding(work, group, need, strategy)?;
        return Some(work[i].take(need));
    }
    let total: u64 = group.iter().map(|&i| work[i].total).sum();
    (total >= need).then(|| fill(work, group, need, strategy))
}

/// Takes `need` extents from `group`, which holds at least that many: while no area can hold
/// the rest, the area with the most free space (ties: name) is taken whole; then the area chosen
/// by the strategy among those that can hold the rest.
fn fill(
    work: &mut [AreaWork<'_>],
    group: &[usize],
    need: u64,
    strategy: PlacementStrategy,
) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut remaining = need;
    while remaining > 0 {
        if let Some(i) = choose_holding(work, group, remaining, strategy) {
            pieces.extend(work[i].take(remaining));
            break;
        }
        // `group` is in name order, and `max_by_key` keeps the last maximum: reverse so the
        // first name wins ties.
        let Some(&largest) = group
            .iter()
            .rev()
            .filter(|&&i| work[i].total > 0)
            .max_by_key(|&&i| work[i].total)
        else {
            break;
        };
        remaining -= work[largest].total;
        pieces.extend(work[largest].take_all());
    }
    pieces
}

/// The area of `group` that the strategy picks to hold `need` extents alone: areas with a
/// contiguous free run of `need` first, then areas holding it in several runs; among those,
/// `Pack` takes the least free space, `Spread` the most; ties by name (group order).
fn choose_holding(
    work: &[AreaWork<'_>],
    group: &[usize],
    need: u64,
    strategy: PlacementStrategy,
) -> Option<usize> {
    let pick = |contiguous: bool| {
        let fitting = group.iter().copied().filter(|&i| {
            let a = &work[i];
            a.total >= need && (!contiguous || a.largest_run() >= need)
        });
        match strategy {
            PlacementStrategy::Pack => fitting.min_by_key(|&i| work[i].total),
            // `max_by_key` keeps the last maximum; the group is in name order, so compare with
            // the position reversed to let the first name win.
            PlacementStrategy::Spread => {
                fitting.max_by_key(|&i| (work[i].total, std::cmp::Reverse(i)))
            }
        }
    };
    pick(true).or_else(|| pick(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(name: &str, node: &str, domain: &str, free: &[(u64, u64)]) -> AreaCandidate {
        AreaCandidate {
            area: AreaId::new(name),
            node: node.into(),
            domain: domain.into(),
            media_type: "ssd".into(),
            free: free.iter().map(|&(s, l)| ExtentRange::new(s, l)).collect(),
        }
    }

    fn request(extents: u64, copies: u8, layout: VolumeLayout) -> PlacementRequest {
        PlacementRequest {
            extents,
            copies,
            layout,
            media_type: None,
            preferred_node: None,
        }
    }

    #[test]
    fn free_extents_complements_used() {
        let free = free_extents(
            10,
            [
                ExtentRange::new(2, 2),
                ExtentRange::new(3, 2),
                ExtentRange::new(8, 5),
            ],
        );
        assert_eq!(free, vec![ExtentRange::new(0, 2), ExtentRange::new(5, 3)]);
        assert_eq!(free_extents(4, []), vec![ExtentRange::new(0, 4)]);
    }

    #[test]
    fn pack_prefers_fullest_area_and_best_fit_run() {
        let areas = [
            area("a", "n1", "z", &[(0, 100)]),
            area("b", "n2", "z", &[(0, 3), (10, 6), (20, 50)]),
        ];
        let rules = PlacementRules::default();
        let placed =
            plan_placement(&areas, &request(5, 1, VolumeLayout::Single), &rules).expect("fits");
        assert_eq!(
            placed.replicas[0].pieces,
            vec![Piece {
                area: AreaId::new("b"),
                node: "n2".into(),
                domain: "z".into(),
                area_offset: 10,
                len: 5
            }]
        );
        let spread = PlacementRules {
            strategy: PlacementStrategy::Spread,
            ..PlacementRules::default()
        };
        let placed =
            plan_placement(&areas, &request(5, 1, VolumeLayout::Single), &spread).expect("fits");
        assert_eq!(placed.replicas[0].pieces[0].area, AreaId::new("a"));
    }

    #[test]
    fn single_may_use_several_runs_of_one_area() {
        let areas = [area("a", "n1", "z", &[(0, 3), (5, 3)])];
        let placed = plan_placement(
            &areas,
            &request(5, 1, VolumeLayout::Single),
            &PlacementRules::default(),
        )
        .expect("fits");
        let pieces: Vec<_> = placed.replicas[0]
            .pieces
            .iter()
            .map(|p| (p.area_offset, p.len))
            .collect();
        assert_eq!(pieces, vec![(0, 3), (5, 2)]);
    }

    #[test]
    fn typed_reasons() {
        let areas = [
            area("a", "n1", "z", &[(0, 4)]),
            area("b", "n1", "z", &[(0, 4)]),
        ];
        let rules = PlacementRules::default();
        assert_eq!(
            plan_placement(&areas, &request(2, 2, VolumeLayout::Concatenated), &rules),
            Err(PlacementError::NotEnoughNodes {
                copies: 2,
                nodes: 1,
                media: "any".into()
            })
        );
        assert_eq!(
            plan_placement(&areas, &request(5, 1, VolumeLayout::Single), &rules),
            Err(PlacementError::NoAreaLargeEnough {
                needed: 5,
                largest_free: 4,
                media: "any".into()
            })
        );
        assert_eq!(
            plan_placement(&areas, &request(9, 1, VolumeLayout::Concatenated), &rules),
            Err(PlacementError::InsufficientCapacity {
                needed: 9,
                free: 8,
                media: "any".into()
            })
        );
        let mut hdd = request(1, 1, VolumeLayout::Concatenated);
        hdd.media_type = Some("hdd".into());
        assert_eq!(
            plan_placement(&areas, &hdd, &rules),
            Err(PlacementError::NoAreaOfMediaType {
                media_type: "hdd".into()
            })
        );
        assert_eq!(
            plan_placement(&[], &request(1, 1, VolumeLayout::Concatenated), &rules),
            Err(PlacementError::NoAreas)
        );
        assert!(matches!(
            plan_placement(&areas, &request(0, 1, VolumeLayout::Single), &rules),
            Err(PlacementError::InvalidRequest { .. })
        ));
        let overlapping = [area("a", "n1", "z", &[(0, 4), (3, 2)])];
        assert!(matches!(
            plan_placement(&overlapping, &request(1, 1, VolumeLayout::Single), &rules),
            Err(PlacementError::OverlappingFreeRanges { .. })
        ));
        let duplicate = [area("a", "n1", "z", &[(0, 4)]), area("a", "n2", "z", &[])];
        assert!(matches!(
            plan_placement(&duplicate, &request(1, 1, VolumeLayout::Single), &rules),
            Err(PlacementError::DuplicateArea { .. })
        ));
        // Two copies of 6 on nodes with 8 + 4: capacity and node count suffice, the second
        // replica does not fit.
        let uneven = [
            area("a", "n1", "z", &[(0, 8)]),
            area("b", "n2", "z", &[(0, 4)]),
        ];
        let err = plan_placement(&uneven, &request(6, 2, VolumeLayout::Concatenated), &rules)
            .expect_err("second replica cannot fit");
        assert_eq!(
            err,
            PlacementError::ReplicaDoesNotFit {
                replica: 2,
                copies: 2,
                needed: 6,
                single: false
            }
        );
        assert_eq!(err.reason(), "NotEnoughNodes");
    }

    #[test]
    fn replicas_prefer_other_domains_then_other_nodes() {
        let areas = [
            area("a1", "n1", "za", &[(0, 10)]),
            area("a2", "n2", "za", &[(0, 10)]),
            area("b1", "n3", "zb", &[(0, 10)]),
        ];
        let rules = PlacementRules {
            domain_order: vec!["za".into()],
            strategy: PlacementStrategy::Pack,
        };
        let placed =
            plan_placement(&areas, &request(5, 3, VolumeLayout::Single), &rules).expect("fits");
        let areas_used: Vec<_> = placed
            .replicas
            .iter()
            .map(|r| r.pieces[0].area.as_str().to_owned())
            .collect();
        assert_eq!(areas_used, vec!["a1", "b1", "a2"]);
    }

    #[test]
    fn to_extent_map_cuts_at_every_replica_boundary() {
        let areas = [
            area("a", "n1", "z", &[(0, 3)]),
            area("b", "n1", "z", &[(0, 2)]),
            area("c", "n2", "y", &[(0, 5)]),
        ];
        let placed = plan_placement(
            &areas,
            &request(5, 2, VolumeLayout::Concatenated),
            &PlacementRules {
                domain_order: vec!["z".into()],
                strategy: PlacementStrategy::Pack,
            },
        )
        .expect("fits");
        let es = ExtentSize::new(4096).expect("valid");
        // 5 extents, the last one partial.
        let map = placed.to_extent_map(4 * 4096 + 512, es).expect("valid map");
        let runs: Vec<_> = map
            .runs()
            .iter()
            .map(|r| {
                (
                    r.offset,
                    r.length,
                    r.replicas
                        .iter()
                        .map(|l| (l.area.as_str().to_owned(), l.area_offset))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            runs,
            vec![
                (0, 3 * 4096, vec![("a".to_owned(), 0), ("c".to_owned(), 0)]),
                (
                    3 * 4096,
                    4096 + 512,
                    vec![("b".to_owned(), 0), ("c".to_owned(), 3 * 4096)]
                ),
            ]
        );
        assert!(matches!(
            placed.to_extent_map(10 * 4096, es),
            Err(ToExtentMapError::SizeMismatch { .. })
        ));
        let mut empty_piece = placed.clone();
        let mut zero = empty_piece.replicas[1].pieces[0].clone();
        zero.len = 0;
        empty_piece.replicas[1].pieces.push(zero);
        assert_eq!(
            empty_piece.to_extent_map(4 * 4096 + 512, es),
            Err(ToExtentMapError::EmptyPiece { replica: 1 })
        );
    }
}
