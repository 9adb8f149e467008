//! `tessera-apiserver`: runs the embedded Kubernetes-compatible API server until interrupted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Embedded, persisted Kubernetes-compatible API server (CRDs, custom resources, Namespaces,
/// Nodes, Events, Leases).
#[derive(Debug, Parser)]
#[command(name = "tessera-apiserver", version)]
struct Args {
    /// Directory holding the persisted state.
    #[arg(long, env = "TESSERA_APISERVER_DATA_DIR")]
    data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Where to write a kubeconfig for this server (default: <data-dir>/kubeconfig).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Number of change events kept for watches and paginated lists.
    #[arg(long, default_value_t = 10_000)]
    history_window: usize,
    /// Interval of periodic watch bookmarks, in seconds.
    #[arg(long, default_value_t = 60)]
    bookmark_interval_seconds: u64,
    /// Do not fsync the log (faster, loses acknowledged writes on power failure).
    #[arg(long)]
    no_fsync: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut builder = tessera_apiserver::ApiServer::builder()
        .data_dir(&args.data_dir)
        .bind(args.listen)
        .history_window(args.history_window)
        .bookmark_interval(Duration::from_secs(args.bookmark_interval_seconds.max(1)))
        .fsync(!args.no_fsync);
    if let Some(k) = &args.kubeconfig {
        builder = builder.kubeconfig_path(k);
    }
    let server = builder.start().await.context("starting the API server")?;
    println!("listening on {}", server.url());
    if let Some(k) = server.kubeconfig_path() {
        println!("kubeconfig: {}", k.display());
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    server.shutdown().await;
    Ok(())
}
