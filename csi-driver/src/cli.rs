//! Command line of `tessera-csi` (also embedded by `tessera local`, which runs it as a child
//! process of the `tessera` binary).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use crate::csi::{controller::ControllerArgs, node::NodeArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// CSI Identity + Controller: turns CSI calls into StorageClaims and attachments.
    Controller,
    /// CSI Identity + Node, plus the node agent: areas, extent server, node-control, engine.
    Node,
}

#[derive(Debug, Parser)]
#[command(name = "tessera-csi", version, about = "The tessera CSI driver")]
pub struct Cli {
    /// Which CSI services to run.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// CSI endpoint: `unix:///path/csi.sock` (the form kubelet and the sidecars use).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// Kubeconfig; default: in-cluster configuration or $KUBECONFIG / ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The CSI driver name reported by GetPluginInfo.
    #[arg(long, default_value = crate::csi::DRIVER_NAME)]
    pub driver_name: String,
    #[command(flatten)]
    pub controller: ControllerArgs,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// The unix socket path of a `unix://` CSI endpoint.
pub fn unix_socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .with_context(|| format!("CSI endpoint {endpoint:?} must be unix:///path"))?;
    anyhow::ensure!(
        path.starts_with('/'),
        "CSI endpoint {endpoint:?} must name an absolute path (unix:///path)"
    );
    Ok(PathBuf::from(path))
}

/// A kube client from an explicit kubeconfig, or the usual inference.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .context("loading kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("inferring the Kubernetes configuration")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Runs the services of `cli.mode` until `shutdown` resolves.
pub async fn run(cli: Cli, shutdown: impl std::future::Future<Output = ()> + Send) -> Result<()> {
    let socket = unix_socket_path(&cli.endpoint)?;
    let client = kube_client(cli.kubeconfig.as_deref()).await?;
    match cli.mode {
        Mode::Controller => {
            crate::csi::controller::serve(
                &cli.driver_name,
                client,
                cli.controller,
                socket,
                shutdown,
            )
            .await
        }
        Mode::Node => {
            // Test builds only: FAILPOINTS (fail crate syntax) arms the node's fail points.
            #[cfg(feature = "failpoints")]
            let _failpoints = fail::FailScenario::setup();
            crate::csi::node::serve(&cli.driver_name, client, cli.node, socket, shutdown).await
        }
    }
}
