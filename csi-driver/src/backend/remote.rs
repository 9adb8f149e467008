//! A remote area: an area owned by another node, reached through that node's extent server over
//! NBD (ARCHITECTURE §4 "Backends"; [`crate::extent_server`] is the other end).
//!
//! Seed 002 §4.4 (S606–S615, [0114]–[0118]): when the data of a virtual volume lives behind
//! another node, the request is forwarded to the node that owns it, which performs it on its own
//! storage and returns the result. Seed 001 §4.5 (S51/S52, [0035]–[0040]) is the same exchange
//! seen from the borrower's client: `{requesting node, disk, access request}` → agent → result.
//! Here the engine has already translated the volume request into `(area, area_offset, length)`
//! pieces, so each backend call becomes one NBD command on the area's export:
//! `read` → `NBD_CMD_READ`, `write` → `NBD_CMD_WRITE` (FUA flag), `write_zeroes` →
//! `NBD_CMD_WRITE_ZEROES`, `trim` → `NBD_CMD_TRIM`, `flush` → `NBD_CMD_FLUSH`.
//!
//! Connections are pooled and pipelined ([`tessera_nbd::ClientPool`]; several connections when
//! the server advertises `CAN_MULTI_CONN`, which the extent server does), reconnected on demand.
//!
//! **Errors.** Every failure is reported as [`BackendError::Io`], so the engine treats it as a
//! failure of this replica only: with another healthy replica the piece succeeds and this area
//! is marked unhealthy for the volume; without one, only the requests touching this area fail
//! with EIO. A disconnect or timeout becomes `ConnectionAborted`/`TimedOut`; an error the server
//! answered keeps its errno (`EPERM` for a range the peer is not granted, `ENOSPC`, `EIO`…).
//!
//! **Generation.** NBD commands have no field for the map generation, so it is not sent; the
//! extent server enforces the current generation through its authorization table instead (a
//! remap that moves a range away from this node revokes it there, and a late request gets
//! `EPERM`). The generation is recorded in the trace of every failed call.

use std::fmt;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tessera_api::model::{AreaId, Generation};
use tessera_nbd::{ClientConfig, ClientError, ClientPool, Credentials, PoolConfig, Target};

use super::{AreaBackend, BackendError, BackendFuture};

/// Largest TRIM / WRITE_ZEROES sent as one command (lengths are 32-bit on the wire).
const MAX_DISCARD: u64 = 1 << 30;

/// How to reach a remote area.
#[derive(Debug, Clone, Default)]
pub struct RemoteAreaConfig {
    /// Connect and request timeouts, in-flight limit per connection.
    pub client: ClientConfig,
    /// Connections, retry on another connection after a disconnect, reconnect back-off.
    pub pool: PoolConfig,
}

/// Why a remote area could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RemoteAreaError {
    #[error("connecting to area {area} at {endpoint}: {source}")]
    Connect {
        area: AreaId,
        endpoint: String,
        #[source]
        source: ClientError,
    },
    #[error("area {area} at {endpoint} is read-only for this node")]
    ReadOnly { area: AreaId, endpoint: String },
}

/// An area served by another node's extent server. See the module documentation.
pub struct RemoteArea {
    area: AreaId,
    endpoint: String,
    size_bytes: u64,
    /// Largest READ/WRITE payload per command (the export's block-size maximum).
    max_payload: u64,
    pool: Arc<ClientPool>,
}

impl fmt::Debug for RemoteArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteArea")
            .field("area", &self.area)
            .field("endpoint", &self.endpoint)
            .field("size_bytes", &self.size_bytes)
            .field("connections", &self.pool.connections())
            .finish()
    }
}

