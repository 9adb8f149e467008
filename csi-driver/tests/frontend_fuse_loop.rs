//! Kernel test of the fuse-loop frontend (ARCHITECTURE §10 "Kernel" tier): a volume over three
//! temp-file areas → FUSE file → /dev/loopN → mkfs.ext4 → mount → files → sync → remount →
//! verify → fstrim reaches the engine (usage bits cleared) → unmount → detach.
//!
//! Root only, and only with /dev/fuse, /dev/loop-control and the tools; otherwise it prints why
//! and passes. It runs in a private mount namespace (this dedicated test binary unshares it for
//! the test thread, whose children — the FUSE threads and every tool — inherit it), so nothing
//! it mounts is visible outside, and a crash leaves no mount behind on the host.

mod frontend_support;

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use frontend_support::{have, pattern, striped_volume};
use tessera_csi::frontend::fuse_loop::FuseLoopFrontend;
use tessera_csi::frontend::{AttachTarget, Frontend};

const MIB: u64 = 1 << 20;

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} missing"));
        }
    }
    for tool in ["losetup", "mkfs.ext4", "mount", "umount", "fstrim"] {
        if !have(tool) {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Unmounts (lazily, as a last resort) when a test step panics with the file system mounted.
struct Mounted<'a>(Option<&'a Path>);

impl Mounted<'_> {
    fn unmount(&mut self) {
        if let Some(path) = self.0.take() {
            run(Command::new("umount").arg(path));
        }
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
}

fn checksum(path: &Path) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(&std::fs::read(path).expect("read file"));
    hasher.finish()
}

fn private_mount_namespace() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    // Without this, mounts would still propagate to the host's shared peer group.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make / rprivate");
}

#[test]
fn ext4_on_fuse_loop_survives_remount_and_fstrim_reaches_the_engine() {
    if let Some(reason) = skip_reason() {
        println!("skipping fuse-loop kernel test: {reason}");
        return;
    }
    let started = Instant::now();
    private_mount_namespace();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // 96 extents of 1 MiB over three areas, no holes.
    let v = striped_volume(None, 3, MIB, 96, 0);
    let frontend = FuseLoopFrontend::new(runtime.handle().clone(), v.dir.path());
    let attachment = frontend.attach(v.volume.clone()).expect("attach");
    let AttachTarget::Device(device) = attachment.target().clone() else {
        panic!("not a device: {:?}", attachment.target());
    };
    println!("attached {} as {}", v.volume.name(), device.display());
    let loop_name = device.file_name().expect("name").to_owned();
    let backing = PathBuf::from("/sys/block")
        .join(&loop_name)
        .join("loop/backing_file");
    assert!(backing.exists(), "loop device is bound");

    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&device));
    let mnt = v.dir.path().join("ext4");
    std::fs::create_dir(&mnt).expect("mountpoint");

    let files: Vec<(String, Vec<u8>)> = vec![
        ("small".into(), pattern(1, 4096 + 17)),
        ("medium".into(), pattern(2, (3 * MIB) as usize)),
        ("big".into(), pattern(3, (16 * MIB) as usize)),
    ];
    let mut mounted = Mounted(None);
    run(Command::new("mount").arg(&device).arg(&mnt));
    mounted.0 = Some(&mnt);
    let mut sums = Vec::new();
    for (name, data) in &files {
        let path = mnt.join(name);
        std::fs::write(&path, data).expect("write file");
        sums.push((path.clone(), checksum(&path)));
    }
    run(&mut Command::new("sync"));
    mounted.unmount();

    run(Command::new("mount").arg(&device).arg(&mnt));
    mounted.0 = Some(&mnt);
    for ((path, sum), (_, data)) in sums.iter().zip(&files) {
        let read = std::fs::read(path).expect("read back");
        assert_eq!(read.len(), data.len(), "{}", path.display());
        assert_eq!(
            checksum(path),
            *sum,
            "{} differs after remount",
            path.display()
        );
    }

    // Delete the big file and fstrim: the loop driver turns the discards into fallocate punches
    // on the FUSE file, which reach the engine and clear the usage bits of whole extents.
    let before = v.volume.in_use_extents();
    std::fs::remove_file(mnt.join("big")).expect("rm");
    run(&mut Command::new("sync"));
    let trimmed = run(Command::new("fstrim").arg("-v").arg(&mnt));
    let after = v.volume.in_use_extents();
    let lost = before.len() - (&after & &before).len();
    println!(
        "fstrim: {} — in-use extents {} → {} ({lost} cleared)",
        trimmed.trim(),
        before.len(),
        after.len()
    );
    assert!(
        lost >= 12,
        "the 16 MiB file's extents were not cleared: {lost} of {} in-use extents lost",
        before.len()
    );
    // The small files are intact after the trim.
    for (path, sum) in sums.iter().take(2) {
        assert_eq!(checksum(path), *sum, "{} damaged by fstrim", path.display());
    }
    mounted.unmount();

    attachment.detach().expect("detach");
    assert!(!backing.exists(), "loop device released");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains("tessera:vol"), "FUSE mount left behind");
    println!("fuse-loop kernel test took {:?}", started.elapsed());
}
