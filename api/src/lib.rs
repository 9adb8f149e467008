//! The tessera.io API: custom resource types (`v1alpha1`) and the shared domain model
//! (`model`): extent maps, generations and map diffs. Nothing here does I/O.

// Seed paragraph citations such as [0045] are references to the patents, not doc links.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod crds;
pub mod model;
pub mod v1alpha1;
