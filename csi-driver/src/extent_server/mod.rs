//! The node's extent server (ARCHITECTURE §4 "Extent server"; seed 001's agent 17).
//!
//! Each node serves its own areas to peer nodes over NBD on TCP, one export per area, named by
//! the area. A peer's engine reaches them through [`crate::backend::remote::RemoteArea`].
//!
//! - **Seed 001 §4.5 (S51 → S71 → S72 → S52, [0035]–[0040]).** The borrower's client sends
//!   `{requesting server, disk, access request}` to the lender's agent, which performs it on its
//!   local storage and returns the result. Here the requesting server is the authenticated NBD
//!   principal, the disk is the export (area) plus the byte range, and the access request is the
//!   NBD command; the result is the NBD reply. Seed 001 §3.5's operations map to READ, WRITE,
//!   WRITE_ZEROES (initialise/erase), TRIM and FLUSH; "search" has no block equivalent (§8.4).
//! - **Seed 002 §4.4 (S606–S615, [0114]–[0118]).** A request for data another node owns is
//!   forwarded to that node, which resolves it against its own real volumes. The forwarding peer
//!   has already translated volume → area offsets, so this server only checks and performs the
//!   area access: one hop, never re-forwarded (serve only [`crate::backend::LocalArea`]s here).
//! - **Authentication.** A peer presents its node name and a per-peer token
//!   ([`tessera_nbd::TokenAuthenticator`], the private `NBD_OPT_TESSERA_AUTH` option) before any
//!   other option; until then `NBD_OPT_LIST` and `NBD_OPT_GO` get `NBD_REP_ERR_POLICY`, so an
//!   unauthenticated client neither sees nor opens an export. Seed 001 leaves authentication
//!   open (§4.7); the tokens come from the chart-generated Secret (ARCHITECTURE §4).
//! - **Authorization.** [`ExtentAuthorization`]: peer → volume → area ranges under the volume's
//!   current map generation, set by the control plane. An authenticated peer sees and opens only
//!   areas it holds a range on, and every request is checked against the table before it reaches
//!   the area; anything outside gets `NBD_EPERM` (seed 001 §8.4: refuse requests from nodes that
//!   are not the recorded borrower of a currently mounted volume).
//! - **Errors.** Area failures map to NBD errors by [`export::export_error`] (`EIO` unless the
//!   cause has an NBD meaning such as `ENOSPC`).
//!
//! [`ExtentServer::start`] binds and spawns the server; the returned [`ExtentServerHandle`]
//! gives the bound address, the authorization table, and stops the server gracefully
//! ([`ExtentServerHandle::stop`]) or abruptly ([`ExtentServerHandle::kill`], which behaves like
//! a crashed node for the peers: connections reset, requests in flight never answered).

pub mod authorization;
pub mod export;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tessera_api::model::AreaId;
use tessera_nbd::{
    CancellationToken, PeerInfo, Server, ServerConfig, SimpleCatalog, TokenAuthenticator,
};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::backend::AreaBackend;

pub use authorization::{AreaGrant, ExtentAuthorization, GrantError};
pub use export::AreaExport;

/// How the extent server authenticates peers and runs connections.
#[derive(Clone, Default)]
pub struct ExtentServerConfig {
    /// Peer node name → its token.
    pub peers: BTreeMap<String, Vec<u8>>,
    /// One token every node holds (the chart's Secret): any peer name presenting it is accepted.
    pub shared_token: Option<Vec<u8>>,
    /// NBD server tunables (handshake timeout, in-flight limits, shutdown grace).
    pub nbd: ServerConfig,
}

impl fmt::Debug for ExtentServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtentServerConfig")
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .field("shared_token", &self.shared_token.is_some())
            .field("nbd", &self.nbd)
            .finish()
    }
}

impl ExtentServerConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `peer` when it presents `token`.
    pub fn with_peer(mut self, peer: impl Into<String>, token: impl Into<Vec<u8>>) -> Self {
        self.peers.insert(peer.into(), token.into());
        self
    }

    /// Accepts any peer name presenting `token` (see [`TokenAuthenticator::with_shared_token`]).
    pub fn with_shared_token(mut self, token: impl Into<Vec<u8>>) -> Self {
        self.shared_token = Some(token.into());
        self
    }

    pub fn with_nbd(mut self, nbd: ServerConfig) -> Self {
        self.nbd = nbd;
        self
    }
}

/// Why the extent server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExtentServerError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("area {0} is given twice")]
    DuplicateArea(AreaId),
    #[error("peer {peer:?} has an empty name or token")]
    InvalidPeer { peer: String },
    #[error("the extent server task failed: {0}")]
    Task(String),
}

type Catalog = SimpleCatalog<AreaExport>;

/// The extent server. See the module documentation.
pub struct ExtentServer;

