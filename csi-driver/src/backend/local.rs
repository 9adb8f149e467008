//! The local backend: an area that is a file or a block device on this node (ARCHITECTURE §4
//! "Local area: positioned I/O on the file or device (O_DIRECT where aligned; io_uring later)").
//!
//! - **Positioned I/O** (`pread`/`pwrite` through [`FileExt`]) so concurrent pieces never share a
//!   file position.
//! - **`O_DIRECT` when aligned.** Each area opens two descriptors: a buffered one and, when the
//!   filesystem accepts it, an `O_DIRECT` one. A piece whose area offset and length are multiples
//!   of [`DIRECT_ALIGN`] goes through the direct descriptor (memory that is not aligned is copied
//!   into an aligned buffer first); anything else goes through the page cache. Linux keeps the two
//!   coherent for non-overlapping-in-time access: a direct read first writes back dirty cached
//!   pages of its range, and a direct write invalidates them. tmpfs and some FUSE filesystems
//!   refuse `O_DIRECT`; that is detected when the area is opened (and again if a direct call
//!   fails with `EINVAL`), and the area then uses the buffered descriptor only.
//! - **Durability.** FUA writes use `pwritev2(RWF_DSYNC)` (or `pwrite` + `fdatasync` where the
//!   kernel lacks it); flush is `fdatasync`, which covers both descriptors (one inode).
//! - **Zeroing and trim** punch a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), which frees the
//!   blocks of a sparse file and reads back as zeros; write-zeroes falls back to `ZERO_RANGE` and
//!   then to writing zeros, trim to doing nothing (it is advisory).
//! - **Drivers** ([`IoDriver`]): io_uring ([`super::uring`], the default where the kernel allows
//!   it) or a blocking thread pool (`tokio::task::spawn_blocking`).
//!   `docs/benchmarks/local-backend.md` has the measurements behind [`IoDriver::Auto`]; zeroing
//!   and trim always use the pool (they are rare).
//!
//! The generation argument is not checked here: local I/O is issued by this node's engine, whose
//! gate guarantees the generation (seed 004 §11.4). Remote areas check it on the serving side.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tessera_api::model::{AreaId, Generation};

use super::aligned::{AlignedBuf, DIRECT_ALIGN, is_direct_aligned, is_memory_aligned};
use super::uring::{ReadBuf, UringDriver, WriteBuf};
use super::{AreaBackend, BackendFuture};

/// How a local area issues its reads, writes and flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoDriver {
    /// The measured default (`docs/benchmarks/local-backend.md`): io_uring, which was faster on
    /// reads (about +25%) and level on writes; the thread pool where the kernel or a seccomp
    /// profile refuses io_uring. Never fails for lack of io_uring.
    #[default]
    Auto,
    /// `pread`/`pwrite` on tokio's blocking thread pool.
    ThreadPool,
    /// io_uring with one ring and completion thread per area; opening fails when the kernel or a
    /// seccomp profile refuses io_uring.
    IoUring,
}

/// Whether aligned pieces bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// `O_DIRECT` for 4096-aligned pieces when the filesystem supports it.
    #[default]
    Auto,
    /// Always through the page cache.
    Off,
}

/// How to open a local area.
#[derive(Debug, Clone, Default)]
pub struct LocalAreaOptions {
    pub driver: IoDriver,
    pub direct: DirectIo,
    /// For a regular file: create it if missing and extend it (sparse) to this size. For a block
    /// device: the usable size, which must not exceed the device. `None`: the current size of the
    /// file or the whole device (decision D-3).
    pub size_bytes: Option<u64>,
}

/// Ring size of an area's io_uring driver.
const URING_ENTRIES: u32 = 256;
/// Largest buffer used when zeroing by writing.
const ZERO_CHUNK: usize = 1 << 20;

