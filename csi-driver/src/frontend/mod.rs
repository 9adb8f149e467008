//! Frontends: how a volume reaches the kernel or a client (ARCHITECTURE §4 "Frontends").
//!
//! - [`nbd`]: every volume as an NBD export on its own unix socket ([`nbd::NbdUnixFrontend`]),
//!   what the embedded default prints and what stock NBD clients (qemu-io, nbdinfo, fio) use.
//! - [`fuse_loop`]: a one-file FUSE filesystem over the engine plus a loop device
//!   ([`fuse_loop::FuseLoopFrontend`]); works wherever FUSE and loop exist, and is what the kernel
//!   tests use.
//! - `ublk` and kernel `nbd` are the fast paths of the design; they are not implemented yet, and
//!   [`UnavailableFrontend`] answers their `attach` with a typed [`FrontendError::Unavailable`]
//!   (never a fake device).
//!
//! [`detect_available`] checks at run time which kinds this node can use and why not.
//!
//! The [`Frontend`] trait is synchronous and object-safe on purpose: attaching runs external
//! commands (`losetup`) and mount system calls, so the node plugin calls it from a blocking
//! thread (`spawn_blocking`); frontends that need the async runtime keep a
//! [`tokio::runtime::Handle`].

pub mod fuse_loop;
pub mod nbd;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::Volume;

/// The kinds of frontend of ARCHITECTURE §4, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    /// `ublk` (Linux ≥ 6.0, `/dev/ublk-control`).
    Ublk,
    /// The kernel NBD client (`nbd` module, `/dev/nbdN`).
    KernelNbd,
    /// One-file FUSE filesystem + loop device.
    FuseLoop,
    /// An NBD export on a unix socket (no kernel device).
    NbdUnix,
}

impl FrontendKind {
    pub const ALL: [FrontendKind; 4] = [
        FrontendKind::Ublk,
        FrontendKind::KernelNbd,
        FrontendKind::FuseLoop,
        FrontendKind::NbdUnix,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::Ublk => "ublk",
            FrontendKind::KernelNbd => "nbd",
            FrontendKind::FuseLoop => "fuse-loop",
            FrontendKind::NbdUnix => "nbd-unix",
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a frontend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The kind cannot be used on this node (missing kernel support, device node or tool, or
    /// not implemented yet). Nothing was attached.
    #[error("frontend {kind} is unavailable: {reason}")]
    Unavailable { kind: FrontendKind, reason: String },

    /// A system call or file operation failed.
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },

    /// An external command (`losetup`, `umount`) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    /// The frontend was used in a way it cannot serve (for example without a multi-threaded
    /// tokio runtime).
    #[error("invalid frontend use: {0}")]
    Invalid(String),
}

impl FrontendError {
    pub(crate) fn io(op: impl Into<String>, source: io::Error) -> Self {
        FrontendError::Io {
            op: op.into(),
            source,
        }
    }
}

/// What an attachment exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachTarget {
    /// A block device node such as `/dev/loop3`.
    Device(PathBuf),
    /// A unix socket serving the volume as NBD export `export` (and as the default export).
    NbdSocket { path: PathBuf, export: String },
}

impl AttachTarget {
    pub fn path(&self) -> &Path {
        match self {
            AttachTarget::Device(path) => path,
            AttachTarget::NbdSocket { path, .. } => path,
        }
    }
}

/// Frontend-specific state of one attachment; detaching consumes it.
pub trait AttachmentState: Send + fmt::Debug {
    /// Tears the attachment down. Must be safe to call after a partial failure and must try
    /// every step even when an earlier one failed (reporting the first error).
    fn detach(&mut self) -> Result<(), FrontendError>;

    /// Makes the kernel device follow the volume's current size after it grew. Frontends
    /// without a kernel device have nothing to do.
    fn refresh_size(&mut self) -> Result<(), FrontendError> {
        Ok(())
    }
}

/// A volume attached through a frontend. Dropping it detaches best-effort (errors are logged);
/// call [`Attachment::detach`] to see them.
#[derive(Debug)]
pub struct Attachment {
    kind: FrontendKind,
    volume: String,
    target: AttachTarget,
    state: Option<Box<dyn AttachmentState>>,
}

impl Attachment {
    pub fn new(
        kind: FrontendKind,
        volume: impl Into<String>,
        target: AttachTarget,
        state: Box<dyn AttachmentState>,
    ) -> Self {
        Attachment {
            kind,
            volume: volume.into(),
            target,
            state: Some(state),
        }
    }

