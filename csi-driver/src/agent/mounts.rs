//! Mount-table, filesystem and bind-mount helpers of the Node service. Blocking: call them from
//! `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags};

use crate::frontend::find_in_path;

/// A mount or filesystem step failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{op}: {source}")]
    Sys {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{tool} is not installed (needed for {purpose})")]
    MissingTool { tool: &'static str, purpose: String },
    #[error("unsupported filesystem type {0:?} (ext4 or xfs)")]
    UnsupportedFs(String),
}

fn sys(op: impl Into<String>, e: impl Into<std::io::Error>) -> MountError {
    MountError::Sys {
        op: op.into(),
        source: e.into(),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub source: String,
    pub fs_type: String,
    pub options: String,
}

/// Undoes the octal escapes of mountinfo (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the current mount table.
pub fn mount_table() -> Vec<MountEntry> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let right: Vec<&str> = right.split(' ').collect();
    Some(MountEntry {
        mount_point: PathBuf::from(unescape(left.get(4)?)),
        options: left.get(5)?.to_string(),
        fs_type: right.first()?.to_string(),
        source: unescape(right.get(1)?),
    })
}

/// Whether something is mounted at exactly `path`.
pub fn is_mount_point(path: &Path) -> bool {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mount_table()
        .iter()
        .any(|m| m.mount_point == canonical || m.mount_point == path)
}

/// Mount points whose source is `device`.
pub fn mounts_of_device(device: &Path) -> Vec<PathBuf> {
    let device = device.display().to_string();
    mount_table()
        .into_iter()
        .filter(|m| m.source == device)
        .map(|m| m.mount_point)
        .collect()
}

fn run(
    tool: &'static str,
    purpose: &str,
    args: &[&str],
) -> Result<std::process::Output, MountError> {
    let program = find_in_path(tool).ok_or_else(|| MountError::MissingTool {
        tool,
        purpose: purpose.into(),
    })?;
    Command::new(&program)
        .args(args)
        .output()
        .map_err(|e| sys(format!("run {}", program.display()), e))
}

fn check(tool: &str, args: &[&str], output: std::process::Output) -> Result<(), MountError> {
    if output.status.success() {
        return Ok(());
    }
    Err(MountError::Command {
        command: format!("{tool} {}", args.join(" ")),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// The filesystem (or other signature) on `device`, `None` when the device is blank.
pub fn probe_fs(device: &Path) -> Result<Option<String>, MountError> {
    let dev = device.display().to_string();
    let args = ["-p", "-o", "value", "-s", "TYPE", dev.as_str()];
    let output = run("blkid", "probing the volume for a filesystem", &args)?;
    match output.status.code() {
        Some(0) => {
            let fs = String::from_utf8_lossy(&output.stdout).trim().to_string();
            Ok(Some(if fs.is_empty() { "unknown".into() } else { fs }))
        }
        // blkid: 2 = nothing found.
        Some(2) => Ok(None),
        _ => check("blkid", &args, output).map(|()| None),
    }
}

/// ext4 unless told otherwise.
pub fn fs_type_or_default(fs_type: &str) -> Result<&str, MountError> {
    match fs_type {
        "" | "ext4" => Ok("ext4"),
        "xfs" => Ok("xfs"),
        other => Err(MountError::UnsupportedFs(other.into())),
    }
}

/// Makes a filesystem on a blank device.
pub fn mkfs(device: &Path, fs_type: &str) -> Result<(), MountError> {
    let dev = device.display().to_string();
    match fs_type {
        "ext4" => {
            // No lazy init: the inode tables are zeroed now, not by a kernel thread that would
            // keep writing after the volume was handed over.
            let args = [
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                dev.as_str(),
            ];
            check("mkfs.ext4", &args, run("mkfs.ext4", "ext4 volumes", &args)?)
        }
        "xfs" => {
            let args = ["-q", dev.as_str()];
            check("mkfs.xfs", &args, run("mkfs.xfs", "xfs volumes", &args)?)
        }
        other => Err(MountError::UnsupportedFs(other.into())),
    }
}

fn create_dir(path: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(path).map_err(|e| sys(format!("create {}", path.display()), e))
}

/// Mounts `device` (filesystem `fs_type`) at `target`, creating the directory.
pub fn mount_fs(
    device: &Path,
    target: &Path,
    fs_type: &str,
    flags: &[String],
) -> Result<(), MountError> {
    create_dir(target)?;
    let data = flags.join(",");
    nix::mount::mount(
        Some(device),
        target,
        Some(fs_type),
        MsFlags::empty(),
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| {
        sys(
            format!("mount {} at {}", device.display(), target.display()),
            e,
        )
    })
}

/// Bind mounts `source` at `target` (a directory for a filesystem, a file for a device node),
/// read-only when asked (a bind mount takes `ro` only on a remount).
pub fn bind_mount(
    source: &Path,
    target: &Path,
    is_file: bool,
    readonly: bool,
) -> Result<(), MountError> {
    if is_file {
        if let Some(parent) = target.parent() {
            create_dir(parent)?;
        }
        if !target.exists() {
            std::fs::File::create(target)
                .map_err(|e| sys(format!("create {}", target.display()), e))?;
        }
    } else {
        create_dir(target)?;
    }
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        sys(
            format!("bind {} at {}", source.display(), target.display()),
            e,
        )
    })?;
    if readonly {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = nix::mount::umount2(target, MntFlags::empty());
            return Err(sys(format!("remount {} read-only", target.display()), e));
        }
    }
    Ok(())
}

/// Unmounts everything stacked at `path` (idempotent).
pub fn unmount_all(path: &Path) -> Result<(), MountError> {
    // A path may carry several stacked mounts (a retried publish); take them all off.
    for _ in 0..16 {
        if !is_mount_point(path) {
            return Ok(());
        }
        nix::mount::umount2(path, MntFlags::empty())
            .map_err(|e| sys(format!("unmount {}", path.display()), e))?;
    }
    Ok(())
}

/// Removes a target or staging path the plugin created (file or empty directory).
pub fn remove_path(path: &Path) -> Result<(), MountError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| sys(format!("remove {}", path.display()), e))
}

