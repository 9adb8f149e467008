//! The NBD server: handshake, authentication, and pipelined transmission.
//!
//! ## Pipelining
//!
//! One connection runs a *reader* (decodes requests, validates and authorizes them, spawns one
//! task per request) and a *writer* (sends replies as they complete, in completion order — the
//! spec lets replies go out of order, matched by handle: spec §"Transmission"). At most
//! [`ServerConfig::max_in_flight`] requests and [`ServerConfig::max_in_flight_bytes`] bytes of
//! READ/WRITE payload are in flight per connection; the permits travel with the reply until it
//! has been written, so a client that stops reading replies stops being read from (bounded
//! memory, no unbounded reply queue).
//!
//! ## FLUSH and FUA
//!
//! A WRITE's reply is only queued after the export's `write` returned. The spec's rule for FLUSH
//! is: "The server MUST NOT send a successful reply header for this request before all write
//! requests for which a reply has already been sent to the client have reached permanent
//! storage" (spec §NBD_CMD_FLUSH). Every such write has returned from the export before the
//! FLUSH was even read, so running `Export::flush` concurrently with other in-flight requests
//! satisfies it, given the [`Export`] contract (flush persists all completed writes). Writes still
//! in flight when a FLUSH arrives are not covered, exactly as in the spec; a client that needs
//! them covered waits for their replies first. FUA is passed to the export per request.
//! Ordering between overlapping in-flight requests is the client's responsibility (the spec
//! promises none).
//!
//! ## What is negotiated
//!
//! Fixed newstyle with `NBD_FLAG_NO_ZEROES`; options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`,
//! `GO` (`NBD_INFO_EXPORT`, `NAME`, `DESCRIPTION`, `BLOCK_SIZE` — the block size is always sent,
//! which the spec allows) and the private auth option. `NBD_OPT_STRUCTURED_REPLY` is refused
//! with `NBD_REP_ERR_UNSUP`: simple replies carry everything this server does (no sparse reads,
//! no block status), every client falls back to them, and refusing keeps one reply format.
//! `STARTTLS` is refused (`NBD_REP_ERR_UNSUP`): TLS, when added, wraps the transport before the
//! handshake (see [`crate::auth`]). Meta contexts and extended headers are unknown options.

use crate::auth::{
    Access, AccessKind, Authenticator, ExportCatalog, OpenError, PeerInfo, Principal,
};
use crate::export::{BlockSize, Capabilities, Export};
use crate::proto::*;
use bytes::{Bytes, BytesMut};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

/// Server tunables.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests processed concurrently per connection.
    pub max_in_flight: usize,
    /// READ/WRITE payload bytes held per connection (at least [`MAX_PAYLOAD`](crate::proto::MAX_PAYLOAD)).
    pub max_in_flight_bytes: usize,
    /// The whole handshake must finish within this time (slow-loris protection).
    pub handshake_timeout: Duration,
    /// Failed authentication attempts before the connection is dropped.
    pub max_auth_failures: u32,
    /// After shutdown is signalled, how long a connection may take to finish in-flight requests
    /// and write their replies before it is dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
            max_auth_failures: 3,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why a connection ended abnormally. Normal ends (`NBD_OPT_ABORT`, `NBD_CMD_DISC`, the client
/// closing, server shutdown) are `Ok(())`.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtoError),
    #[error("handshake did not complete in time")]
    HandshakeTimeout,
    #[error("too many failed authentication attempts")]
    AuthenticationFailed,
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    ExportRefused(String),
}

/// An NBD server over a catalog and an authenticator. Cheap to clone.
pub struct Server<C, A> {
    catalog: Arc<C>,
    auth: Arc<A>,
    config: Arc<ServerConfig>,
}

impl<C, A> Clone for Server<C, A> {
    fn clone(&self) -> Self {
        Self {
            catalog: self.catalog.clone(),
            auth: self.auth.clone(),
            config: self.config.clone(),
        }
    }
}

