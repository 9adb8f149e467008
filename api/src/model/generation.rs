//! The mapping generation.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Version of a volume's mapping (`VirtualVolume.status.mapping.generation`).
///
/// It increases on every change of the mapping. Every backend request carries the generation it
/// was translated with, and nodes reject control messages for another generation, which is how
/// the remap protocol proves that no I/O lands on a stale mapping (seed 004 §11.6 invariants I1,
/// I2; ARCHITECTURE §4 "I/O gate", §6).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation of a freshly created, all-hole mapping.
    pub const INITIAL: Generation = Generation(0);

    pub const fn new(value: u64) -> Self {
        Generation(value)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The following generation.
    ///
    /// # Panics
    /// At `u64::MAX`. Generations come from the API as non-negative `i64`, so a generation read
    /// from the API can always be incremented; use [`Generation::checked_next`] for anything else.
    pub const fn next(self) -> Self {
        match self.checked_next() {
            Some(next) => next,
            None => panic!("mapping generation overflow"),
        }
    }

    /// The following generation, or `None` at `u64::MAX`.
    pub const fn checked_next(self) -> Option<Self> {
        match self.0.checked_add(1) {
            Some(v) => Some(Generation(v)),
            None => None,
        }
    }
}

impl From<u64> for Generation {
    fn from(value: u64) -> Self {
        Generation(value)
    }
}

impl From<Generation> for u64 {
    fn from(generation: Generation) -> u64 {
        generation.0
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_ordered_and_checked() {
        let g = Generation::INITIAL;
        assert!(g.next() > g);
        assert_eq!(g.next().get(), 1);
        assert_eq!(Generation(u64::MAX).checked_next(), None);
        assert_eq!(Generation(41).to_string(), "41");
        assert_eq!(
            serde_json::to_string(&Generation(7)).ok().as_deref(),
            Some("7")
        );
        assert_eq!(
            serde_json::from_str::<Generation>("7").ok(),
            Some(Generation(7))
        );
    }
}
