//! The tessera operator: pure planners (no I/O) and the controllers that apply their decisions.

pub mod planners;
