//! `tessera-csi`: the CSI controller and node plugin.

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Controller,
    Node,
}

#[derive(Parser)]
#[command(name = "tessera-csi", version, about = "The tessera CSI driver")]
struct Cli {
    /// Which CSI services to run.
    #[arg(long, value_enum)]
    mode: Mode,
    /// CSI endpoint, e.g. unix:///csi/csi.sock
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    endpoint: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The CSI services, engine, frontends and extent server arrive with the data-path and CSI
    // issues; until then this binary refuses to start rather than pretend to serve.
    bail!(
        "tessera-csi --mode {:?} on {}: the CSI services are not implemented yet",
        cli.mode,
        cli.endpoint
    )
}