struct AreaFiles {
    path: PathBuf,
    buffered: Arc<File>,
    direct: Option<Arc<File>>,
    /// Cleared when the filesystem refuses a direct call after all.
    direct_ok: AtomicBool,
}

impl AreaFiles {
    /// The descriptor for a piece, and whether it is the direct one.
    fn pick(&self, offset: u64, len: usize) -> (Arc<File>, bool) {
        match &self.direct {
            Some(direct)
                if is_direct_aligned(offset, len) && self.direct_ok.load(Ordering::Relaxed) =>
            {
                (Arc::clone(direct), true)
            }
            _ => (Arc::clone(&self.buffered), false),
        }
    }

    fn disable_direct(&self, error: &io::Error) {
        if self.direct_ok.swap(false, Ordering::Relaxed) {
            tracing::warn!(path = %self.path.display(), %error,
                "O_DIRECT refused at run time; using buffered I/O for this area");
        }
    }
}

enum Driver {
    ThreadPool,
    IoUring(UringDriver),
}

/// A file or block device serving one area.
pub struct LocalArea {
    area: AreaId,
    size_bytes: u64,
    files: Arc<AreaFiles>,
    driver: Driver,
}

impl std::fmt::Debug for LocalArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalArea")
            .field("area", &self.area)
            .field("path", &self.files.path)
            .field("size_bytes", &self.size_bytes)
            .field("direct", &self.direct_io_active())
            .field("io_uring", &self.uses_io_uring())
            .finish()
    }
}

