//! A pipelined NBD client and a reconnecting pool of them.
//!
//! [`NbdClient`] negotiates with `NBD_OPT_GO` (requesting `NBD_INFO_BLOCK_SIZE`, so it honours
//! the server's constraints; falling back to `NBD_OPT_EXPORT_NAME` for servers without GO), then
//! runs two tasks: a writer that sends requests from a queue (batching them into one flush when
//! several are ready) and a reader that matches replies to requests by handle. Any number of
//! tasks may call it concurrently; at most [`ClientConfig::max_in_flight`] requests are on the
//! wire.
//!
//! Failure model: when the connection breaks (EOF, I/O error, protocol violation, or a request
//! exceeding [`ClientConfig::request_timeout`]), every in-flight request fails with
//! [`ClientError::Disconnected`] (the timed-out one with [`ClientError::Timeout`]) and the client
//! refuses further requests — nothing hangs. A timeout kills the whole connection because with
//! simple replies a late reply can no longer be told apart from garbage unless its request is
//! remembered forever; a stalled server is treated as a dead one. [`ClientPool`] replaces dead
//! connections on the next request and retries requests that failed with `Disconnected` once
//! (block writes are idempotent; as with any block device, overlapping concurrent writes are the
//! caller's responsibility).

use crate::auth::ExportListing;
use crate::export::BlockSize;
use crate::proto::*;
use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

/// Client tunables.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bound on establishing a connection, including the handshake.
    pub connect_timeout: Duration,
    /// Bound on waiting for a reply once a request is sent; `None` waits forever. Exceeding it
    /// fails the connection (see the module documentation).
    pub request_timeout: Option<Duration>,
    /// Requests on the wire at once.
    pub max_in_flight: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(30)),
            max_in_flight: 64,
        }
    }
}

/// Credentials for the tessera authentication option.
#[derive(Clone)]
pub struct Credentials {
    pub principal: String,
    pub token: Vec<u8>,
}

impl Credentials {
    pub fn new(principal: impl Into<String>, token: impl Into<Vec<u8>>) -> Self {
        Self {
            principal: principal.into(),
            token: token.into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtoError),
    #[error("connecting timed out")]
    ConnectTimeout,
    #[error("server refused option {option}: reply {reply:#x}: {message}")]
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("authentication failed: {0}")]
    AuthenticationFailed(String),
    #[error("server does not support tessera authentication")]
    AuthenticationUnsupported,
    #[error("export {0:?} not found")]
    ExportNotFound(String),
    /// The server answered the request with an error.
    #[error("server returned {0}")]
    Remote(Errno),
    #[error("request timed out")]
    Timeout,
    /// The connection is gone; the request may or may not have been executed.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// The request violates the negotiated export constraints; it was not sent.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
}

impl ClientError {
    /// Whether the error means the connection is unusable (as opposed to a per-request error).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            ClientError::Io(_)
                | ClientError::Protocol(_)
                | ClientError::Timeout
                | ClientError::Disconnected(_)
                | ClientError::ConnectTimeout
        )
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDetails {
    pub name: String,
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// The server's constraints, or the spec's defaults if it sent none (minimum 1).
    pub block_size: BlockSize,
}