    pub fn kind(&self) -> FrontendKind {
        self.kind
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn target(&self) -> &AttachTarget {
        &self.target
    }

    /// Makes the kernel device follow the volume's size after the volume grew.
    pub fn refresh_size(&mut self) -> Result<(), FrontendError> {
        match self.state.as_mut() {
            Some(state) => state.refresh_size(),
            None => Ok(()),
        }
    }

    pub fn detach(mut self) -> Result<(), FrontendError> {
        match self.state.take() {
            Some(mut state) => state.detach(),
            None => Ok(()),
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(mut state) = self.state.take()
            && let Err(e) = state.detach()
        {
            tracing::warn!(volume = %self.volume, kind = %self.kind, error = %e,
                "detach on drop failed");
        }
    }
}

/// Exposes volumes through one kind of frontend.
pub trait Frontend: Send + Sync {
    fn kind(&self) -> FrontendKind;

    /// Exposes `volume`; returns the device or socket. Blocking (see the module docs).
    fn attach(&self, volume: Arc<Volume>) -> Result<Attachment, FrontendError>;

    /// Removes an attachment made by this frontend.
    fn detach(&self, attachment: Attachment) -> Result<(), FrontendError> {
        attachment.detach()
    }
}

/// A frontend kind this node cannot use: `attach` always fails with
/// [`FrontendError::Unavailable`] and the reason from [`detect_available`].
#[derive(Debug, Clone)]
pub struct UnavailableFrontend {
    pub kind: FrontendKind,
    pub reason: String,
}

impl Frontend for UnavailableFrontend {
    fn kind(&self) -> FrontendKind {
        self.kind
    }

    fn attach(&self, _volume: Arc<Volume>) -> Result<Attachment, FrontendError> {
        Err(FrontendError::Unavailable {
            kind: self.kind,
            reason: self.reason.clone(),
        })
    }
}

/// Whether a frontend kind can be used here, and why (not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    pub kind: FrontendKind,
    pub available: bool,
    pub reason: String,
}

/// Checks at run time which frontend kinds this node can use.
///
/// Only presence is checked (device nodes, sysfs, tools on `PATH`): whether this process may
/// open them (root, `CAP_SYS_ADMIN`, device cgroup) is found out by `attach`.
pub fn detect_available() -> Vec<Availability> {
    detect_in(Path::new("/"))
}

/// [`detect_available`] against another root directory (tests).
pub fn detect_in(root: &Path) -> Vec<Availability> {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let exists = |p: &str| at(p).exists();
    let mut out = Vec::with_capacity(FrontendKind::ALL.len());

    // ublk: the control device exists once `ublk_drv` is loaded (Linux ≥ 6.0).
    out.push(if exists("/dev/ublk-control") {
        Availability {
            kind: FrontendKind::Ublk,
            available: false,
            reason: "/dev/ublk-control present, but the ublk frontend is not implemented yet"
                .into(),
        }
    } else {
        Availability {
            kind: FrontendKind::Ublk,
            available: false,
            reason: "no /dev/ublk-control (ublk_drv not loaded or kernel < 6.0)".into(),
        }
    });

    // Kernel NBD: the module is loaded (or built in) when /sys/module/nbd exists, and it
    // creates /dev/nbd0.. at load time.
    let nbd_module = exists("/sys/module/nbd");
    let nbd_dev = exists("/dev/nbd0");
    out.push(Availability {
        kind: FrontendKind::KernelNbd,
        available: false,
        reason: match (nbd_module, nbd_dev) {
            (false, false) => "no /sys/module/nbd and no /dev/nbd0 (nbd module not loaded)".into(),
            _ => "nbd module present, but the kernel-nbd frontend is not implemented yet".into(),
        },
    });

    // fuse-loop: /dev/fuse, /dev/loop-control and losetup.
    let mut missing = Vec::new();
    if !exists("/dev/fuse") {
        missing.push("/dev/fuse");
    }
    if !exists("/dev/loop-control") {
        missing.push("/dev/loop-control");
    }
    if find_in_path("losetup").is_none() {
        missing.push("losetup on PATH");
    }
    out.push(Availability {
        kind: FrontendKind::FuseLoop,
        available: missing.is_empty(),
        reason: if missing.is_empty() {
            "/dev/fuse, /dev/loop-control and losetup present".into()
        } else {
            format!("missing {}", missing.join(", "))
        },
    });

    out.push(Availability {
        kind: FrontendKind::NbdUnix,
        available: true,
        reason: "needs only a unix socket".into(),
    });
    out
}

/// The first `tool` on `PATH` (plus `/sbin` and `/usr/sbin`, where losetup lives but which a
/// non-login PATH may lack).
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}
