//! What a server serves: the [`Export`] trait, its errors and capabilities, and an in-memory
//! implementation ([`MemExport`]).
//!
//! ## Why `impl Future + Send` (static dispatch) with an opt-in boxed variant
//!
//! The data path calls an export once per NBD request, potentially hundreds of thousands of
//! times a second. `Export` methods return `impl Future + Send` (native async-fn-in-trait), so a
//! server monomorphised over a concrete export pays no allocation or virtual call per request,
//! and implementations can be plain `async fn`s. Because such a trait is not object-safe, the
//! blanket-implemented [`DynExport`] provides boxed-future methods, and `dyn DynExport` itself
//! implements `Export`: a catalog serving heterogeneous exports uses `Arc<dyn DynExport>` and
//! pays one small allocation per request — negligible next to a block I/O, and only when chosen.
//!
//! Buffers are owned (`Bytes` in, `Bytes` out) so an implementation can move them to a thread
//! pool or hand them to io_uring without borrowing from the connection.

use crate::proto::Errno;
use bytes::Bytes;
use parking_lot::RwLock;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors an export reports. Each maps to an NBD error value (spec §"Error values").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The backing store failed (`NBD_EIO`).
    #[error("I/O error: {0}")]
    Io(String),
    /// The range lies (partly) outside the export. The server checks bounds before calling the
    /// export, so this only appears when the export shrank concurrently: `NBD_ENOSPC` for writes
    /// (spec: "SHOULD return NBD_ENOSPC if it receives a write request including one or more
    /// sectors beyond the size of the device"), `NBD_EINVAL` otherwise.
    #[error("range outside the export")]
    OutOfRange,
    /// Space could not be allocated (a write to a hole when the pool is full) — `NBD_ENOSPC`.
    #[error("no space left to allocate")]
    NoSpace,
    /// The peer may not perform this operation — `NBD_EPERM`.
    #[error("permission denied")]
    PermissionDenied,
    /// A write to a read-only export — `NBD_EPERM` (spec §"Error values").
    #[error("export is read-only")]
    ReadOnly,
    /// The request is invalid for this export (alignment, unsupported flag) — `NBD_EINVAL`.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Out of memory — `NBD_ENOMEM` (spec: "SHOULD NOT return NBD_ENOMEM if at all possible").
    #[error("out of memory")]
    NoMemory,
    /// The export is being shut down — `NBD_ESHUTDOWN`; the client must then disconnect.
    #[error("export is shutting down")]
    ShuttingDown,
}

impl ExportError {
    /// The NBD error value for this error, given whether the failed request was a write (WRITE or
    /// WRITE_ZEROES), which decides how [`ExportError::OutOfRange`] is reported.
    pub fn errno(&self, is_write: bool) -> Errno {
        match self {
            ExportError::Io(_) => Errno::EIO,
            ExportError::OutOfRange if is_write => Errno::ENOSPC,
            ExportError::OutOfRange => Errno::EINVAL,
            ExportError::NoSpace => Errno::ENOSPC,
            ExportError::PermissionDenied | ExportError::ReadOnly => Errno::EPERM,
            ExportError::Invalid(_) => Errno::EINVAL,
            ExportError::NoMemory => Errno::ENOMEM,
            ExportError::ShuttingDown => Errno::ESHUTDOWN,
        }
    }
}

impl From<std::io::Error> for ExportError {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            PermissionDenied => ExportError::PermissionDenied,
            ReadOnlyFilesystem => ExportError::ReadOnly,
            // EDQUOT and EFBIG "SHOULD" map to ENOSPC too (spec §"Error values").
            StorageFull | QuotaExceeded | FileTooLarge => ExportError::NoSpace,
            OutOfMemory => ExportError::NoMemory,
            InvalidInput => ExportError::Invalid(e.to_string()),
            _ => ExportError::Io(e.to_string()),
        }
    }
}

