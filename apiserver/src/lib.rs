//! An embedded, persisted Kubernetes-compatible API server.
//!
//! It serves CustomResourceDefinitions and their custom resources, Namespaces, Nodes, Events
//! (core/v1 and events.k8s.io/v1) and Leases over plain HTTP, with the REST semantics kube-rs
//! clients and `kubectl` rely on (watch with resourceVersion and bookmarks, optimistic
//! concurrency, merge/JSON/apply patches, the status subresource, finalizers, generation,
//! discovery, tables). State is kept in memory and persisted in a data directory. See
//! `docs/apiserver.md` for exactly what is and is not supported.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let server = tessera_apiserver::ApiServer::builder()
//!     .data_dir("/tmp/tessera-api")
//!     .start()
//!     .await?;
//! let client = server.client();
//! println!("listening on {}, kubeconfig {:?}", server.addr(), server.kubeconfig_path());
//! # let _ = client;
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod cli;
pub mod crd;
pub mod discovery;
pub mod errors;
pub mod kubeconfig;
pub mod meta;
pub mod patch;
pub mod persistence;
pub mod protobuf;
pub mod resources;
pub mod rest;
pub mod routes;
pub mod selectors;
pub mod store;
pub mod table;
pub mod validation;
pub mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch as tokio_watch;
use tokio::task::JoinHandle;

pub use errors::{ApiError, StoreError};
pub use store::StoreOptions;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot bootstrap the store: {0}")]
    Bootstrap(ApiError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build a client: {0}")]
    Client(#[from] kube::Error),
    #[error("invalid server URL: {0}")]
    Url(String),
}

/// Entry point: `ApiServer::builder()`.
pub struct ApiServer;

impl ApiServer {
    pub fn builder() -> ApiServerBuilder {
        ApiServerBuilder::default()
    }
}

/// Configures and starts a server.
#[derive(Debug, Clone)]
pub struct ApiServerBuilder {
    data_dir: Option<PathBuf>,
    bind: SocketAddr,
    kubeconfig: Option<PathBuf>,
    store: StoreOptions,
    bookmark_interval: Duration,
    default_watch_timeout: Duration,
    max_body_bytes: usize,
}

impl Default for ApiServerBuilder {
    fn default() -> Self {
        ApiServerBuilder {
            data_dir: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            kubeconfig: None,
            store: StoreOptions::default(),
            bookmark_interval: Duration::from_secs(60),
            default_watch_timeout: Duration::from_secs(1800),
            max_body_bytes: 3 * 1024 * 1024,
        }
    }
}

impl ApiServerBuilder {
    /// Persist state in `dir` (created if missing). Without it, state lives in memory only.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Listen address (default `127.0.0.1:0`: an ephemeral port, see [`RunningServer::addr`]).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Where to write the kubeconfig (default: `<data dir>/kubeconfig`).
    pub fn kubeconfig_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.kubeconfig = Some(path.into());
        self
    }

    /// How many change events are kept for watches and paginated lists (default 10000). A watch
    /// or `continue` older than the window gets 410 Gone.
    pub fn history_window(mut self, events: usize) -> Self {
        self.store.history_window = events.max(1);
        self
    }

    /// Snapshot the state once the log holds this many records (default 20000).
    pub fn compact_every(mut self, records: usize) -> Self {
        self.store.compact_every = records.max(1);
        self
    }

    /// fsync the log before acknowledging writes (default true).
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.store.fsync = fsync;
        self
    }

    /// Interval of periodic watch bookmarks (default 60 s).
    pub fn bookmark_interval(mut self, d: Duration) -> Self {
        self.bookmark_interval = d;
        self
    }

    /// Watch duration when the client sends no `timeoutSeconds` (default 30 min).
    pub fn default_watch_timeout(mut self, d: Duration) -> Self {
        self.default_watch_timeout = d;
        self
    }

    /// Largest accepted request body (default 3 MiB).
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    /// Opens the store, binds and serves on the current tokio runtime.
    pub async fn start(self) -> Result<RunningServer, StartError> {
        let store = store::Store::open(self.data_dir.as_deref(), self.store.clone())?;
        rest::bootstrap(&store).map_err(StartError::Bootstrap)?;
        let listener = tokio::net::TcpListener::bind(self.bind)
            .await
            .map_err(|source| StartError::Bind {
                addr: self.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: self.bind,
            source,
        })?;
        let url = format!("http://{addr}");
        let kubeconfig_path = self
            .kubeconfig
            .clone()
            .or_else(|| self.data_dir.as_ref().map(|d| d.join("kubeconfig")));
        if let Some(path) = &kubeconfig_path {
            kubeconfig::write(path, &url).map_err(|source| StartError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
        }
        let config = kubeconfig::client_config(&url)?;
        let client = kube::Client::try_from(config.clone())?;
        let (shutdown_tx, shutdown_rx) = tokio_watch::channel(false);
        let state = Arc::new(routes::AppState {
            store: store.clone(),
            opts: routes::HttpOptions {
                bookmark_interval: self.bookmark_interval,
                default_watch_timeout: self.default_watch_timeout,
                max_body_bytes: self.max_body_bytes,
            },
            shutdown: shutdown_rx.clone(),
            server_address: addr.to_string(),
        });
        let app = routes::router(state);
        let mut signal = shutdown_rx;
        let join = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = signal.wait_for(|stop| *stop).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "API server stopped with an error");
            }
        });
        tracing::info!(%addr, "API server listening");
        Ok(RunningServer {
            addr,
            url,
            kubeconfig_path,
            client,
            config,
            shutdown_tx,
            join: Some(join),
            store,
        })
    }
}

/// A started server. Dropping it stops it too (without waiting).
pub struct RunningServer {
    addr: SocketAddr,
    url: String,
    kubeconfig_path: Option<PathBuf>,
    client: kube::Client,
    config: kube::Config,
    shutdown_tx: tokio_watch::Sender<bool>,
    join: Option<JoinHandle<()>>,
    store: Arc<store::Store>,
}

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The kubeconfig written for this server (plain http, no auth), if any.
    pub fn kubeconfig_path(&self) -> Option<&Path> {
        self.kubeconfig_path.as_deref()
    }

    /// A kube client for this server (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The client configuration, to build differently configured clients.
    pub fn kube_config(&self) -> kube::Config {
        self.config.clone()
    }

    /// The current resourceVersion of the store.
    pub fn resource_version(&self) -> u64 {
        self.store.current_rv()
    }

    /// Stops serving (open watches end), waits for the server task and releases the data
    /// directory.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(join) = self.join.take() {
            let abort = join.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), join)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.store.close();
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(join) = self.join.take() {
            join.abort();
        }
        self.store.close();
    }
}
