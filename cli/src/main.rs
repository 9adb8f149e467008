//! `tessera`: the command line, and the executable `tessera local` runs its children with.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // `tessera component …` (a child of `tessera local`) runs and exits here.
    tessera::component::main_if_requested();
    match tessera::commands::run(tessera::commands::Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            ExitCode::FAILURE
        }
    }
}
