//! The `tessera` command line (glue: parsing, printing, exit codes).

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::component::Component;
use crate::local::{LocalCluster, LocalConfig};
use crate::tables::{self, Snapshot};

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "tessera: storage virtualization for Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system on this machine: API server, operator, CSI controller and node
    /// agents as child processes, all state under one data directory.
    Local(LocalArgs),
    /// Print the status tables of pools, areas, claims or volumes.
    Get {
        #[arg(value_enum)]
        what: GetWhat,
        #[command(flatten)]
        target: Target,
    },
    /// Attach a volume to a node of `tessera local` as a kernel block device (root).
    Attach {
        /// VirtualVolume name (or the name of a bound StorageClaim in namespace default).
        volume: String,
        /// Node to attach on (default: where it is attached, else the first node).
        #[arg(long)]
        node: Option<String>,
        /// Data directory of `tessera local`.
        #[arg(long, default_value = "./tessera-data")]
        data_dir: PathBuf,
    },
    /// Run one component in this process (how `tessera local` starts its children).
    #[command(hide = true)]
    Component {
        #[arg(value_enum)]
        component: Component,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// Where all state lives; running again with the same directory resumes.
    #[arg(long, default_value = "./tessera-data")]
    pub data_dir: PathBuf,
    /// Number of node agents (node-a, node-b, …), each with two areas.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Size of each area file (sparse), e.g. 1GiB or 268435456.
    #[arg(long, default_value = "1GiB", value_parser = crate::units::parse_bytes)]
    pub area_size_bytes: u64,
    /// Node frontend (auto, fuse-loop, nbd); default: the node agent's own (auto).
    #[arg(long)]
    pub frontend: Option<String>,
    /// Provision volumes through CSI, write and verify data through them, and show the status
    /// tables until Ctrl-C.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GetWhat {
    Pools,
    Areas,
    Claims,
    Volumes,
    All,
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// Kubeconfig of the cluster.
    #[arg(long, conflicts_with = "data_dir")]
    pub kubeconfig: Option<PathBuf>,
    /// Data directory of `tessera local` (its kubeconfig is used).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl Target {
    /// `--kubeconfig`, else `<data-dir>/kubeconfig`, else `./tessera-data/kubeconfig` when it
    /// exists, else the usual inference ($KUBECONFIG, ~/.kube/config, in-cluster).
    pub async fn client(&self) -> Result<kube::Client> {
        let path = match (&self.kubeconfig, &self.data_dir) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(d)) => Some(d.join("kubeconfig")),
            (None, None) => {
                let local = Path::new("./tessera-data/kubeconfig");
                local.exists().then(|| local.to_path_buf())
            }
        };
        match path {
            Some(path) => Ok(crate::local::client_from_kubeconfig(&path).await?),
            None => kube::Client::try_default()
                .await
                .context("no --kubeconfig or --data-dir, and no default configuration"),
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Component { component, args } = cli.command {
        crate::component::run(component, args)?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Local(args) => local(args).await,
            Command::Get { what, target } => {
                let client = target.client().await?;
                let snap = Snapshot::fetch(&client)
                    .await
                    .context("listing tessera objects")?;
                print!(
                    "{}",
                    match what {
                        GetWhat::Pools => tables::pools(&snap.pools),
                        GetWhat::Areas => tables::areas(&snap.areas),
                        GetWhat::Claims => tables::claims(&snap.claims),
                        GetWhat::Volumes => tables::volumes(&snap.volumes),
                        GetWhat::All => snap.render(),
                    }
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Attach {
                volume,
                node,
                data_dir,
            } => {
                let a = crate::attach::attach(&data_dir, &volume, node.as_deref()).await?;
                eprintln!(
                    "{} attached on {} (NBD: {})",
                    a.volume_id, a.node, a.nbd_uri
                );
                println!("{}", a.device);
                Ok(ExitCode::SUCCESS)
            }
            Command::Component { .. } => unreachable!("handled above"),
        }
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

enum Outcome {
    Interrupted,
    Died(crate::local::ChildDeath),
    DemoFailed(anyhow::Error),
}

async fn local(args: LocalArgs) -> Result<ExitCode> {
    let mut config = LocalConfig::new(&args.data_dir);
    config.nodes = args.nodes;
    config.area_size_bytes = args.area_size_bytes;
    config.frontend = args.frontend.clone();
    config.progress = true;
    // One signal listener for the whole run: Ctrl-C while starting stops what has started.
    let (interrupt_tx, mut interrupt) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = interrupt_tx.send(true);
    });
    let cluster = match LocalCluster::start_interruptible(config, interrupt.clone()).await {
        Ok(cluster) => cluster,
        Err(crate::local::LocalError::Interrupted) => {
            eprintln!("interrupted: stopped what had started");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    let endpoints = cluster.endpoints();
    let data_dir = cluster.data_dir().to_path_buf();
    eprintln!(
        "API server {}\n  kubectl --kubeconfig {} get tessera -A\n  endpoints: {}\n  logs: {}",
        endpoints.apiserver,
        endpoints.kubeconfig.display(),
        data_dir.join("endpoints.json").display(),
        data_dir.join("logs").display(),
    );
    let outcome = {
        let work = async {
            if args.demo {
                if let Err(e) = demo(&cluster, args.area_size_bytes).await {
                    return Outcome::DemoFailed(e);
                }
            } else {
                eprintln!("Running; Ctrl-C stops every component.");
            }
            std::future::pending().await
        };
        tokio::select! {
            _ = interrupt.wait_for(|i| *i) => Outcome::Interrupted,
            death = cluster.unexpected_exit() => Outcome::Died(death),
            outcome = work => outcome,
        }
    };
    match &outcome {
        Outcome::Interrupted => eprintln!("\nstopping…"),
        Outcome::Died(death) => eprintln!("\n✗ {death}\nstopping the other components…"),
        Outcome::DemoFailed(e) => eprintln!("\n✗ demo failed: {e:#}\nstopping…"),
    }
    let report = cluster.stop().await;
    for child in &report.children {
        eprintln!(
            "  {} {} ({})",
            if child.killed { "killed" } else { "stopped" },
            child.component,
            child.status
        );
    }
    Ok(match outcome {
        Outcome::Interrupted => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// Provisions the demo volumes, then redraws the status tables every 2 s until cancelled.
async fn demo(cluster: &LocalCluster, area_size: u64) -> Result<()> {
    let endpoints = cluster.endpoints();
    let nodes: Vec<String> = endpoints.nodes.iter().map(|n| n.name.clone()).collect();
    let plan = crate::demo::plan(&nodes, area_size);
    let provisioned = crate::demo::provision(&endpoints, cluster.data_dir(), &plan).await?;
    let endpoints = cluster.refresh_endpoints()?;
    let footer = crate::demo::footer(&endpoints, cluster.data_dir(), &provisioned);
    let client = cluster.client();
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let view = match Snapshot::fetch(&client).await {
            Ok(snap) => snap.render(),
            Err(e) => format!("cannot read the status: {e}\n"),
        };
        if tty {
            // Home + clear, then the whole view: one redraw per refresh.
            print!("\x1b[H\x1b[2J{view}\n{footer}Ctrl-C stops every component.\n");
        } else if view != last {
            print!("{view}\n{footer}\n");
        }
        last = view;
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}
