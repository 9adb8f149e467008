//! The engine as an NBD export, and the per-volume unix-socket frontend (ARCHITECTURE §4: "Every
//! volume is also reachable as an NBD export on a unix socket").
//!
//! [`VolumeExport`] implements [`tessera_nbd::Export`] over an `Arc<Volume>`; [`NbdUnixFrontend`]
//! serves one volume per socket with [`tessera_nbd::Server`] and [`AllowAll`] (the socket's
//! file permissions are the access control, see the `tessera-nbd` README).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tessera_nbd::{
    AllowAll, BlockSize, CancellationToken, Capabilities, Export, ExportError, Server,
    SimpleCatalog,
};
use tokio::net::UnixListener;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::{AttachTarget, Attachment, AttachmentState, Frontend, FrontendError, FrontendKind};
use crate::engine::{EngineError, Volume};

/// How often a request that met [`EngineError::StaleGeneration`] is translated again. The engine
/// documents that error as retryable ("translated again with the active map"); a map swap racing
/// a request is rare, so a couple of attempts is plenty, and a persistent mismatch is an error.
const STALE_RETRIES: usize = 3;

/// Maps an engine error to the NBD export error (and so to the NBD errno the client sees).
pub fn export_error(e: EngineError) -> ExportError {
    match e {
        // ARCHITECTURE §4: a write to a hole fails with ENOSPC until allocation on demand exists.
        EngineError::NeedsAllocation { .. } => ExportError::NoSpace,
        EngineError::OutOfRange { .. } => ExportError::OutOfRange,
        EngineError::Unaligned { .. } => ExportError::Invalid(e.to_string()),
        // A full area file system is ENOSPC (as `EngineError::errno`), anything else EIO.
        EngineError::Io { ref source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            ExportError::NoSpace
        }
        EngineError::Io { .. }
        | EngineError::AllReplicasFailed { .. }
        | EngineError::StaleGeneration { .. }
        | EngineError::UnknownArea { .. }
        | EngineError::Fenced { .. } => ExportError::Io(e.to_string()),
        EngineError::Map(_) => ExportError::Invalid(e.to_string()),
        // Not request errors (map management); reported as I/O errors should they ever surface.
        EngineError::GenerationNotNewer { .. }
        | EngineError::IncompatibleMap { .. }
        | EngineError::TooManyExtents { .. }
        | EngineError::Gate(_) => ExportError::Io(e.to_string()),
    }
}

/// Runs `op` again while it fails with [`EngineError::StaleGeneration`] (see [`STALE_RETRIES`]).
async fn retry_stale<T, F, Fut>(mut op: F) -> Result<T, ExportError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, EngineError>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(EngineError::StaleGeneration { .. }) if attempt < STALE_RETRIES => attempt += 1,
            other => return other.map_err(export_error),
        }
    }
}

/// A volume as an NBD export.
#[derive(Debug, Clone)]
pub struct VolumeExport {
    volume: Arc<Volume>,
}

impl VolumeExport {
    pub fn new(volume: Arc<Volume>) -> Self {
        VolumeExport { volume }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            // The engine clears usage bits on trim (seed 000 bitmap 332), so trims must reach it.
            can_trim: true,
            // Native: the local backend punches a hole instead of writing zero buffers.
            can_write_zeroes: true,
            // Safe: the engine has no write-back cache and no per-connection state; a request
            // returns only after every piece on every replica completed, and `Volume::flush`
            // flushes every area of the volume. So a FLUSH on any connection covers writes
            // completed on every connection — the spec's condition for CAN_MULTI_CONN.
            can_multi_conn: true,
        }
    }

    fn block_size(&self) -> BlockSize {
        // The engine refuses anything not aligned to its 512-byte sector; advertising 512 as the
        // minimum makes the server reject misaligned requests with EINVAL before they reach us.
        BlockSize::DEFAULT
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        retry_stale(|| self.volume.read(offset, u64::from(len))).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        retry_stale(|| self.volume.write(offset, data.clone(), fua)).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        retry_stale(|| self.volume.flush()).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        retry_stale(|| self.volume.trim(offset, u64::from(len))).await?;
        // The engine's trim has no FUA of its own; a flush makes the discard durable.
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _may_trim: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        // NO_HOLE (`may_trim == false`) cannot be honoured more strictly than this: the engine
        // keeps the extent mapped either way; only the area file may become sparse, which is
        // invisible to the client.
        retry_stale(|| self.volume.write_zeroes(offset, u64::from(len), fua)).await
    }
}

/// Serves one volume as an NBD export on its own unix socket.
///
/// The export is published under the volume's name and as the default export `""`, so both
/// `nbd+unix:///<volume>?socket=…` and `nbd+unix:///?socket=…` (fio's nbd engine) work.
#[derive(Debug)]
pub struct NbdUnixFrontend;

impl NbdUnixFrontend {
    /// Binds `socket_path` (replacing a stale socket file) and serves `volume` on the current
    /// tokio runtime until [`NbdUnixHandle::stop`]. Must be called inside a runtime.
    pub fn start(
        volume: Arc<Volume>,
        socket_path: impl AsRef<Path>,
    ) -> Result<NbdUnixHandle, FrontendError> {
        let runtime = Handle::try_current()
            .map_err(|e| FrontendError::Invalid(format!("NbdUnixFrontend::start: {e}")))?;
        Self::start_on(&runtime, volume, socket_path)
    }