impl RemoteArea {
    /// Connects to the extent server at `endpoint` (`host:port`) and opens the export of `area`,
    /// authenticating with `credentials` (this node's name and token). Fails if the server is
    /// unreachable, refuses the credentials, or has granted this node nothing on the area.
    pub async fn connect(
        area: impl Into<AreaId>,
        endpoint: impl Into<String>,
        credentials: Credentials,
        config: RemoteAreaConfig,
    ) -> Result<RemoteArea, RemoteAreaError> {
        let area = area.into();
        let endpoint = endpoint.into();
        let pool = ClientPool::connect(
            Target::Tcp(endpoint.clone()),
            area.as_str(),
            Some(credentials),
            config.client,
            config.pool,
        )
        .await
        .map_err(|source| RemoteAreaError::Connect {
            area: area.clone(),
            endpoint: endpoint.clone(),
            source,
        })?;
        let details = pool.details();
        if details.read_only() {
            return Err(RemoteAreaError::ReadOnly { area, endpoint });
        }
        let block = details.block_size;
        let mut max_payload = u64::from(block.max.max(block.min));
        max_payload -= max_payload % u64::from(block.min.max(1));
        tracing::info!(%area, %endpoint, size = details.size, connections = pool.connections(),
            "remote area connected");
        Ok(RemoteArea {
            area,
            endpoint,
            size_bytes: details.size,
            max_payload: max_payload.max(512),
            pool: Arc::new(pool),
        })
    }

    /// The extent server this area is reached through.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Live pooled connections right now.
    pub fn live_connections(&self) -> usize {
        self.pool.live_connections()
    }

    /// Disconnects every pooled connection (in-flight requests complete first); later calls
    /// reconnect on demand.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn check(&self, area_offset: u64, length: u64) -> Result<(), BackendError> {
        match area_offset.checked_add(length) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(BackendError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "area {}: range at {area_offset} with length {length} is outside its {} bytes",
                    self.area, self.size_bytes
                ),
            ))),
        }
    }

    /// Maps a client error to the engine's backend error, with a trace of the failed call.
    fn fail(&self, op: &'static str, generation: Generation, error: ClientError) -> BackendError {
        let io = to_io_error(&error);
        if error.is_connection_error() {
            tracing::warn!(area = %self.area, endpoint = %self.endpoint, op, %generation, %error,
                "remote area unreachable");
        } else {
            tracing::debug!(area = %self.area, endpoint = %self.endpoint, op, %generation, %error,
                "remote area request failed");
        }
        BackendError::Io(io)
    }

    /// `[offset, offset + length)` split into commands of at most `max` bytes.
    fn chunks(offset: u64, length: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
        let max = max.clamp(512, u64::from(u32::MAX) & !511);
        let mut done = 0;
        std::iter::from_fn(move || {
            (done < length).then(|| {
                let n = (length - done).min(max);
                let at = offset + done;
                done += n;
                // `n <= max <= u32::MAX`.
                (at, u32::try_from(n).unwrap_or(u32::MAX))
            })
        })
    }
}

/// The I/O error the engine sees for a client error.
pub fn to_io_error(error: &ClientError) -> io::Error {
    use io::ErrorKind as K;
    match error {
        // The server's answer keeps its errno end to end (NBD error values are Linux errnos).
        ClientError::Remote(errno) => match i32::try_from(errno.0) {
            Ok(raw) => io::Error::from_raw_os_error(raw),
            Err(_) => io::Error::other(error.to_string()),
        },
        ClientError::Timeout | ClientError::ConnectTimeout => {
            io::Error::new(K::TimedOut, error.to_string())
        }
        ClientError::Disconnected(_) => io::Error::new(K::ConnectionAborted, error.to_string()),
        ClientError::Io(e) => io::Error::new(e.kind(), error.to_string()),
        ClientError::AuthenticationFailed(_)
        | ClientError::AuthenticationUnsupported
        | ClientError::Refused { .. } => io::Error::new(K::PermissionDenied, error.to_string()),
        ClientError::ExportNotFound(_) => io::Error::new(K::NotFound, error.to_string()),
        ClientError::InvalidRequest(_) => io::Error::new(K::InvalidInput, error.to_string()),
        ClientError::Protocol(_) => io::Error::new(K::InvalidData, error.to_string()),
    }
}

