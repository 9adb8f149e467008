//! Interoperability with real NBD implementations: the server against `nbdinfo`, `qemu-io`,
//! `qemu-img`, `nbdcopy`, `nbdfuse` and fio's nbd engine (over a unix socket and TCP), and the
//! client against `nbdkit`. A missing tool prints `skipping: <tool> not installed` and the test
//! passes (CI installs them: `apt-get install -y fio libnbd-bin nbdkit fuse3 qemu-utils`).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;
use tessera_nbd::*;
use tokio::process::Command;

fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        println!("skipping: {tool} not installed");
    }
    found
}

struct Served {
    export: Arc<MemExport>,
    sock: PathBuf,
    tcp: std::net::SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn unix_uri(&self) -> String {
        format!("nbd+unix:///vol?socket={}", self.sock.display())
    }
    fn tcp_uri(&self) -> String {
        format!("nbd://{}/vol", self.tcp)
    }
    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("server did not shut down")
                .unwrap()
                .unwrap();
        }
    }
}

async fn serve<A: Authenticator + 'static>(size: u64, auth: A) -> Served {
    let (export, catalog) = mem_catalog(size);
    let server = Server::new(catalog, Arc::new(auth));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol.sock");
    let shutdown = CancellationToken::new();
    let ul = tokio::net::UnixListener::bind(&sock).unwrap();
    let tl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = tl.local_addr().unwrap();
    let tasks = vec![
        tokio::spawn({
            let (s, sd) = (server.clone(), shutdown.clone());
            async move { s.serve_unix(ul, sd).await }
        }),
        tokio::spawn({
            let (s, sd) = (server.clone(), shutdown.clone());
            async move { s.serve_tcp(tl, sd).await }
        }),
    ];
    Served {
        export,
        sock,
        tcp,
        shutdown,
        tasks,
        _dir: dir,
    }
}

