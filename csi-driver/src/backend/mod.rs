//! Backends: where the bytes of an area live (ARCHITECTURE §4 "Backends").
//!
//! The engine translates a volume request into pieces `(area, area_offset, length)` and hands each
//! piece to the area's [`AreaBackend`]. Every backend call carries the mapping [`Generation`] the
//! piece was translated with (seed 004 §11.4 "stamp each backend I/O with the map generation";
//! ARCHITECTURE §4 "I/O gate").
//!
//! Implementations:
//! - [`LocalArea`] — a file or block device on this node: positioned I/O, `O_DIRECT` for
//!   4096-aligned pieces, on a blocking thread pool or on io_uring ([`local`]).
//! - [`remote::RemoteArea`] — an area owned by another node, reached through that node's extent
//!   server over NBD (seed 001's agent; seed 002 §4.4 S606–S615 [0114]–[0118]: the request is
//!   forwarded to the owner) on the `tessera-nbd` pooled, pipelined client. Each method maps to one
//!   NBD command. NBD has no field for the generation, so the generation is enforced by the
//!   extent server's authorization table (grants per peer, volume and generation), not per
//!   request: a request outside the current grant fails with EPERM, which the engine sees as a
//!   replica failure rather than [`BackendError::StaleGeneration`] — a known gap until the I/O
//!   gate and remap protocol carry generations to peers.
//! - [`fault::FaultyArea`] — a wrapper that fails on demand (tests, drills).
//!
//! Futures are boxed ([`BackendFuture`]) so that the engine can hold `Arc<dyn AreaBackend>` of any
//! kind; one allocation per piece is noise next to a system call.

pub mod aligned;
pub mod fault;
pub mod local;
pub mod remote;
pub mod uring;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tessera_api::model::{AreaId, Generation};

pub use local::{DirectIo, IoDriver, LocalArea, LocalAreaOptions};

/// The future every backend call returns.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The device, file or connection failed. The engine treats this as a failure of this
    /// replica (it may mark the replica unhealthy and use another one).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    /// The serving side runs another mapping generation than the request was translated with
    /// (remote areas: the extent server refuses it, seed 004 §11.6 I1/I2). Not a replica failure:
    /// the request must be translated again with the current map.
    #[error("request translated with generation {sent}, the area serves generation {current}")]
    StaleGeneration {
        sent: Generation,
        current: Generation,
    },
}

/// One storage area as the engine sees it: byte-addressed, `[0, size_bytes)`.
///
/// Offsets and lengths arrive sector-aligned (the engine refuses anything else), and a piece never
/// crosses an extent. Implementations must not reorder a call against a later call on the same
/// range: the engine only issues a later overlapping call after the earlier one completed.
pub trait AreaBackend: Send + Sync + fmt::Debug {
    /// The area's name (the `StorageArea` object name).
    fn area(&self) -> &AreaId;

    /// Usable bytes of the area.
    fn size_bytes(&self) -> u64;

    /// Reads exactly `length` bytes at `area_offset`.
    fn read(
        &self,
        generation: Generation,
        area_offset: u64,
        length: usize,
    ) -> BackendFuture<'_, Bytes>;

    /// Writes `data` at `area_offset`; with `fua`, the data is durable when the future completes.
    fn write(
        &self,
        generation: Generation,
        area_offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BackendFuture<'_, ()>;

    /// Makes `[area_offset, area_offset + length)` read back as zeros.
    fn write_zeroes(
        &self,
        generation: Generation,
        area_offset: u64,
        length: u64,
        fua: bool,
    ) -> BackendFuture<'_, ()>;

    /// Discards the range (advisory: afterwards it reads as the old data or as zeros).
    fn trim(&self, generation: Generation, area_offset: u64, length: u64) -> BackendFuture<'_, ()>;

    /// Makes every write that completed before this call durable.
    fn flush(&self, generation: Generation) -> BackendFuture<'_, ()>;
}

/// The node's areas by name, shared by every volume of the node.
///
/// Lookups are lock-free (an atomic pointer to an immutable map); registering or removing an
/// area copies the map, which happens only on area registration.
#[derive(Default)]
pub struct AreaRegistry {
    areas: ArcSwap<HashMap<AreaId, Arc<dyn AreaBackend>>>,
}

impl fmt::Debug for AreaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let areas = self.areas.load();
        let mut names: Vec<&str> = areas.keys().map(AreaId::as_str).collect();
        names.sort_unstable();
        f.debug_struct("AreaRegistry")
            .field("areas", &names)
            .finish()
    }
}

impl AreaRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `backend` under its area name; returns the backend it replaced, if any.
    pub fn insert(&self, backend: Arc<dyn AreaBackend>) -> Option<Arc<dyn AreaBackend>> {
        let area = backend.area().clone();
        let mut previous = None;
        self.areas.rcu(|current| {
            let mut next = HashMap::clone(current);
            previous = next.insert(area.clone(), Arc::clone(&backend));
            next
        });
        previous
    }

    /// Unregisters an area; returns its backend if it was registered.
    pub fn remove(&self, area: &AreaId) -> Option<Arc<dyn AreaBackend>> {
        let mut removed = None;
        self.areas.rcu(|current| {
            let mut next = HashMap::clone(current);
            removed = next.remove(area);
            next
        });
        removed
    }

    pub fn get(&self, area: &AreaId) -> Option<Arc<dyn AreaBackend>> {
        self.areas.load().get(area).cloned()
    }

    pub fn contains(&self, area: &AreaId) -> bool {
        self.areas.load().contains_key(area)
    }

    /// Registered area names, sorted.
    pub fn area_ids(&self) -> Vec<AreaId> {
        let mut ids: Vec<AreaId> = self.areas.load().keys().cloned().collect();
        ids.sort_unstable();
        ids
    }
}
