//! Command line of `tessera-operator`, kept in the library so that `tessera component operator`
//! (the child process `tessera local` starts) runs exactly the same code.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tessera-operator",
    version,
    about = "The tessera storage operator"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the CustomResourceDefinitions of every tessera kind, one YAML file per kind.
    Crdgen {
        /// Directories to write into (each gets every file; stale tessera CRD files are removed).
        #[arg(default_values = ["crds", "charts/tessera/crds"])]
        out: Vec<PathBuf>,
        /// Print all CRDs to stdout as one multi-document YAML instead of writing files.
        #[arg(long)]
        stdout: bool,
    },
    /// Run the controllers (while holding the leader Lease) and serve /metrics, /healthz and
    /// /readyz.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_addr: SocketAddr,
    /// Kubeconfig to use; default: in-cluster configuration or $KUBECONFIG / ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This replica's identity in the leader Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "tessera-operator")]
    pub lease_name: String,
    /// Seconds without a heartbeat after which an Online StorageArea becomes Offline.
    #[arg(long, default_value_t = 40)]
    pub area_heartbeat_timeout_seconds: u64,
    /// File holding the shared node-control token (the node agents' token). Without it the
    /// remap coordinator refuses remaps of attached volumes.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Namespace of the node Leases (`tessera-node-<node>`, the node agents' `--namespace`).
    #[arg(long, default_value = "default")]
    pub node_namespace: String,
}

/// Runs the command; `run` stops when `shutdown` resolves.
pub async fn run(cli: Cli, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    match cli.command {
        Command::Crdgen { out, stdout } => crdgen(&out, stdout),
        Command::Run(args) => run_controllers(args, shutdown).await,
    }
}

/// The default log setup of the binary: `RUST_LOG` or `info,kube=warn`, on stderr.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: `tessera local` sends this to a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

async fn run_controllers(
    args: RunArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use crate::controllers::{Config, Operator};
    let client = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .context("loading the kubeconfig")?;
            kube::Client::try_from(config).context("building the client")?
        }
        None => kube::Client::try_default()
            .await
            .context("building the client from the default configuration")?,
    };
    let identity = args.identity.unwrap_or_else(default_identity);
    let mut config = Config::new(identity);
    config.leader.namespace = args.lease_namespace;
    config.leader.lease_name = args.lease_name;
    config.area_heartbeat_timeout = Duration::from_secs(args.area_heartbeat_timeout_seconds);
    config.node_namespace = args.node_namespace;
    if let Some(path) = &args.token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading the node-control token {}", path.display()))?;
        config.node_token = Some(token.trim().to_string());
    }
    let operator = Operator::new(client, config);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: releasing the leader Lease");
        let _ = shutdown_tx.send(true);
    });
    let mut http_stop = shutdown_rx.clone();
    let (addr, http) = crate::metrics::serve(
        args.metrics_addr,
        operator.metrics(),
        operator.health(),
        async move {
            let _ = http_stop.wait_for(|s| *s).await;
        },
    )
    .await
    .with_context(|| format!("listening on {}", args.metrics_addr))?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    let mut stop = shutdown_rx;
    operator
        .run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    http.await.context("metrics server task")??;
    Ok(())
}

/// Ctrl-C or SIGTERM (what the kubelet sends).
pub async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `<hostname>-<pid>` when no identity is given.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "tessera-operator".into());
    format!("{host}-{}", std::process::id())
}

fn crdgen(dirs: &[PathBuf], stdout: bool) -> Result<()> {
    let rendered = tessera_api::crds::rendered().context("rendering CRDs")?;
    if stdout {
        for (_, yaml) in &rendered {
            print!("---\n{yaml}");
        }
        return Ok(());
    }
    for dir in dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Remove files of kinds that no longer exist, so the directory equals the types.
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tessera.io.yaml") && !rendered.iter().any(|(f, _)| f == name) {
                std::fs::remove_file(&path)?;
            }
        }
        for (file, yaml) in &rendered {
            let path = dir.join(file);
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
