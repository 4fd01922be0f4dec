//! Owned host memory for KV rows.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::TransferError;

/// Alignment of every arena: one cache line, and what AVX-512 loads like.
pub const ARENA_ALIGN: usize = 64;

/// Live allocation counters, shared by a backend and every arena it made.
#[derive(Debug, Default)]
pub struct AllocTracker {
    arenas: AtomicU64,
    bytes: AtomicU64,
}

/// A snapshot of [`AllocTracker`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Arenas alive.
    pub arenas: u64,
    /// Bytes held by live arenas.
    pub bytes: u64,
}

impl AllocTracker {
    /// Current counters.
    pub fn snapshot(&self) -> AllocStats {
        AllocStats {
            arenas: self.arenas.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// An owned, zeroed, 64-byte-aligned block of host memory, freed on drop.
///
/// Writers and readers share it through raw pointers: the owner (the KV store) guarantees that
/// no byte is written while it is read, by publishing row counts only after the rows are written.
#[derive(Debug)]
pub struct Arena {
    ptr: NonNull<u8>,
    len: usize,
    tracker: Arc<AllocTracker>,
}

// SAFETY: Arena owns its allocation outright (no aliasing owner); concurrent access to its bytes
// goes through raw pointers whose discipline the owner upholds, as documented on the type.
unsafe impl Send for Arena {}
// SAFETY: as above; &Arena hands out only raw pointers and lengths.
unsafe impl Sync for Arena {}

impl Arena {
    /// Allocates `len` zeroed bytes with plain `std::alloc`.
    pub fn host(len: usize, tracker: Arc<AllocTracker>) -> Result<Self, TransferError> {
        let layout = Layout::from_size_align(len.max(1), ARENA_ALIGN)
            .map_err(|e| TransferError::Alloc { bytes: len, reason: e.to_string() })?;
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)
            .ok_or_else(|| TransferError::Alloc { bytes: len, reason: "out of memory".into() })?;
        tracker.arenas.fetch_add(1, Ordering::Relaxed);
        tracker.bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok(Self { ptr, len, tracker })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-byte arena.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the block.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the block, for writers (see the type's note on sharing).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(1), ARENA_ALIGN)
            .expect("layout was valid at allocation");
        // SAFETY: ptr came from alloc_zeroed with this same layout and is freed once, here.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
        self.tracker.arenas.fetch_sub(1, Ordering::Relaxed);
        self.tracker.bytes.fetch_sub(self.len as u64, Ordering::Relaxed);
    }
}
