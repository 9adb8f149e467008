//! Shared harness of the CSI conformance tests: a tonic channel over a CSI unix socket, and the
//! capability builders every sanity case uses.

#![allow(dead_code)]

pub mod cluster;

use std::path::Path;
use std::time::Duration;

use tessera_proto::csi::v1::VolumeCapability;
use tessera_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use tonic::transport::Channel;

/// A channel to the CSI endpoint at `socket`, waiting (10 s at most) for the socket to appear.
pub async fn connect(socket: &Path) -> Channel {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "CSI socket {} did not appear",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tessera_csi::csi::connect_unix(socket)
        .await
        .expect("CSI socket connects")
}

pub fn capability(mode: Mode, block: bool) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                mount_flags: Vec::new(),
                volume_mount_group: String::new(),
            })
        }),
    }
}

/// SINGLE_NODE_WRITER with a filesystem: what the sanity suite uses by default.
pub fn single_writer_mount() -> VolumeCapability {
    capability(Mode::SingleNodeWriter, false)
}

pub fn multi_writer_block() -> VolumeCapability {
    capability(Mode::MultiNodeMultiWriter, true)
}

/// Asserts the gRPC code of a failed call and returns its message.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
) -> String {
    match result {
        Ok(response) => panic!("expected {code:?}, got OK: {:?}", response.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), code, "{}", status.message());
            status.message().to_owned()
        }
    }
}