impl ExportDetails {
    pub fn read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }
    pub fn can_flush(&self) -> bool {
        self.flags & NBD_FLAG_SEND_FLUSH != 0
    }
    pub fn can_fua(&self) -> bool {
        self.flags & NBD_FLAG_SEND_FUA != 0
    }
    pub fn can_trim(&self) -> bool {
        self.flags & NBD_FLAG_SEND_TRIM != 0
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & NBD_FLAG_SEND_WRITE_ZEROES != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flags & NBD_FLAG_CAN_MULTI_CONN != 0
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

async fn read_parsed<S, T>(
    io: &mut S,
    rbuf: &mut BytesMut,
    parse: impl Fn(&[u8]) -> Result<Parse<T>, ProtoError>,
) -> Result<T, ClientError>
where
    S: AsyncRead + Unpin,
{
    loop {
        match parse(rbuf)? {
            Parse::Parsed { value, consumed } => {
                rbuf.advance(consumed);
                return Ok(value);
            }
            Parse::Incomplete { needed } => {
                rbuf.reserve(needed.saturating_sub(rbuf.len()).max(512));
                if io.read_buf(rbuf).await? == 0 {
                    return Err(ClientError::Disconnected(
                        "server closed the connection during the handshake".into(),
                    ));
                }
            }
        }
    }
}

async fn send_option<S: AsyncWrite + Unpin>(io: &mut S, req: &OptionRequest) -> io::Result<()> {
    let mut buf = BytesMut::new();
    req.encode(&mut buf);
    io.write_all(&buf).await?;
    io.flush().await
}

/// Greeting and client flags. Returns whether NO_ZEROES was negotiated.
async fn greet<S>(io: &mut S, rbuf: &mut BytesMut) -> Result<bool, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hs = read_parsed(io, rbuf, parse_server_greeting).await?;
    if hs & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle.into());
    }
    let no_zeroes = hs & NBD_FLAG_NO_ZEROES != 0;
    let mut flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        flags |= NBD_FLAG_C_NO_ZEROES;
    }
    io.write_all(&flags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

async fn authenticate<S>(
    io: &mut S,
    rbuf: &mut BytesMut,
    creds: &Credentials,
) -> Result<(), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(
        io,
        &OptionRequest::Auth(AuthRequest {
            principal: creds.principal.clone(),
            token: creds.token.clone(),
        }),
    )
    .await?;
    let frame = read_parsed(io, rbuf, parse_option_reply).await?;
    match frame.reply {
        OptionReply::Ack => Ok(()),
        OptionReply::Error {
            reply_type: NBD_REP_ERR_UNSUP,
            ..
        } => Err(ClientError::AuthenticationUnsupported),
        OptionReply::Error { message, .. } => Err(ClientError::AuthenticationFailed(message)),
        _ => Err(ProtoError::Malformed("unexpected reply to the authentication option").into()),
    }
}

async fn go<S>(
    io: &mut S,
    rbuf: &mut BytesMut,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportDetails, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(
        io,
        &OptionRequest::Go(InfoRequest {
            name: export.to_owned(),
            info_types: vec![NBD_INFO_BLOCK_SIZE],
        }),
    )
    .await?;
    let mut export_info = None;
    // Without NBD_INFO_BLOCK_SIZE the spec's defaults apply: minimum 1, preferred 4096.
    let mut block_size = BlockSize {
        min: 1,
        preferred: 4096,
        max: MAX_PAYLOAD,
    };
    loop {
        let frame = read_parsed(io, rbuf, parse_option_reply).await?;
        if frame.option != NBD_OPT_GO {
            return Err(ProtoError::Malformed("option reply for a different option").into());
        }
        match frame.reply {
            OptionReply::Info(InfoReply::Export { size, flags }) => {
                export_info = Some((size, flags))
            }
            OptionReply::Info(InfoReply::BlockSize {
                min,
                preferred,
                max,
            }) => {
                let bs = BlockSize {
                    min,
                    preferred,
                    max: max.min(MAX_PAYLOAD),
                };
                if !bs.is_valid() {
                    return Err(ProtoError::Malformed("server sent invalid block sizes").into());
                }
                block_size = bs;
            }
            OptionReply::Info(_) => {}
            OptionReply::Ack => {
                let Some((size, flags)) = export_info else {
                    return Err(ProtoError::Malformed(
                        "NBD_OPT_GO succeeded without NBD_INFO_EXPORT",
                    )
                    .into());
                };
                return Ok(ExportDetails {
                    name: export.to_owned(),
                    size,
                    flags,
                    block_size,
                });
            }
            OptionReply::Error {
                reply_type: NBD_REP_ERR_UNSUP,
                ..
            } => {
                // Old server without GO (spec: clients "SHOULD fall back to NBD_OPT_EXPORT_NAME").
                send_option(io, &OptionRequest::ExportName(export.to_owned())).await?;
                let (size, flags) =
                    read_parsed(io, rbuf, |b| Ok(parse_export_name_reply(b, no_zeroes))).await?;
                return Ok(ExportDetails {
                    name: export.to_owned(),
                    size,
                    flags,
                    block_size,
                });
            }
            OptionReply::Error {
                reply_type: NBD_REP_ERR_UNKNOWN,
                ..
            } => return Err(ClientError::ExportNotFound(export.to_owned())),
            OptionReply::Error {
                reply_type,
                message,
            } => {
                return Err(ClientError::Refused {
                    option: NBD_OPT_GO,
                    reply: reply_type,
                    message,
                });
            }
            OptionReply::Server { .. } | OptionReply::Unknown { .. } => {
                return Err(ProtoError::Malformed("unexpected reply to NBD_OPT_GO").into());
            }
        }
    }
}

