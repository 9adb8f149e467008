//! `tessera-operator`: the tessera control plane.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "tessera-operator", version, about = "The tessera storage operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CustomResourceDefinitions of every tessera kind, one YAML file per kind.
    Crdgen {
        /// Directories to write into (each gets every file; stale tessera CRD files are removed).
        #[arg(default_values = ["crds", "charts/tessera/crds"])]
        out: Vec<PathBuf>,
        /// Print all CRDs to stdout as one multi-document YAML instead of writing files.
        #[arg(long)]
        stdout: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Crdgen { out, stdout } => crdgen(&out, stdout),
    }
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
