//! CSI Node service (node mode).

use std::path::PathBuf;

use anyhow::{Result, bail};

/// Node-mode options.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {}

/// Serves Identity + Node and runs the node agent until `shutdown`.
pub async fn serve(
    _driver_name: &str,
    _client: kube::Client,
    _args: NodeArgs,
    socket: PathBuf,
    _shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    bail!(
        "the CSI node service is not implemented yet (socket {})",
        socket.display()
    )
}
