//! An io_uring driver for local areas (ARCHITECTURE §4 "io_uring later").
//!
//! One ring per driver and one completion thread. Any thread submits: it pushes the entry under
//! a mutex and enters the kernel; the completion thread waits for completions, finishes short
//! transfers by resubmitting the rest, and wakes the waiting task through a oneshot channel.
//!
//! Every in-flight operation is a heap `Op` whose address is the entry's `user_data`. The op
//! owns its buffer and keeps its file open until the kernel has posted the completion, so a
//! caller that stops waiting (drops its future) never leaves the kernel writing into freed
//! memory.
//!
//! Availability is detected at run time ([`UringDriver::new`]): seccomp profiles and
//! `kernel.io_uring_disabled` can refuse the ring, and then local areas use the thread pool.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use io_uring::{IoUring, Probe, opcode, squeue, types};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::aligned::AlignedBuf;

/// `user_data` of the entry that wakes the completion thread at shutdown.
const WAKE: u64 = 0;

/// Memory a read lands in.
pub(crate) enum ReadBuf {
    Aligned(AlignedBuf),
    Plain(Vec<u8>),
}

impl ReadBuf {
    fn len(&self) -> usize {
        match self {
            ReadBuf::Aligned(buf) => buf.len(),
            ReadBuf::Plain(buf) => buf.len(),
        }
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            ReadBuf::Aligned(buf) => buf.as_mut_slice().as_mut_ptr(),
            ReadBuf::Plain(buf) => buf.as_mut_ptr(),
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            ReadBuf::Aligned(buf) => buf.into_bytes(),
            ReadBuf::Plain(buf) => Bytes::from(buf),
        }
    }
}

/// Memory a write comes from.
pub(crate) enum WriteBuf {
    Shared(Bytes),
    Aligned(AlignedBuf),
}

impl WriteBuf {
    fn as_slice(&self) -> &[u8] {
        match self {
            WriteBuf::Shared(bytes) => bytes,
            WriteBuf::Aligned(buf) => buf.as_slice(),
        }
    }
}

enum OpKind {
    Read(ReadBuf),
    Write { data: WriteBuf, dsync: bool },
    Fdatasync,
}

/// Result of a completed operation.
pub(crate) enum OpOutput {
    Read(Bytes),
    Done,
}

struct Op {
    /// Keeps the descriptor open until the completion arrives.
    file: Arc<File>,
    offset: u64,
    /// Bytes transferred so far (short reads and writes are continued).
    done: usize,
    kind: OpKind,
    reply: Option<oneshot::Sender<io::Result<OpOutput>>>,
}

impl Op {
    fn entry(&mut self) -> io::Result<squeue::Entry> {
        let fd = types::Fd(self.file.as_raw_fd());
        let offset = self.offset + self.done as u64;
        let entry = match &mut self.kind {
            OpKind::Read(buf) => {
                let remaining = chunk_len(buf.len() - self.done)?;
                // SAFETY (pointer use by the kernel): `buf` lives in this boxed op until the
                // completion is reaped; `done < len`.
                let ptr = buf.as_mut_ptr().wrapping_add(self.done);
                opcode::Read::new(fd, ptr, remaining).offset(offset).build()
            }
            OpKind::Write { data, dsync } => {
                let slice = data.as_slice();
                let remaining = chunk_len(slice.len() - self.done)?;
                let ptr = slice.as_ptr().wrapping_add(self.done);
                let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, ptr, remaining)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            OpKind::Fdatasync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        Ok(entry)
    }

    fn total(&self) -> usize {
        match &self.kind {
            OpKind::Read(buf) => buf.len(),
            OpKind::Write { data, .. } => data.as_slice().len(),
            OpKind::Fdatasync => 0,
        }
    }

    fn finish(self, result: io::Result<()>) {
        let Op { kind, reply, .. } = self;
        let output = result.map(|()| match kind {
            OpKind::Read(buf) => OpOutput::Read(buf.into_bytes()),
            OpKind::Write { .. } | OpKind::Fdatasync => OpOutput::Done,
        });
        if let Some(reply) = reply {
            // The waiter may have gone away; the I/O itself is complete either way.
            let _ = reply.send(output);
        }
    }
}

/// A single transfer is at most `u32::MAX` bytes; pieces are at most one extent anyway.
fn chunk_len(remaining: usize) -> io::Result<u32> {
    u32::try_from(remaining.min(1 << 30))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "transfer too large"))
}

