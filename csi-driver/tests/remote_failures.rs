//! Remote areas when things go wrong (ARCHITECTURE §4 "Extent server"; seed 002 §4.10: a failed
//! node affects only what it serves; seed 001 [0019]: a duplexed volume survives the loss of one
//! lender).
//!
//! - an extent server killed or stopped in the middle of I/O fails only the requests that touch
//!   its areas, with EIO; requests on other areas keep succeeding;
//! - a `copies: 2` volume with one remote replica keeps serving from the other after the remote
//!   dies, and reports itself degraded;
//! - an unauthenticated peer sees no export and opens none; an authenticated but unauthorized
//!   peer gets EPERM; a newer generation's grant decides the next request.

mod remote_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use remote_support::*;
use tessera_api::model::{AreaId, Generation};
use tessera_csi::backend::remote::RemoteAreaConfig;
use tessera_csi::backend::{AreaBackend, BackendError, BackendFuture, LocalArea};
use tessera_csi::engine::{EngineError, HealthState, Volume, VolumeOptions};
use tessera_csi::extent_server::{ExtentServerHandle, GrantError};
use tessera_nbd::client::list_exports;
use tessera_nbd::{ClientConfig, ClientError, Credentials, Permission};
use tokio::sync::Notify;

const G1: Generation = Generation(1);

/// Node B's area that can hold writes on the server side (to kill the server while they are in
/// flight, deterministically).
#[derive(Debug)]
struct GatedArea {
    inner: Arc<LocalArea>,
    hold_writes: AtomicBool,
    arrived: Notify,
    release: Notify,
}

impl GatedArea {
    fn new(inner: Arc<LocalArea>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            hold_writes: AtomicBool::new(false),
            arrived: Notify::new(),
            release: Notify::new(),
        })
    }
}

impl AreaBackend for GatedArea {
    fn area(&self) -> &AreaId {
        self.inner.area()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read(&self, g: Generation, off: u64, len: usize) -> BackendFuture<'_, Bytes> {
        self.inner.read(g, off, len)
    }
    fn write(&self, g: Generation, off: u64, data: Bytes, fua: bool) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            if self.hold_writes.load(Ordering::SeqCst) {
                // `notify_one` stores a permit, so the test cannot miss the arrival.
                self.arrived.notify_one();
                self.release.notified().await;
            }
            self.inner.write(g, off, data, fua).await
        })
    }
    fn write_zeroes(&self, g: Generation, off: u64, len: u64, fua: bool) -> BackendFuture<'_, ()> {
        self.inner.write_zeroes(g, off, len, fua)
    }
    fn trim(&self, g: Generation, off: u64, len: u64) -> BackendFuture<'_, ()> {
        self.inner.trim(g, off, len)
    }
    fn flush(&self, g: Generation) -> BackendFuture<'_, ()> {
        self.inner.flush(g)
    }
}

/// Node A with local area `a1`, node B serving `b1` (gated), and an 8 MiB volume whose first
/// 4 MiB live on `a1` and last 4 MiB on `b1` (`copies: 1`).
struct Split {
    _dir: tempfile::TempDir,
    b1: Arc<GatedArea>,
    server: ExtentServerHandle,
    volume: Arc<Volume>,
}

async fn split_volume() -> Split {
    let dir = tempfile::tempdir().expect("dir");
    let a1 = local_area(&dir, "a1", 8 * MIB);
    let b1 = GatedArea::new(local_area(&dir, "b1", 8 * MIB));
    let server = start_node_b(vec![b1.clone() as Arc<dyn AreaBackend>]).await;
    server
        .authorization()
        .grant_volume(
            NODE_A,
            "vol",
            G1,
            vec![("b1".into(), 0..4 * MIB, Permission::ReadWrite)],
        )
        .expect("grant");
    let remote = connect_remote(&server, "b1").await;
    let areas = registry(&[a1 as Arc<dyn AreaBackend>, remote]);
    let m = map(
        8 * MIB,
        G1,
        &[(0, 4, vec![loc("a1", 0)]), (4, 4, vec![loc("b1", 0)])],
    );
    let volume = Volume::open("vol", m, areas, VolumeOptions::default()).expect("volume");
    Split {
        _dir: dir,
        b1,
        server,
        volume: Arc::new(volume),
    }
}

