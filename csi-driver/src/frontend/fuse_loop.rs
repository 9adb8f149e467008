//! The fuse-loop frontend (ARCHITECTURE §4): a one-file FUSE filesystem over the engine, and a
//! loop device on that file.
//!
//! ```text
//! /dev/loopN ──(loop driver, buffered)──▶ <private dir>/mnt/volume ──(FUSE)──▶ VolumeFile ──▶ Volume
//! ```
//!
//! - The file's size is the volume's size and fixed (truncate to anything else is refused).
//! - `read`/`write` go to [`Volume::read`]/[`Volume::write`]; the file is opened with
//!   `FOPEN_DIRECT_IO` so the FUSE page cache is bypassed (the loop device has its own page cache
//!   above us; caching twice only costs memory and hides writes from other openers).
//! - `fsync` → [`Volume::flush`]. The loop driver turns `REQ_PREFLUSH` into `vfs_fsync` on the
//!   backing file, so a file system's barrier on `/dev/loopN` reaches the engine as a flush.
//! - `fallocate`: the loop driver turns `BLKDISCARD` into `PUNCH_HOLE | KEEP_SIZE` and
//!   `REQ_OP_WRITE_ZEROES` into `PUNCH_HOLE` (or `ZERO_RANGE` with `REQ_NOUNMAP`), see
//!   `lo_fallocate` in `drivers/block/loop.c`. A punched file range must read back as zeros
//!   (fallocate(2)), and the loop driver relies on that for WRITE_ZEROES, which ext4 uses to zero
//!   inode tables — so both modes map to [`Volume::write_zeroes`], not to the advisory
//!   [`Volume::trim`]. Both clear the usage bits of whole extents (seed 000 bitmap 332), which is
//!   what `fstrim` on the mounted file system is for; the local backend implements both with a
//!   punched hole, so the cost is the same.
//! - FUSE handlers are synchronous and run on fuser's worker threads (several, with
//!   `FUSE_DEV_IOC_CLONE` per-thread descriptors); each bridges to the async engine with
//!   [`Handle::block_on`], which needs a **multi-threaded** runtime (its workers drive the
//!   engine's futures while the FUSE thread waits).
//!
//! Attaching mounts the filesystem on a private directory (`<base>/<volume>.<pid>.<n>/mnt`) and
//! runs `losetup --find --show --direct-io=off <file>`. Detaching runs `losetup -d`, waits until
//! the loop driver released the file, unmounts, joins the FUSE threads and removes the
//! directory; a failed attach undoes what it did (the same code, from a drop guard).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use tokio::runtime::{Handle, RuntimeFlavor};

use super::{
    AttachTarget, Attachment, AttachmentState, Frontend, FrontendError, FrontendKind, find_in_path,
};
use crate::engine::{EngineError, Volume};

/// The engine's sector: every engine request is aligned to it.
const SECTOR: u64 = 512;
/// The single file in the filesystem.
pub const FILE_NAME: &str = "volume";
const ROOT: INodeNo = INodeNo::ROOT;
const FILE_INO: INodeNo = INodeNo(2);
/// Attributes never change behind the kernel's back (fixed size, one writer: us).
const TTL: Duration = Duration::from_secs(3600);
/// How long detach waits for the loop driver to let go of the file after `losetup -d`.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

fn engine_errno(e: &EngineError) -> Errno {
    Errno::from_i32(e.errno())
}

/// The one-file FUSE filesystem over a volume.
pub struct VolumeFile {
    volume: Arc<Volume>,
    runtime: Handle,
    uid: u32,
    gid: u32,
    created: SystemTime,
    /// Serialises read-modify-write of unaligned writes among themselves (the loop driver never
    /// sends them — block I/O is sector-aligned — but a stray `dd` on the file might).
    rmw: Mutex<()>,
}

impl std::fmt::Debug for VolumeFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeFile")
            .field("volume", &self.volume.name())
            .finish_non_exhaustive()
    }
}

