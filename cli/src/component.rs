//! `tessera component <apiserver|operator|csi> <args…>`: runs one component in this process,
//! with exactly the command line of its own binary. `tessera local` starts its children this
//! way, so one executable carries the whole system.

use std::ffi::OsString;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Component {
    /// `tessera-apiserver`: the embedded API server.
    Apiserver,
    /// `tessera-operator`.
    Operator,
    /// `tessera-csi`: the CSI controller or a node agent.
    Csi,
}

impl Component {
    pub fn binary_name(self) -> &'static str {
        match self {
            Component::Apiserver => "tessera-apiserver",
            Component::Operator => "tessera-operator",
            Component::Csi => "tessera-csi",
        }
    }
}

/// For binaries that embed `tessera` and serve as the child executable of `tessera local`:
/// call first thing in `main` (before any async runtime exists). When the process was started
/// as `<exe> component <name> <args…>` it runs that component and exits; otherwise it returns.
pub fn main_if_requested() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new("component")) {
        return;
    }
    let Some(name) = args.next() else {
        eprintln!("usage: tessera component <apiserver|operator|csi> <args…>");
        std::process::exit(2);
    };
    let Some(component) = name
        .to_str()
        .and_then(|n| Component::from_str(n, true).ok())
    else {
        eprintln!("unknown component {name:?}: expected apiserver, operator or csi");
        std::process::exit(2);
    };
    let code = match run(component, args.collect()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{}: {e:#}", component.binary_name());
            1
        }
    };
    std::process::exit(code);
}

/// Runs `component` with `args` (its own command line, without the program name) on a new
/// runtime until it stops on SIGTERM or Ctrl-C.
pub fn run(component: Component, args: Vec<OsString>) -> Result<()> {
    let argv = std::iter::once(OsString::from(component.binary_name())).chain(args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match component {
        Component::Apiserver => {
            let args = tessera_apiserver::cli::Args::parse_from(argv);
            tessera_apiserver::cli::init_tracing();
            runtime.block_on(tessera_apiserver::cli::run(
                args,
                tessera_apiserver::cli::shutdown_signal(),
            ))
        }
        Component::Operator => {
            let cli = tessera_operator::cli::Cli::parse_from(argv);
            tessera_operator::cli::init_tracing();
            runtime.block_on(tessera_operator::cli::run(
                cli,
                tessera_operator::cli::wait_for_signal(),
            ))
        }
        Component::Csi => {
            let cli = tessera_csi::cli::Cli::parse_from(argv);
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
                )
                .with_writer(std::io::stderr)
                // Colours only on a terminal: `tessera local` sends this to a log file.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .try_init();
            runtime.block_on(tessera_csi::cli::run(
                cli,
                tessera_csi::csi::shutdown_signal(),
            ))
        }
    }
}
