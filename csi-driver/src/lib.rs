//! The tessera node data path and CSI services.
//!
//! - [`engine`]: volumes, translation through the active extent map, replicas, usage and dirty
//!   tracking.
//! - [`backend`]: where extents live: local files/devices, remote areas over NBD.
