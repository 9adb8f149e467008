//! Stock NBD clients against a volume spread over two nodes (ARCHITECTURE §10 "Interop").
//!
//! The volume's extents come from three areas: `a1` and `a2` on node A (local files) and `b1` on
//! node B, served by B's extent server on another loopback address and reached through
//! `RemoteArea` (seed 002 §4.4 S606–S615: the request for B's data is forwarded to B). Extents
//! rotate `a1, b1, a2, a1, b1, …`, so almost every multi-extent request crosses both nodes. The
//! volume is exposed on an NBD unix socket by the frontend's `NbdUnixFrontend`, and driven with
//! `nbdinfo`, `qemu-io`, `nbdcopy` and fio's nbd engine. A missing tool prints
//! `skipping: <tool> not installed` and the test passes.

mod remote_support;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use remote_support::*;
use tessera_api::model::Generation;
use tessera_csi::backend::{AreaBackend, LocalArea};
use tessera_csi::engine::{Volume, VolumeOptions};
use tessera_csi::extent_server::ExtentServerHandle;
use tessera_csi::frontend::nbd::{NbdUnixFrontend, NbdUnixHandle};
use tessera_nbd::Permission;
use tokio::process::Command;

/// Extents per area; the volume has three times as many.
const PER_AREA: u64 = 8;
const VOLUME_BYTES: u64 = 3 * PER_AREA * ES;
const AREAS: [&str; 3] = ["a1", "b1", "a2"];

fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        println!("skipping: {tool} not installed");
    }
    found
}

struct TwoNodes {
    dir: tempfile::TempDir,
    /// Node B's area, read directly to prove bytes really went over the network.
    b1: Arc<LocalArea>,
    server: ExtentServerHandle,
    volume: Arc<Volume>,
    frontend: Option<NbdUnixHandle>,
}

impl TwoNodes {
    async fn start() -> TwoNodes {
        let dir = tempfile::tempdir().expect("dir");
        let area_bytes = PER_AREA * ES;
        let a1 = local_area(&dir, "a1", area_bytes);
        let a2 = local_area(&dir, "a2", area_bytes);
        let b1 = local_area(&dir, "b1", area_bytes);
        let server = start_node_b(vec![b1.clone() as Arc<dyn AreaBackend>]).await;
        server
            .authorization()
            .grant_volume(
                NODE_A,
                "vol",
                Generation(1),
                vec![("b1".into(), 0..area_bytes, Permission::ReadWrite)],
            )
            .expect("grant node A the volume's range on b1");
        println!("node B's extent server: {}", server.addr());
        let remote = connect_remote(&server, "b1").await;
        let areas = registry(&[a1 as Arc<dyn AreaBackend>, a2, remote]);
        let runs: Vec<_> = (0..3 * PER_AREA)
            .map(|i| (i, 1, vec![loc(AREAS[(i % 3) as usize], i / 3)]))
            .collect();
        let m = map(VOLUME_BYTES, Generation(1), &runs);
        let volume =
            Arc::new(Volume::open("vol", m, areas, VolumeOptions::default()).expect("volume"));
        let frontend = NbdUnixFrontend::start(volume.clone(), dir.path().join("vol.sock"))
            .expect("NBD unix frontend");
        TwoNodes {
            dir,
            b1,
            server,
            volume,
            frontend: Some(frontend),
        }
    }

    fn uri(&self) -> String {
        self.frontend.as_ref().expect("frontend running").uri()
    }

    /// Volume bytes `[offset, offset + len)` that live on `b1`, read from B's file directly,
    /// with their volume offsets.
    fn on_b1(&self, offset: u64, len: u64) -> Vec<(u64, Vec<u8>)> {
        let file = std::fs::read(self.b1.path()).expect("read b1");
        let mut out = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let extent = at / ES;
            let end = ((extent + 1) * ES).min(offset + len);
            if extent % 3 == 1 {
                let area_at = (extent / 3) * ES + at % ES;
                out.push((
                    at,
                    file[area_at as usize..(area_at + end - at) as usize].to_vec(),
                ));
            }
            at = end;
        }
        out
    }

    async fn stop(mut self) {
        if let Some(f) = self.frontend.take() {
            f.stop().await.expect("frontend stop");
        }
    }
}