fn assert_eio<T: std::fmt::Debug>(result: Result<T, EngineError>, what: &str) {
    match result {
        Err(e) => assert_eq!(e.errno(), libc::EIO, "{what}: {e}"),
        Ok(v) => panic!("{what}: expected EIO, got {v:?}"),
    }
}

/// Reads and writes on `a1` (the first 4 MiB), all of which must succeed.
async fn local_io(volume: &Volume, seed: u8) {
    let data = pattern(seed, 64 * 1024);
    let at = u64::from(seed % 32) * 64 * 1024;
    volume
        .write(at, Bytes::from(data.clone()), false)
        .await
        .expect("write on the local area");
    assert_eq!(
        volume.read(at, data.len() as u64).await.expect("read"),
        data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_extent_server_fails_only_requests_on_its_areas() {
    let s = split_volume().await;
    let remote_at = 5 * MIB;
    let before = pattern(1, 128 * 1024);
    s.volume
        .write(remote_at, Bytes::from(before.clone()), false)
        .await
        .expect("remote write before the failure");
    assert_eq!(
        s.volume.read(remote_at, 128 * 1024).await.expect("read"),
        before
    );

    // A write to B's area is held inside node B's server when B dies.
    s.b1.hold_writes.store(true, Ordering::SeqCst);
    let in_flight = tokio::spawn({
        let volume = s.volume.clone();
        async move {
            volume
                .write(remote_at, Bytes::from(pattern(2, 4096)), false)
                .await
        }
    });
    // Local I/O goes on while the remote write is in flight.
    let local_during = tokio::spawn({
        let volume = s.volume.clone();
        async move {
            for seed in 0..16 {
                local_io(&volume, seed).await;
            }
        }
    });
    s.b1.arrived.notified().await;
    s.server.kill().await;

    assert_eio(
        in_flight.await.expect("join"),
        "write in flight when the server died",
    );
    local_during.await.expect("local I/O during the failure");
    // Afterwards: B's range fails, A's range works, a request spanning both fails as a whole.
    assert_eio(
        s.volume.read(remote_at, 4096).await,
        "read on the dead area",
    );
    assert_eio(
        s.volume
            .write(remote_at, Bytes::from(vec![7u8; 4096]), true)
            .await,
        "write on the dead area",
    );
    assert_eio(s.volume.flush().await, "flush reaching the dead area");
    assert_eio(
        s.volume.read(4 * MIB - 4096, 8192).await,
        "read spanning both areas",
    );
    for seed in 16..24 {
        local_io(&s.volume, seed).await;
    }
    // copies: 1 — nothing to degrade to; the remote bytes are failed, not silently served.
    s.b1.release.notify_waiters();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_extent_server_fails_only_requests_on_its_areas() {
    let s = split_volume().await;
    let data = pattern(3, 256 * 1024);
    // Many pipelined requests on both areas, then a graceful stop in the middle.
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let volume = s.volume.clone();
        let data = Bytes::from(data.clone());
        tasks.push(tokio::spawn(async move {
            let at = (i % 2) * 4 * MIB + (i / 2) * 128 * 1024;
            (at, volume.write(at, data.slice(..128 * 1024), false).await)
        }));
    }
    s.server.stop().await.expect("graceful stop");
    for task in tasks {
        let (at, result) = task.await.expect("join");
        match result {
            Ok(()) => {}
            // Only requests on B's half may fail, and only with EIO.
            Err(e) => {
                assert!(at >= 4 * MIB, "local write at {at} failed: {e}");
                assert_eq!(e.errno(), libc::EIO, "{e}");
            }
        }
    }
    assert_eio(s.volume.read(4 * MIB, 4096).await, "read after stop");
    for seed in 0..8 {
        local_io(&s.volume, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_extent_server_times_out_into_eio() {
    let dir = tempfile::tempdir().expect("dir");
    let b1 = GatedArea::new(local_area(&dir, "b1", 4 * MIB));
    let server = start_node_b(vec![b1.clone() as Arc<dyn AreaBackend>]).await;
    server
        .authorization()
        .grant_volume(
            NODE_A,
            "vol",
            G1,
            vec![("b1".into(), 0..4 * MIB, Permission::ReadWrite)],
        )
        .expect("grant");
    let config = RemoteAreaConfig {
        client: ClientConfig {
            request_timeout: Some(Duration::from_millis(300)),
            ..remote_config().client
        },
        ..remote_config()
    };
    let remote = connect_as(&server, "b1", NODE_A, TOKEN_A, config)
        .await
        .expect("connect");
    b1.hold_writes.store(true, Ordering::SeqCst);
    let err = remote
        .write(G1, 0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .expect_err("a hung server must time out");
    match err {
        BackendError::Io(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
        other => panic!("expected an I/O error, got {other}"),
    }
    b1.release.notify_waiters();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mirrored_volume_survives_its_remote_replica() {
    let dir = tempfile::tempdir().expect("dir");
    let a1 = local_area(&dir, "a1", 8 * MIB);
    let b1 = local_area(&dir, "b1", 8 * MIB);
    let server = start_node_b(vec![b1 as Arc<dyn AreaBackend>]).await;
    server
        .authorization()
        .grant_volume(
            NODE_A,
            "mirror",
            G1,
            vec![("b1".into(), 0..4 * MIB, Permission::ReadWrite)],
        )
        .expect("grant");
    let remote = connect_remote(&server, "b1").await;
    let areas = registry(&[a1 as Arc<dyn AreaBackend>, remote]);
    // The remote replica first: reads go there while it is healthy (seed 002 [0075]).
    let m = map(4 * MIB, G1, &[(0, 4, vec![loc("b1", 0), loc("a1", 0)])]);
    let volume = Volume::open("mirror", m, areas, VolumeOptions::default()).expect("volume");
    let first = pattern(4, MIB as usize);
    volume
        .write(0, Bytes::from(first.clone()), true)
        .await
        .expect("mirrored write");
    assert_eq!(volume.read(0, MIB).await.expect("read"), first);
    assert_eq!(volume.health().state, HealthState::Healthy);

    server.kill().await;

    // Reads fall back to the local replica; writes complete on it alone.
    assert_eq!(volume.read(0, MIB).await.expect("read after death"), first);
    let second = pattern(5, 2 * MIB as usize);
    volume
        .write(MIB, Bytes::from(second.clone()), false)
        .await
        .expect("write with one replica left");
    volume.flush().await.expect("flush with one replica left");
    assert_eq!(volume.read(MIB, 2 * MIB).await.expect("read back"), second);
    let health = volume.health();
    assert_eq!(health.state, HealthState::Degraded, "{health:?}");
    assert_eq!(health.unhealthy_areas, vec![AreaId::new("b1")]);
    assert_eq!(health.degraded_bytes, 4 * MIB);
    assert_eq!(health.failed_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_peers_see_and_open_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start_node_b(vec![local_area(&dir, "b1", 4 * MIB) as Arc<dyn AreaBackend>]).await;
    server
        .authorization()
        .grant_volume(
            NODE_A,
            "vol",
            G1,
            vec![("b1".into(), 0..4 * MIB, Permission::ReadWrite)],
        )
        .expect("grant");
    let tcp = || async {
        tokio::net::TcpStream::connect(server.addr())
            .await
            .expect("tcp")
    };

    // No token: the listing is refused by policy, nothing is revealed.
    match list_exports(tcp().await, None).await {
        Ok(list) => assert!(list.is_empty(), "listed without credentials: {list:?}"),
        Err(e) => assert!(matches!(e, ClientError::Refused { .. }), "{e}"),
    }
    // Wrong token (for a real peer name), and an unknown peer.
    for creds in [
        Credentials::new(NODE_A, b"not-the-token".to_vec()),
        Credentials::new("node-x", TOKEN_A.to_vec()),
    ] {
        let e = list_exports(tcp().await, Some(&creds))
            .await
            .expect_err("listing with bad credentials");
        assert!(matches!(e, ClientError::AuthenticationFailed(_)), "{e}");
    }
    // Opening fails the same ways.
    let wrong = connect_as(&server, "b1", NODE_A, b"not-the-token", remote_config()).await;
    assert!(wrong.is_err(), "opened with a wrong token");
    let none = tessera_nbd::ClientPool::connect(
        tessera_nbd::Target::Tcp(server.addr().to_string()),
        "b1",
        None,
        remote_config().client,
        remote_config().pool,
    )
    .await;
    assert!(none.is_err(), "opened without credentials");

    // Authenticated: A lists its granted area; C (no grant) sees nothing and cannot open.
    let listed = list_exports(
        tcp().await,
        Some(&Credentials::new(NODE_A, TOKEN_A.to_vec())),
    )
    .await
    .expect("list as A");
    assert_eq!(
        listed.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["b1"]
    );
    let c_list = list_exports(
        tcp().await,
        Some(&Credentials::new(NODE_C, TOKEN_C.to_vec())),
    )
    .await
    .expect("list as C");
    assert!(c_list.is_empty(), "{c_list:?}");
    assert!(
        connect_as(&server, "b1", NODE_C, TOKEN_C, remote_config())
            .await
            .is_err(),
        "C opened an area it holds no range on"
    );
}

fn assert_eperm<T: std::fmt::Debug>(result: Result<T, BackendError>, what: &str) {
    match result {
        Err(BackendError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{what}: {e}"),
        other => panic!("{what}: expected EPERM, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthorized_ranges_get_eperm() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start_node_b(vec![local_area(&dir, "b1", 8 * MIB) as Arc<dyn AreaBackend>]).await;
    let auth = server.authorization();
    auth.grant_volume(
        NODE_A,
        "vol",
        G1,
        vec![
            ("b1".into(), 0..MIB, Permission::ReadWrite),
            ("b1".into(), MIB..2 * MIB, Permission::Read),
        ],
    )
    .expect("grant A");
    auth.grant_volume(
        NODE_C,
        "other",
        G1,
        vec![("b1".into(), 4 * MIB..5 * MIB, Permission::ReadWrite)],
    )
    .expect("grant C");
    let remote = connect_remote(&server, "b1").await;
    let page = || Bytes::from(vec![9u8; 4096]);

    remote
        .write(G1, 0, page(), false)
        .await
        .expect("granted write");
    remote.read(G1, MIB, 4096).await.expect("granted read");
    assert_eperm(
        remote.write(G1, MIB, page(), false).await,
        "read-only range",
    );
    assert_eperm(
        remote.trim(G1, MIB, 4096).await,
        "trim on a read-only range",
    );
    assert_eperm(remote.read(G1, 4 * MIB, 4096).await, "another peer's range");
    assert_eperm(
        remote.read(G1, MIB - 4096, 8192 + MIB as usize).await,
        "a read straddling the grant's end",
    );
    assert_eperm(remote.read(G1, 6 * MIB, 4096).await, "nobody's range");

    // Detach: the open connection's next request is refused.
    assert!(auth.revoke_volume(NODE_A, "vol"));
    assert_eperm(remote.read(G1, 0, 4096).await, "revoked range");
    assert_eperm(remote.flush(G1).await, "flush without any grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn newer_generation_grant_decides_the_next_request() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start_node_b(vec![local_area(&dir, "b1", 8 * MIB) as Arc<dyn AreaBackend>]).await;
    let auth = server.authorization();
    auth.grant_volume(
        NODE_A,
        "vol",
        G1,
        vec![("b1".into(), 0..MIB, Permission::ReadWrite)],
    )
    .expect("generation 1");
    let remote = connect_remote(&server, "b1").await;
    remote
        .write(G1, 0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .expect("generation 1 write");
    assert_eperm(remote.read(G1, 2 * MIB, 4096).await, "before the remap");

    // A remap moves the volume's extent on b1 from [0, 1 MiB) to [2 MiB, 3 MiB).
    let g2 = Generation(2);
    auth.grant_volume(
        NODE_A,
        "vol",
        g2,
        vec![("b1".into(), 2 * MIB..3 * MIB, Permission::ReadWrite)],
    )
    .expect("generation 2");
    assert_eperm(remote.read(g2, 0, 4096).await, "the old generation's range");
    remote
        .write(g2, 2 * MIB, Bytes::from(vec![2u8; 4096]), true)
        .await
        .expect("the new generation's range");

    // A delayed generation-1 grant cannot bring the old range back.
    let stale = auth.grant_volume(
        NODE_A,
        "vol",
        G1,
        vec![("b1".into(), 0..MIB, Permission::ReadWrite)],
    );
    assert!(
        matches!(stale, Err(GrantError::StaleGeneration { .. })),
        "{stale:?}"
    );
    assert_eperm(remote.read(g2, 0, 4096).await, "after the stale grant");
    assert_eq!(auth.generation(NODE_A, "vol"), Some(g2));
}