impl VolumeFile {
    pub fn new(volume: Arc<Volume>, runtime: Handle) -> Self {
        VolumeFile {
            volume,
            runtime,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            created: SystemTime::now(),
            rmw: Mutex::new(()),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o700, 0, 2),
            FILE_INO => (FileType::RegularFile, 0o600, self.volume.size(), 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(SECTOR),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    /// Bytes `[offset, offset + size)` clamped to the file; an engine read of the enclosing
    /// sector-aligned window, sliced.
    fn read_range(&self, offset: u64, size: u64) -> Result<Bytes, Errno> {
        let volume_size = self.volume.size();
        if offset >= volume_size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.saturating_add(size).min(volume_size);
        let start_aligned = offset - offset % SECTOR;
        let end_aligned = end.next_multiple_of(SECTOR).min(volume_size);
        let data = self
            .runtime
            .block_on(self.volume.read(start_aligned, end_aligned - start_aligned))
            .map_err(|e| engine_errno(&e))?;
        let from = (offset - start_aligned) as usize;
        let to = (end - start_aligned) as usize;
        if data.len() < to {
            return Err(Errno::EIO);
        }
        Ok(data.slice(from..to))
    }

    /// Writes `data` at `offset` (clamped to the file; returns the bytes written).
    fn write_range(&self, offset: u64, data: &[u8], fua: bool) -> Result<usize, Errno> {
        let volume_size = self.volume.size();
        if offset >= volume_size {
            // The file cannot grow (its size is the volume's).
            return Err(Errno::from_i32(libc::EFBIG));
        }
        let len = (data.len() as u64).min(volume_size - offset) as usize;
        let data = &data[..len];
        if len == 0 {
            return Ok(0);
        }
        let end = offset + len as u64;
        if offset.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR) {
            // The only case the loop driver produces: straight through, one copy into `Bytes`
            // (fuser lends the buffer only for the duration of the call).
            self.runtime
                .block_on(self.volume.write(offset, Bytes::copy_from_slice(data), fua))
                .map_err(|e| engine_errno(&e))?;
            return Ok(len);
        }
        // Unaligned: read-modify-write of the enclosing sectors.
        let _serialised = self.rmw.lock();
        let start_aligned = offset - offset % SECTOR;
        let end_aligned = end.next_multiple_of(SECTOR).min(volume_size);
        let window = self
            .runtime
            .block_on(self.volume.read(start_aligned, end_aligned - start_aligned))
            .map_err(|e| engine_errno(&e))?;
        let mut merged = BytesMut::from(&window[..]);
        let from = (offset - start_aligned) as usize;
        merged[from..from + len].copy_from_slice(data);
        self.runtime
            .block_on(self.volume.write(start_aligned, merged.freeze(), fua))
            .map_err(|e| engine_errno(&e))?;
        Ok(len)
    }

    /// Makes `[offset, offset + length)` read as zeros: [`Volume::write_zeroes`] on the aligned
    /// inside, zero writes on partial sectors at the edges.
    fn zero_range(&self, offset: u64, length: u64) -> Result<(), Errno> {
        let volume_size = self.volume.size();
        let end = offset.saturating_add(length).min(volume_size);
        if offset >= end {
            return Ok(());
        }
        let inner_start = offset.next_multiple_of(SECTOR);
        let inner_end = end - end % SECTOR;
        if inner_start < inner_end {
            self.runtime
                .block_on(
                    self.volume
                        .write_zeroes(inner_start, inner_end - inner_start, false),
                )
                .map_err(|e| engine_errno(&e))?;
        }
        // Edge pieces (at most one sector each); when the range lies within one sector both
        // edges are the same piece.
        let head_end = inner_start.min(end);
        if offset < head_end {
            self.write_range(offset, &vec![0; (head_end - offset) as usize], false)?;
        }
        let tail_start = inner_end.max(head_end);
        if tail_start < end {
            self.write_range(tail_start, &vec![0; (end - tail_start) as usize], false)?;
        }
        Ok(())
    }

    fn flush_volume(&self) -> Result<(), Errno> {
        self.runtime
            .block_on(self.volume.flush())
            .map_err(|e| engine_errno(&e))
    }
}

impl Filesystem for VolumeFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger requests mean fewer round trips for the loop driver's bios; the kernel clamps
        // to what it supports (the value it returns in Err is the nearest allowed).
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.attr(FILE_INO)) {
            (ROOT, Some(attr)) if name == FILE_NAME => {
                reply.entry(&TTL, &attr, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The size is the volume's; resizing goes through the volume, not the file. Times and
        // modes are accepted and ignored (nothing depends on them).
        if size.is_some_and(|s| s != attr.size) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        // See the module docs: no FUSE page cache under the loop device's; parallel direct
        // writes so the kernel does not serialise writers on the inode lock.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        )
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        match self.read_range(offset, u64::from(size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        // O_DSYNC/O_SYNC openers get durable writes (FUA on every replica).
        let fua = flags.0 & (libc::O_DSYNC | libc::O_SYNC) != 0;
        match self.write_range(offset, data, fua) {
            Ok(written) => reply.written(written as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // FUSE `flush` is close(2), not a durability request; fsync is.
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush_volume() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.volume.size() / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096)
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zeroing = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        let volume_size = self.volume.size();
        let result = if mode & !known != 0 {
            // COLLAPSE_RANGE, INSERT_RANGE, UNSHARE: a block device cannot shift its contents.
            Err(Errno::from_i32(libc::EOPNOTSUPP))
        } else if !keep_size && offset.saturating_add(length) > volume_size {
            // Would grow the file.
            Err(Errno::from_i32(libc::EFBIG))
        } else if zeroing {
            // See the module docs for why PUNCH_HOLE is write-zeroes, not trim.
            self.zero_range(offset, length)
        } else {
            // Plain preallocation: a mapped volume is allocated already; a hole cannot be
            // allocated from here (writes to it fail with ENOSPC, ARCHITECTURE §4).
            Ok(())
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// Attaches volumes as `/dev/loopN` through a one-file FUSE filesystem.
#[derive(Debug, Clone)]
pub struct FuseLoopFrontend {
    runtime: Handle,
    base_dir: PathBuf,
    fuse_threads: usize,
}

static ATTACH_SEQ: AtomicU64 = AtomicU64::new(0);

impl FuseLoopFrontend {
    /// Private mount directories are created under `base_dir`. `runtime` must be multi-threaded
    /// (checked by `attach`).
    pub fn new(runtime: Handle, base_dir: impl Into<PathBuf>) -> Self {
        FuseLoopFrontend {
            runtime,
            base_dir: base_dir.into(),
            fuse_threads: 4,
        }
    }

    /// FUSE worker threads per attachment (default 4; at least 1). Each blocks while its
    /// request is in the engine, so this bounds the requests in flight from the loop device.
    pub fn with_fuse_threads(mut self, threads: usize) -> Self {
        self.fuse_threads = threads.max(1);
        self
    }
}

impl Frontend for FuseLoopFrontend {
    fn kind(&self) -> FrontendKind {
        FrontendKind::FuseLoop
    }

    fn attach(&self, volume: Arc<Volume>) -> Result<Attachment, FrontendError> {
        let unavailable = |reason: String| FrontendError::Unavailable {
            kind: FrontendKind::FuseLoop,
            reason,
        };
        if self.runtime.runtime_flavor() != RuntimeFlavor::MultiThread {
            return Err(FrontendError::Invalid(
                "fuse-loop needs a multi-threaded tokio runtime: FUSE threads block on it".into(),
            ));
        }
        for dev in ["/dev/fuse", "/dev/loop-control"] {
            if !Path::new(dev).exists() {
                return Err(unavailable(format!("{dev} does not exist")));
            }
        }
        let losetup =
            find_in_path("losetup").ok_or_else(|| unavailable("losetup not found".into()))?;

        let name = volume.name().to_string();
        let dir = self.base_dir.join(format!(
            "{}.{}.{}",
            sanitize(&name),
            std::process::id(),
            ATTACH_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| FrontendError::io(format!("create {}", mountpoint.display()), e))?;
        // From here on, dropping `state` undoes everything done so far.
        let mut state = FuseLoopState {
            dir: Some(dir),
            mountpoint: mountpoint.clone(),
            session: None,
            loop_device: None,
            losetup: losetup.clone(),
        };

        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("tessera:{name}")),
            MountOption::Subtype("tessera".into()),
            MountOption::RW,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        config.n_threads = Some(self.fuse_threads);
        config.clone_fd = self.fuse_threads > 1;
        let fs = VolumeFile::new(volume, self.runtime.clone());
        let session = fuser::spawn_mount(fs, &mountpoint, &config)
            .map_err(|e| FrontendError::io(format!("mount FUSE on {}", mountpoint.display()), e))?;
        state.session = Some(session);

        let file = mountpoint.join(FILE_NAME);
        let output = Command::new(&losetup)
            .args(["--find", "--show", "--direct-io=off"])
            .arg(&file)
            .output()
            .map_err(|e| FrontendError::io(format!("run {}", losetup.display()), e))?;
        if !output.status.success() {
            return Err(command_error(&losetup, &["--find", "--show"], &output));
        }
        let device = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if !device.starts_with("/dev/") {
            return Err(FrontendError::Invalid(format!(
                "losetup printed {device:?}, not a device"
            )));
        }
        state.loop_device = Some(device.clone());
        Ok(Attachment::new(
            FrontendKind::FuseLoop,
            name,
            AttachTarget::Device(device),
            Box::new(state),
        ))
    }
}

/// A volume name as a directory name component.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn command_error(program: &Path, args: &[&str], output: &std::process::Output) -> FrontendError {
    FrontendError::Command {
        command: format!("{} {}", program.display(), args.join(" ")),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    }
}

/// Everything one attachment set up, torn down in reverse order.
#[derive(Debug)]
struct FuseLoopState {
    dir: Option<PathBuf>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    loop_device: Option<PathBuf>,
    losetup: PathBuf,
}

impl FuseLoopState {
    fn detach_loop(&mut self) -> Result<(), FrontendError> {
        let Some(device) = self.loop_device.take() else {
            return Ok(());
        };
        let output = Command::new(&self.losetup)
            .arg("-d")
            .arg(&device)
            .output()
            .map_err(|e| FrontendError::io(format!("run {} -d", self.losetup.display()), e))?;
        let backing = device
            .file_name()
            .map(|n| Path::new("/sys/block").join(n).join("loop/backing_file"));
        // A device someone else already detached is as good as detached by us.
        let unbound = backing.as_ref().is_some_and(|b| !b.exists());
        if !output.status.success() && !unbound {
            return Err(command_error(&self.losetup, &["-d"], &output));
        }
        // `losetup -d` only sets autoclear while the device is open (a mounted file system, a
        // reader); the file is released when the last opener closes. Unmounting FUSE before that
        // would fail with EBUSY, so wait for the release (bounded).
        if let Some(backing) = backing {
            let deadline = Instant::now() + RELEASE_TIMEOUT;
            while backing.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if backing.exists() {
                return Err(FrontendError::Invalid(format!(
                    "{} still holds the volume file {}s after losetup -d (is it still open?)",
                    device.display(),
                    RELEASE_TIMEOUT.as_secs()
                )));
            }
        }
        Ok(())
    }

    fn unmount(&mut self) -> Result<(), FrontendError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        session.umount_and_join().map_err(|e| {
            // Still busy (the loop device did not let go): detach the mount lazily so the
            // directory can go; the FUSE threads keep serving until the last user closes the
            // file, then exit on their own. Never leave the loop device without its server.
            let lazy = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            FrontendError::io(
                format!(
                    "unmount {} (lazy unmount: {lazy:?})",
                    self.mountpoint.display()
                ),
                e,
            )
        })
    }

    fn remove_dir(&mut self) -> Result<(), FrontendError> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        std::fs::remove_dir_all(&dir)
            .map_err(|e| FrontendError::io(format!("remove {}", dir.display()), e))
    }
}

impl AttachmentState for FuseLoopState {
    /// The file's attributes are cached for [`TTL`]: invalidate them, let a `stat` fetch the new
    /// size into the kernel inode, then tell the loop driver (`losetup -c`, LOOP_SET_CAPACITY,
    /// which reads the cached inode size).
    fn refresh_size(&mut self) -> Result<(), FrontendError> {
        let (Some(session), Some(device)) = (self.session.as_ref(), self.loop_device.as_ref())
        else {
            return Ok(());
        };
        session
            .notifier()
            .inval_inode(FILE_INO, 0, 0)
            .map_err(|e| FrontendError::io("invalidate the FUSE file attributes", e))?;
        let file = self.mountpoint.join(FILE_NAME);
        std::fs::metadata(&file)
            .map_err(|e| FrontendError::io(format!("stat {}", file.display()), e))?;
        let output = Command::new(&self.losetup)
            .arg("-c")
            .arg(device)
            .output()
            .map_err(|e| FrontendError::io(format!("run {} -c", self.losetup.display()), e))?;
        if !output.status.success() {
            return Err(command_error(&self.losetup, &["-c"], &output));
        }
        Ok(())
    }

    fn detach(&mut self) -> Result<(), FrontendError> {
        // Every step is attempted; the first error is reported. Unmounting is skipped while the
        // loop device may still use the file (it would hang its I/O).
        let looped = self.detach_loop();
        let unmounted = if looped.is_ok() {
            self.unmount()
        } else {
            Ok(())
        };
        let removed = if looped.is_ok() && unmounted.is_ok() {
            self.remove_dir()
        } else {
            Ok(())
        };
        looped.and(unmounted).and(removed)
    }
}

impl Drop for FuseLoopState {
    fn drop(&mut self) {
        // Only reached with work left when attach failed half-way (an `Attachment` detaches on
        // its own drop); the partial state is undone here.
        if (self.loop_device.is_some() || self.session.is_some() || self.dir.is_some())
            && let Err(e) = self.detach()
        {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e,
                "fuse-loop cleanup failed");
        }
    }
}
