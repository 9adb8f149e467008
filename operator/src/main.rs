//! `tessera-operator`: the tessera control plane (the command line lives in
//! `tessera_operator::cli`, shared with `tessera component operator`).

use anyhow::{Context, Result};
use clap::Parser;
use tessera_operator::cli;

fn main() -> Result<()> {
    let cli = cli::Cli::parse();
    if matches!(cli.command, cli::Command::Run(_)) {
        cli::init_tracing();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(cli::run(cli, cli::wait_for_signal()))
}
