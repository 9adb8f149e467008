//! Helpers shared by the multi-process e2e binaries (`remap`, `mirror`): fio with the NBD
//! engine and its JSON report, and byte comparisons against the area files of `tessera local`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube::Api;
use tessera_api::v1alpha1::{VirtualVolume, VolumeMapping};
use tessera_e2e::io::VolumeIo;
use tokio::process::Command;

/// `fio` with the `nbd` engine (libnbd), or why not.
pub fn fio_with_nbd() -> std::result::Result<(), String> {
    match std::process::Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
    {
        Ok(out) if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("uri") => {
            Ok(())
        }
        Ok(_) => Err("fio has no nbd engine (Debian's fio has it)".into()),
        Err(e) => Err(format!("fio is not installed ({e}); `apt-get install fio`")),
    }
}

/// What one fio job (`--output-format=json`) reports.
#[derive(Debug, Clone, Copy)]
pub struct FioReport {
    pub writes: u64,
    pub iops: f64,
    /// I/Os that failed (`total_err`).
    pub errors: u64,
    /// The errno the job stopped with (`error`), 0 when none; a verify failure stops the job.
    pub error_code: u64,
}

impl FioReport {
    pub fn parse(stdout: &[u8]) -> Result<FioReport> {
        let text = String::from_utf8_lossy(stdout);
        let start = text.find('{').context("fio printed no JSON")?;
        let json: serde_json::Value = serde_json::from_str(&text[start..]).context("fio JSON")?;
        let job = &json["jobs"][0];
        Ok(FioReport {
            writes: job["write"]["total_ios"].as_u64().unwrap_or(0),
            iops: job["write"]["iops"].as_f64().unwrap_or(0.0),
            errors: job["total_err"].as_u64().unwrap_or(0),
            error_code: job["error"].as_u64().unwrap_or(0),
        })
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `(area, area offset)` of every replica of the byte at `offset`.
pub fn replicas(mapping: &VolumeMapping, offset: i64) -> Vec<(String, i64)> {
    mapping
        .extents
        .iter()
        .find(|r| r.offset <= offset && offset < r.offset + r.length)
        .map(|r| {
            r.replicas
                .iter()
                .map(|p| (p.area.clone(), p.area_offset + offset - r.offset))
                .collect()
        })
        .unwrap_or_default()
}

/// The area file of a local node's area (`<node>-area-<i>` → `<data>/<node>/areas/area-<i>.img`).
pub fn area_file(data_dir: &Path, area: &str) -> Result<PathBuf> {
    let (node, index) = area
        .rsplit_once("-area-")
        .with_context(|| format!("unexpected area name {area}"))?;
    Ok(data_dir
        .join(node)
        .join("areas")
        .join(format!("area-{index}.img")))
}

/// Reads the whole volume through `io` and compares each extent with the bytes of every
/// replica's area file at the mapped offset. Returns the bytes compared.
pub async fn compare_with_areas(
    io: &VolumeIo,
    mapping: &VolumeMapping,
    data_dir: &Path,
    size: u64,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let es = mapping.extent_size_bytes;
    let mut compared = 0;
    for e in 0..(size as i64 / es) {
        let got = io.read_at((e * es) as u64, es as u64).await?;
        for (area, at) in replicas(mapping, e * es) {
            let path = area_file(data_dir, &area)?;
            let file = std::fs::File::open(&path).with_context(|| path.display().to_string())?;
            let mut want = vec![0u8; es as usize];
            file.read_exact_at(&mut want, at as u64)
                .with_context(|| format!("reading {} at {at}", path.display()))?;
            if let Some(i) = tessera_e2e::io::first_difference(&got, &want) {
                bail!(
                    "extent {e}: the volume and {area}@{at} differ at byte {i} (volume offset {})",
                    e * es + i as i64
                );
            }
            compared += es as u64;
        }
    }
    Ok(compared)
}

/// nbdcopy of volume bytes [0, len) from where `from` maps them to where `to` maps them,
/// merged into contiguous runs, each area file range exported by `nbdkit file` (offset filter)
/// on a unix socket; with `flush`, `--flush` at the end (a copy that ends with a flush, as the
/// mirror leg's does). Returns (bytes, seconds of nbdcopy, servers' start excluded).
pub async fn nbdcopy_between(
    data_dir: &Path,
    from: &VolumeMapping,
    to: &VolumeMapping,
    len: u64,
    flush: bool,
) -> Result<(u64, f64)> {
    let es = from.extent_size_bytes;
    let mut runs: Vec<(String, i64, String, i64, i64)> = Vec::new();
    for e in 0..(len as i64 / es) {
        let (src, so) = replicas(from, e * es)
            .into_iter()
            .next()
            .with_context(|| format!("primary extent {e} is not allocated"))?;
        let (dst, d) = replicas(to, e * es)
            .into_iter()
            .next()
            .with_context(|| format!("secondary extent {e} is not allocated"))?;
        match runs.last_mut() {
            Some(r) if r.0 == src && r.2 == dst && r.1 + r.4 == so && r.3 + r.4 == d => r.4 += es,
            _ => runs.push((src, so, dst, d, es)),
        }
    }
    let sockets = tempfile::tempdir()?;
    let mut bytes = 0u64;
    let mut seconds = 0.0;
    for (i, (src, so, dst, d, len)) in runs.iter().enumerate() {
        let s_sock = sockets.path().join(format!("s{i}.sock"));
        let d_sock = sockets.path().join(format!("d{i}.sock"));
        let mut servers = Vec::new();
        for (sock, area, offset) in [(&s_sock, src, so), (&d_sock, dst, d)] {
            servers.push(
                Command::new("nbdkit")
                    .args(["--foreground", "--exit-with-parent", "-U"])
                    .arg(sock)
                    .arg("--filter=offset")
                    .arg("file")
                    .arg(format!("file={}", area_file(data_dir, area)?.display()))
                    .arg(format!("offset={offset}"))
                    .arg(format!("range={len}"))
                    .kill_on_drop(true)
                    .spawn()
                    .context("nbdkit (install the nbdkit package)")?,
            );
        }
        for sock in [&s_sock, &d_sock] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                if Instant::now() > deadline {
                    bail!("nbdkit did not create {}", sock.display());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let started = Instant::now();
        let status = Command::new("nbdcopy")
            .args(flush.then_some("--flush"))
            .arg(format!("nbd+unix:///?socket={}", s_sock.display()))
            .arg(format!("nbd+unix:///?socket={}", d_sock.display()))
            .status()
            .await
            .context("nbdcopy (install libnbd-bin)")?;
        ensure!(status.success(), "nbdcopy failed: {status}");
        seconds += started.elapsed().as_secs_f64();
        bytes += *len as u64;
        drop(servers);
    }
    Ok((bytes, seconds))
}

/// The committed mapping of volume `id`.
pub async fn mapping_of(volumes: &Api<VirtualVolume>, id: &str) -> Result<VolumeMapping> {
    volumes
        .get(id)
        .await?
        .status
        .and_then(|s| s.mapping)
        .context("volume has no mapping")
}

/// fio writing `[0, size)` of an NBD export at random (4 KiB, iodepth 16) for `runtime_s`
/// seconds, verifying every block as it goes (`crc32c`, `verify_backlog`, fatal on the first
/// mismatch); JSON report on stdout.
pub fn spawn_fio_verify(
    name: &str,
    socket: &Path,
    export: &str,
    size: u64,
    runtime_s: u64,
) -> Result<tokio::process::Child> {
    let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
    Command::new("fio")
        .args([
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--offset=0",
            &format!("--size={size}"),
            "--verify=crc32c",
            "--verify_backlog=512",
            "--verify_fatal=1",
            // A killed job would leave a `*-verify.state` file in the working directory.
            "--verify_state_save=0",
            "--loops=1000",
            &format!("--runtime={runtime_s}"),
            "--time_based",
            "--output-format=json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning fio")
}
