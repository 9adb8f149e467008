//! The engine as an NBD export on a unix socket: our client, qemu-io and nbdinfo against a
//! multi-extent volume; error mapping; the `Frontend` trait and run-time detection.

mod frontend_support;

use std::process::Command;

use bytes::Bytes;
use frontend_support::{have, pattern, striped_volume};
use tessera_api::model::{AreaId, ByteRange};
use tessera_csi::engine::EngineError;
use tessera_csi::frontend::nbd::{NbdUnixFrontend, NbdUnixSocketFrontend, export_error};
use tessera_csi::frontend::{
    AttachTarget, Frontend, FrontendError, FrontendKind, UnavailableFrontend, detect_available,
    detect_in,
};
use tessera_nbd::{ClientError, Errno, ExportError, NbdClient};

const EXTENT: u64 = 64 << 10;
/// 64 extents over three areas, the last 4 unmapped.
const EXTENTS: u64 = 64;
const HOLES: u64 = 4;

#[test]
fn engine_errors_map_to_nbd_errors() {
    let io = |errno: i32| EngineError::Io {
        area: AreaId::new("a"),
        source: std::io::Error::from_raw_os_error(errno),
    };
    let range = ByteRange::new(0, 4096).expect("range");
    let cases = [
        (
            EngineError::NeedsAllocation { range },
            ExportError::NoSpace,
            Errno::ENOSPC,
        ),
        (io(libc::ENOSPC), ExportError::NoSpace, Errno::ENOSPC),
        (
            EngineError::OutOfRange {
                offset: 0,
                length: 1,
                size_bytes: 0,
            },
            ExportError::OutOfRange,
            Errno::ENOSPC, // as a write
        ),
    ];
    for (engine, export, errno) in cases {
        let mapped = export_error(engine);
        assert_eq!(mapped, export);
        assert_eq!(mapped.errno(true), errno);
    }
    let unaligned = export_error(EngineError::Unaligned {
        offset: 1,
        length: 512,
    });
    assert!(
        matches!(unaligned, ExportError::Invalid(_)),
        "{unaligned:?}"
    );
    for engine in [
        io(libc::EIO),
        EngineError::AllReplicasFailed {
            range,
            tried: vec![AreaId::new("a"), AreaId::new("b")],
        },
        EngineError::UnknownArea {
            area: AreaId::new("x"),
        },
    ] {
        let mapped = export_error(engine);
        assert!(matches!(mapped, ExportError::Io(_)), "{mapped:?}");
        assert_eq!(mapped.errno(false), Errno::EIO);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_drives_a_multi_extent_volume() {
    let v = striped_volume(None, 3, EXTENT, EXTENTS, HOLES);
    let sock = v.dir.path().join("vol.sock");
    let served = NbdUnixFrontend::start(v.volume.clone(), &sock).expect("start");
    assert_eq!(
        served.uri(),
        format!("nbd+unix:///vol?socket={}", sock.display())
    );

    let client = NbdClient::connect_unix(&sock, "vol")
        .await
        .expect("connect");
    let details = client.details().clone();
    assert_eq!(client.size(), EXTENTS * EXTENT);
    assert!(details.can_trim() && details.can_write_zeroes() && details.can_multi_conn());
    assert!(details.can_flush() && details.can_fua() && !details.read_only());

    // A write spanning three extents (three areas), read back through the default export on a
    // second connection (multi-conn: no per-connection state).
    let data = pattern(1, (2 * EXTENT + 8192) as usize);
    let offset = EXTENT - 4096;
    client
        .write(offset, Bytes::from(data.clone()), true)
        .await
        .expect("write");
    client.flush().await.expect("flush");
    let other = NbdClient::connect_unix(&sock, "")
        .await
        .expect("default export");
    let read = other.read(offset, data.len() as u32).await.expect("read");
    assert_eq!(&read[..], &data[..]);
    // The pieces landed on the areas at the mapped slots: extent 2 is area2's top slot.
    let area2 = std::fs::read(&v.areas[2].1).expect("area file");
    let per_area = EXTENTS.div_ceil(3);
    let slot = (per_area - 1) * EXTENT;
    let in_extent2 = (2 * EXTENT - offset) as usize;
    assert_eq!(
        &area2[slot as usize..slot as usize + 4096],
        &data[in_extent2..in_extent2 + 4096]
    );

    // Usage: written extents 0..=3 are in use; a trim of whole extents 1 and 2 clears them.
    let in_use =
        |vol: &tessera_csi::engine::Volume| vol.in_use_extents().iter().collect::<Vec<_>>();
    assert_eq!(in_use(&v.volume), vec![0, 1, 2, 3]);
    client
        .trim(EXTENT, 2 * EXTENT as u32, false)
        .await
        .expect("trim");
    assert_eq!(in_use(&v.volume), vec![0, 3]);
    // Write-zeroes reads back as zeros.
    client
        .write_zeroes(3 * EXTENT, 4096, false, true)
        .await
        .expect("zeroes");
    let zeros = client.read(3 * EXTENT, 4096).await.expect("read");
    assert!(zeros.iter().all(|&b| b == 0));

    // A write into the unmapped tail is ENOSPC (ARCHITECTURE §4), reads of it are zeros.
    let hole = (EXTENTS - HOLES) * EXTENT;
    match client.write(hole, Bytes::from(vec![1; 4096]), false).await {
        Err(ClientError::Remote(e)) => assert_eq!(e, Errno::ENOSPC),
        other => panic!("write to a hole: {other:?}"),
    }
    let read = client.read(hole, 4096).await.expect("read hole");
    assert!(read.iter().all(|&b| b == 0));

    client.disconnect().await;
    other.disconnect().await;
    served.stop().await.expect("stop");
    assert!(!sock.exists(), "socket removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_replaced_and_other_files_are_refused() {
    let v = striped_volume(None, 1, EXTENT, 4, 0);
    let sock = v.dir.path().join("vol.sock");
    let first = NbdUnixFrontend::start(v.volume.clone(), &sock).expect("start");
    // Simulate a crash: the socket file stays behind.
    std::mem::forget(first);
    let second = NbdUnixFrontend::start(v.volume.clone(), &sock).expect("restart");
    second.stop().await.expect("stop");
    let file = v.dir.path().join("not-a-socket");
    std::fs::write(&file, b"x").expect("file");
    match NbdUnixFrontend::start(v.volume.clone(), &file) {
        Err(FrontendError::Io { .. }) => {}
        other => panic!("binding over a regular file: {other:?}"),
    }
    assert!(file.exists(), "regular file left alone");
}

/// Runs a tool, returning stdout; panics with its output on failure.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn qemu_io_and_nbdinfo_against_the_volume() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let v = striped_volume(None, 3, EXTENT, EXTENTS, HOLES);
    let sock = v.dir.path().join("vol.sock");
    let served =
        NbdUnixFrontend::start_on(runtime.handle(), v.volume.clone(), &sock).expect("start");
    let uri = served.uri();

    if have("nbdinfo") {
        let info = run(Command::new("nbdinfo").arg("--json").arg(&uri));
        let size = format!("\"export-size\": {}", EXTENTS * EXTENT);
        assert!(info.contains(&size), "{info}");
        for flag in [
            "\"can_multi_conn\": true",
            "\"can_trim\": true",
            "\"can_zero\": true",
        ] {
            assert!(info.contains(flag), "{flag} missing in {info}");
        }
        let list = run(Command::new("nbdinfo").arg("--list").arg(&uri));
        assert!(list.contains("vol"), "{list}");
    }
    if have("qemu-io") {
        // Across every extent of the mapped part (60 extents over 3 areas), in 1 MiB writes
        // that straddle extent boundaries, then verified and partly discarded/zeroed.
        let mapped = (EXTENTS - HOLES) * EXTENT;
        let out = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -P 0x5a 32k {}", mapped - 64 * 1024),
            "-c",
            &format!("read -P 0x5a 32k {}", mapped - 64 * 1024),
            "-c",
            "write -z 128k 64k",
            "-c",
            "read -P 0 128k 64k",
            "-c",
            "read -P 0x5a 192k 64k",
            "-c",
            "flush",
        ]));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        // A write into the hole is refused with ENOSPC.
        let out = Command::new("qemu-io")
            .args(["-f", "raw", &uri, "-c"])
            .arg(format!("write -P 1 {mapped} 4k"))
            .output()
            .expect("spawn");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("No space left on device"), "{text}");
        // The engine saw it: the pattern is in the volume.
        let read = runtime
            .block_on(v.volume.read(EXTENT * 10, 4096))
            .expect("read");
        assert!(read.iter().all(|&b| b == 0x5a));
    }
    runtime.block_on(served.stop()).expect("stop");
}

