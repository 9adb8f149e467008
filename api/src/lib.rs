//! The tessera.io API: custom resource types (`v1alpha1`) and the shared domain model
//! (`model`): extent maps, generations and map diffs. Nothing here does I/O.

pub mod crds;
pub mod model;
pub mod v1alpha1;