struct Shared {
    ring: IoUring,
    /// Serialises pushes to the submission queue (one producer at a time).
    sq: Mutex<()>,
    inflight: AtomicUsize,
    shutdown: AtomicBool,
}

impl Shared {
    /// Pushes one entry and enters the kernel. Retries while the queue is full.
    fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        let guard = self.sq.lock();
        loop {
            // SAFETY: the `sq` mutex makes this the only producer; the completion thread never
            // touches the submission queue outside this mutex.
            let pushed = unsafe {
                let mut sq = self.ring.submission_shared();
                let pushed = sq.push(entry).is_ok();
                sq.sync();
                pushed
            };
            if pushed {
                break;
            }
            // Queue full: hand the queued entries to the kernel and try again.
            submit_ignoring_busy(&self.ring)?;
        }
        // The entry is published; enter the kernel outside the lock so other producers can push
        // meanwhile (the kernel serialises submission per ring anyway).
        drop(guard);
        submit_ignoring_busy(&self.ring)
    }
}

/// `submit`, treating "busy, try later" as success: the entries stay queued and the completion
/// thread's next `submit_and_wait` hands them over.
fn submit_ignoring_busy(ring: &IoUring) -> io::Result<()> {
    match ring.submit() {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// An io_uring instance with its completion thread.
pub struct UringDriver {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for UringDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDriver")
            .field("inflight", &self.shared.inflight.load(Ordering::Relaxed))
            .finish()
    }
}

impl UringDriver {
    /// Creates a ring of `entries` submission slots and checks that it works here: the ring can
    /// be set up, a no-op completes, and the kernel knows read, write and fsync. Fails when any
    /// of that is refused (the caller then uses the thread pool).
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder().build(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring opcode {code} not supported"),
                ));
            }
        }
        let shared = Arc::new(Shared {
            ring,
            sq: Mutex::new(()),
            inflight: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
        });
        // Probe a round trip before starting the thread.
        shared.push(&opcode::Nop::new().build().user_data(WAKE))?;
        shared.ring.submit_and_wait(1)?;
        // SAFETY: no completion thread exists yet, so this is the only consumer.
        let probed = unsafe { shared.ring.completion_shared() }.count();
        if probed != 1 {
            return Err(io::Error::other("io_uring no-op did not complete"));
        }
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tessera-uring".into())
            .spawn(move || completion_loop(&thread_shared))?;
        Ok(UringDriver {
            shared,
            thread: Some(thread),
        })
    }

    async fn run(&self, file: Arc<File>, offset: u64, kind: OpKind) -> io::Result<OpOutput> {
        let (reply, wait) = oneshot::channel();
        let mut op = Box::new(Op {
            file,
            offset,
            done: 0,
            kind,
            reply: Some(reply),
        });
        let entry = op.entry()?;
        self.shared.inflight.fetch_add(1, Ordering::SeqCst);
        let user_data = Box::into_raw(op) as u64;
        if let Err(e) = self.shared.push(&entry.user_data(user_data)) {
            self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
            // SAFETY: the push failed, so the kernel never saw `user_data`; we still own it.
            drop(unsafe { Box::from_raw(user_data as *mut Op) });
            return Err(e);
        }
        wait.await
            .unwrap_or_else(|_| Err(io::Error::other("io_uring driver stopped")))
    }

    pub(crate) async fn read(
        &self,
        file: Arc<File>,
        offset: u64,
        buf: ReadBuf,
    ) -> io::Result<Bytes> {
        match self.run(file, offset, OpKind::Read(buf)).await? {
            OpOutput::Read(bytes) => Ok(bytes),
            OpOutput::Done => Err(io::Error::other("io_uring read returned no data")),
        }
    }

    pub(crate) async fn write(
        &self,
        file: Arc<File>,
        offset: u64,
        data: WriteBuf,
        dsync: bool,
    ) -> io::Result<()> {
        self.run(file, offset, OpKind::Write { data, dsync })
            .await
            .map(|_| ())
    }

    pub(crate) async fn fdatasync(&self, file: Arc<File>) -> io::Result<()> {
        self.run(file, 0, OpKind::Fdatasync).await.map(|_| ())
    }
}