async fn run(cmd: &mut Command) -> Output {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.kill_on_drop(true).output())
        .await
        .expect("tool timed out")
        .expect("tool failed to start");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    println!(
        "$ {:?}\n{}{}",
        cmd.as_std(),
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdinfo_lists_and_describes_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let s = serve(64 * MIB, AllowAll).await;
    for uri in [s.unix_uri(), s.tcp_uri()] {
        let o = run(Command::new("nbdinfo").arg(&uri)).await;
        assert!(o.status.success());
        let out = stdout(&o);
        for want in [
            "export-size: 67108864",
            "can_flush: true",
            "can_fua: true",
            "can_trim: true",
            "can_zero: true",
            "can_multi_conn: true",
            "is_read_only: false",
            "block_size_minimum: 512",
            "block_size_maximum: 33554432",
            "description: test volume",
        ] {
            assert!(out.contains(want), "missing {want:?}");
        }
    }
    let o = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://{}", s.tcp)))
    .await;
    assert!(o.status.success());
    assert!(stdout(&o).contains("export=\"vol\""));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_io_writes_and_verifies_a_pattern() {
    if !have("qemu-io") {
        return;
    }
    let s = serve(64 * MIB, AllowAll).await;
    for (uri, off, pat) in [(s.unix_uri(), 0u64, 0xabu8), (s.tcp_uri(), 2 * MIB, 0xcd)] {
        let o = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -P {pat:#x} {off} 1M"),
            "-c",
            &format!("read -P {pat:#x} {off} 1M"),
            "-c",
            &format!("write -z -f {} 64k", off + MIB),
            "-c",
            &format!("read -P 0 {} 64k", off + MIB),
            "-c",
            "flush",
            "-c",
            // unaligned: qemu does read-modify-write using the advertised 512-byte minimum
            &format!("write -P 0x5a {} 10", off + 100),
            "-c",
            &format!("read -P 0x5a {} 10", off + 100),
        ]))
        .await;
        let out = stdout(&o);
        assert!(o.status.success(), "qemu-io failed");
        assert!(
            !out.contains("Pattern verification failed") && !out.contains("failed:"),
            "{out}"
        );
        let mut want = vec![pat; MIB as usize];
        want[100..110].fill(0x5a);
        assert_eq!(s.export.slice(off, MIB as usize), want);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_img_info_reports_the_size() {
    if !have("qemu-img") {
        return;
    }
    let s = serve(64 * MIB, AllowAll).await;
    for uri in [s.unix_uri(), s.tcp_uri()] {
        let o = run(Command::new("qemu-img").args(["info", "-f", "raw", &uri])).await;
        assert!(o.status.success());
        assert!(stdout(&o).contains("virtual size: 64 MiB (67108864 bytes)"));
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdcopy_to_and_from_a_file() {
    if !have("nbdcopy") {
        return;
    }
    let s = serve(16 * MIB, AllowAll).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let data = pattern(42, (16 * MIB) as usize);
    std::fs::write(&src, &data).unwrap();

    let o = run(Command::new("nbdcopy").arg(&src).arg(s.unix_uri())).await;
    assert!(o.status.success());
    assert!(
        s.export.contents() == data[..],
        "export differs from the source file"
    );

    let o = run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=32"])
        .arg(s.tcp_uri())
        .arg(&dst))
    .await;
    assert!(o.status.success());
    assert!(
        std::fs::read(&dst).unwrap() == data[..],
        "copy differs from the source file"
    );
    s.stop().await;
}

async fn fio(uri: &str, offset: &str) -> Output {
    run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        &format!("--offset={offset}"),
        "--iodepth=32",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // Do not leave a verify-state file in the working directory.
        "--verify_state_save=0",
    ]))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_nbd_engine_with_crc32c_verification() {
    if !have("fio") {
        return;
    }
    let engines = run(Command::new("fio").arg("--enghelp")).await;
    if !stdout(&engines).lines().any(|l| l.trim() == "nbd") {
        println!("skipping: fio built without the nbd engine");
        return;
    }
    let s = serve(64 * MIB, AllowAll).await;
    for (uri, offset) in [(s.unix_uri(), "0"), (s.tcp_uri(), "32M")] {
        let o = fio(&uri, offset).await;
        let out = stdout(&o);
        assert!(o.status.success(), "fio failed");
        assert!(!out.contains("verify: bad"), "{out}");
        assert!(
            out.contains("issued rwts: total=4096,4096"),
            "fio did not write and verify everything"
        );
    }
    assert!(s.export.stats().writes >= 8192);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdfuse_exposes_the_export_as_a_file() {
    if !have("nbdfuse") || !have("fusermount3") {
        return;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        println!("skipping: /dev/fuse not usable");
        return;
    }
    let s = serve(16 * MIB, AllowAll).await;
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = dir.path().join("pid");
    let mut child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(mnt.join("disk"))
        .arg(s.unix_uri())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // nbdfuse writes the pid file once the mount is ready.
    let mut ready = false;
    for _ in 0..100 {
        if pidfile.exists() {
            ready = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            println!("skipping: nbdfuse exited early ({status}); FUSE unavailable here");
            s.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "nbdfuse did not become ready");
    let disk = mnt.join("disk");
    let data = pattern(7, MIB as usize);
    let (d2, data2) = (disk.clone(), data.clone());
    let back = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d2)
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), 16 * MIB);
        f.seek(SeekFrom::Start(4 * MIB)).unwrap();
        f.write_all(&data2).unwrap();
        f.sync_all().unwrap();
        let mut back = vec![0; MIB as usize];
        f.seek(SeekFrom::Start(4 * MIB)).unwrap();
        f.read_exact(&mut back).unwrap();
        back
    })
    .await
    .unwrap();
    assert!(back == data[..]);
    assert!(s.export.slice(4 * MIB, MIB as usize) == data[..]);
    let o = run(Command::new("fusermount3").arg("-u").arg(&mnt)).await;
    assert!(o.status.success());
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stock_clients_cannot_use_a_token_protected_server() {
    if !have("nbdinfo") {
        return;
    }
    let auth = TokenAuthenticator::new().with_principal("node-a", b"secret".to_vec());
    let s = serve(MIB, auth).await;
    let o = run(Command::new("nbdinfo").arg(s.tcp_uri())).await;
    assert!(!o.status.success());
    let o = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://{}", s.tcp)))
    .await;
    assert!(!stdout(&o).contains("export=\"vol\""));
    s.stop().await;
}

async fn wait_for(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never appeared", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_against_nbdkit() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kit.sock");
    let mut kit = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(["memory", "64M"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(&sock).await;

    let c = Arc::new(NbdClient::connect_unix(&sock, "").await.unwrap());
    assert_eq!(c.size(), 64 * MIB);
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..8u64 {
                let off = (t * 8 + i) * 256 * 1024;
                let data = pattern(t * 31 + i, 256 * 1024);
                c.write(off, data.clone(), i == 0).await.unwrap();
                assert_eq!(c.read(off, 256 * 1024).await.unwrap(), data);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.flush().await.unwrap();
    c.write_zeroes(0, 4096, false, false).await.unwrap();
    assert!(c.read(0, 4096).await.unwrap().iter().all(|b| *b == 0));
    if c.details().can_trim() {
        c.trim(8192, 4096, false).await.unwrap();
    }
    c.disconnect().await;

    let pool = ClientPool::connect(
        Target::Unix(sock.clone()),
        "",
        None,
        ClientConfig::default(),
        PoolConfig::default(),
    )
    .await
    .unwrap();
    pool.write(MIB, pattern(5, 4096), true).await.unwrap();
    assert_eq!(pool.read(MIB, 4096).await.unwrap(), pattern(5, 4096));
    pool.close().await;
    kit.kill().await.unwrap();
}
