//! Shared fixtures of the remote-area and interop tests: two simulated nodes on loopback.
//!
//! Node A runs the engine: its own areas are `LocalArea`s, node B's areas are `RemoteArea`s to
//! B's extent server. Node B is just an extent server over its own `LocalArea`s, bound to
//! 127.0.0.2 (a different loopback address, so the two "nodes" do not share an address; falls
//! back to 127.0.0.1 where that address cannot be bound).

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tessera_api::model::{ExtentMap, ExtentSize, Generation, ReplicaLocation, Run};
use tessera_csi::backend::remote::{RemoteArea, RemoteAreaConfig, RemoteAreaError};
use tessera_csi::backend::{AreaBackend, AreaRegistry, LocalArea, LocalAreaOptions};
use tessera_csi::extent_server::{ExtentServer, ExtentServerConfig, ExtentServerHandle};
use tessera_nbd::{ClientConfig, Credentials, PoolConfig, ServerConfig};

pub const MIB: u64 = 1 << 20;
/// Extent size of the test volumes.
pub const ES: u64 = MIB;

pub const NODE_A: &str = "node-a";
pub const TOKEN_A: &[u8] = b"token-of-node-a";
/// A second authenticated peer, granted nothing unless a test says so.
pub const NODE_C: &str = "node-c";
pub const TOKEN_C: &[u8] = b"token-of-node-c";

pub fn es() -> ExtentSize {
    ExtentSize::new(ES).expect("valid extent size")
}

/// Node B's address: 127.0.0.2 when the loopback accepts it (Linux routes all of 127/8).
pub fn node_b_bind() -> SocketAddr {
    let b = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 0);
    match std::net::TcpListener::bind(b) {
        Ok(_) => b,
        Err(e) => {
            println!("127.0.0.2 not bindable ({e}); node B uses 127.0.0.1");
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
        }
    }
}

/// A sparse temp-file area of `size` bytes.
pub fn local_area(dir: &TempDir, name: &str, size: u64) -> Arc<LocalArea> {
    let options = LocalAreaOptions {
        size_bytes: Some(size),
        ..LocalAreaOptions::default()
    };
    Arc::new(
        LocalArea::open(name, dir.path().join(format!("{name}.img")), &options)
            .expect("open local area"),
    )
}

/// Extent-server configuration with peers A and C and a short shutdown grace.
pub fn server_config() -> ExtentServerConfig {
    ExtentServerConfig::new()
        .with_peer(NODE_A, TOKEN_A)
        .with_peer(NODE_C, TOKEN_C)
        .with_nbd(ServerConfig {
            shutdown_grace: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            ..ServerConfig::default()
        })
}

/// Node B: an extent server over `areas`.
pub async fn start_node_b(areas: Vec<Arc<dyn AreaBackend>>) -> ExtentServerHandle {
    ExtentServer::start(node_b_bind(), areas, server_config())
        .await
        .expect("start node B's extent server")
}

/// Short timeouts so that failure tests stay fast.
pub fn remote_config() -> RemoteAreaConfig {
    RemoteAreaConfig {
        client: ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Some(Duration::from_secs(10)),
            max_in_flight: 64,
        },
        pool: PoolConfig {
            connections: 2,
            retry_on_disconnect: true,
            reconnect_backoff: Duration::from_millis(50),
        },
    }
}

/// `area` on `server`, as node `peer` with `token`.
pub async fn connect_as(
    server: &ExtentServerHandle,
    area: &str,
    peer: &str,
    token: &[u8],
    config: RemoteAreaConfig,
) -> Result<Arc<RemoteArea>, RemoteAreaError> {
    RemoteArea::connect(
        area,
        server.addr().to_string(),
        Credentials::new(peer, token.to_vec()),
        config,
    )
    .await
    .map(Arc::new)
}

/// `area` on `server`, as node A.
pub async fn connect_remote(server: &ExtentServerHandle, area: &str) -> Arc<RemoteArea> {
    connect_as(server, area, NODE_A, TOKEN_A, remote_config())
        .await
        .expect("connect remote area")
}

pub fn registry(areas: &[Arc<dyn AreaBackend>]) -> Arc<AreaRegistry> {
    let registry = Arc::new(AreaRegistry::new());
    for area in areas {
        registry.insert(Arc::clone(area));
    }
    registry
}

pub fn loc(area: &str, slot: u64) -> ReplicaLocation {
    ReplicaLocation::new(area, slot * ES)
}

/// A map of `size` bytes from `(extent_start, extent_count, replicas)` runs (each replica
/// location is the start of the run on its area); everything else is a hole.
pub fn map(
    size: u64,
    generation: Generation,
    mapped: &[(u64, u64, Vec<ReplicaLocation>)],
) -> Arc<ExtentMap> {
    let mut runs = Vec::new();
    let mut cursor = 0;
    for (start, count, replicas) in mapped {
        let offset = start * ES;
        if offset > cursor {
            runs.push(Run::hole(cursor, offset - cursor));
        }
        let end = ((start + count) * ES).min(size);
        runs.push(Run::new(offset, end - offset, replicas.clone()));
        cursor = end;
    }
    if cursor < size {
        runs.push(Run::hole(cursor, size - cursor));
    }
    Arc::new(ExtentMap::from_runs(size, es(), generation, runs).expect("valid map"))
}

/// A deterministic pattern for `len` bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_mul(31)
                .wrapping_add((i as u8).wrapping_mul(7))
                ^ (i >> 8) as u8
                ^ (i >> 16) as u8
        })
        .collect()
}
