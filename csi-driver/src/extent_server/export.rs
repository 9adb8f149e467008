//! One area served as an NBD export (seed 001 §4.5 S71: the agent performs the access on the
//! local storage through the driver that manages it directly).

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tessera_api::model::Generation;
use tessera_nbd::{BlockSize, Capabilities, Export, ExportError};

use crate::backend::{AreaBackend, BackendError};

/// The generation the extent server stamps on the backend calls it makes.
///
/// NBD requests carry no generation, so the server cannot forward the borrower's. What makes a
/// request "current" on this side is the authorization table: a peer's ranges are replaced
/// atomically when the control plane installs a newer generation of a volume's grant, and every
/// request is checked against the table before it reaches the area (see
/// [`super::ExtentAuthorization`]). Local areas ignore the generation.
pub const SERVED_GENERATION: Generation = Generation::INITIAL;

/// An area of this node as an NBD export. The export name is the area name.
pub struct AreaExport {
    backend: Arc<dyn AreaBackend>,
}

impl fmt::Debug for AreaExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AreaExport")
            .field("area", self.backend.area())
            .field("size_bytes", &self.backend.size_bytes())
            .finish()
    }
}

impl AreaExport {
    pub fn new(backend: Arc<dyn AreaBackend>) -> Self {
        Self { backend }
    }

    pub fn backend(&self) -> &Arc<dyn AreaBackend> {
        &self.backend
    }
}

/// Maps an area-backend failure to the NBD error the peer sees.
///
/// I/O errors keep their meaning where NBD has one (`ENOSPC`, `EPERM`, `EINVAL`, `ENOMEM`);
/// everything else is `EIO`. A stale generation cannot happen on a local area (it ignores the
/// generation); should a backend report one, the peer gets `EIO` — NBD has no "retranslate"
/// error, and the peer's engine treats the replica as failed, which is the safe side.
pub fn export_error(error: BackendError) -> ExportError {
    match error {
        BackendError::Io(e) => ExportError::from(e),
        BackendError::StaleGeneration { sent, current } => ExportError::Io(format!(
            "area serves generation {current}, request carried {sent}"
        )),
    }
}

impl Export for AreaExport {
    fn size(&self) -> u64 {
        self.backend.size_bytes()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            // A local area has no per-connection cache: a flush (fdatasync of the area file)
            // covers writes completed on every connection, so the peer may pool connections.
            can_multi_conn: true,
        }
    }

    fn block_size(&self) -> BlockSize {
        BlockSize::DEFAULT
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.backend
            .read(SERVED_GENERATION, offset, len as usize)
            .await
            .map_err(export_error)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.backend
            .write(SERVED_GENERATION, offset, data, fua)
            .await
            .map_err(export_error)
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.backend
            .flush(SERVED_GENERATION)
            .await
            .map_err(export_error)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        self.backend
            .trim(SERVED_GENERATION, offset, u64::from(len))
            .await
            .map_err(export_error)?;
        if fua {
            // The area trait's trim has no FUA; a flush makes the discard durable.
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
        // The local area allocates or punches as it sees fit; either way the range reads as
        // zeros afterwards, which is all NBD_CMD_WRITE_ZEROES promises (NO_HOLE is a hint).
        self.backend
            .write_zeroes(SERVED_GENERATION, offset, u64::from(len), fua)
            .await
            .map_err(export_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn backend_errors_map_to_nbd_errors() {
        use tessera_nbd::Errno;
        let io = |kind| export_error(BackendError::Io(io::Error::from(kind)));
        assert_eq!(io(io::ErrorKind::Other).errno(false), Errno::EIO);
        assert_eq!(io(io::ErrorKind::InvalidInput).errno(false), Errno::EINVAL);
        assert_eq!(
            io(io::ErrorKind::PermissionDenied).errno(true),
            Errno::EPERM
        );
        let full = export_error(BackendError::Io(io::Error::from_raw_os_error(libc::ENOSPC)));
        assert_eq!(full.errno(true), Errno::ENOSPC);
        let stale = export_error(BackendError::StaleGeneration {
            sent: Generation(1),
            current: Generation(2),
        });
        assert_eq!(stale.errno(false), Errno::EIO);
    }
}