impl LocalArea {
    /// Opens (and for files, optionally creates and sizes) the area at `path`. Blocking: call it
    /// from a blocking context or at startup.
    pub fn open(
        area: impl Into<AreaId>,
        path: impl AsRef<Path>,
        options: &LocalAreaOptions,
    ) -> io::Result<LocalArea> {
        let path = path.as_ref().to_path_buf();
        let mut open = OpenOptions::new();
        open.read(true).write(true);
        if options.size_bytes.is_some() {
            open.create(true);
        }
        let buffered = open.open(&path)?;
        let file_type = buffered.metadata()?.file_type();
        let size_bytes = if file_type.is_block_device() {
            let device = (&buffered).seek(SeekFrom::End(0))?;
            match options.size_bytes {
                Some(size) if size > device => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{}: area size {size} exceeds the device ({device} bytes)",
                            path.display()
                        ),
                    ));
                }
                Some(size) => size,
                None => device,
            }
        } else {
            let current = buffered.metadata()?.len();
            match options.size_bytes {
                Some(size) if size > current => {
                    buffered.set_len(size)?;
                    size
                }
                Some(size) => size,
                None => current,
            }
        };
        let direct = match options.direct {
            DirectIo::Off => None,
            DirectIo::Auto => open_direct(&path, size_bytes),
        };
        let driver = match options.driver {
            IoDriver::ThreadPool => Driver::ThreadPool,
            IoDriver::IoUring => Driver::IoUring(UringDriver::new(URING_ENTRIES)?),
            IoDriver::Auto => match UringDriver::new(URING_ENTRIES) {
                Ok(ring) => Driver::IoUring(ring),
                Err(error) => {
                    tracing::info!(path = %path.display(), %error,
                        "io_uring unavailable; using the blocking thread pool");
                    Driver::ThreadPool
                }
            },
        };
        Ok(LocalArea {
            area: area.into(),
            size_bytes,
            files: Arc::new(AreaFiles {
                path,
                buffered: Arc::new(buffered),
                direct_ok: AtomicBool::new(direct.is_some()),
                direct: direct.map(Arc::new),
            }),
            driver,
        })
    }

    pub fn path(&self) -> &Path {
        &self.files.path
    }

    /// Whether aligned pieces currently bypass the page cache.
    pub fn direct_io_active(&self) -> bool {
        self.files.direct.is_some() && self.files.direct_ok.load(Ordering::Relaxed)
    }

    pub fn uses_io_uring(&self) -> bool {
        matches!(self.driver, Driver::IoUring(_))
    }

    fn check(&self, area_offset: u64, length: u64) -> io::Result<()> {
        match area_offset.checked_add(length) {
            Some(end) if end <= self.size_bytes && end <= i64::MAX as u64 => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "area {}: range at {area_offset} with length {length} is outside its {} bytes",
                    self.area, self.size_bytes
                ),
            )),
        }
    }

    async fn do_read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.check(offset, len as u64)?;
        let (file, direct) = self.files.pick(offset, len);
        let result = match &self.driver {
            Driver::ThreadPool => blocking(move || pread(&file, offset, len, direct)).await,
            Driver::IoUring(ring) => ring.read(file, offset, read_buf(len, direct)).await,
        };
        match result {
            Err(e) if direct && is_einval(&e) => {
                self.files.disable_direct(&e);
                let file = Arc::clone(&self.files.buffered);
                match &self.driver {
                    Driver::ThreadPool => blocking(move || pread(&file, offset, len, false)).await,
                    Driver::IoUring(ring) => ring.read(file, offset, read_buf(len, false)).await,
                }
            }
            other => other,
        }
    }

    async fn do_write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let (file, direct) = self.files.pick(offset, data.len());
        let result = match &self.driver {
            Driver::ThreadPool => {
                let data = data.clone();
                blocking(move || pwrite(&file, offset, write_buf(data, direct).as_ref(), fua)).await
            }
            Driver::IoUring(ring) => {
                ring.write(file, offset, write_buf(data.clone(), direct), fua)
                    .await
            }
        };
        match result {
            Err(e) if direct && is_einval(&e) => {
                self.files.disable_direct(&e);
                let file = Arc::clone(&self.files.buffered);
                match &self.driver {
                    Driver::ThreadPool => blocking(move || pwrite(&file, offset, &data, fua)).await,
                    Driver::IoUring(ring) => {
                        ring.write(file, offset, WriteBuf::Shared(data), fua).await
                    }
                }
            }
            other => other,
        }
    }

    async fn do_flush(&self) -> io::Result<()> {
        let file = Arc::clone(&self.files.buffered);
        match &self.driver {
            Driver::ThreadPool => blocking(move || file.sync_data()).await,
            Driver::IoUring(ring) => ring.fdatasync(file).await,
        }
    }

    async fn do_write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check(offset, len)?;
        let files = Arc::clone(&self.files);
        blocking(move || zero_range(&files, offset, len, fua)).await
    }

    async fn do_trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let file = Arc::clone(&self.files.buffered);
        blocking(move || match punch_hole(&file, offset, len) {
            Err(e) if is_unsupported(&e) => Ok(()), // Trim is advisory.
            other => other,
        })
        .await
    }
}

impl AreaBackend for LocalArea {
    fn area(&self) -> &AreaId {
        &self.area
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read(
        &self,
        _generation: Generation,
        area_offset: u64,
        length: usize,
    ) -> BackendFuture<'_, Bytes> {
        Box::pin(async move { Ok(self.do_read(area_offset, length).await?) })
    }

    fn write(
        &self,
        _generation: Generation,
        area_offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BackendFuture<'_, ()> {
        Box::pin(async move { Ok(self.do_write(area_offset, data, fua).await?) })
    }

    fn write_zeroes(
        &self,
        _generation: Generation,
        area_offset: u64,
        length: u64,
        fua: bool,
    ) -> BackendFuture<'_, ()> {
        Box::pin(async move { Ok(self.do_write_zeroes(area_offset, length, fua).await?) })
    }

    fn trim(
        &self,
        _generation: Generation,
        area_offset: u64,
        length: u64,
    ) -> BackendFuture<'_, ()> {
        Box::pin(async move { Ok(self.do_trim(area_offset, length).await?) })
    }

    fn flush(&self, _generation: Generation) -> BackendFuture<'_, ()> {
        Box::pin(async move { Ok(self.do_flush().await?) })
    }
}