impl<C, A> Server<C, A>
where
    C: ExportCatalog + 'static,
    A: Authenticator + 'static,
{
    pub fn new(catalog: Arc<C>, auth: Arc<A>) -> Self {
        Self {
            catalog,
            auth,
            config: Arc::new(ServerConfig::default()),
        }
    }

    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = Arc::new(config);
        self
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Serves one connection until the client leaves or `shutdown` fires.
    pub async fn serve_connection<S>(
        &self,
        stream: S,
        peer: PeerInfo,
        shutdown: &CancellationToken,
    ) -> Result<(), ServerError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        serve_connection_with(
            stream,
            &*self.catalog,
            &*self.auth,
            peer,
            &self.config,
            shutdown,
        )
        .await
    }

    /// Accepts TCP connections until `shutdown` fires, then waits for open connections to
    /// finish (each gets [`ServerConfig::shutdown_grace`]).
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        // Small replies must not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        let server = self.clone();
                        let shutdown = shutdown.clone();
                        tracker.spawn(async move {
                            let peer = PeerInfo::tcp(addr);
                            if let Err(e) = server.serve_connection(stream, peer, &shutdown).await {
                                debug!(peer = %addr, error = %e, "NBD connection ended with error");
                            }
                        });
                    }
                    Err(e) => accept_backoff(e).await,
                },
            }
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    /// Accepts unix-socket connections until `shutdown` fires (see [`Server::serve_tcp`]). The
    /// peer's credentials (`SO_PEERCRED`) are passed to the authenticator.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _addr)) => {
                        let peer = match stream.peer_cred() {
                            Ok(c) => PeerInfo::unix(Some(c.uid()), Some(c.gid()), c.pid()),
                            Err(_) => PeerInfo::unix(None, None, None),
                        };
                        let server = self.clone();
                        let shutdown = shutdown.clone();
                        tracker.spawn(async move {
                            let desc = peer.to_string();
                            if let Err(e) = server.serve_connection(stream, peer, &shutdown).await {
                                debug!(peer = %desc, error = %e, "NBD connection ended with error");
                            }
                        });
                    }
                    Err(e) => accept_backoff(e).await,
                },
            }
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

/// Accept errors (EMFILE, ECONNABORTED…) must neither kill the listener nor spin.
async fn accept_backoff(e: io::Error) {
    warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Serves one connection with default configuration and no external shutdown signal.
pub async fn serve_connection<S, C, A>(
    stream: S,
    catalog: &C,
    auth: &A,
    peer: PeerInfo,
) -> Result<(), ServerError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
    C: ExportCatalog,
    A: Authenticator,
{
    serve_connection_with(
        stream,
        catalog,
        auth,
        peer,
        &ServerConfig::default(),
        &CancellationToken::new(),
    )
    .await
}

/// Serves one connection: handshake (bounded by [`ServerConfig::handshake_timeout`]), then
/// transmission until `NBD_CMD_DISC`, EOF, a protocol violation, or `shutdown` (plus the grace
/// period).
pub async fn serve_connection_with<S, C, A>(
    mut stream: S,
    catalog: &C,
    auth: &A,
    peer: PeerInfo,
    config: &ServerConfig,
    shutdown: &CancellationToken,
) -> Result<(), ServerError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
    C: ExportCatalog,
    A: Authenticator,
{
    let span = tracing::info_span!(
        "nbd_conn",
        peer = %peer,
        principal = tracing::field::Empty,
        export = tracing::field::Empty
    );
    async move {
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
        let hs = handshake(
            &mut stream,
            &mut rbuf,
            catalog,
            auth,
            &peer,
            config,
            shutdown,
        );
        let session = match tokio::time::timeout(config.handshake_timeout, hs).await {
            Err(_) => return Err(ServerError::HandshakeTimeout),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(s))) => s,
        };
        let span = tracing::Span::current();
        span.record("principal", session.principal.as_str());
        span.record("export", session.name.as_str());
        debug!(
            size = session.size,
            flags = session.flags,
            "entering transmission"
        );

        let work = transmission(stream, rbuf, session, catalog, config, shutdown);
        tokio::pin!(work);
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(config.shutdown_grace).await;
        };
        tokio::select! {
            r = &mut work => r,
            _ = grace => {
                warn!("connection did not drain within the shutdown grace period; dropping it");
                Ok(())
            }
        }
    }
    .instrument(span)
    .await
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// What the handshake hands to transmission.
struct Session<E: ?Sized> {
    export: Arc<E>,
    name: String,
    principal: Principal,
    flags: u16,
    size: u64,
    block: BlockSize,
}

