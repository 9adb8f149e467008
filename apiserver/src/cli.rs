//! Command line of `tessera-apiserver`, kept in the library so that `tessera component apiserver`
//! (the child process `tessera local` starts) runs exactly the same code.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Embedded, persisted Kubernetes-compatible API server (CRDs, custom resources, Namespaces,
/// Nodes, Events, Leases).
#[derive(Debug, Parser)]
#[command(name = "tessera-apiserver", version)]
pub struct Args {
    /// Directory holding the persisted state.
    #[arg(long, env = "TESSERA_APISERVER_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    /// Where to write a kubeconfig for this server (default: <data-dir>/kubeconfig).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Once serving, write `{"url": …, "kubeconfig": …}` to this file (atomically), so a
    /// supervisor that started the server on port 0 learns where it listens.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Number of change events kept for watches and paginated lists.
    #[arg(long, default_value_t = 10_000)]
    pub history_window: usize,
    /// Interval of periodic watch bookmarks, in seconds.
    #[arg(long, default_value_t = 60)]
    pub bookmark_interval_seconds: u64,
    /// Do not fsync the log (faster, loses acknowledged writes on power failure).
    #[arg(long)]
    pub no_fsync: bool,
}

/// What `--ready-file` holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadyFile {
    pub url: String,
    pub kubeconfig: Option<PathBuf>,
}

/// Serves until `shutdown` resolves, then shuts the server down.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut builder = crate::ApiServer::builder()
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
    if let Some(path) = &args.ready_file {
        let ready = ReadyFile {
            url: server.url().to_string(),
            kubeconfig: server.kubeconfig_path().map(Path::to_path_buf),
        };
        write_atomically(path, &serde_json::to_vec_pretty(&ready)?)
            .with_context(|| format!("writing the ready file {}", path.display()))?;
    }
    shutdown.await;
    server.shutdown().await;
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
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

/// The default log setup of the binary: `RUST_LOG` or `info`, on stderr.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: `tessera local` sends this to a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
