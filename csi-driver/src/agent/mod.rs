//! The node agent (seed 001 agent, seed 002 manager): registers this node's StorageAreas and
//! heartbeats them, runs the extent server for peers, serves node-control, and keeps the
//! mapping cache on local disk.