/// Reads more input into `buf`; `Ok(false)` on EOF or shutdown.
async fn read_more<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    needed: usize,
    shutdown: &CancellationToken,
) -> io::Result<bool> {
    buf.reserve(needed.saturating_sub(buf.len()).max(1024));
    tokio::select! {
        _ = shutdown.cancelled() => Ok(false),
        n = r.read_buf(buf) => Ok(n? > 0),
    }
}

fn transmission_flags(caps: &Capabilities) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
    if caps.read_only {
        flags |= NBD_FLAG_READ_ONLY;
    } else {
        if caps.can_trim {
            flags |= NBD_FLAG_SEND_TRIM;
        }
        if caps.can_write_zeroes {
            flags |= NBD_FLAG_SEND_WRITE_ZEROES;
        }
    }
    if caps.can_multi_conn {
        flags |= NBD_FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// The export's block size, made valid and capped at what the codec accepts.
fn effective_block_size(bs: BlockSize) -> BlockSize {
    let bs = if bs.is_valid() {
        bs
    } else {
        warn!(?bs, "export advertises invalid block sizes; using defaults");
        BlockSize::DEFAULT
    };
    let mut max = bs.max.min(MAX_PAYLOAD);
    max -= max % bs.min;
    BlockSize {
        max: max.max(bs.min),
        ..bs
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> io::Result<()> {
    w.write_all(buf).await?;
    w.flush().await?;
    buf.clear();
    Ok(())
}

async fn handshake<S, C, A>(
    io: &mut S,
    rbuf: &mut BytesMut,
    catalog: &C,
    auth: &A,
    peer: &PeerInfo,
    config: &ServerConfig,
    shutdown: &CancellationToken,
) -> Result<Option<Session<C::Export>>, ServerError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
    C: ExportCatalog,
    A: Authenticator,
{
    let hs_flags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
    let mut wbuf = BytesMut::with_capacity(256);
    encode_server_greeting(&mut wbuf, hs_flags);
    send(io, &mut wbuf).await?;

    let client_flags = loop {
        match parse_client_flags(rbuf, hs_flags)? {
            Parse::Parsed { value, consumed } => {
                let _ = rbuf.split_to(consumed);
                break value;
            }
            Parse::Incomplete { needed } => {
                if !read_more(io, rbuf, needed, shutdown).await? {
                    return Ok(None);
                }
            }
        }
    };
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut principal = auth.on_connect(peer);
    let mut auth_failures = 0u32;

    loop {
        // Frame one option and decode it into owned data before consuming the input.
        let (option, decoded) = loop {
            match parse_option(rbuf)? {
                Parse::Parsed { value, consumed } => {
                    let out = (value.option, OptionRequest::decode(&value));
                    let _ = rbuf.split_to(consumed);
                    break out;
                }
                Parse::Incomplete { needed } => {
                    if !read_more(io, rbuf, needed, shutdown).await? {
                        return Ok(None);
                    }
                }
            }
        };
        let req = match decoded {
            Ok(req) => req,
            Err(e) => {
                debug!(option, reason = e.reason, "invalid option data");
                let t = if e.too_big {
                    NBD_REP_ERR_TOO_BIG
                } else {
                    NBD_REP_ERR_INVALID
                };
                OptionReply::error(t, e.reason).encode(&mut wbuf, option);
                send(io, &mut wbuf).await?;
                continue;
            }
        };

        let authenticated = match (&req, &principal) {
            (OptionRequest::Abort | OptionRequest::Auth(_), _) => None,
            (_, Some(p)) => Some(p.clone()),
            (OptionRequest::ExportName(_), None) => {
                // Cannot carry an error: the spec mandates ending the session.
                return Err(ServerError::ExportRefused("not authenticated".into()));
            }
            (_, None) => {
                OptionReply::error(NBD_REP_ERR_POLICY, "authentication required")
                    .encode(&mut wbuf, option);
                send(io, &mut wbuf).await?;
                continue;
            }
        };

        match req {
            OptionRequest::Abort => {
                // "The server MUST reply with NBD_REP_ACK" (spec §NBD_OPT_ABORT); the client may
                // already have closed, so a failed write is not an error.
                OptionReply::Ack.encode(&mut wbuf, option);
                let _ = send(io, &mut wbuf).await;
                let _ = io.shutdown().await;
                return Ok(None);
            }
            OptionRequest::Auth(creds) => {
                match auth.authenticate(peer, &creds.principal, &creds.token) {
                    Some(p) => {
                        debug!(principal = %p, "authenticated");
                        principal = Some(p);
                        OptionReply::Ack.encode(&mut wbuf, option);
                    }
                    None => {
                        auth_failures += 1;
                        warn!(claimed = %creds.principal, "authentication failed");
                        if auth_failures >= config.max_auth_failures {
                            OptionReply::error(NBD_REP_ERR_POLICY, "authentication failed")
                                .encode(&mut wbuf, option);
                            let _ = send(io, &mut wbuf).await;
                            return Err(ServerError::AuthenticationFailed);
                        }
                        OptionReply::error(NBD_REP_ERR_POLICY, "authentication failed")
                            .encode(&mut wbuf, option);
                    }
                }
                send(io, &mut wbuf).await?;
            }
            OptionRequest::List => {
                let p = authenticated.unwrap_or_else(|| Principal::new(""));
                for e in catalog.list(&p) {
                    OptionReply::Server {
                        name: e.name,
                        description: e.description,
                    }
                    .encode(&mut wbuf, option);
                }
                OptionReply::Ack.encode(&mut wbuf, option);
                send(io, &mut wbuf).await?;
            }
            OptionRequest::StartTls => {
                OptionReply::error(NBD_REP_ERR_UNSUP, "TLS is not offered on this socket")
                    .encode(&mut wbuf, option);
                send(io, &mut wbuf).await?;
            }
            OptionRequest::StructuredReply => {
                OptionReply::error(NBD_REP_ERR_UNSUP, "this server uses simple replies only")
                    .encode(&mut wbuf, option);
                send(io, &mut wbuf).await?;
            }
            OptionRequest::Unsupported(_) => {
                OptionReply::error(NBD_REP_ERR_UNSUP, "option not supported")
                    .encode(&mut wbuf, option);
                send(io, &mut wbuf).await?;
            }
            OptionRequest::ExportName(name) => {
                let p = authenticated.unwrap_or_else(|| Principal::new(""));
                let export = catalog
                    .open(&name, &p)
                    .await
                    .map_err(|e| ServerError::ExportRefused(format!("{name:?}: {e}")))?;
                let caps = export.capabilities();
                let flags = transmission_flags(&caps);
                let size = export.size();
                encode_export_name_reply(&mut wbuf, size, flags, no_zeroes);
                send(io, &mut wbuf).await?;
                let block = effective_block_size(export.block_size());
                return Ok(Some(Session {
                    export,
                    name,
                    principal: p,
                    flags,
                    size,
                    block,
                }));
            }
            OptionRequest::Info(info) | OptionRequest::Go(info) => {
                let is_go = option == NBD_OPT_GO;
                let p = authenticated.unwrap_or_else(|| Principal::new(""));
                let export = match catalog.open(&info.name, &p).await {
                    Ok(e) => e,
                    Err(e) => {
                        let t = match e {
                            OpenError::NotFound | OpenError::Unavailable(_) => NBD_REP_ERR_UNKNOWN,
                            OpenError::Denied => NBD_REP_ERR_POLICY,
                            OpenError::ShuttingDown => NBD_REP_ERR_SHUTDOWN,
                        };
                        OptionReply::error(t, e.to_string()).encode(&mut wbuf, option);
                        send(io, &mut wbuf).await?;
                        continue;
                    }
                };
                let caps = export.capabilities();
                let flags = transmission_flags(&caps);
                let size = export.size();
                let block = effective_block_size(export.block_size());
                OptionReply::Info(InfoReply::Export { size, flags }).encode(&mut wbuf, option);
                // NBD_INFO_BLOCK_SIZE is always sent (the spec allows unrequested info; clients
                // ignore what they did not ask for) because we enforce non-default constraints.
                OptionReply::Info(InfoReply::BlockSize {
                    min: block.min,
                    preferred: block.preferred,
                    max: block.max,
                })
                .encode(&mut wbuf, option);
                if info.info_types.contains(&NBD_INFO_NAME) {
                    OptionReply::Info(InfoReply::Name(info.name.clone())).encode(&mut wbuf, option);
                }
                if info.info_types.contains(&NBD_INFO_DESCRIPTION)
                    && let Some(d) = catalog
                        .list(&p)
                        .into_iter()
                        .find(|l| l.name == info.name)
                        .map(|l| l.description)
                        .filter(|d| !d.is_empty())
                {
                    OptionReply::Info(InfoReply::Description(d)).encode(&mut wbuf, option);
                }
                OptionReply::Ack.encode(&mut wbuf, option);
                send(io, &mut wbuf).await?;
                if is_go {
                    return Ok(Some(Session {
                        export,
                        name: info.name,
                        principal: p,
                        flags,
                        size,
                        block,
                    }));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

/// Permits held from decoding a request until its reply has been written.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct ReplyMsg {
    handle: u64,
    error: u32,
    data: Option<Bytes>,
    _permits: Permits,
}

/// Sends exactly one reply for a request. If dropped without sending (the handler panicked or
/// was cancelled), it replies `NBD_EIO` so the client is never left waiting.
struct Responder {
    tx: mpsc::UnboundedSender<ReplyMsg>,
    handle: u64,
    permits: Option<Permits>,
}

impl Responder {
    fn send(mut self, error: Errno, data: Option<Bytes>) {
        if let Some(permits) = self.permits.take() {
            // A send error means the writer is gone (connection closing): nothing to do.
            let _ = self.tx.send(ReplyMsg {
                handle: self.handle,
                error: error.0,
                data,
                _permits: permits,
            });
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(permits) = self.permits.take() {
            let _ = self.tx.send(ReplyMsg {
                handle: self.handle,
                error: Errno::EIO.0,
                data: None,
                _permits: permits,
            });
        }
    }
}

/// A validated request, ready for the export.
enum Op {
    /// Nothing to do (zero-length request): reply success.
    Noop,
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    },
}

const OK: Errno = Errno(0);

/// Checks a request against the protocol, the export and the authorization hook
/// (spec §"Error values" decides the error numbers).
fn validate<E, C>(
    session: &Session<E>,
    catalog: &C,
    req: &Request,
    payload: Option<Bytes>,
) -> Result<Op, Errno>
where
    E: Export + ?Sized,
    C: ExportCatalog,
{
    let allowed_flags = match req.command {
        // FUA "is valid for all commands" once SEND_FUA is negotiated, "even by ignoring the bit".
        Command::Read | Command::Write | Command::Flush | Command::Trim => NBD_CMD_FLAG_FUA,
        Command::WriteZeroes => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        // Not advertised (CACHE, BLOCK_STATUS need negotiation we do not offer): "SHOULD return
        // NBD_EINVAL if it receives an unknown command".
        Command::Cache
        | Command::BlockStatus
        | Command::Resize
        | Command::Unknown(_)
        | Command::Disc => {
            return Err(Errno::EINVAL);
        }
    };
    if req.flags & !allowed_flags != 0 {
        return Err(Errno::EINVAL);
    }
    let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
    let kind = match req.command {
        Command::Read => AccessKind::Read,
        Command::Write => AccessKind::Write,
        Command::Trim => AccessKind::Trim,
        Command::WriteZeroes => AccessKind::WriteZeroes,
        _ => AccessKind::Flush,
    };
    if kind == AccessKind::Flush {
        // Offset and length are reserved for FLUSH; tolerate nonzero values.
        let access = Access {
            kind,
            offset: 0,
            len: 0,
        };
        if !catalog.authorize(&session.principal, &session.name, &access) {
            return Err(Errno::EPERM);
        }
        return Ok(Op::Flush);
    }
    if kind.is_write() && session.flags & NBD_FLAG_READ_ONLY != 0 {
        return Err(Errno::EPERM);
    }
    if (kind == AccessKind::Trim && session.flags & NBD_FLAG_SEND_TRIM == 0)
        || (kind == AccessKind::WriteZeroes && session.flags & NBD_FLAG_SEND_WRITE_ZEROES == 0)
    {
        return Err(Errno::EINVAL);
    }
    let is_write_data = matches!(kind, AccessKind::Write | AccessKind::WriteZeroes);
    let size = session.export.size();
    match req.offset.checked_add(req.len.into()) {
        Some(end) if end <= size => {}
        // "SHOULD return NBD_ENOSPC if it receives a write request including one or more sectors
        // beyond the size of the device ... NBD_EINVAL if it receives a read or trim request"
        // (spec §"Error values"; likewise ENOSPC for WRITE_ZEROES).
        _ => {
            return Err(if is_write_data {
                Errno::ENOSPC
            } else {
                Errno::EINVAL
            });
        }
    }
    let min = u64::from(session.block.min);
    if !req.offset.is_multiple_of(min) || !u64::from(req.len).is_multiple_of(min) {
        return Err(Errno::EINVAL);
    }
    // READ and WRITE are bounded by the advertised maximum; TRIM and WRITE_ZEROES carry no
    // payload, so we accept any length rather than fail clients that do not split them.
    if matches!(kind, AccessKind::Read | AccessKind::Write) && req.len > session.block.max {
        return Err(Errno::EINVAL);
    }
    let access = Access {
        kind,
        offset: req.offset,
        len: req.len.into(),
    };
    if !catalog.authorize(&session.principal, &session.name, &access) {
        return Err(Errno::EPERM);
    }
    if req.len == 0 {
        return Ok(Op::Noop);
    }
    Ok(match kind {
        AccessKind::Read => Op::Read {
            offset: req.offset,
            len: req.len,
        },
        AccessKind::Write => Op::Write {
            offset: req.offset,
            data: payload.unwrap_or_default(),
            fua,
        },
        AccessKind::Trim => Op::Trim {
            offset: req.offset,
            len: req.len,
            fua,
        },
        AccessKind::WriteZeroes => Op::WriteZeroes {
            offset: req.offset,
            len: req.len,
            may_trim: req.flags & NBD_CMD_FLAG_NO_HOLE == 0,
            fua,
        },
        AccessKind::Flush => Op::Flush,
    })
}

/// Runs one request against the export and queues its reply.
async fn execute<E: Export + ?Sized>(op: Op, export: Arc<E>, responder: Responder) {
    let (errno, data) = match op {
        Op::Noop => (OK, None),
        Op::Read { offset, len } => match export.read(offset, len).await {
            Ok(b) if b.len() == len as usize => (OK, Some(b)),
            Ok(b) => {
                // A simple reply cannot carry a short read: report EIO instead.
                warn!(offset, len, got = b.len(), "export returned a short read");
                (Errno::EIO, None)
            }
            Err(e) => (e.errno(false), None),
        },
        Op::Write { offset, data, fua } => {
            (status(export.write(offset, data, fua).await, true), None)
        }
        Op::Flush => (status(export.flush().await, false), None),
        Op::Trim { offset, len, fua } => (status(export.trim(offset, len, fua).await, false), None),
        Op::WriteZeroes {
            offset,
            len,
            may_trim,
            fua,
        } => (
            status(export.write_zeroes(offset, len, may_trim, fua).await, true),
            None,
        ),
    };
    if errno != OK {
        debug!(handle = responder.handle, %errno, "request failed");
    }
    responder.send(errno, data);
}

fn status(r: Result<(), crate::export::ExportError>, is_write: bool) -> Errno {
    match r {
        Ok(()) => OK,
        Err(e) => {
            if matches!(e, crate::export::ExportError::Io(_)) {
                warn!(error = %e, "export I/O error");
            }
            e.errno(is_write)
        }
    }
}

enum ReaderEnd {
    Disc,
    Eof,
    Shutdown,
    Io(io::Error),
    Proto(ProtoError),
}

async fn transmission<S, C>(
    stream: S,
    mut rbuf: BytesMut,
    session: Session<C::Export>,
    catalog: &C,
    config: &ServerConfig,
    shutdown: &CancellationToken,
) -> Result<(), ServerError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
    C: ExportCatalog,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let stop = shutdown.child_token();
    let max_in_flight = config
        .max_in_flight
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let byte_budget = config
        .max_in_flight_bytes
        .max(MAX_PAYLOAD as usize)
        .min(Semaphore::MAX_PERMITS);
    let count_sem = Arc::new(Semaphore::new(max_in_flight));
    let byte_sem = Arc::new(Semaphore::new(byte_budget));
    // Unbounded is safe: every queued reply holds a count permit, so at most `max_in_flight`
    // replies can be queued.
    let (tx, rx) = mpsc::unbounded_channel::<ReplyMsg>();
    let decoder = RequestDecoder::new(MAX_PAYLOAD);

    let reader = async {
        let end = loop {
            let (req, payload) = match decoder.decode(&mut rbuf) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    if rbuf.capacity() - rbuf.len() < 16 * 1024 {
                        rbuf.reserve(64 * 1024);
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break ReaderEnd::Shutdown,
                        r = rd.read_buf(&mut rbuf) => match r {
                            Ok(0) => break ReaderEnd::Eof,
                            Ok(_) => continue,
                            Err(e) => break ReaderEnd::Io(e),
                        },
                    }
                }
                Err(e) => break ReaderEnd::Proto(e),
            };
            if req.command == Command::Disc {
                break ReaderEnd::Disc;
            }
            let count = tokio::select! {
                _ = stop.cancelled() => break ReaderEnd::Shutdown,
                p = count_sem.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break ReaderEnd::Shutdown,
                },
            };
            let op = validate(&session, catalog, &req, payload);
            let payload_bytes = match &op {
                Ok(Op::Read { len, .. }) => *len,
                Ok(Op::Write { data, .. }) => data.len() as u32,
                _ => 0,
            };
            let bytes = if payload_bytes > 0 {
                let n = (payload_bytes as usize).min(byte_budget) as u32;
                tokio::select! {
                    _ = stop.cancelled() => break ReaderEnd::Shutdown,
                    p = byte_sem.clone().acquire_many_owned(n) => match p {
                        Ok(p) => Some(p),
                        Err(_) => break ReaderEnd::Shutdown,
                    },
                }
            } else {
                None
            };
            let responder = Responder {
                tx: tx.clone(),
                handle: req.handle,
                permits: Some(Permits {
                    _count: count,
                    _bytes: bytes,
                }),
            };
            match op {
                Err(errno) => {
                    debug!(handle = req.handle, command = ?req.command, %errno, "request rejected");
                    responder.send(errno, None);
                }
                Ok(Op::Noop) => responder.send(OK, None),
                Ok(op) => {
                    let export = session.export.clone();
                    tokio::spawn(execute(op, export, responder).in_current_span());
                }
            }
        };
        // "The server MUST handle all outstanding requests" before closing (spec §NBD_CMD_DISC);
        // on shutdown the spec likewise says to wait for in-flight requests. All permits back
        // means every reply has been written (or the writer is gone).
        let _ = count_sem.acquire_many(max_in_flight as u32).await;
        drop(tx);
        end
    };

    let writer = async {
        let r = write_replies(wr, rx).await;
        if r.is_err() {
            stop.cancel();
        }
        r
    };

    let (end, written) = tokio::join!(reader, writer);
    match end {
        ReaderEnd::Disc => debug!("client sent NBD_CMD_DISC"),
        ReaderEnd::Eof => debug!("client closed the connection"),
        ReaderEnd::Shutdown => info!("connection closed by server shutdown"),
        ReaderEnd::Io(e) => {
            debug!(error = %e, "read error");
            return Err(e.into());
        }
        ReaderEnd::Proto(e) => {
            warn!(error = %e, "protocol violation; disconnecting");
            return Err(e.into());
        }
    }
    match written {
        // The client may legitimately have closed before reading every reply.
        Err(e)
            if !matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            Err(e.into())
        }
        _ => Ok(()),
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<ReplyMsg>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let mut hdr = BytesMut::with_capacity(SIMPLE_REPLY_HEADER_LEN);
    while let Some(msg) = rx.recv().await {
        write_reply(&mut w, &mut hdr, msg).await?;
        // Batch whatever else is ready into the same flush.
        while let Ok(msg) = rx.try_recv() {
            write_reply(&mut w, &mut hdr, msg).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    hdr: &mut BytesMut,
    msg: ReplyMsg,
) -> io::Result<()> {
    hdr.clear();
    SimpleReply {
        error: msg.error,
        handle: msg.handle,
    }
    .encode(hdr);
    w.write_all(hdr).await?;
    if let Some(data) = &msg.data {
        // Large payloads bypass the buffer (BufWriter writes them directly).
        w.write_all(data).await?;
    }
    Ok(())
}