/// Lists the exports a server offers over `stream` (after authenticating if `credentials` are
/// given), then ends the negotiation with `NBD_OPT_ABORT`.
pub async fn list_exports<S>(
    mut stream: S,
    credentials: Option<&Credentials>,
) -> Result<Vec<ExportListing>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut rbuf = BytesMut::new();
    greet(&mut stream, &mut rbuf).await?;
    if let Some(c) = credentials {
        authenticate(&mut stream, &mut rbuf, c).await?;
    }
    send_option(&mut stream, &OptionRequest::List).await?;
    let mut out = Vec::new();
    let result = loop {
        let frame = read_parsed(&mut stream, &mut rbuf, parse_option_reply).await?;
        match frame.reply {
            OptionReply::Server { name, description } => {
                out.push(ExportListing { name, description })
            }
            OptionReply::Ack => break Ok(out),
            OptionReply::Error {
                reply_type,
                message,
            } => {
                break Err(ClientError::Refused {
                    option: NBD_OPT_LIST,
                    reply: reply_type,
                    message,
                });
            }
            _ => break Err(ProtoError::Malformed("unexpected reply to NBD_OPT_LIST").into()),
        }
    };
    // Soft disconnect; the reply is optional in practice (spec §NBD_OPT_ABORT).
    let _ = send_option(&mut stream, &OptionRequest::Abort).await;
    let _ = stream.shutdown().await;
    result
}

// ---------------------------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------------------------

type ReplyResult = Result<Option<Bytes>, ClientError>;

struct Pending {
    /// Payload length that follows a successful reply (READ only).
    read_len: u32,
    tx: oneshot::Sender<ReplyResult>,
}

#[derive(Default)]
struct PendingMap {
    map: HashMap<u64, Pending>,
    /// Set once the connection accepts no more requests.
    closed: Option<String>,
    /// The server sent ESHUTDOWN: finish in-flight requests, then disconnect.
    draining: bool,
}

struct Outgoing {
    req: Request,
    payload: Option<Bytes>,
}

struct Shared {
    pending: Mutex<PendingMap>,
    next_handle: AtomicU64,
    in_flight: AtomicUsize,
    sem: Semaphore,
    /// Fires when the connection is dead or closing.
    dead: CancellationToken,
    out: mpsc::UnboundedSender<Outgoing>,
}

impl Shared {
    /// Marks the connection dead and fails every in-flight request.
    fn fail(&self, reason: &str) {
        let drained = {
            let mut p = self.pending.lock();
            if p.closed.is_none() {
                p.closed = Some(reason.to_owned());
            }
            std::mem::take(&mut p.map)
        };
        if !drained.is_empty() {
            debug!(
                reason,
                requests = drained.len(),
                "failing in-flight NBD requests"
            );
        }
        for (_, pending) in drained {
            let _ = pending
                .tx
                .send(Err(ClientError::Disconnected(reason.to_owned())));
        }
        self.sem.close();
        self.dead.cancel();
    }

    fn send_disc(&self) {
        let _ = self.out.send(Outgoing {
            req: Request {
                flags: 0,
                command: Command::Disc,
                handle: 0,
                offset: 0,
                len: 0,
            },
            payload: None,
        });
    }
}

/// One NBD connection, usable concurrently from many tasks (share it with `Arc`).
pub struct NbdClient {
    shared: Arc<Shared>,
    details: ExportDetails,
    config: ClientConfig,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("details", &self.details)
            .field("in_flight", &self.in_flight())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl NbdClient {
    /// Connects over TCP with default configuration.
    pub async fn connect_tcp(
        addr: impl ToSocketAddrs,
        export: &str,
        credentials: Option<Credentials>,
    ) -> Result<Self, ClientError> {
        Self::connect_tcp_with(addr, export, credentials.as_ref(), ClientConfig::default()).await
    }

    pub async fn connect_tcp_with(
        addr: impl ToSocketAddrs,
        export: &str,
        credentials: Option<&Credentials>,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let limit = config.connect_timeout;
        tokio::time::timeout(limit, async {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Self::establish(stream, export, credentials, config).await
        })
        .await
        .map_err(|_| ClientError::ConnectTimeout)?
    }

    /// Connects over a unix socket with default configuration and no credentials.
    pub async fn connect_unix(path: impl AsRef<Path>, export: &str) -> Result<Self, ClientError> {
        Self::connect_unix_with(path, export, None, ClientConfig::default()).await
    }

    pub async fn connect_unix_with(
        path: impl AsRef<Path>,
        export: &str,
        credentials: Option<&Credentials>,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let limit = config.connect_timeout;
        let path = path.as_ref();
        tokio::time::timeout(limit, async {
            let stream = UnixStream::connect(path).await?;
            Self::establish(stream, export, credentials, config).await
        })
        .await
        .map_err(|_| ClientError::ConnectTimeout)?
    }

    /// Negotiates over an already-connected stream (in-memory pipes, TLS streams).
    pub async fn from_stream<S>(
        stream: S,
        export: &str,
        credentials: Option<&Credentials>,
        config: ClientConfig,
    ) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let limit = config.connect_timeout;
        tokio::time::timeout(limit, Self::establish(stream, export, credentials, config))
            .await
            .map_err(|_| ClientError::ConnectTimeout)?
    }

