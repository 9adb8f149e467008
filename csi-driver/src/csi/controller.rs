//! CSI Controller service (controller mode).

use std::path::PathBuf;

use anyhow::{Result, bail};

/// Controller-mode options.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {}

/// Serves Identity + Controller on `socket` until `shutdown`.
pub async fn serve(
    _driver_name: &str,
    _client: kube::Client,
    _args: ControllerArgs,
    socket: PathBuf,
    _shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    bail!(
        "the CSI controller service is not implemented yet (socket {})",
        socket.display()
    )
}