impl ExtentServer {
    /// Binds `bind_addr` (port 0 picks one) and serves `areas` — this node's own areas, in
    /// practice [`crate::backend::LocalArea`]s — to the peers in `config`.
    ///
    /// Nothing is granted at first: peers can authenticate but see no export until the control
    /// plane calls [`ExtentAuthorization::grant_volume`] on
    /// [`ExtentServerHandle::authorization`].
    pub async fn start(
        bind_addr: SocketAddr,
        areas: impl IntoIterator<Item = Arc<dyn AreaBackend>>,
        config: ExtentServerConfig,
    ) -> Result<ExtentServerHandle, ExtentServerError> {
        let mut auth = TokenAuthenticator::new();
        for (peer, token) in &config.peers {
            if peer.is_empty() || token.is_empty() {
                return Err(ExtentServerError::InvalidPeer { peer: peer.clone() });
            }
            auth = auth.with_principal(peer.clone(), token.clone());
        }
        match &config.shared_token {
            Some(token) if token.is_empty() => {
                return Err(ExtentServerError::InvalidPeer {
                    peer: "<shared>".into(),
                });
            }
            Some(token) => auth = auth.with_shared_token(token.clone()),
            None => {}
        }
        if config.peers.is_empty() && config.shared_token.is_none() {
            tracing::warn!("extent server without peers: nobody can authenticate");
        }
        let authorization = Arc::new(ExtentAuthorization::new());
        let catalog = Arc::new(Catalog::new().with_authorization(authorization.ranges().clone()));
        let mut seen = std::collections::BTreeSet::new();
        for backend in areas {
            let area = backend.area().clone();
            if !seen.insert(area.clone()) {
                return Err(ExtentServerError::DuplicateArea(area));
            }
            authorization.add_area(&area, backend.size_bytes());
            catalog.insert_with_description(
                area.as_str(),
                Arc::new(AreaExport::new(backend)),
                format!("tessera area {area}"),
            );
        }
        let listener =
            TcpListener::bind(bind_addr)
                .await
                .map_err(|source| ExtentServerError::Bind {
                    addr: bind_addr,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ExtentServerError::Bind {
                addr: bind_addr,
                source,
            })?;
        let server = Server::new(catalog.clone(), Arc::new(auth)).with_config(config.nbd);
        let shutdown = CancellationToken::new();
        let span = tracing::info_span!("extent_server", %addr);
        tracing::info!(parent: &span, areas = seen.len(), peers = config.peers.len(), "extent server listening");
        let task = tokio::spawn(accept_loop(listener, server, shutdown.clone()).instrument(span));
        Ok(ExtentServerHandle {
            addr,
            authorization,
            catalog,
            shutdown,
            task: Some(task),
        })
    }
}

/// Accepts peers until `shutdown`. Connection tasks live in a `JoinSet` owned by this task, so
/// aborting it (kill) drops every connection at once.
async fn accept_loop(
    listener: TcpListener,
    server: Server<Catalog, TokenAuthenticator>,
    shutdown: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Small replies must not wait for Nagle.
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, %error, "TCP_NODELAY refused");
                    }
                    let server = server.clone();
                    let shutdown = shutdown.clone();
                    let span = tracing::debug_span!("peer", %peer);
                    connections.spawn(
                        async move {
                            tracing::debug!("peer connected");
                            match server
                                .serve_connection(stream, PeerInfo::tcp(peer), &shutdown)
                                .await
                            {
                                Ok(()) => tracing::debug!("peer disconnected"),
                                Err(error) => {
                                    tracing::info!(%error, "peer connection ended with an error");
                                }
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(error) => {
                    // EMFILE and friends must neither end the server nor spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    // Each connection finishes its in-flight requests within the configured grace.
    while connections.join_next().await.is_some() {}
    tracing::info!("extent server stopped");
}

/// A running extent server. Dropping it kills the server (see [`ExtentServerHandle::kill`]).
pub struct ExtentServerHandle {
    addr: SocketAddr,
    authorization: Arc<ExtentAuthorization>,
    catalog: Arc<Catalog>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for ExtentServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtentServerHandle")
            .field("addr", &self.addr)
            .field("running", &self.task.is_some())
            .finish()
    }
}

impl ExtentServerHandle {
    /// The bound address (with the chosen port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The table the control plane maintains.
    pub fn authorization(&self) -> &Arc<ExtentAuthorization> {
        &self.authorization
    }

    /// Starts serving another area of this node.
    pub fn add_area(&self, backend: Arc<dyn AreaBackend>) {
        let area = backend.area().clone();
        self.authorization.add_area(&area, backend.size_bytes());
        self.catalog.insert_with_description(
            area.as_str(),
            Arc::new(AreaExport::new(backend)),
            format!("tessera area {area}"),
        );
        tracing::info!(%area, addr = %self.addr, "area served");
    }

    /// Stops serving an area: new opens fail and every request on open connections gets EPERM.
    pub fn remove_area(&self, area: &AreaId) -> bool {
        self.authorization.remove_area(area);
        let removed = self.catalog.remove(area.as_str()).is_some();
        tracing::info!(%area, addr = %self.addr, removed, "area withdrawn");
        removed
    }

    /// Stops accepting, lets open connections finish their in-flight requests (within
    /// [`ServerConfig::shutdown_grace`]) and waits for them to close.
    pub async fn stop(mut self) -> Result<(), ExtentServerError> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| ExtentServerError::Task(e.to_string())),
            None => Ok(()),
        }
    }

    /// Drops the listener and every connection at once, without answering requests in flight —
    /// what peers see when the node dies.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Cancelled is the expected outcome; anything else already ended the task.
            let _ = task.await;
        }
        tracing::warn!(addr = %self.addr, "extent server killed");
    }
}

impl Drop for ExtentServerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.shutdown.cancel();
            task.abort();
        }
    }
}
