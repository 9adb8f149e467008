//! The local backend on temp files: both drivers, the O_DIRECT and buffered paths, zeroing, trim,
//! bounds.

mod engine_support;

use std::os::unix::fs::MetadataExt;

use bytes::Bytes;
use engine_support::pattern;
use tessera_api::model::Generation;
use tessera_csi::backend::{
    AreaBackend, BackendError, DirectIo, IoDriver, LocalArea, LocalAreaOptions,
};

const G: Generation = Generation(1);

fn drivers() -> Vec<IoDriver> {
    let dir = tempfile::tempdir().expect("dir");
    let probe = LocalArea::open(
        "probe",
        dir.path().join("probe"),
        &LocalAreaOptions {
            driver: IoDriver::IoUring,
            size_bytes: Some(4096),
            ..Default::default()
        },
    );
    match probe {
        Ok(_) => vec![IoDriver::ThreadPool, IoDriver::IoUring],
        Err(e) => {
            eprintln!("io_uring unavailable here ({e}); testing the thread pool only");
            vec![IoDriver::ThreadPool]
        }
    }
}

fn open(dir: &tempfile::TempDir, driver: IoDriver, direct: DirectIo, size: u64) -> LocalArea {
    LocalArea::open(
        "a",
        dir.path().join(format!("{driver:?}-{direct:?}.img")),
        &LocalAreaOptions {
            driver,
            direct,
            size_bytes: Some(size),
        },
    )
    .expect("open")
}

#[tokio::test]
async fn open_creates_a_sparse_file_of_the_area_size() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("area.img");
    let area = LocalArea::open(
        "a",
        &path,
        &LocalAreaOptions {
            size_bytes: Some(1 << 20),
            ..Default::default()
        },
    )
    .expect("open");
    assert_eq!(area.size_bytes(), 1 << 20);
    assert_eq!(area.area().as_str(), "a");
    let meta = std::fs::metadata(&path).expect("meta");
    assert_eq!(meta.len(), 1 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "sparse");
    drop(area);
    // Without a size, an existing file keeps its size; a missing one is an error.
    let again = LocalArea::open("a", &path, &LocalAreaOptions::default()).expect("reopen");
    assert_eq!(again.size_bytes(), 1 << 20);
    assert!(
        LocalArea::open(
            "b",
            dir.path().join("missing"),
            &LocalAreaOptions::default()
        )
        .is_err()
    );
}

#[tokio::test]
async fn reads_and_writes_round_trip_on_every_path() {
    let dir = tempfile::tempdir().expect("dir");
    for driver in drivers() {
        for direct in [DirectIo::Auto, DirectIo::Off] {
            let area = open(&dir, driver, direct, 1 << 20);
            if direct == DirectIo::Off {
                assert!(!area.direct_io_active());
            } else {
                eprintln!(
                    "{driver:?}: O_DIRECT active on the temp dir: {}",
                    area.direct_io_active()
                );
            }
            assert_eq!(area.uses_io_uring(), driver == IoDriver::IoUring);
            // Aligned (direct path), sector-aligned only (buffered path), and an aligned piece
            // whose memory is not page-aligned (copied into an aligned buffer).
            let aligned = pattern(1, 8192);
            area.write(G, 4096, Bytes::from(aligned.clone()), false)
                .await
                .expect("aligned");
            let small = pattern(2, 1536);
            area.write(G, 512, Bytes::from(small.clone()), true)
                .await
                .expect("sector");
            let backing = Bytes::from(pattern(3, 4096 + 1));
            let misaligned = backing.slice(1..);
            area.write(G, 65536, misaligned.clone(), true)
                .await
                .expect("misaligned memory");
            area.flush(G).await.expect("flush");
            assert_eq!(
                &area.read(G, 4096, 8192).await.expect("read")[..],
                &aligned[..]
            );
            assert_eq!(
                &area.read(G, 512, 1536).await.expect("read")[..],
                &small[..]
            );
            assert_eq!(
                &area.read(G, 65536, 4096).await.expect("read")[..],
                &misaligned[..]
            );
            // A direct read sees a buffered write that overlaps its range.
            let mixed = area.read(G, 0, 4096).await.expect("read");
            assert_eq!(&mixed[512..2048], &small[..]);
            assert!(mixed[..512].iter().all(|&b| b == 0));
        }
    }
}

#[tokio::test]
async fn write_zeroes_and_trim_punch_holes() {
    let dir = tempfile::tempdir().expect("dir");
    for driver in drivers() {
        let area = open(&dir, driver, DirectIo::Auto, 1 << 20);
        area.write(G, 0, Bytes::from(vec![7; 1 << 18]), true)
            .await
            .expect("fill");
        area.write_zeroes(G, 4096, 8192, true)
            .await
            .expect("zeroes");
        area.write_zeroes(G, 512, 512, false)
            .await
            .expect("partial block zeroes");
        let read = area.read(G, 0, 16384).await.expect("read");
        assert!(read[4096..12288].iter().all(|&b| b == 0));
        assert!(read[512..1024].iter().all(|&b| b == 0));
        assert!(read[..512].iter().all(|&b| b == 7));
        assert!(read[12288..].iter().all(|&b| b == 7));
        area.trim(G, 65536, 65536).await.expect("trim");
        assert!(
            area.read(G, 65536, 65536)
                .await
                .expect("read")
                .iter()
                .all(|&b| b == 0)
        );
        let meta = std::fs::metadata(area.path()).expect("meta");
        assert_eq!(meta.len(), 1 << 20, "KEEP_SIZE");
        assert!(meta.blocks() * 512 < 1 << 18, "trimmed blocks were freed");
    }
}

#[tokio::test]
async fn requests_outside_the_area_are_io_errors() {
    let dir = tempfile::tempdir().expect("dir");
    for driver in drivers() {
        let area = open(&dir, driver, DirectIo::Auto, 8192);
        for result in [
            area.read(G, 4096, 8192).await.map(|_| ()),
            area.write(G, 8192, Bytes::from(vec![0; 512]), false).await,
            area.write_zeroes(G, u64::MAX - 10, 512, false).await,
            area.trim(G, 8192, 1).await,
        ] {
            match result {
                Err(BackendError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn areas_on_tmpfs_work_with_or_without_o_direct() {
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("no /dev/shm here; skipping");
        return;
    };
    let area = LocalArea::open(
        "shm",
        dir.path().join("area.img"),
        &LocalAreaOptions {
            size_bytes: Some(1 << 16),
            ..Default::default()
        },
    )
    .expect("open");
    eprintln!("tmpfs O_DIRECT active: {}", area.direct_io_active());
    let data = pattern(9, 8192);
    area.write(G, 8192, Bytes::from(data.clone()), true)
        .await
        .expect("write");
    assert_eq!(
        &area.read(G, 8192, 8192).await.expect("read")[..],
        &data[..]
    );
}
