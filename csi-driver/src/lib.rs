//! The tessera node data path and CSI services.
//!
//! - [`engine`]: volumes, translation through the active extent map, replicas, usage and dirty
//!   tracking.
//! - [`backend`]: where extents live: local files/devices, remote areas over NBD.

// Seed paragraph citations such as [0045] are references to the patents, not doc links.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod agent;
pub mod backend;
pub mod cli;
pub mod csi;
pub mod engine;
pub mod extent_server;
pub mod frontend;
