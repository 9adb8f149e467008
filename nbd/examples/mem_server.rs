//! Serves an in-memory export named `vol` over a unix socket and/or TCP, for trying stock NBD
//! clients by hand:
//!
//! ```text
//! cargo run -p tessera-nbd --example mem_server -- --unix /tmp/vol.sock --tcp 127.0.0.1:10809 --size-mib 64
//! nbdinfo 'nbd+unix:///vol?socket=/tmp/vol.sock'
//! qemu-io -f raw nbd://127.0.0.1:10809/vol -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
//! ```
//!
//! Both listeners accept every client (`AllowAll`); see the crate docs for token auth.

use std::sync::Arc;
use tessera_nbd::{AllowAll, CancellationToken, MemExport, Server, SimpleCatalog};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut unix = None;
    let mut tcp = None;
    let mut size_mib = 64u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--unix" => unix = args.next(),
            "--tcp" => tcp = args.next(),
            "--size-mib" => size_mib = args.next().and_then(|s| s.parse().ok()).unwrap_or(64),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: [--unix PATH] [--tcp ADDR] [--size-mib N]"
                );
                std::process::exit(2);
            }
        }
    }
    let catalog = Arc::new(SimpleCatalog::new());
    catalog.insert_with_description(
        "vol",
        Arc::new(MemExport::new(size_mib << 20)),
        "in-memory test volume",
    );
    let server = Server::new(catalog, Arc::new(AllowAll));
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    if let Some(path) = unix {
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path)?;
        eprintln!("serving nbd+unix:///vol?socket={path}");
        let (s, sd) = (server.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move { s.serve_unix(l, sd).await }));
    }
    if let Some(addr) = tcp {
        let l = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("serving nbd://{}/vol", l.local_addr()?);
        let (s, sd) = (server.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move { s.serve_tcp(l, sd).await }));
    }
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
