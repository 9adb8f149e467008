//! Pure planners (being written).
