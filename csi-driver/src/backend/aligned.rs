//! Page-aligned heap buffers for `O_DIRECT` I/O.
//!
//! `O_DIRECT` needs the memory, the file offset and the length aligned to the device's logical
//! block size; we use [`DIRECT_ALIGN`] (4096), which satisfies every device and filesystem we run
//! on. A filled buffer turns into [`Bytes`] without a copy ([`Bytes::from_owner`]).

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use bytes::Bytes;

/// Alignment of memory, offsets and lengths on the `O_DIRECT` path.
pub const DIRECT_ALIGN: usize = 4096;

/// A zero-initialised heap buffer whose first byte is [`DIRECT_ALIGN`]-aligned.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Option<Layout>,
}

// SAFETY: the buffer owns its allocation exclusively; it is plain bytes.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (its capacity is rounded up to the alignment).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::<u8>::dangling(),
                len: 0,
                layout: None,
            };
        }
        let size = len.next_multiple_of(DIRECT_ALIGN);
        let layout = match Layout::from_size_align(size, DIRECT_ALIGN) {
            Ok(layout) => layout,
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len,
            layout: Some(layout),
        }
    }

    /// An aligned copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (or dangling with `len` 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Hands the buffer to [`Bytes`] without copying.
    pub fn into_bytes(self) -> Bytes {
        if self.len == 0 {
            return Bytes::new();
        }
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            // SAFETY: allocated in `zeroed` with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// Whether memory at `ptr`, file offset `offset` and length `len` suit `O_DIRECT`.
pub fn is_direct_aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN) && len > 0
}

/// Whether `data`'s memory starts on a [`DIRECT_ALIGN`] boundary.
pub fn is_memory_aligned(data: &[u8]) -> bool {
    (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let buf = AlignedBuf::zeroed(5000);
        assert_eq!(buf.len(), 5000);
        assert!(is_memory_aligned(buf.as_slice()));
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        let bytes = AlignedBuf::copy_from(&[7u8; 4096]).into_bytes();
        assert!(is_memory_aligned(&bytes));
        assert_eq!(&bytes[..], &[7u8; 4096][..]);
        assert!(AlignedBuf::zeroed(0).into_bytes().is_empty());
        assert!(is_direct_aligned(8192, 4096));
        assert!(!is_direct_aligned(512, 4096));
        assert!(!is_direct_aligned(0, 0));
    }
}
