//! `tessera-csi`: the CSI controller and node plugin.

use anyhow::Result;
use clap::Parser;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = tessera_csi::cli::Cli::parse();
    tessera_csi::cli::run(cli, tessera_csi::csi::shutdown_signal()).await
}