    async fn establish<S>(
        mut stream: S,
        export: &str,
        credentials: Option<&Credentials>,
        config: ClientConfig,
    ) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut rbuf = BytesMut::new();
        let no_zeroes = greet(&mut stream, &mut rbuf).await?;
        if let Some(c) = credentials {
            authenticate(&mut stream, &mut rbuf, c).await?;
        }
        let details = go(&mut stream, &mut rbuf, export, no_zeroes).await?;
        if !rbuf.is_empty() {
            return Err(ProtoError::Malformed("server sent data before any request").into());
        }

        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        let max_in_flight = config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        let shared = Arc::new(Shared {
            pending: Mutex::new(PendingMap::default()),
            next_handle: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            sem: Semaphore::new(max_in_flight),
            dead: CancellationToken::new(),
            out: tx,
        });
        let span = tracing::debug_span!("nbd_client", export = %details.name);
        tokio::spawn(reader_task(rd, shared.clone()).instrument(span.clone()));
        let writer = tokio::spawn(writer_task(wr, rx, shared.clone()).instrument(span));
        Ok(Self {
            shared,
            details,
            config,
            writer: Mutex::new(Some(writer)),
        })
    }

    pub fn details(&self) -> &ExportDetails {
        &self.details
    }

    pub fn size(&self) -> u64 {
        self.details.size
    }

    /// Requests queued or on the wire.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the connection no longer accepts requests.
    pub fn is_closed(&self) -> bool {
        self.shared.pending.lock().closed.is_some() || self.shared.dead.is_cancelled()
    }

    fn check(&self, offset: u64, len: u32, write: bool) -> Result<(), ClientError> {
        if write && self.details.read_only() {
            return Err(ClientError::InvalidRequest("export is read-only"));
        }
        match offset.checked_add(len.into()) {
            Some(end) if end <= self.details.size => {}
            _ => {
                return Err(ClientError::InvalidRequest(
                    "range beyond the end of the export",
                ));
            }
        }
        let min = u64::from(self.details.block_size.min);
        if !offset.is_multiple_of(min) || !u64::from(len).is_multiple_of(min) {
            return Err(ClientError::InvalidRequest(
                "not aligned to the minimum block size",
            ));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        self.check(offset, len, false)?;
        if len > self.details.block_size.max {
            return Err(ClientError::InvalidRequest(
                "longer than the maximum block size",
            ));
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let data = self.submit(Command::Read, 0, offset, len, None).await?;
        Ok(data.unwrap_or_default())
    }

    /// Writes `data` at `offset`; with `fua`, the reply waits for stable storage (emulated with a
    /// FLUSH if the server lacks FUA).
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::InvalidRequest("longer than the maximum block size"))?;
        self.check(offset, len, true)?;
        if len > self.details.block_size.max {
            return Err(ClientError::InvalidRequest(
                "longer than the maximum block size",
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let (flags, emulate) = self.fua_flags(fua);
        self.submit(Command::Write, flags, offset, len, Some(data))
            .await?;
        if emulate {
            self.flush().await?;
        }
        Ok(())
    }

    /// Asks the server to persist every write whose reply has been received.
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.details.can_flush() {
            return Err(ClientError::InvalidRequest("server does not support FLUSH"));
        }
        self.submit(Command::Flush, 0, 0, 0, None).await.map(drop)
    }

    /// Discards a range (a hint to the server).
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ClientError> {
        self.check(offset, len, true)?;
        if !self.details.can_trim() {
            return Err(ClientError::InvalidRequest("server does not support TRIM"));
        }
        if len == 0 {
            return Ok(());
        }
        let (flags, emulate) = self.fua_flags(fua);
        self.submit(Command::Trim, flags, offset, len, None).await?;
        if emulate {
            self.flush().await?;
        }
        Ok(())
    }

    /// Zeroes a range; `may_trim = false` sets `NBD_CMD_FLAG_NO_HOLE`.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.check(offset, len, true)?;
        if !self.details.can_write_zeroes() {
            return Err(ClientError::InvalidRequest(
                "server does not support WRITE_ZEROES",
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let (mut flags, emulate) = self.fua_flags(fua);
        if !may_trim {
            flags |= NBD_CMD_FLAG_NO_HOLE;
        }
        self.submit(Command::WriteZeroes, flags, offset, len, None)
            .await?;
        if emulate {
            self.flush().await?;
        }
        Ok(())
    }

    fn fua_flags(&self, fua: bool) -> (u16, bool) {
        match (fua, self.details.can_fua()) {
            (false, _) => (0, false),
            (true, true) => (NBD_CMD_FLAG_FUA, false),
            (true, false) => (0, self.details.can_flush()),
        }
    }

    async fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
    ) -> ReplyResult {
        let shared = &self.shared;
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        struct Dec<'a>(&'a AtomicUsize);
        impl Drop for Dec<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _dec = Dec(&shared.in_flight);

        let _permit = shared
            .sem
            .acquire()
            .await
            .map_err(|_| self.closed_error())?;
        let handle = shared.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = shared.pending.lock();
            if let Some(reason) = &p.closed {
                return Err(ClientError::Disconnected(reason.clone()));
            }
            if p.draining {
                return Err(ClientError::Disconnected("server is shutting down".into()));
            }
            let read_len = if command == Command::Read { len } else { 0 };
            p.map.insert(handle, Pending { read_len, tx });
        }
        let req = Request {
            flags,
            command,
            handle,
            offset,
            len,
        };
        if shared.out.send(Outgoing { req, payload }).is_err() {
            shared.pending.lock().map.remove(&handle);
            return Err(self.closed_error());
        }
        let reply = match self.config.request_timeout {
            None => rx.await,
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(r) => r,
                Err(_) => {
                    warn!(
                        handle,
                        ?command,
                        offset,
                        len,
                        "NBD request timed out; dropping the connection"
                    );
                    shared.fail("a request timed out");
                    return Err(ClientError::Timeout);
                }
            },
        };
        reply.unwrap_or_else(|_| Err(self.closed_error()))
    }

    fn closed_error(&self) -> ClientError {
        let reason = self
            .shared
            .pending
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        ClientError::Disconnected(reason)
    }

    /// Soft disconnect: waits for in-flight requests, sends `NBD_CMD_DISC` and closes.
    pub async fn disconnect(&self) {
        let max = self.config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS) as u32;
        // Waiting for every permit means no request is in flight; fails at once if dead.
        let _all = self.shared.sem.acquire_many(max).await;
        {
            let mut p = self.shared.pending.lock();
            if p.closed.is_none() {
                p.closed = Some("client disconnected".into());
            }
        }
        self.shared.send_disc();
        let writer = self.writer.lock().take();
        if let Some(w) = writer {
            let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
        }
        self.shared.fail("client disconnected");
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // Best effort: queue a DISC (the writer sends queued messages before noticing `dead`),
        // then stop the tasks.
        if !self.shared.dead.is_cancelled() {
            self.shared.send_disc();
        }
        self.shared.fail("client dropped");
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let mut hdr = BytesMut::with_capacity(REQUEST_HEADER_LEN);
    let result: io::Result<()> = async {
        loop {
            let msg = tokio::select! {
                biased;
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => return Ok(()),
                },
                _ = shared.dead.cancelled() => return Ok(()),
            };
            let mut disc = write_request(&mut w, &mut hdr, msg).await?;
            while !disc && let Ok(msg) = rx.try_recv() {
                disc = write_request(&mut w, &mut hdr, msg).await?;
            }
            w.flush().await?;
            if disc {
                // "A client MUST NOT send anything to the server after sending an NBD_CMD_DISC".
                return w.shutdown().await;
            }
        }
    }
    .await;
    if let Err(e) = result {
        shared.fail(&format!("write failed: {e}"));
    }
}