impl AreaBackend for RemoteArea {
    fn area(&self) -> &AreaId {
        &self.area
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read(
        &self,
        generation: Generation,
        area_offset: u64,
        length: usize,
    ) -> BackendFuture<'_, Bytes> {
        Box::pin(async move {
            self.check(area_offset, length as u64)?;
            if length as u64 <= self.max_payload {
                let len = u32::try_from(length).unwrap_or(u32::MAX);
                return self
                    .pool
                    .read(area_offset, len)
                    .await
                    .map_err(|e| self.fail("read", generation, e));
            }
            // Pipelined: every chunk is on the wire at once.
            let parts = try_join_all(
                Self::chunks(area_offset, length as u64, self.max_payload)
                    .map(|(at, n)| self.pool.read(at, n)),
            )
            .await
            .map_err(|e| self.fail("read", generation, e))?;
            let mut out = BytesMut::with_capacity(length);
            for part in parts {
                out.extend_from_slice(&part);
            }
            Ok(out.freeze())
        })
    }

    fn write(
        &self,
        generation: Generation,
        area_offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.check(area_offset, data.len() as u64)?;
            try_join_all(
                Self::chunks(area_offset, data.len() as u64, self.max_payload).map(|(at, n)| {
                    let start = (at - area_offset) as usize;
                    let part = data.slice(start..start + n as usize);
                    self.pool.write(at, part, fua)
                }),
            )
            .await
            .map_err(|e| self.fail("write", generation, e))?;
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        generation: Generation,
        area_offset: u64,
        length: u64,
        fua: bool,
    ) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.check(area_offset, length)?;
            try_join_all(
                Self::chunks(area_offset, length, MAX_DISCARD)
                    .map(|(at, n)| self.pool.write_zeroes(at, n, true, fua)),
            )
            .await
            .map_err(|e| self.fail("write_zeroes", generation, e))?;
            Ok(())
        })
    }

    fn trim(&self, generation: Generation, area_offset: u64, length: u64) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.check(area_offset, length)?;
            try_join_all(
                Self::chunks(area_offset, length, MAX_DISCARD)
                    .map(|(at, n)| self.pool.trim(at, n, false)),
            )
            .await
            .map_err(|e| self.fail("trim", generation, e))?;
            Ok(())
        })
    }

    fn flush(&self, generation: Generation) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.pool
                .flush()
                .await
                .map_err(|e| self.fail("flush", generation, e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_nbd::Errno;

    #[test]
    fn chunks_cover_the_range_in_order() {
        let got: Vec<(u64, u32)> = RemoteArea::chunks(4096, 10 * 1024, 4096).collect();
        assert_eq!(got, vec![(4096, 4096), (8192, 4096), (12288, 2048)]);
        assert_eq!(RemoteArea::chunks(0, 0, 4096).count(), 0);
        let big: Vec<(u64, u32)> = RemoteArea::chunks(0, 3 << 30, MAX_DISCARD).collect();
        assert_eq!(big.len(), 3);
        assert!(big.iter().all(|(_, n)| u64::from(*n) == MAX_DISCARD));
    }

    #[test]
    fn client_errors_become_io_errors() {
        let eperm = to_io_error(&ClientError::Remote(Errno::EPERM));
        assert_eq!(eperm.raw_os_error(), Some(libc::EPERM));
        let enospc = to_io_error(&ClientError::Remote(Errno::ENOSPC));
        assert_eq!(enospc.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            to_io_error(&ClientError::Timeout).kind(),
            io::ErrorKind::TimedOut
        );
        assert_eq!(
            to_io_error(&ClientError::Disconnected("gone".into())).kind(),
            io::ErrorKind::ConnectionAborted
        );
    }
}
