//! The tessera operator: pure planners (no I/O) and the controllers that apply their decisions.

pub mod cli;
pub mod controllers;
pub mod leader;
pub mod metrics;
pub mod planners;