/// Writes one request; returns whether it was a DISC.
async fn write_request<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    hdr: &mut BytesMut,
    msg: Outgoing,
) -> io::Result<bool> {
    hdr.clear();
    msg.req.encode(hdr);
    w.write_all(hdr).await?;
    if let Some(p) = &msg.payload {
        w.write_all(p).await?;
    }
    Ok(msg.req.command == Command::Disc)
}

async fn reader_task<R: AsyncRead + Unpin>(rd: R, shared: Arc<Shared>) {
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let reason = loop {
        tokio::select! {
            _ = shared.dead.cancelled() => break String::from("connection closed"),
            r = read_reply(&mut rd, &shared) => match r {
                Ok(true) => continue,
                Ok(false) => break String::from("server shut down"),
                Err(reason) => break reason,
            },
        }
    };
    shared.fail(&reason);
}

/// Reads and dispatches one reply. `Ok(false)` ends the connection cleanly (after ESHUTDOWN
/// drained).
async fn read_reply<R: AsyncRead + Unpin>(rd: &mut R, shared: &Shared) -> Result<bool, String> {
    let mut hdr = [0u8; SIMPLE_REPLY_HEADER_LEN];
    if let Err(e) = rd.read_exact(&mut hdr).await {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            "server closed the connection".into()
        } else {
            format!("read failed: {e}")
        });
    }
    let reply = match parse_simple_reply(&hdr) {
        Ok(Parse::Parsed { value, .. }) => value,
        Ok(Parse::Incomplete { .. }) => return Err("short reply header".into()),
        Err(e) => return Err(e.to_string()),
    };
    let Some(pending) = shared.pending.lock().map.remove(&reply.handle) else {
        // Without the request we cannot know whether data follows: the stream is lost.
        return Err(format!("reply for unknown handle {:#x}", reply.handle));
    };
    let result = if reply.error != 0 {
        Err(ClientError::Remote(Errno(reply.error)))
    } else if pending.read_len > 0 {
        let len = pending.read_len as usize;
        let mut buf = BytesMut::with_capacity(len);
        while buf.len() < len {
            let want = (len - buf.len()) as u64;
            match (&mut *rd).take(want).read_buf(&mut buf).await {
                Ok(0) => return Err("server closed the connection mid-reply".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
        Ok(Some(buf.freeze()))
    } else {
        Ok(None)
    };
    let _ = pending.tx.send(result);

    if reply.error == Errno::ESHUTDOWN.0 {
        // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
        shared.pending.lock().draining = true;
    }
    let done = {
        let p = shared.pending.lock();
        p.draining && p.map.is_empty()
    };
    if done {
        shared.send_disc();
        return Ok(false);
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Pool
// ---------------------------------------------------------------------------------------------

/// Where a pool connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`.
    Tcp(String),
    Unix(PathBuf),
}

/// Pool tunables.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Connections (only 1 is used unless the server advertises `NBD_FLAG_CAN_MULTI_CONN`:
    /// without it, the spec says clients "SHOULD NOT multiplex their commands over more than one
    /// connection", because a FLUSH would not cover other connections' writes).
    pub connections: usize,
    /// Retry a request once on another connection when its connection broke.
    pub retry_on_disconnect: bool,
    /// After a failed reconnect, fail fast for this long instead of reconnecting again.
    pub reconnect_backoff: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connections: 4,
            retry_on_disconnect: true,
            reconnect_backoff: Duration::from_millis(200),
        }
    }
}

