//! NBD (network block device) for tessera: a sans-I/O protocol codec ([`proto`]), an async
//! server with authentication, per-request authorization and pipelining ([`server`]), and a
//! pipelined client with a reconnecting connection pool ([`client`]).
//!
//! The server backs two things (ARCHITECTURE §4): the node's *extent server* (TCP, token or
//! mTLS authentication, [`RangeAuthorization`] deciding every request) and the per-volume
//! unix-socket frontend (stock clients such as `qemu-io`, `nbdcopy`, `nbdfuse` and fio's nbd
//! engine; the socket's file permissions are the access control, [`AllowAll`]). The client is
//! the remote-area backend of the node engine.
//!
//! Protocol references ("spec §…") are to the NBD protocol document, `doc/proto.md` in
//! NetworkBlockDevice/nbd.

pub mod auth;
pub mod client;
pub mod export;
pub mod proto;
pub mod server;

pub use auth::{
    Access, AccessKind, AllowAll, Authenticator, ExportCatalog, ExportListing, OpenError, PeerAddr,
    PeerInfo, Permission, Principal, RangeAuthorization, SimpleCatalog, TokenAuthenticator,
};
pub use client::{
    ClientConfig, ClientError, ClientPool, Credentials, ExportDetails, NbdClient, PoolConfig,
    Target,
};
pub use export::{
    BlockSize, BoxFuture, Capabilities, DynExport, Export, ExportError, MemExport, MemExportStats,
};
pub use proto::Errno;
pub use server::{Server, ServerConfig, ServerError, serve_connection, serve_connection_with};
pub use tokio_util::sync::CancellationToken;
