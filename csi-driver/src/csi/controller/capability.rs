//! Which volume capabilities tessera serves.
//!
//! Every single-node access mode is served: the volume has one borrower at a time (seed 001
//! [0028]), recorded in `VirtualVolume.spec.accessNode`. MULTI_NODE_MULTI_WRITER is served for
//! Block volumes only: several nodes translate the same volume (`spec.sharedAccessNodes`) and
//! the workload coordinates its writes, as with any shared block device; a filesystem mounted
//! on two nodes at once would be corrupted. The multi-node reader and single-writer modes are
//! not served (there is no read-only export).

use tessera_proto::csi::v1::VolumeCapability;
use tessera_proto::csi::v1::volume_capability::{AccessType, access_mode::Mode};

use super::error::{Error, Result};

/// How a publish records its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// One borrower: `spec.accessNode`.
    Single,
    /// A MULTI_NODE_MULTI_WRITER Block volume: `spec.sharedAccessNodes`.
    Multi,
}

impl Access {
    /// The `tessera.io/access` publish_context value.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Single => "single",
            Access::Multi => "multi",
        }
    }
}

/// Checks one capability; `Ok` says how a publish with it records the node.
pub fn check(capability: &VolumeCapability) -> Result<Access> {
    let mode = capability
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume capability without access_mode".into()))?
        .mode();
    let block = match &capability.access_type {
        Some(AccessType::Block(_)) => true,
        Some(AccessType::Mount(_)) => false,
        None => {
            return Err(Error::InvalidArgument(
                "volume capability without access_type (block or mount)".into(),
            ));
        }
    };
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => Ok(Access::Single),
        Mode::MultiNodeMultiWriter if block => Ok(Access::Multi),
        Mode::MultiNodeMultiWriter => Err(Error::InvalidArgument(
            "MULTI_NODE_MULTI_WRITER is supported for Block volumes only: a filesystem mounted \
             on several nodes at once would be corrupted"
                .into(),
        )),
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter => {
            Err(Error::InvalidArgument(format!(
                "access mode {} is not supported: a volume has one borrower at a time (seed 001 \
                 [0028]), or several writers for Block volumes",
                mode.as_str_name()
            )))
        }
        Mode::Unknown => Err(Error::InvalidArgument(
            "volume capability with access mode UNKNOWN".into(),
        )),
    }
}

/// Checks a non-empty list of capabilities.
pub fn check_all(capabilities: &[VolumeCapability]) -> Result<()> {
    if capabilities.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities must not be empty".into(),
        ));
    }
    capabilities.iter().try_for_each(|c| check(c).map(|_| ()))
}

/// Whether a node must grow the filesystem after ControllerExpandVolume (Mount volumes; an
/// unknown capability is treated as Mount).
pub fn needs_node_expansion(capability: Option<&VolumeCapability>) -> bool {
    !matches!(
        capability.and_then(|c| c.access_type.as_ref()),
        Some(AccessType::Block(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::csi::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, block: bool) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume::default())
            }),
        }
    }

    #[test]
    fn single_node_modes_take_one_borrower_and_multi_writers_need_block() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            for block in [false, true] {
                assert_eq!(check(&cap(mode, block)).unwrap(), Access::Single);
            }
        }
        assert_eq!(
            check(&cap(Mode::MultiNodeMultiWriter, true)).unwrap(),
            Access::Multi
        );
        for (mode, block) in [
            (Mode::MultiNodeMultiWriter, false),
            (Mode::MultiNodeReaderOnly, true),
            (Mode::MultiNodeSingleWriter, true),
            (Mode::Unknown, true),
        ] {
            assert!(matches!(
                check(&cap(mode, block)),
                Err(Error::InvalidArgument(_))
            ));
        }
        assert!(check_all(&[]).is_err());
        assert!(needs_node_expansion(Some(&cap(
            Mode::SingleNodeWriter,
            false
        ))));
        assert!(!needs_node_expansion(Some(&cap(
            Mode::SingleNodeWriter,
            true
        ))));
        assert!(needs_node_expansion(None));
    }
}
