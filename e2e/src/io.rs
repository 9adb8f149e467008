//! Reading and writing a published volume, through its block device (what a pod sees) or its
//! NBD export (every staged volume has one), and the data pattern the scenarios verify.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tessera_nbd::NbdClient;

use crate::error::{E2eError, Result};

/// Largest single NBD request the harness sends (the NBD default maximum block size is 32 MiB;
/// 1 MiB keeps requests well inside any server's limit).
const CHUNK: u64 = 1 << 20;

/// Bytes of one pattern record: 15 decimal digits and a newline.
pub const RECORD: u64 = 16;

/// The seeded pattern at `offset..offset + len` of a volume: every 16-byte record at absolute
/// offset `p` reads `{seed * 10^11 + p / 16:015}\n`. Each record names its own position, so a
/// misplaced extent or a shifted read shows, and any sub-range can be regenerated without the
/// rest. (Plain decimal text so a shell with `awk` can produce the same bytes.)
pub fn pattern(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    assert!(
        offset.is_multiple_of(RECORD) && len.is_multiple_of(RECORD),
        "pattern ranges are whole records"
    );
    assert!(seed < 10_000, "seed must keep records at 15 digits");
    let mut out = Vec::with_capacity(len as usize);
    for p in (offset..offset + len).step_by(RECORD as usize) {
        let v = seed * 100_000_000_000 + p / RECORD;
        out.extend_from_slice(format!("{v:015}\n").as_bytes());
    }
    out
}

/// Where the first difference between `got` and `want` is, for a readable failure.
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .or((got.len() != want.len()).then(|| got.len().min(want.len())))
}

/// An open path to a volume's bytes.
pub enum VolumeIo {
    /// The NBD export of the staged volume (`nbd+unix:///<id>?socket=…`).
    Nbd { target: String, client: NbdClient },
    /// The published block device (the bind mount at the NodePublish target path).
    Device {
        target: String,
        file: Arc<File>,
        size: u64,
    },
}

impl std::fmt::Debug for VolumeIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

impl VolumeIo {
    pub async fn open_nbd(socket: &Path, export: &str) -> Result<Self> {
        let target = format!("nbd+unix:///{export}?socket={}", socket.display());
        let client = NbdClient::connect_unix(socket, export)
            .await
            .map_err(|source| E2eError::Nbd {
                target: target.clone(),
                source,
            })?;
        Ok(VolumeIo::Nbd { target, client })
    }

    /// Opens a block device node with O_DIRECT, so reads come from the volume, not from the
    /// page cache of an earlier open.
    pub async fn open_device(path: &Path) -> Result<Self> {
        let target = path.display().to_string();
        let path_buf = path.to_path_buf();
        let (file, size) = blocking(target.clone(), move || open_direct(&path_buf)).await?;
        Ok(VolumeIo::Device {
            target,
            file: Arc::new(file),
            size,
        })
    }

    pub fn describe(&self) -> &str {
        match self {
            VolumeIo::Nbd { target, .. } | VolumeIo::Device { target, .. } => target,
        }
    }

    pub fn is_device(&self) -> bool {
        matches!(self, VolumeIo::Device { .. })
    }

    /// Size of the volume as this path sees it.
    pub fn size(&self) -> u64 {
        match self {
            VolumeIo::Nbd { client, .. } => client.size(),
            VolumeIo::Device { size, .. } => *size,
        }
    }

    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            VolumeIo::Nbd { target, client } => {
                for (i, chunk) in data.chunks(CHUNK as usize).enumerate() {
                    client
                        .write(
                            offset + i as u64 * CHUNK,
                            Bytes::copy_from_slice(chunk),
                            false,
                        )
                        .await
                        .map_err(|source| E2eError::Nbd {
                            target: target.clone(),
                            source,
                        })?;
                }
                client.flush().await.map_err(|source| E2eError::Nbd {
                    target: target.clone(),
                    source,
                })
            }
            VolumeIo::Device { target, file, .. } => {
                let file = file.clone();
                let data = aligned_copy(data);
                blocking(target.clone(), move || {
                    file.write_all_at(data.as_slice(), offset)?;
                    file.sync_all()
                })
                .await
            }
        }
    }

    pub async fn read_at(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        match self {
            VolumeIo::Nbd { target, client } => {
                let mut out = Vec::with_capacity(len as usize);
                let mut at = offset;
                while at < offset + len {
                    let n = CHUNK.min(offset + len - at) as u32;
                    let data = client.read(at, n).await.map_err(|source| E2eError::Nbd {
                        target: target.clone(),
                        source,
                    })?;
                    out.extend_from_slice(&data);
                    at += u64::from(n);
                }
                Ok(out)
            }
            VolumeIo::Device { target, file, .. } => {
                let file = file.clone();
                blocking(target.clone(), move || {
                    let mut buf = AlignedBuf::zeroed(len as usize);
                    file.read_exact_at(buf.as_mut_slice(), offset)?;
                    Ok(buf.as_slice().to_vec())
                })
                .await
            }
        }
    }

    /// Closes the path (before NodeUnstage, as a pod exits before kubelet unstages).
    pub async fn close(self) {
        if let VolumeIo::Nbd { client, .. } = self {
            client.disconnect().await;
        }
    }
}

/// The device behind a NodePublish target path, if the target is a block device node.
pub fn block_device_at(path: &Path) -> Option<PathBuf> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| path.to_path_buf())
}

fn open_direct(path: &Path) -> std::io::Result<(File, u64)> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // Seeking to the end of a block device yields its size.
    let size = file.seek(SeekFrom::End(0))?;
    Ok((file, size))
}

async fn blocking<T: Send + 'static>(
    target: String,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| E2eError::io(target, e)),
        Err(join) => Err(E2eError::io(
            target,
            std::io::Error::other(join.to_string()),
        )),
    }
}

/// A 4096-aligned buffer, as O_DIRECT requires.
struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; 4096]);

impl AlignedBuf {
    fn zeroed(len: usize) -> Self {
        Self {
            pages: vec![Page([0; 4096]); len.div_ceil(4096)],
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `Page` is a plain 4096-byte array with no padding, so the vector's storage is
        // `pages.len() * 4096` initialised bytes; `len` never exceeds that.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

fn aligned_copy(data: &[u8]) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_records_name_their_position() {
        let p = pattern(7, 4096, 32);
        assert_eq!(&p, b"000700000000256\n000700000000257\n");
        // Any sub-range equals the same bytes of a larger range.
        let whole = pattern(3, 0, 1 << 16);
        assert_eq!(&whole[4096..8192], pattern(3, 4096, 4096).as_slice());
        assert_ne!(pattern(3, 0, 4096), pattern(4, 0, 4096));
    }

    #[test]
    fn first_difference_finds_mismatches() {
        assert_eq!(first_difference(b"abc", b"abc"), None);
        assert_eq!(first_difference(b"abd", b"abc"), Some(2));
        assert_eq!(first_difference(b"ab", b"abc"), Some(2));
    }
}
