//! `tessera.io/v1alpha1`: the seven custom resources of ARCHITECTURE §3.
//!
//! These are the persisted (wire) types. The domain model they are converted to lives in
//! [`crate::model`]; keeping the two apart lets the schema evolve without touching planners.

// kube's derive takes one `printcolumn(...)` attribute per column, which clippy reads as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

mod area;
mod claim;
mod common;
mod convert;
mod mirror;
mod pool;
mod priority_class;
mod remap;
mod volume;

pub use area::*;
pub use claim::*;
pub use common::*;
pub use convert::MappingConversionError;
pub use mirror::*;
pub use pool::*;
pub use priority_class::*;
pub use remap::*;
pub use volume::*;

pub mod usage_report;

/// API group of every tessera kind.
pub const GROUP: &str = "tessera.io";
/// API version of this module.
pub const VERSION: &str = "v1alpha1";