    /// [`NbdUnixFrontend::start`] on an explicit runtime (callable from any thread).
    pub fn start_on(
        runtime: &Handle,
        volume: Arc<Volume>,
        socket_path: impl AsRef<Path>,
    ) -> Result<NbdUnixHandle, FrontendError> {
        let path = socket_path.as_ref().to_path_buf();
        remove_stale_socket(&path)?;
        let listener = {
            // `UnixListener::bind` registers with the reactor of the runtime entered here.
            let _guard = runtime.enter();
            UnixListener::bind(&path)
                .map_err(|e| FrontendError::io(format!("bind {}", path.display()), e))?
        };
        let export_name = volume.name().to_string();
        let catalog = Arc::new(SimpleCatalog::new());
        let export = Arc::new(VolumeExport::new(volume));
        catalog.insert_with_description(export_name.clone(), export.clone(), "tessera volume");
        catalog.insert_with_description("", export, "tessera volume (default export)");
        let server = Server::new(catalog, Arc::new(AllowAll));
        let cancel = CancellationToken::new();
        let task = runtime.spawn({
            let cancel = cancel.clone();
            async move { server.serve_unix(listener, cancel).await }
        });
        Ok(NbdUnixHandle {
            path,
            export: export_name,
            cancel,
            task: Some(task),
        })
    }
}

/// Removes a leftover socket file at `path` (from a crashed plugin); refuses anything else.
fn remove_stale_socket(path: &Path) -> Result<(), FrontendError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| FrontendError::io(format!("remove stale {}", path.display()), e)),
        Ok(_) => Err(FrontendError::io(
            format!("bind {}", path.display()),
            io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FrontendError::io(format!("stat {}", path.display()), e)),
    }
}

/// A running unix-socket export. Dropping it stops accepting and removes the socket file (open
/// connections are then closed by the server's shutdown grace); [`NbdUnixHandle::stop`] also
/// waits for them.
#[derive(Debug)]
pub struct NbdUnixHandle {
    path: PathBuf,
    export: String,
    cancel: CancellationToken,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl NbdUnixHandle {
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    pub fn export_name(&self) -> &str {
        &self.export
    }

    /// `nbd+unix:///<export>?socket=<path>` (the NBD URI standard).
    pub fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.export, self.path.display())
    }

    /// Stops the server: no new connections, in-flight requests finish (bounded by the
    /// server's shutdown grace), the socket file is removed.
    pub async fn stop(mut self) -> Result<(), FrontendError> {
        self.cancel.cancel();
        let served = match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result.map_err(|e| FrontendError::io("NBD server", e)),
                Err(e) => Err(FrontendError::Invalid(format!("NBD server task: {e}"))),
            },
            None => Ok(()),
        };
        let removed = self.remove_socket();
        served.and(removed)
    }

    fn remove_socket(&self) -> Result<(), FrontendError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FrontendError::io(
                format!("remove {}", self.path.display()),
                e,
            )),
            _ => Ok(()),
        }
    }
}

impl Drop for NbdUnixHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
        if self.task.is_some() {
            // Not awaited (Drop cannot): the listener closes on the runtime shortly after.
            let _ = self.remove_socket();
        }
    }
}

/// [`NbdUnixFrontend`] behind the [`Frontend`] trait: sockets are created as
/// `<dir>/<volume>.sock` on `runtime`.
#[derive(Debug, Clone)]
pub struct NbdUnixSocketFrontend {
    runtime: Handle,
    dir: PathBuf,
}

impl NbdUnixSocketFrontend {
    pub fn new(runtime: Handle, dir: impl Into<PathBuf>) -> Self {
        NbdUnixSocketFrontend {
            runtime,
            dir: dir.into(),
        }
    }
}

#[derive(Debug)]
struct NbdAttachment {
    runtime: Handle,
    handle: Option<NbdUnixHandle>,
}

impl AttachmentState for NbdAttachment {
    fn detach(&mut self) -> Result<(), FrontendError> {
        let Some(handle) = self.handle.take() else {
            return Ok(());
        };
        if Handle::try_current().is_ok() {
            // Inside the runtime (async caller): blocking on it would panic; stop without
            // waiting for open connections.
            drop(handle);
            return Ok(());
        }
        self.runtime.block_on(handle.stop())
    }
}

impl Frontend for NbdUnixSocketFrontend {
    fn kind(&self) -> FrontendKind {
        FrontendKind::NbdUnix
    }

    fn attach(&self, volume: Arc<Volume>) -> Result<Attachment, FrontendError> {
        let name = volume.name().to_string();
        let path = self.dir.join(format!("{name}.sock"));
        let handle = NbdUnixFrontend::start_on(&self.runtime, volume, &path)?;
        let target = AttachTarget::NbdSocket {
            path,
            export: name.clone(),
        };
        Ok(Attachment::new(
            FrontendKind::NbdUnix,
            name,
            target,
            Box::new(NbdAttachment {
                runtime: self.runtime.clone(),
                handle: Some(handle),
            }),
        ))
    }
}