#[test]
fn frontend_trait_attach_and_detach_over_nbd_unix() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let v = striped_volume(None, 2, EXTENT, 8, 0);
    let frontend = NbdUnixSocketFrontend::new(runtime.handle().clone(), v.dir.path());
    assert_eq!(frontend.kind(), FrontendKind::NbdUnix);
    let attachment = frontend.attach(v.volume.clone()).expect("attach");
    let AttachTarget::NbdSocket { path, export } = attachment.target().clone() else {
        panic!("not a socket: {:?}", attachment.target());
    };
    assert_eq!(export, "vol");
    let size = runtime.block_on(async {
        let client = NbdClient::connect_unix(&path, &export)
            .await
            .expect("connect");
        let size = client.size();
        client.disconnect().await;
        size
    });
    assert_eq!(size, 8 * EXTENT);
    frontend.detach(attachment).expect("detach");
    assert!(!path.exists());
}

#[test]
fn unavailable_kinds_fail_typed_and_detection_explains_why() {
    let v = striped_volume(None, 1, EXTENT, 2, 0);
    for kind in [FrontendKind::Ublk, FrontendKind::KernelNbd] {
        let reason = detect_available()
            .into_iter()
            .find(|a| a.kind == kind)
            .expect("reported");
        println!("{kind}: available={} ({})", reason.available, reason.reason);
        assert!(!reason.available, "not implemented, so never available");
        let frontend = UnavailableFrontend {
            kind,
            reason: reason.reason.clone(),
        };
        match frontend.attach(v.volume.clone()) {
            Err(FrontendError::Unavailable { kind: k, reason: r }) => {
                assert_eq!((k, r), (kind, reason.reason));
            }
            other => panic!("{kind}: {other:?}"),
        }
    }
    // Against an empty root nothing but the socket frontend is there, and the reasons say so.
    let empty = tempfile::tempdir().expect("dir");
    let report = detect_in(empty.path());
    assert_eq!(report.len(), 4);
    for a in &report {
        assert_eq!(a.available, a.kind == FrontendKind::NbdUnix, "{a:?}");
    }
    let ublk = &report[0];
    assert!(ublk.reason.contains("/dev/ublk-control"), "{ublk:?}");
    let nbd = &report[1];
    assert!(nbd.reason.contains("/sys/module/nbd"), "{nbd:?}");
    let fuse = &report[2];
    assert!(fuse.reason.contains("/dev/fuse") && fuse.reason.contains("/dev/loop-control"));
    // With the device nodes present, fuse-loop is available (losetup comes from PATH).
    std::fs::create_dir_all(empty.path().join("dev")).expect("dev");
    for node in ["dev/fuse", "dev/loop-control", "dev/ublk-control"] {
        std::fs::write(empty.path().join(node), b"").expect("node");
    }
    let report = detect_in(empty.path());
    assert_eq!(
        report[2].available,
        tessera_csi::frontend::find_in_path("losetup").is_some()
    );
    assert!(
        report[0].reason.contains("not implemented"),
        "{:?}",
        report[0]
    );
}