/// What an export supports; turned into NBD transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, trims and write-zeroes fail with `NBD_EPERM`; `NBD_FLAG_READ_ONLY` is advertised.
    pub read_only: bool,
    /// `NBD_FLAG_SEND_TRIM`: the export implements [`Export::trim`] meaningfully.
    pub can_trim: bool,
    /// `NBD_FLAG_SEND_WRITE_ZEROES`. The default [`Export::write_zeroes`] writes zero buffers,
    /// so this may stay on even for exports without a native implementation.
    pub can_write_zeroes: bool,
    /// `NBD_FLAG_CAN_MULTI_CONN`: the export has no per-connection cache, so a FLUSH (or FUA) on
    /// one connection covers writes completed on every connection (spec §"Transmission flags").
    pub can_multi_conn: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            read_only: false,
            can_trim: false,
            can_write_zeroes: true,
            can_multi_conn: false,
        }
    }
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE` (spec §"Block size constraints")
/// and enforced by the server (misaligned or oversized requests get `NBD_EINVAL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Power of two, at most 64 KiB; offsets and lengths must be multiples of it.
    pub min: u32,
    /// Power of two, at least `max(min, 512)`.
    pub preferred: u32,
    /// Largest READ/WRITE length; a multiple of `min`. Capped at 32 MiB by the server.
    pub max: u32,
}

impl BlockSize {
    /// 512 / 4096 / 32 MiB: sector granularity (what O_DIRECT on most devices needs), page-sized
    /// preferred I/O, and the largest payload the spec promises is never a DoS.
    pub const DEFAULT: BlockSize = BlockSize {
        min: 512,
        preferred: 4096,
        max: crate::proto::MAX_PAYLOAD,
    };

    /// Whether the constraints are valid per the spec.
    pub fn is_valid(&self) -> bool {
        self.min.is_power_of_two()
            && self.min <= 65536
            && self.preferred.is_power_of_two()
            && self.preferred >= self.min.max(512)
            && self.max >= self.min
            && (self.max == u32::MAX || self.max.is_multiple_of(self.min))
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A block device served over NBD.
///
/// Contract (what the server relies on):
/// * The server validates bounds, alignment, read-only and capability flags before calling, so
///   implementations see only in-range, aligned, non-empty requests; they still must not panic
///   on anything.
/// * `read` returns exactly `len` bytes (anything else is reported as `NBD_EIO`, because a
///   simple reply cannot carry a short read).
/// * `write`/`trim`/`write_zeroes` with `fua = true` must not complete before the data is on
///   stable storage (spec §"Ordering of messages and writes").
/// * `flush` must persist every write that has *completed* (returned) before `flush` was called.
///   The server only sends a write's reply after it returned, which is exactly the spec's rule:
///   a FLUSH covers "all write requests for which a reply has already been sent".
/// * Calls may run concurrently; ordering between overlapping in-flight requests is the client's
///   concern (NBD gives no ordering guarantees between in-flight requests).
pub trait Export: Send + Sync + 'static {
    /// Size in bytes; should be a multiple of [`BlockSize::min`].
    fn size(&self) -> u64;

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn block_size(&self) -> BlockSize {
        BlockSize::DEFAULT
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, ExportError>> + Send;

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;

    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send;

    /// Discards a range (a hint; the spec allows doing nothing). Default: no-op.
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        let _ = (offset, len, fua);
        async { Ok(()) }
    }

    /// Makes a range read as zeroes. `may_trim` is false when the client set
    /// `NBD_CMD_FLAG_NO_HOLE` (the range must stay allocated). Default: writes zero buffers of
    /// at most 1 MiB.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        let _ = may_trim;
        async move {
            const CHUNK: u32 = 1 << 20;
            let zeroes = Bytes::from(vec![0u8; len.min(CHUNK) as usize]);
            let mut done = 0u32;
            while done < len {
                let n = (len - done).min(CHUNK);
                self.write(offset + u64::from(done), zeroes.slice(..n as usize), fua)
                    .await?;
                done += n;
            }
            Ok(())
        }
    }
}