#[derive(Default)]
struct Slot {
    client: Mutex<Option<Arc<NbdClient>>>,
    connecting: tokio::sync::Mutex<Option<(Instant, String)>>,
}

impl Slot {
    fn live(&self) -> Option<Arc<NbdClient>> {
        self.client.lock().clone().filter(|c| !c.is_closed())
    }
}

/// A pool of pipelined connections to one export. Requests go to the least-loaded live
/// connection; dead connections are replaced on demand.
pub struct ClientPool {
    target: Target,
    export: String,
    credentials: Option<Credentials>,
    client_config: ClientConfig,
    pool_config: PoolConfig,
    slots: Vec<Slot>,
    details: Mutex<ExportDetails>,
    rr: AtomicUsize,
}

impl fmt::Debug for ClientPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientPool")
            .field("target", &self.target)
            .field("export", &self.export)
            .field("connections", &self.slots.len())
            .finish()
    }
}

impl ClientPool {
    /// Connects the first connection (so configuration and authentication errors surface here);
    /// the others are opened on demand.
    pub async fn connect(
        target: Target,
        export: &str,
        credentials: Option<Credentials>,
        client_config: ClientConfig,
        pool_config: PoolConfig,
    ) -> Result<Self, ClientError> {
        let first = connect_target(&target, export, credentials.as_ref(), &client_config).await?;
        let details = first.details().clone();
        let n = if details.can_multi_conn() {
            pool_config.connections.max(1)
        } else {
            1
        };
        let slots: Vec<Slot> = (0..n).map(|_| Slot::default()).collect();
        *slots[0].client.lock() = Some(Arc::new(first));
        Ok(Self {
            target,
            export: export.to_owned(),
            credentials,
            client_config,
            pool_config,
            slots,
            details: Mutex::new(details),
            rr: AtomicUsize::new(0),
        })
    }

