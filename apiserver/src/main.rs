//! `tessera-apiserver`: runs the embedded Kubernetes-compatible API server until interrupted
//! (the command line lives in `tessera_apiserver::cli`, shared with `tessera component`).

use clap::Parser;
use tessera_apiserver::cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli::init_tracing();
    cli::run(cli::Args::parse(), cli::shutdown_signal()).await
}
