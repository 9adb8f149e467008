//! Domain model (no I/O).
