//! Online migration (seed 004 fourth embodiment, Figs. 19–26, [0093]–[0120]): the copy progress
//! table 224 with its per-extent states, the copy program 214 (Fig. 25), the controller's copy
//! processing 631 (Fig. 22) with write-triggered copy priority, and the routing of I/O per
//! extent that each cycle's mapping expresses (Fig. 26 principle, [0116]).
//!
//! Pure: the controller feeds in what happened (a COPY I/O finished, a write was held, the hold
//! timer expired) and gets back what to do ([`CopyAction`]). One COPY I/O is outstanding at a
//! time, which is what Fig. 26 shows (after a suspend, the extent in flight completes and the
//! other suspended ones go back to "not copied").

use std::ops::Range;

/// State of one entry of the copy progress table 224 ([0110]–[0112]; values as in the patent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyState {
    /// 0.
    NotCopied,
    /// 1.
    Copying,
    /// 2.
    Suspended,
    /// 4.
    Copied,
}

impl CopyState {
    /// The patent's table value (Fig. 26: 224a/224b/224c).
    pub const fn value(self) -> u8 {
        match self {
            CopyState::NotCopied => 0,
            CopyState::Copying => 1,
            CopyState::Suspended => 2,
            CopyState::Copied => 4,
        }
    }
}

/// Where I/O to one extent goes while the migration runs ([0114]–[0117]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Not copied: read and write the source only (inference, [0117]).
    Source,
    /// Being copied (or suspended inside the held chunk): I/O is held ([0114]).
    Held,
    /// Copied: read the destination, write both, so the source keeps the newest data if the
    /// migration fails ([0116]). In an extent map: replicas `[destination, source]` (the engine
    /// reads the first healthy replica and writes every one).
    DestinationWriteBoth,
    /// After the migration committed: the destination only (the patent does not describe the
    /// final mapping; inference).
    Destination,
}

/// What the copy engine or the coordinator must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyAction {
    /// Issue the COPY I/O of this extent (904): read the source, write the destination.
    CopyExtent(u64),
    /// No extent is marked for copying any more: the chunk is done (911), commit it.
    ChunkDone,
    /// A COPY I/O failed (915): the chunk failed, entries 1/2 went back to 0.
    ChunkFailed { extent: u64, cause: String },
    /// Ask the coordinator to suspend the copy (806/718 → 6317) — the answer to a held write on
    /// an extent being copied, or to a hold timeout during the copy (821).
    RequestSuspend,
}

/// Table 224 plus copy program 214 plus the copy processing 631 of the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    states: Vec<CopyState>,
    /// The extent whose COPY I/O is outstanding.
    in_flight: Option<u64>,
    /// 6311: the first copy invocation uses COPY start (which clears the table), later ones
    /// COPY restart.
    started: bool,
    /// Addresses of held writes waiting for their copy (6316 → 6313).
    priority: Vec<u64>,
    /// Whether the current chunk's copy was suspended.
    suspended: bool,
}

impl Migration {
    /// A migration of `extents` extents, nothing copied.
    pub fn new(extents: u64) -> Self {
        Migration {
            states: vec![CopyState::NotCopied; extents as usize],
            in_flight: None,
            started: false,
            priority: Vec::new(),
            suspended: false,
        }
    }

    pub fn states(&self) -> &[CopyState] {
        &self.states
    }

    /// The table as the patent's values (for comparing with Fig. 26).
    pub fn values(&self) -> Vec<u8> {
        self.states.iter().map(|s| s.value()).collect()
    }

    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// Every extent copied (634 Y).
    pub fn is_complete(&self) -> bool {
        self.states.iter().all(|s| *s == CopyState::Copied)
    }

    /// The next chunk to copy in a new cycle: prioritised extents first, then the first run of
    /// not-copied extents, at most `chunk_extents` long (the cycle's hold scope).
    pub fn next_chunk(&self, chunk_extents: u64) -> Option<Range<u64>> {
        let chunk = chunk_extents.max(1);
        if let Some(&p) = self
            .priority
            .iter()
            .find(|&&p| self.state(p) == Some(CopyState::NotCopied))
        {
            return Some(p..p + 1);
        }
        let start = self
            .states
            .iter()
            .position(|s| *s == CopyState::NotCopied)? as u64;
        let mut end = start;
        while end < start + chunk && self.state(end) == Some(CopyState::NotCopied) {
            end += 1;
        }
        Some(start..end)
    }

    fn state(&self, extent: u64) -> Option<CopyState> {
        self.states.get(extent as usize).copied()
    }

    /// 6311/6312/6313 → 901–904 / 906: copy `range` in this cycle. The very first call is COPY
    /// start (902: every entry back to 0 first); later ones are COPY restart. Extents already
    /// copied stay copied on restart.
    pub fn copy_range(&mut self, range: Range<u64>) -> Vec<CopyAction> {
        if !self.started {
            self.started = true;
            self.states
                .iter_mut()
                .for_each(|s| *s = CopyState::NotCopied);
        }
        self.suspended = false;
        let end = range.end.min(self.states.len() as u64);
        for e in range.start..end {
            if self.states[e as usize] != CopyState::Copied {
                self.states[e as usize] = CopyState::Copying;
            }
        }
        self.issue()
    }