async fn run(cmd: &mut Command) -> Output {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.kill_on_drop(true).output())
        .await
        .expect("tool timed out")
        .expect("tool failed to start");
    println!(
        "$ {:?}\n{}{}",
        cmd.as_std(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdinfo_describes_the_two_node_volume() {
    if !have("nbdinfo") {
        return;
    }
    let nodes = TwoNodes::start().await;
    let o = run(Command::new("nbdinfo").arg(nodes.uri())).await;
    assert!(o.status.success(), "nbdinfo failed");
    let out = text(&o);
    assert!(out.contains(&format!("size: {VOLUME_BYTES}")), "{out}");
    assert!(out.contains("export=\"vol\""), "{out}");
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_io_patterns_cross_both_nodes() {
    if !have("qemu-io") {
        return;
    }
    let nodes = TwoNodes::start().await;
    // 2.5 MiB from 512 KiB: a1 → b1 → a2; zeroes across b1 → a2; a small unaligned write on b1.
    let o = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &nodes.uri(),
        "-c",
        "write -P 0xab 512k 2560k",
        "-c",
        "read -P 0xab 512k 2560k",
        "-c",
        "write -z 1536k 1M",
        "-c",
        "read -P 0 1536k 1M",
        "-c",
        "read -P 0xab 512k 1M",
        "-c",
        "flush",
        "-c",
        "write -P 0x5a 4194404 10",
        "-c",
        "read -P 0x5a 4194404 10",
    ]))
    .await;
    let out = text(&o);
    assert!(o.status.success(), "qemu-io failed");
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "{out}"
    );
    // The b1 parts really are on node B's area: [1 MiB, 1.5 MiB) pattern, [1.5, 2) MiB zeroes.
    let b = nodes.on_b1(MIB, MIB);
    assert_eq!(b.len(), 1);
    assert!(b[0].1[..512 * 1024].iter().all(|&x| x == 0xab));
    assert!(b[0].1[512 * 1024..].iter().all(|&x| x == 0));
    let small = nodes.on_b1(4 * MIB, ES);
    assert_eq!(&small[0].1[100..110], &[0x5a; 10]);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdcopy_to_and_from_a_file_round_trips() {
    if !have("nbdcopy") {
        return;
    }
    let nodes = TwoNodes::start().await;
    let src = nodes.dir.path().join("src.img");
    let dst = nodes.dir.path().join("dst.img");
    let data = pattern(42, VOLUME_BYTES as usize);
    std::fs::write(&src, &data).expect("write source");

    let o = run(Command::new("nbdcopy").arg(&src).arg(nodes.uri())).await;
    assert!(o.status.success(), "nbdcopy file → volume failed");
    for (at, bytes) in nodes.on_b1(0, VOLUME_BYTES) {
        assert!(
            bytes[..] == data[at as usize..at as usize + bytes.len()],
            "node B's area differs at volume offset {at}"
        );
    }

    let o = run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=32"])
        .arg(nodes.uri())
        .arg(&dst))
    .await;
    assert!(o.status.success(), "nbdcopy volume → file failed");
    assert_eq!(
        checksum(&src),
        checksum(&dst),
        "copy differs from the source"
    );
    nodes.stop().await;
}

/// FNV-1a of a file (a checksum, not a security property).
fn checksum(path: &Path) -> u64 {
    std::fs::read(path)
        .expect("read")
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_nbd_engine_verifies_crc32c_across_nodes() {
    if !have("fio") {
        return;
    }
    let engines = run(Command::new("fio").arg("--enghelp")).await;
    if !text(&engines).lines().any(|l| l.trim() == "nbd") {
        println!("skipping: fio built without the nbd engine");
        return;
    }
    let nodes = TwoNodes::start().await;
    let o = run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", nodes.uri()),
        "--rw=randwrite",
        "--bs=4k",
        &format!("--size={VOLUME_BYTES}"),
        "--iodepth=32",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
    ]))
    .await;
    let out = text(&o);
    assert!(o.status.success(), "fio failed");
    assert!(!out.contains("verify: bad"), "{out}");
    let ios = VOLUME_BYTES / 4096;
    assert!(
        out.contains(&format!("issued rwts: total={ios},{ios}")),
        "fio did not write and verify everything: {out}"
    );
    // fio wrote every block, so node B's area holds a third of the volume.
    assert_eq!(nodes.volume.health().unhealthy_areas.len(), 0);
    nodes.stop().await;
}

/// Stock clients cannot present a token, so node B's extent server shows and opens nothing for
/// them, even though the area is served and granted to node A.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stock_clients_get_nothing_from_the_extent_server() {
    if !have("nbdinfo") {
        return;
    }
    let nodes = TwoNodes::start().await;
    let addr = nodes.server.addr();
    let o = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://{addr}")))
    .await;
    assert!(
        !o.status.success() || !text(&o).contains("export=\"b1\""),
        "an unauthenticated client listed the area"
    );
    let o = run(Command::new("nbdinfo").arg(format!("nbd://{addr}/b1"))).await;
    assert!(
        !o.status.success(),
        "an unauthenticated client opened the area"
    );
    nodes.stop().await;
}