impl Drop for UringDriver {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // Wake the completion thread; it exits once nothing is in flight.
        if let Err(e) = self
            .shared
            .push(&opcode::Nop::new().build().user_data(WAKE))
        {
            tracing::warn!(error = %e, "cannot wake the io_uring completion thread");
            return;
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("io_uring completion thread panicked");
        }
    }
}

fn completion_loop(shared: &Shared) {
    loop {
        if let Err(e) = shared.ring.submit_and_wait(1)
            && !matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
            )
        {
            tracing::error!(error = %e, "io_uring wait failed");
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: this thread is the only consumer of the completion queue.
        let completions: Vec<(u64, i32)> = unsafe { shared.ring.completion_shared() }
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in completions {
            if user_data == WAKE {
                continue;
            }
            // SAFETY: every non-WAKE user_data is a `Box<Op>` leaked by `run` or by a
            // resubmission below, and each is completed exactly once.
            let op = unsafe { Box::from_raw(user_data as *mut Op) };
            complete(shared, op, result);
        }
        if shared.shutdown.load(Ordering::SeqCst) && shared.inflight.load(Ordering::SeqCst) == 0 {
            return;
        }
    }
}

/// Handles one completion: finish, continue a short transfer, or retry an interrupted one.
fn complete(shared: &Shared, mut op: Box<Op>, result: i32) {
    if result < 0 {
        let errno = -result;
        if errno == libc::EINTR || errno == libc::EAGAIN {
            resubmit(shared, op);
            return;
        }
        shared.inflight.fetch_sub(1, Ordering::SeqCst);
        (*op).finish(Err(io::Error::from_raw_os_error(errno)));
        return;
    }
    if matches!(op.kind, OpKind::Fdatasync) {
        shared.inflight.fetch_sub(1, Ordering::SeqCst);
        (*op).finish(Ok(()));
        return;
    }
    let transferred = result as usize;
    if transferred == 0 {
        shared.inflight.fetch_sub(1, Ordering::SeqCst);
        let error = match op.kind {
            OpKind::Read(_) => io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"),
            _ => io::Error::new(io::ErrorKind::WriteZero, "write transferred nothing"),
        };
        (*op).finish(Err(error));
        return;
    }
    op.done += transferred;
    if op.done < op.total() {
        resubmit(shared, op);
    } else {
        shared.inflight.fetch_sub(1, Ordering::SeqCst);
        (*op).finish(Ok(()));
    }
}

fn resubmit(shared: &Shared, mut op: Box<Op>) {
    let entry = match op.entry() {
        Ok(entry) => entry,
        Err(e) => {
            shared.inflight.fetch_sub(1, Ordering::SeqCst);
            (*op).finish(Err(e));
            return;
        }
    };
    let user_data = Box::into_raw(op) as u64;
    if let Err(e) = shared.push(&entry.user_data(user_data)) {
        shared.inflight.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: not submitted, still ours.
        let op = unsafe { Box::from_raw(user_data as *mut Op) };
        (*op).finish(Err(e));
    }
}