/// Opens the `O_DIRECT` descriptor and checks that an aligned read works on it.
fn open_direct(path: &Path, size_bytes: u64) -> Option<File> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => file,
        Err(error) => {
            tracing::info!(path = %path.display(), %error, "O_DIRECT not available; buffered I/O only");
            return None;
        }
    };
    if size_bytes >= DIRECT_ALIGN as u64 {
        let mut probe = AlignedBuf::zeroed(DIRECT_ALIGN);
        if let Err(error) = file.read_exact_at(probe.as_mut_slice(), 0) {
            tracing::info!(path = %path.display(), %error, "O_DIRECT read refused; buffered I/O only");
            return None;
        }
    }
    Some(file)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| Err(io::Error::other(format!("I/O worker failed: {join}"))))
}

fn read_buf(len: usize, direct: bool) -> ReadBuf {
    if direct {
        ReadBuf::Aligned(AlignedBuf::zeroed(len))
    } else {
        ReadBuf::Plain(vec![0; len])
    }
}

/// The write's memory, copied into an aligned buffer when the direct path needs it.
fn write_buf(data: Bytes, direct: bool) -> WriteBuf {
    if direct && !is_memory_aligned(&data) {
        WriteBuf::Aligned(AlignedBuf::copy_from(&data))
    } else {
        WriteBuf::Shared(data)
    }
}

impl AsRef<[u8]> for WriteBuf {
    fn as_ref(&self) -> &[u8] {
        match self {
            WriteBuf::Shared(bytes) => bytes,
            WriteBuf::Aligned(buf) => buf.as_slice(),
        }
    }
}

fn pread(file: &File, offset: u64, len: usize, direct: bool) -> io::Result<Bytes> {
    if direct {
        let mut buf = AlignedBuf::zeroed(len);
        file.read_exact_at(buf.as_mut_slice(), offset)?;
        Ok(buf.into_bytes())
    } else {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }
}

/// Writes all of `data`; with `dsync`, durable on return.
fn pwrite(file: &File, mut offset: u64, mut data: &[u8], dsync: bool) -> io::Result<()> {
    if !dsync {
        return file.write_all_at(data, offset);
    }
    while !data.is_empty() {
        let iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: `iov` points at `data`, which outlives the call.
        let written = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_DSYNC) };
        if written < 0 {
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Kernels or filesystems without per-write sync flags.
                Some(libc::ENOSYS | libc::EOPNOTSUPP) => {
                    file.write_all_at(data, offset)?;
                    return file.sync_data();
                }
                _ => return Err(error),
            }
        }
        if written == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev2 wrote nothing",
            ));
        }
        let written = written as usize;
        data = &data[written..];
        offset += written as u64;
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    loop {
        // SAFETY: plain system call on an open descriptor.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Makes the range read as zeros: punch, else zero-range, else write zeros.
fn zero_range(files: &AreaFiles, offset: u64, len: u64, fua: bool) -> io::Result<()> {
    let file = &files.buffered;
    let punched = match punch_hole(file, offset, len) {
        Err(e) if is_unsupported(&e) => {
            match fallocate(
                file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if is_unsupported(&e) => false,
                other => other.map(|()| true)?,
            }
        }
        other => other.map(|()| true)?,
    };
    if !punched {
        let zeros = AlignedBuf::zeroed(ZERO_CHUNK);
        let mut cursor = offset;
        let end = offset + len;
        while cursor < end {
            let n = ((end - cursor) as usize).min(ZERO_CHUNK);
            let (file, _) = files.pick(cursor, n);
            file.write_all_at(&zeros.as_slice()[..n], cursor)?;
            cursor += n as u64;
        }
    }
    if fua { file.sync_data() } else { Ok(()) }
}

fn is_einval(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EINVAL)
}

fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}