/// Loop devices whose backing file is under `dir` (from sysfs).
pub fn loops_backed_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file"))
            && Path::new(backing.trim()).starts_with(dir)
        {
            out.push(PathBuf::from(format!("/dev/{name}")));
        }
    }
    out
}

/// What a killed plugin left under its fuse directory: loop devices over dead FUSE files are
/// detached (autoclear while something still holds them) and the dead FUSE mounts lazily
/// unmounted. Mounts of those loop devices elsewhere (staging paths) stay until the next
/// stage or unstage of their volume unmounts them. Best effort: failures are logged.
pub fn sweep_stale_fuse(dir: &Path) {
    for device in loops_backed_under(dir) {
        let dev = device.display().to_string();
        match run(
            "losetup",
            "detaching stale loop devices",
            &["-d", dev.as_str()],
        ) {
            Ok(output) if output.status.success() => {
                tracing::warn!(device = %dev, "stale loop device of a previous run detached");
            }
            Ok(output) => tracing::warn!(device = %dev,
                stderr = %String::from_utf8_lossy(&output.stderr).trim(), "stale loop device not detached"),
            Err(error) => tracing::warn!(device = %dev, %error, "stale loop device not detached"),
        }
    }
    let mut stale: Vec<PathBuf> = mount_table()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir))
        .collect();
    stale.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for mount_point in stale {
        if let Err(error) = nix::mount::umount2(&mount_point, MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %mount_point.display(), %error, "stale FUSE mount not removed");
        }
    }
}

/// statvfs of a mounted filesystem: (total, available, used) bytes and the same for inodes.
pub fn fs_stats(path: &Path) -> Result<([u64; 3], [u64; 3]), MountError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| sys(format!("statvfs {}", path.display()), e))?;
    let frag = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frag;
    let avail = st.blocks_available() as u64 * frag;
    let used = (st.blocks() as u64 - st.blocks_free() as u64) * frag;
    let inodes = st.files() as u64;
    let ifree = st.files_free() as u64;
    let iavail = st.files_available() as u64;
    Ok(([total, avail, used], [inodes, iavail, inodes - ifree]))
}

/// Bytes an ext4 filesystem on `device` spans (`dumpe2fs -h`: block count × block size).
pub fn ext4_size(device: &Path) -> Result<u64, MountError> {
    let dev = device.display().to_string();
    let args = ["-h", dev.as_str()];
    let output = run("dumpe2fs", "reading the ext4 size", &args)?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    check("dumpe2fs", &args, output)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(count), Some(size)) => Ok(count * size),
        _ => Err(MountError::Command {
            command: format!("dumpe2fs -h {dev}"),
            status: "no block count or size".into(),
            stderr: String::new(),
        }),
    }
}

/// Grows an unmounted ext4 filesystem to its device (`e2fsck -f -p`, then `resize2fs`): what a
/// NodeExpandVolume that could not grow it online left to do, done at the next stage.
pub fn grow_ext4_offline(device: &Path) -> Result<(), MountError> {
    let dev = device.display().to_string();
    let fsck = ["-f", "-p", dev.as_str()];
    let output = run("e2fsck", "checking ext4 before growing it", &fsck)?;
    // 0: clean, 1: errors corrected.
    if !matches!(output.status.code(), Some(0 | 1)) {
        check("e2fsck", &fsck, output)?;
    }
    let args = [dev.as_str()];
    check("resize2fs", &args, run("resize2fs", "growing ext4", &args)?)
}

/// Grows the filesystem on `device` mounted at `mount_point` to the device's size.
pub fn grow_fs(device: &Path, mount_point: &Path, fs_type: &str) -> Result<(), MountError> {
    match fs_type {
        "ext4" => {
            let dev = device.display().to_string();
            let args = [dev.as_str()];
            check("resize2fs", &args, run("resize2fs", "growing ext4", &args)?).map_err(|e| match e
            {
                // EXT4_IOC_RESIZE_FS answers EPERM without CAP_SYS_RESOURCE.
                MountError::Command {
                    command,
                    status,
                    stderr,
                } if stderr.contains("Permission denied") => MountError::Command {
                    command,
                    status,
                    stderr: format!("{stderr} (online ext4 growth needs CAP_SYS_RESOURCE)"),
                },
                other => other,
            })
        }
        "xfs" => {
            let mp = mount_point.display().to_string();
            let args = [mp.as_str()];
            check(
                "xfs_growfs",
                &args,
                run("xfs_growfs", "growing xfs", &args)?,
            )
        }
        other => Err(MountError::UnsupportedFs(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let line = "36 35 98:0 /mnt1 /mnt/my\\040dir rw,noatime master:1 - ext4 /dev/loop3 rw,errors=continue";
        let entry = parse_mountinfo_line(line).expect("parses");
        assert_eq!(entry.mount_point, PathBuf::from("/mnt/my dir"));
        assert_eq!(entry.source, "/dev/loop3");
        assert_eq!(entry.fs_type, "ext4");
        assert_eq!(entry.options, "rw,noatime");
    }

    #[test]
    fn fs_type_defaults_to_ext4_and_refuses_others() {
        assert_eq!(fs_type_or_default("").ok(), Some("ext4"));
        assert_eq!(fs_type_or_default("xfs").ok(), Some("xfs"));
        assert!(fs_type_or_default("ntfs").is_err());
    }
}
