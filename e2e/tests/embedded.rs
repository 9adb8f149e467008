//! The end-to-end scenarios against the embedded default (`tessera local` started in a
//! temporary directory), or against the environment named by `TESSERA_E2E_ENDPOINTS` /
//! `TESSERA_E2E_KUBECONFIG` (see `e2e/README.md`).
//!
//! A custom `main` (`harness = false`): this binary is also the child executable of the local
//! cluster (`<exe> component <apiserver|operator|csi> …`), so it must hand over to
//! `tessera::component` before anything else happens.
//!
//! Arguments: names (or parts of names) select scenarios; `--list` lists them.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tessera::local::{LocalCluster, LocalConfig};
use tessera_e2e::scenarios::{self, Outcome, Scenario};
use tessera_e2e::{E2eError, Environment, Options};

/// Small sparse areas (6 × 256 MiB = 384 extents of 4 MiB) so the reclaim scenario fills the
/// pool with a handful of claims.
const AREA_SIZE: u64 = 256 << 20;
const NODES: usize = 3;

fn main() -> ExitCode {
    tessera::component::main_if_requested();

    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let selected: Vec<Scenario> = scenarios::all()
        .into_iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.name.contains(f)))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for s in &selected {
            println!("{}: test", s.name);
        }
        return ExitCode::SUCCESS;
    }
    if selected.is_empty() {
        println!("no scenario matches {filters:?}");
        return ExitCode::SUCCESS;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&selected)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("end-to-end setup failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenarios; `Ok(false)` when any failed.
async fn run(selected: &[Scenario]) -> anyhow::Result<bool> {
    let mut scratch = tempfile::Builder::new()
        .prefix("tessera-e2e-")
        .tempdir()
        .context("creating a scratch directory")?;
    let work_dir = scratch.path().join("work");

    if let Some(env) = Environment::from_process_env(&work_dir).await? {
        println!(
            "running {} scenarios against {} (controller {}, nodes {})",
            selected.len(),
            env.kubeconfig.display(),
            env.controller_socket.display(),
            env.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(summarize(&run_scenarios(&env, selected).await));
    }

    let data_dir = scratch.path().join("local");
    let config = LocalConfig {
        nodes: NODES,
        area_size_bytes: AREA_SIZE,
        // Usage reports ride on the heartbeat; the reclaim scenario waits for one.
        heartbeat_seconds: 1,
        ready_timeout: Duration::from_secs(120),
        ..LocalConfig::new(&data_dir)
    };
    println!(
        "starting tessera local ({NODES} nodes, {} MiB areas) in {}",
        AREA_SIZE >> 20,
        data_dir.display()
    );
    let cluster = LocalCluster::start(config)
        .await
        .context("starting tessera local")?;
    let outcomes = run_against_local(&data_dir, &work_dir, selected).await;
    // Always stop the children, whatever happened above.
    let stop = cluster.stop().await;
    if !stop.clean() {
        println!(
            "warning: some components had to be killed: {:?}",
            stop.children
        );
    }
    let passed = match outcomes {
        Ok(outcomes) => summarize(&outcomes),
        Err(e) => {
            println!("FAILED to set up the scenarios: {e:#}");
            false
        }
    };
    if !passed {
        // Keep the logs of every component for whoever reads the failure.
        scratch.disable_cleanup(true);
        println!("component logs kept in {}", data_dir.join("logs").display());
    }
    Ok(passed)
}

async fn run_against_local(
    data_dir: &Path,
    work_dir: &Path,
    selected: &[Scenario],
) -> anyhow::Result<Vec<Outcome>> {
    // The local node agents run as this user: fuse-loop (the kernel frontend) needs root.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let options = Options {
        kernel_frontend: root,
        ..Options::new(work_dir)
    }
    .with_env_overrides()?;
    if !options.kernel_frontend {
        println!(
            "no kernel frontend (not root): Block volumes are staged and reached through their NBD \
             exports; filesystem scenarios are skipped"
        );
    }
    let env = Environment::from_endpoints(&data_dir.join("endpoints.json"), options).await?;
    Ok(run_scenarios(&env, selected).await)
}

async fn run_scenarios(env: &Environment, selected: &[Scenario]) -> Vec<Outcome> {
    scenarios::run(env, selected, |o| match &o.result {
        Ok(()) => println!("{} ... ok ({:.1}s)", o.name, o.elapsed.as_secs_f64()),
        Err(E2eError::Skipped(why)) => println!("{} ... skipped: {why}", o.name),
        Err(e) => println!(
            "{} ... FAILED ({:.1}s): {e}",
            o.name,
            o.elapsed.as_secs_f64()
        ),
    })
    .await
}

fn summarize(outcomes: &[Outcome]) -> bool {
    let skipped = outcomes
        .iter()
        .filter(|o| matches!(o.result, Err(E2eError::Skipped(_))))
        .count();
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count() - skipped;
    println!(
        "end-to-end: {} passed, {failed} failed, {skipped} skipped",
        outcomes.len() - failed - skipped
    );
    failed == 0
}
