//! The CSI services (spec v1.12, `tessera-proto`'s `csi.v1`): Identity in both modes,
//! Controller in controller mode, Node in node mode. Typed errors of the engine, the agent and
//! the API are turned into gRPC codes here, at the edge, and nowhere else.

pub mod controller;
pub mod identity;
pub mod node;

use std::path::Path;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// The driver name (CSIDriver object, StorageClass provisioner).
pub const DRIVER_NAME: &str = "csi.tessera.io";

/// Topology key of a node (NodeGetInfo, CreateVolume accessible topology).
pub const TOPOLOGY_NODE_KEY: &str = "topology.tessera.io/node";
/// Topology key of a node's zone (the StorageArea `domain`).
pub const TOPOLOGY_ZONE_KEY: &str = "topology.kubernetes.io/zone";

/// publish_context key: the committed mapping generation the volume was published at.
pub const PUBLISH_GENERATION: &str = "tessera.io/generation";
/// publish_context key: `single` (one borrower, seed 001 [0028]) or `multi`
/// (MULTI_NODE_MULTI_WRITER block volume).
pub const PUBLISH_ACCESS: &str = "tessera.io/access";

/// A gRPC channel to a CSI endpoint on a unix socket, the transport kubelet and the sidecars
/// use. tonic needs a URI; the connector ignores it and dials the socket.
pub async fn connect_unix(
    socket: &Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://[::1]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

/// Binds a unix socket for a CSI endpoint, replacing a stale socket file left by a previous
/// run (kubelet restarts plugins; a leftover socket must not keep the new one from binding).
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListenerStream> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    Ok(UnixListenerStream::new(listener))
}