/// A boxed future, as returned by [`DynExport`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe mirror of [`Export`] (boxed futures); implemented for every `Export`. Use
/// `Arc<dyn DynExport>` to serve different export types from one catalog.
pub trait DynExport: Send + Sync + 'static {
    fn dyn_size(&self) -> u64;
    fn dyn_capabilities(&self) -> Capabilities;
    fn dyn_block_size(&self) -> BlockSize;
    fn dyn_read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>>;
    fn dyn_write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>>;
    fn dyn_flush(&self) -> BoxFuture<'_, Result<(), ExportError>>;
    fn dyn_trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), ExportError>>;
    fn dyn_write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>>;
}

impl<T: Export> DynExport for T {
    fn dyn_size(&self) -> u64 {
        self.size()
    }
    fn dyn_capabilities(&self) -> Capabilities {
        self.capabilities()
    }
    fn dyn_block_size(&self) -> BlockSize {
        self.block_size()
    }
    fn dyn_read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>> {
        Box::pin(self.read(offset, len))
    }
    fn dyn_write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(self.write(offset, data, fua))
    }
    fn dyn_flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(self.flush())
    }
    fn dyn_trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(self.trim(offset, len, fua))
    }
    fn dyn_write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(self.write_zeroes(offset, len, may_trim, fua))
    }
}

impl Export for dyn DynExport {
    fn size(&self) -> u64 {
        self.dyn_size()
    }
    fn capabilities(&self) -> Capabilities {
        self.dyn_capabilities()
    }
    fn block_size(&self) -> BlockSize {
        self.dyn_block_size()
    }
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, ExportError>> + Send {
        self.dyn_read(offset, len)
    }
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        self.dyn_write(offset, data, fua)
    }
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send {
        self.dyn_flush()
    }
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        self.dyn_trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        self.dyn_write_zeroes(offset, len, may_trim, fua)
    }
}

// ---------------------------------------------------------------------------------------------
// MemExport
// ---------------------------------------------------------------------------------------------

/// Counters of what reached a [`MemExport`], for tests that check FUA/FLUSH propagation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemExportStats {
    pub reads: u64,
    pub writes: u64,
    pub fua_writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// An export backed by memory. Useful for tests and for other crates' tests: it counts requests
/// ([`MemExport::stats`]) and can inject a fault into every request ([`MemExport::set_fault`]).
/// It has no cache, so it advertises `CAN_MULTI_CONN`.
pub struct MemExport {
    data: RwLock<Vec<u8>>,
    caps: Capabilities,
    block_size: BlockSize,
    fault: RwLock<Option<ExportError>>,
    counters: Counters,
}

