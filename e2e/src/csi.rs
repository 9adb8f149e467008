//! CSI over a unix socket, the transport kubelet and the sidecars use.

use std::path::{Path, PathBuf};

use tessera_proto::csi::v1::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};
use tonic::transport::Channel;

use crate::error::{E2eError, Result};

/// A channel to one CSI endpoint.
#[derive(Clone, Debug)]
pub struct CsiConnection {
    socket: PathBuf,
    channel: Channel,
}

impl CsiConnection {
    /// Connects to `socket`. The URI is a placeholder: the connector ignores it and dials the
    /// socket, as tonic has no unix scheme of its own.
    pub async fn connect(socket: &Path) -> Result<Self> {
        let channel = tessera_csi::csi::connect_unix(socket)
            .await
            .map_err(|source| E2eError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            channel,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }
}