    /// The export as last negotiated.
    pub fn details(&self) -> ExportDetails {
        self.details.lock().clone()
    }

    /// Number of connection slots.
    pub fn connections(&self) -> usize {
        self.slots.len()
    }

    /// Live connections right now.
    pub fn live_connections(&self) -> usize {
        self.slots.iter().filter(|s| s.live().is_some()).count()
    }

    async fn pick(&self) -> Result<Arc<NbdClient>, ClientError> {
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let n = self.slots.len();
        let mut best: Option<(usize, usize, Option<Arc<NbdClient>>)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let live = self.slots[i].live();
            let load = live.as_ref().map_or(0, |c| c.in_flight());
            if best.as_ref().is_none_or(|(_, l, _)| load < *l) {
                best = Some((i, load, live));
            }
        }
        match best {
            Some((_, _, Some(c))) => Ok(c),
            Some((i, _, None)) => self.reconnect(i).await,
            None => Err(ClientError::Disconnected("empty pool".into())),
        }
    }

    async fn reconnect(&self, i: usize) -> Result<Arc<NbdClient>, ClientError> {
        let slot = &self.slots[i];
        let mut last_failure = slot.connecting.lock().await;
        if let Some(c) = slot.live() {
            return Ok(c); // another task reconnected meanwhile
        }
        if let Some((at, reason)) = last_failure.as_ref()
            && at.elapsed() < self.pool_config.reconnect_backoff
        {
            return Err(ClientError::Disconnected(format!(
                "reconnect failed recently: {reason}"
            )));
        }
        match connect_target(
            &self.target,
            &self.export,
            self.credentials.as_ref(),
            &self.client_config,
        )
        .await
        {
            Ok(c) => {
                *last_failure = None;
                let c = Arc::new(c);
                *self.details.lock() = c.details().clone();
                *slot.client.lock() = Some(c.clone());
                debug!(slot = i, "NBD pool connection (re)established");
                Ok(c)
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    async fn run<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Arc<NbdClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let c = self.pick().await?;
        match f(c).await {
            Err(ClientError::Disconnected(reason)) if self.pool_config.retry_on_disconnect => {
                debug!(%reason, "retrying NBD request on another connection");
                f(self.pick().await?).await
            }
            r => r,
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        self.run(|c| async move { c.read(offset, len).await }).await
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        self.run(|c| {
            let data = data.clone();
            async move { c.write(offset, data, fua).await }
        })
        .await
    }

    /// With `CAN_MULTI_CONN` one FLUSH covers every connection (spec §"Transmission flags");
    /// without it the pool has a single connection.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.run(|c| async move { c.flush().await }).await
    }

    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ClientError> {
        self.run(|c| async move { c.trim(offset, len, fua).await })
            .await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.run(|c| async move { c.write_zeroes(offset, len, may_trim, fua).await })
            .await
    }

    /// Soft-disconnects every connection.
    pub async fn close(&self) {
        for s in &self.slots {
            let c = s.client.lock().take();
            if let Some(c) = c {
                c.disconnect().await;
            }
        }
    }
}

async fn connect_target(
    target: &Target,
    export: &str,
    credentials: Option<&Credentials>,
    config: &ClientConfig,
) -> Result<NbdClient, ClientError> {
    match target {
        Target::Tcp(addr) => {
            NbdClient::connect_tcp_with(addr.as_str(), export, credentials, config.clone()).await
        }
        Target::Unix(path) => {
            NbdClient::connect_unix_with(path, export, credentials, config.clone()).await
        }
    }
}