    /// 904: the next COPY I/O, if none is outstanding; 910/911 when nothing is marked.
    fn issue(&mut self) -> Vec<CopyAction> {
        if self.in_flight.is_some() {
            return Vec::new();
        }
        match self.states.iter().position(|s| *s == CopyState::Copying) {
            Some(e) => {
                self.in_flight = Some(e as u64);
                vec![CopyAction::CopyExtent(e as u64)]
            }
            None => vec![CopyAction::ChunkDone],
        }
    }

    /// 912/913: COPY suspend — every entry at 1 goes to 2. The outstanding COPY I/O still
    /// completes.
    pub fn suspend(&mut self) {
        self.suspended = true;
        for s in &mut self.states {
            if *s == CopyState::Copying {
                *s = CopyState::Suspended;
            }
        }
    }

    /// 907–911 / 914–915: the outstanding COPY I/O finished. On success its extent is copied
    /// (4) — even if it was suspended — and every other suspended entry goes back to 0; then the
    /// next COPY I/O, or the chunk is done. On failure entries 1 and 2 go back to 0.
    ///
    /// When a copy priority is pending (6316 Y), a finished suspended chunk restarts at once
    /// with the prioritised extent (6313; Fig. 26 C).
    pub fn copy_done(&mut self, extent: u64, result: Result<(), String>) -> Vec<CopyAction> {
        if self.in_flight != Some(extent) {
            return Vec::new();
        }
        self.in_flight = None;
        match result {
            Ok(()) => {
                self.states[extent as usize] = CopyState::Copied;
                for s in &mut self.states {
                    if *s == CopyState::Suspended {
                        *s = CopyState::NotCopied;
                    }
                }
                self.priority.retain(|p| *p != extent);
                let next = self.issue();
                if next == vec![CopyAction::ChunkDone]
                    && self.suspended
                    && let Some(&p) = self
                        .priority
                        .iter()
                        .find(|&&p| self.state(p) == Some(CopyState::NotCopied))
                {
                    return self.copy_range(p..p + 1);
                }
                next
            }
            Err(cause) => {
                for s in &mut self.states {
                    if matches!(s, CopyState::Copying | CopyState::Suspended) {
                        *s = CopyState::NotCopied;
                    }
                }
                vec![CopyAction::ChunkFailed { extent, cause }]
            }
        }
    }

    /// 806: a write was held on `extent`. If that extent is being copied, its copy gets priority:
    /// the copy is suspended (6317) and restarted with it once the outstanding COPY I/O is done
    /// (6313). `reads_suspend` is the [0108] variant where a held read suspends the copy too.
    pub fn held_request(
        &mut self,
        extent: u64,
        is_write: bool,
        reads_suspend: bool,
    ) -> Vec<CopyAction> {
        let copying = matches!(
            self.state(extent),
            Some(CopyState::Copying | CopyState::Suspended)
        );
        if !copying || self.in_flight == Some(extent) {
            // Its own copy is already running: it completes first anyway.
            return Vec::new();
        }
        if is_write {
            if !self.priority.contains(&extent) {
                self.priority.push(extent);
            }
        } else if !reads_suspend {
            return Vec::new();
        }
        if self.suspended {
            return Vec::new();
        }
        vec![CopyAction::RequestSuspend]
    }

    /// 821: the hold timer expired during the copy: suspend it, commit what is copied.
    pub fn hold_timeout(&mut self) -> Vec<CopyAction> {
        if self.suspended || self.in_flight.is_none() {
            return Vec::new();
        }
        vec![CopyAction::RequestSuspend]
    }

    /// 633: the route of every extent for the mapping committed at the end of this cycle's
    /// hold. Only extents already copied change (to read-destination/write-both); the rest of
    /// the hold scope reverts to the source.
    pub fn routes_after_cycle(&self) -> Vec<Route> {
        self.states
            .iter()
            .map(|s| match s {
                CopyState::Copied => Route::DestinationWriteBoth,
                _ => Route::Source,
            })
            .collect()
    }

    /// Routes while the chunk is being copied (inside the hold, Fig. 26 A).
    pub fn routes_during_copy(&self) -> Vec<Route> {
        self.states
            .iter()
            .map(|s| match s {
                CopyState::Copied => Route::DestinationWriteBoth,
                CopyState::Copying | CopyState::Suspended => Route::Held,
                CopyState::NotCopied => Route::Source,
            })
            .collect()
    }

    /// The final mapping (634 Y; inference: dual-write dropped, destination only), or `None`
    /// while extents remain.
    pub fn final_routes(&self) -> Option<Vec<Route>> {
        self.is_complete()
            .then(|| vec![Route::Destination; self.states.len()])
    }

    /// 635: the mapping that restores the layout from before the migration (every extent back
    /// on the source, whose data is the newest thanks to the dual writes).
    pub fn restore_routes(&self) -> Vec<Route> {
        vec![Route::Source; self.states.len()]
    }
}
