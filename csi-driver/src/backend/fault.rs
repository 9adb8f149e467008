//! A backend wrapper that fails on demand and records every call with its generation.
//!
//! Used by the engine tests (replica failure injection, "every backend request carries the map
//! generation") and usable for failure drills on a real node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use tessera_api::model::{AreaId, Generation};

use super::{AreaBackend, BackendError, BackendFuture};

/// Which backend operation a [`Call`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
}

/// One recorded backend call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub kind: CallKind,
    pub generation: Generation,
    pub area_offset: u64,
    pub length: u64,
    pub fua: bool,
}

/// Wraps another backend; each switch makes a class of calls fail with `EIO` before they reach
/// the inner backend (so a failed write leaves the inner data untouched).
#[derive(Debug)]
pub struct FaultyArea {
    inner: Arc<dyn AreaBackend>,
    fail_reads: AtomicBool,
    /// Writes, write-zeroes and trims.
    fail_writes: AtomicBool,
    fail_flushes: AtomicBool,
    /// The next this many calls fail (of any kind), then calls pass again.
    fail_next: AtomicU64,
    /// When set, every call answers `StaleGeneration` unless it carries exactly this generation.
    serving_generation: Mutex<Option<Generation>>,
    calls: Mutex<Vec<Call>>,
}

impl FaultyArea {
    pub fn new(inner: Arc<dyn AreaBackend>) -> Self {
        FaultyArea {
            inner,
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_flushes: AtomicBool::new(false),
            fail_next: AtomicU64::new(0),
            serving_generation: Mutex::new(None),
            calls: Mutex::new(Vec::new()),
        }
    }

    pub fn inner(&self) -> &Arc<dyn AreaBackend> {
        &self.inner
    }

    /// Fails (or stops failing) every kind of call.
    pub fn fail_all(&self, fail: bool) {
        self.fail_reads.store(fail, Ordering::SeqCst);
        self.fail_writes.store(fail, Ordering::SeqCst);
        self.fail_flushes.store(fail, Ordering::SeqCst);
    }

    pub fn fail_reads(&self, fail: bool) {
        self.fail_reads.store(fail, Ordering::SeqCst);
    }

    /// Writes, write-zeroes and trims.
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    pub fn fail_flushes(&self, fail: bool) {
        self.fail_flushes.store(fail, Ordering::SeqCst);
    }

    /// Fails the next `count` calls of any kind.
    pub fn fail_next(&self, count: u64) {
        self.fail_next.store(count, Ordering::SeqCst);
    }

    /// Emulates an extent server at `generation`: calls with another generation are refused.
    pub fn serve_generation(&self, generation: Option<Generation>) {
        *self.serving_generation.lock() = generation;
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().clone()
    }

    pub fn clear_calls(&self) {
        self.calls.lock().clear();
    }

    /// Records the call and decides whether it fails.
    fn admit(&self, call: Call) -> Result<(), BackendError> {
        self.calls.lock().push(call);
        if let Some(current) = *self.serving_generation.lock()
            && current != call.generation
        {
            return Err(BackendError::StaleGeneration {
                sent: call.generation,
                current,
            });
        }
        let switched = match call.kind {
            CallKind::Read => &self.fail_reads,
            CallKind::Write | CallKind::WriteZeroes | CallKind::Trim => &self.fail_writes,
            CallKind::Flush => &self.fail_flushes,
        };
        let once = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if once || switched.load(Ordering::SeqCst) {
            return Err(BackendError::Io(std::io::Error::other(format!(
                "injected failure on area {} ({:?})",
                self.inner.area(),
                call.kind
            ))));
        }
        Ok(())
    }
}

impl AreaBackend for FaultyArea {
    fn area(&self) -> &AreaId {
        self.inner.area()
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read(
        &self,
        generation: Generation,
        area_offset: u64,
        length: usize,
    ) -> BackendFuture<'_, Bytes> {
        let call = Call {
            kind: CallKind::Read,
            generation,
            area_offset,
            length: length as u64,
            fua: false,
        };
        Box::pin(async move {
            self.admit(call)?;
            self.inner.read(generation, area_offset, length).await
        })
    }

    fn write(
        &self,
        generation: Generation,
        area_offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BackendFuture<'_, ()> {
        let call = Call {
            kind: CallKind::Write,
            generation,
            area_offset,
            length: data.len() as u64,
            fua,
        };
        Box::pin(async move {
            self.admit(call)?;
            self.inner.write(generation, area_offset, data, fua).await
        })
    }

    fn write_zeroes(
        &self,
        generation: Generation,
        area_offset: u64,
        length: u64,
        fua: bool,
    ) -> BackendFuture<'_, ()> {
        let call = Call {
            kind: CallKind::WriteZeroes,
            generation,
            area_offset,
            length,
            fua,
        };
        Box::pin(async move {
            self.admit(call)?;
            self.inner
                .write_zeroes(generation, area_offset, length, fua)
                .await
        })
    }

    fn trim(&self, generation: Generation, area_offset: u64, length: u64) -> BackendFuture<'_, ()> {
        let call = Call {
            kind: CallKind::Trim,
            generation,
            area_offset,
            length,
            fua: false,
        };
        Box::pin(async move {
            self.admit(call)?;
            self.inner.trim(generation, area_offset, length).await
        })
    }

    fn flush(&self, generation: Generation) -> BackendFuture<'_, ()> {
        let call = Call {
            kind: CallKind::Flush,
            generation,
            area_offset: 0,
            length: 0,
            fua: false,
        };
        Box::pin(async move {
            self.admit(call)?;
            self.inner.flush(generation).await
        })
    }
}