impl MemExport {
    /// A zero-filled export of `size` bytes (allocated lazily by the OS).
    pub fn new(size: u64) -> Self {
        Self::from_vec(vec![0; usize::try_from(size).unwrap_or(usize::MAX)])
    }

    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(data),
            caps: Capabilities {
                read_only: false,
                can_trim: true,
                can_write_zeroes: true,
                can_multi_conn: true,
            },
            block_size: BlockSize::DEFAULT,
            fault: RwLock::new(None),
            counters: Counters::default(),
        }
    }

    pub fn with_capabilities(mut self, caps: Capabilities) -> Self {
        self.caps = caps;
        self
    }

    pub fn with_block_size(mut self, bs: BlockSize) -> Self {
        self.block_size = bs;
        self
    }

    /// Makes every subsequent request fail with `fault` (or succeed again with `None`).
    pub fn set_fault(&self, fault: Option<ExportError>) {
        *self.fault.write() = fault;
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().clone()
    }

    /// Copies `len` bytes at `offset` out (panics if out of range — test helper).
    pub fn slice(&self, offset: u64, len: usize) -> Vec<u8> {
        let d = self.data.read();
        d[offset as usize..offset as usize + len].to_vec()
    }

    pub fn stats(&self) -> MemExportStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MemExportStats {
            reads: l(&c.reads),
            writes: l(&c.writes),
            fua_writes: l(&c.fua_writes),
            flushes: l(&c.flushes),
            trims: l(&c.trims),
            write_zeroes: l(&c.write_zeroes),
            bytes_read: l(&c.bytes_read),
            bytes_written: l(&c.bytes_written),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, ExportError> {
        if let Some(f) = self.fault.read().clone() {
            return Err(f);
        }
        let size = self.data.read().len() as u64;
        let end = offset.checked_add(len).ok_or(ExportError::OutOfRange)?;
        if end > size {
            return Err(ExportError::OutOfRange);
        }
        Ok(offset as usize..end as usize)
    }

    fn zero(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        let r = self.check(offset, len.into())?;
        if self.caps.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.data.write()[r].fill(0);
        Ok(())
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn block_size(&self) -> BlockSize {
        self.block_size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        let r = self.check(offset, len.into())?;
        let out = Bytes::copy_from_slice(&self.data.read()[r]);
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(len.into(), Ordering::Relaxed);
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let r = self.check(offset, data.len() as u64)?;
        if self.caps.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.data.write()[r].copy_from_slice(&data);
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.counters.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        if let Some(f) = self.fault.read().clone() {
            return Err(f);
        }
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), ExportError> {
        self.zero(offset, len)?;
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _may_trim: bool,
        _fua: bool,
    ) -> Result<(), ExportError> {
        self.zero(offset, len)?;
        self.counters.write_zeroes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Shares an export between catalogs and tests.
impl<E: Export> Export for Arc<E> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn block_size(&self) -> BlockSize {
        (**self).block_size()
    }
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, ExportError>> + Send {
        (**self).read(offset, len)
    }
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        (**self).write(offset, data, fua)
    }
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send {
        (**self).flush()
    }
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        (**self).trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send {
        (**self).write_zeroes(offset, len, may_trim, fua)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct ZeroFallback(MemExport);
    impl Export for ZeroFallback {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read(&self, o: u64, l: u32) -> impl Future<Output = Result<Bytes, ExportError>> + Send {
            self.0.read(o, l)
        }
        fn write(
            &self,
            o: u64,
            d: Bytes,
            f: bool,
        ) -> impl Future<Output = Result<(), ExportError>> + Send {
            self.0.write(o, d, f)
        }
        fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send {
            self.0.flush()
        }
    }

    #[tokio::test]
    async fn default_write_zeroes_writes_chunks() {
        let e = ZeroFallback(MemExport::from_vec(vec![0xff; 3 << 20]));
        e.write_zeroes(512, (2 << 20) + 512, true, false)
            .await
            .unwrap();
        let c = e.0.contents();
        assert!(c[..512].iter().all(|b| *b == 0xff));
        assert!(c[512..(2 << 20) + 1024].iter().all(|b| *b == 0));
        assert!(c[(2 << 20) + 1024..].iter().all(|b| *b == 0xff));
        assert_eq!(e.0.stats().writes, 3);
    }

    #[tokio::test]
    async fn dyn_export_dispatches() {
        let e: Arc<dyn DynExport> = Arc::new(MemExport::new(4096));
        e.write(0, Bytes::from_static(b"abcd"), true).await.unwrap();
        assert_eq!(&e.read(0, 4).await.unwrap()[..], b"abcd");
        assert_eq!(Export::size(&*e), 4096);
        assert_eq!(e.read(4095, 2).await, Err(ExportError::OutOfRange));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(ExportError::OutOfRange.errno(true), Errno::ENOSPC);
        assert_eq!(ExportError::OutOfRange.errno(false), Errno::EINVAL);
        assert_eq!(ExportError::ReadOnly.errno(true), Errno::EPERM);
        assert_eq!(ExportError::ShuttingDown.errno(false), Errno::ESHUTDOWN);
        let io: ExportError = std::io::Error::from(std::io::ErrorKind::StorageFull).into();
        assert_eq!(io, ExportError::NoSpace);
    }

    #[test]
    fn block_size_validation() {
        assert!(BlockSize::DEFAULT.is_valid());
        assert!(
            !BlockSize {
                min: 3,
                preferred: 4096,
                max: 4096
            }
            .is_valid()
        );
        assert!(
            !BlockSize {
                min: 4096,
                preferred: 512,
                max: 4096
            }
            .is_valid()
        );
    }
}
