//! NBD protocol (being written).
