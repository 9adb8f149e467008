//! A growable bitmap of atomic words, one bit per extent.
//!
//! The hot path (a write setting its extents' bits) is lock-free: one atomic pointer load of the
//! chunk list, then `fetch_or`/`fetch_and` on a word, whose previous value says whether the bit
//! transitioned (seed 000 Fig. 8: only 0→1 and 1→0 transitions count). Growing (a volume
//! expansion) appends chunks to a new list that shares the old chunks, so a writer still holding
//! the old list updates the same words and no bit is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use roaring::RoaringBitmap;

/// Words per chunk: 1024 words = 65 536 extents (256 GiB of 4 MiB extents) per 8 KiB chunk.
const CHUNK_WORDS: usize = 1024;
const CHUNK_BITS: u64 = (CHUNK_WORDS * 64) as u64;

type Chunk = [AtomicU64];

pub(crate) struct AtomicBitmap {
    chunks: ArcSwap<Vec<Arc<Chunk>>>,
}

fn new_chunk() -> Arc<Chunk> {
    (0..CHUNK_WORDS).map(|_| AtomicU64::new(0)).collect()
}

impl AtomicBitmap {
    /// A bitmap with room for at least `bits` bits, all clear.
    pub(crate) fn new(bits: u64) -> Self {
        let bitmap = AtomicBitmap {
            chunks: ArcSwap::from_pointee(Vec::new()),
        };
        bitmap.grow(bits);
        bitmap
    }

    /// Makes room for `bits` bits (never shrinks). Callers serialise growth.
    pub(crate) fn grow(&self, bits: u64) {
        let wanted = bits.div_ceil(CHUNK_BITS) as usize;
        let current = self.chunks.load();
        if current.len() >= wanted {
            return;
        }
        let mut chunks = Vec::clone(&current);
        chunks.resize_with(wanted, new_chunk);
        self.chunks.store(Arc::new(chunks));
    }

    /// A consistent view of the chunk list for a batch of updates.
    pub(crate) fn view(&self) -> BitmapView {
        BitmapView {
            chunks: self.chunks.load_full(),
        }
    }

    /// The set bits. Each word is read atomically; words are not read at one instant.
    pub(crate) fn to_roaring(&self) -> RoaringBitmap {
        self.collect(|word| word.load(Ordering::SeqCst))
    }

    /// The set bits, clearing each word in the same atomic step (so a bit set concurrently is
    /// either returned now or stays set for the next call).
    pub(crate) fn take(&self) -> RoaringBitmap {
        self.collect(|word| word.swap(0, Ordering::SeqCst))
    }

    /// Clears every bit.
    pub(crate) fn clear_all(&self) {
        let _ = self.take();
    }

    fn collect(&self, mut read: impl FnMut(&AtomicU64) -> u64) -> RoaringBitmap {
        let chunks = self.chunks.load();
        let mut out = RoaringBitmap::new();
        for (c, chunk) in chunks.iter().enumerate() {
            for (w, word) in chunk.iter().enumerate() {
                let mut bits = read(word);
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let index = c as u64 * CHUNK_BITS + w as u64 * 64 + bit;
                    // Volumes are limited to u32::MAX + 1 extents at open (RoaringBitmap indices).
                    if let Ok(index) = u32::try_from(index) {
                        out.insert(index);
                    }
                }
            }
        }
        out
    }
}

/// A pinned chunk list; indices beyond it are ignored (they cannot be addressed by a map the
/// bitmap was grown for).
pub(crate) struct BitmapView {
    chunks: Arc<Vec<Arc<Chunk>>>,
}

impl BitmapView {
    fn word(&self, index: u64) -> Option<(&AtomicU64, u64)> {
        let chunk = self.chunks.get((index / CHUNK_BITS) as usize)?;
        let within = index % CHUNK_BITS;
        Some((&chunk[(within / 64) as usize], 1u64 << (within % 64)))
    }

    /// Sets the bit; true when it was clear (a 0→1 transition).
    pub(crate) fn set(&self, index: u64) -> bool {
        self.word(index)
            .is_some_and(|(word, mask)| word.fetch_or(mask, Ordering::SeqCst) & mask == 0)
    }

    /// Clears the bit; true when it was set (a 1→0 transition).
    pub(crate) fn clear(&self, index: u64) -> bool {
        self.word(index)
            .is_some_and(|(word, mask)| word.fetch_and(!mask, Ordering::SeqCst) & mask != 0)
    }

    #[cfg(test)]
    pub(crate) fn get(&self, index: u64) -> bool {
        self.word(index)
            .is_some_and(|(word, mask)| word.load(Ordering::SeqCst) & mask != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_growth_and_take() {
        let bitmap = AtomicBitmap::new(10);
        let view = bitmap.view();
        assert!(view.set(3));
        assert!(!view.set(3));
        assert!(view.get(3));
        assert!(view.clear(3));
        assert!(!view.clear(3));
        // A bit past the first chunk is ignored until the bitmap grows.
        assert!(!view.set(CHUNK_BITS + 1));
        bitmap.grow(CHUNK_BITS + 2);
        // The old view still shares chunk 0 with the grown bitmap.
        assert!(view.set(5));
        let grown = bitmap.view();
        assert!(grown.get(5));
        assert!(grown.set(CHUNK_BITS + 1));
        let set: Vec<u32> = bitmap.to_roaring().iter().collect();
        assert_eq!(set, vec![5, CHUNK_BITS as u32 + 1]);
        assert_eq!(bitmap.take().len(), 2);
        assert!(bitmap.to_roaring().is_empty());
    }
}
