//! Owned host memory for KV rows, and the counters that prove none of it leaks.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::inflight::{InFlight, Use};
use crate::TransferError;

/// Alignment of every arena: one cache line, and what AVX-512 loads like.
pub const ARENA_ALIGN: usize = 64;

/// Live allocation counters, shared by a backend and every arena it made, with the backend's
/// byte budget (`u64::MAX` when unbounded).
#[derive(Debug)]
pub struct AllocTracker {
    arenas: AtomicU64,
    bytes: AtomicU64,
    capacity: u64,
}

impl Default for AllocTracker {
    fn default() -> Self {
        Self::with_capacity(u64::MAX)
    }
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
    /// Counters with a budget of `capacity` bytes of live arenas.
    pub fn with_capacity(capacity: u64) -> Self {
        Self {
            arenas: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            capacity,
        }
    }

    /// Current counters.
    pub fn snapshot(&self) -> AllocStats {
        AllocStats {
            arenas: self.arenas.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    /// Takes `len` bytes of the budget, or says it is exhausted.
    pub(crate) fn reserve(&self, len: usize) -> Result<(), TransferError> {
        let len = len as u64;
        let before = self.bytes.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > self.capacity {
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(TransferError::Exhausted {
                requested: len,
                live: before,
                capacity: self.capacity,
            });
        }
        self.arenas.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Returns `len` bytes to the budget.
    pub(crate) fn release(&self, len: usize) {
        self.arenas.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len as u64, Ordering::Relaxed);
    }
}

/// Where an arena's bytes came from, which decides how they are freed and how fast random
/// reads from them are (hugepages spare the TLB on random row gathers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// `std::alloc`, for small arenas.
    Heap,
    /// `mmap(MAP_HUGETLB)`: reserved 2 MiB pages.
    HugeTlb,
    /// `mmap` + `madvise(MADV_HUGEPAGE)`: transparent hugepages, when the kernel allows.
    TransparentHuge,
    /// Plain anonymous `mmap`.
    Mmap,
    /// Page-locked through `cuMemHostAlloc`, so the GPU can DMA from it directly.
    CudaPinned,
}

/// An owned, zeroed, 64-byte-aligned block of host memory, freed on drop.
///
/// Writers and readers share it through raw pointers: the owner (the KV store) guarantees that
/// no byte is written while it is read, by publishing row counts only after the rows are written.
/// Dropping an arena first waits for every gather still reading it.
///
/// An arena is freed exactly once, by its `Drop`; freeing it twice does not compile:
/// ```compile_fail
/// let link = kvdex_transfer::HostLink::new();
/// let a = kvdex_transfer::DeviceLink::alloc_arena(&link, 4096).unwrap();
/// drop(a);
/// drop(a); // error[E0382]: use of moved value
/// ```
#[derive(Debug)]
pub struct Arena {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
    tracker: Arc<AllocTracker>,
    in_flight: Arc<InFlight>,
}

// SAFETY: Arena owns its allocation outright (no aliasing owner); concurrent access to its bytes
// goes through raw pointers whose discipline the owner upholds, as documented on the type.
unsafe impl Send for Arena {}
// SAFETY: as above; &Arena hands out only raw pointers and lengths.
unsafe impl Sync for Arena {}

impl Arena {
    /// Allocates `len` zeroed bytes with plain `std::alloc`.
    pub fn host(len: usize, tracker: Arc<AllocTracker>) -> Result<Self, TransferError> {
        let layout =
            Layout::from_size_align(len.max(1), ARENA_ALIGN).map_err(|e| TransferError::Alloc {
                bytes: len,
                reason: e.to_string(),
            })?;
        tracker.reserve(len)?;
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            tracker.release(len);
            return Err(TransferError::Alloc {
                bytes: len,
                reason: "out of memory".into(),
            });
        };
        Ok(Self {
            ptr,
            len,
            backing: Backing::Heap,
            tracker,
            in_flight: Default::default(),
        })
    }

    /// Allocates `len` zeroed bytes with `mmap`, asking for hugepages: reserved ones first,
    /// then transparent ones, then plain pages. Arenas under 2 MiB use [`Arena::host`].
    pub fn hugepage(len: usize, tracker: Arc<AllocTracker>) -> Result<Self, TransferError> {
        if len < crate::mmap::HUGE_PAGE {
            return Self::host(len, tracker);
        }
        tracker.reserve(len)?;
        match crate::mmap::map_anonymous(len) {
            Ok((ptr, backing)) => Ok(Self {
                ptr,
                len,
                backing,
                tracker,
                in_flight: Default::default(),
            }),
            Err(e) => {
                tracker.release(len);
                Err(e)
            }
        }
    }

    /// Wraps memory already allocated by `backing`'s allocator, counted in `tracker`.
    ///
    /// # Safety
    /// `ptr` must point to `len` zeroed bytes allocated by `backing`'s allocator, aligned to
    /// [`ARENA_ALIGN`], owned by nobody else; `tracker.reserve(len)` must have succeeded.
    pub(crate) unsafe fn from_raw(
        ptr: NonNull<u8>,
        len: usize,
        backing: Backing,
        tracker: Arc<AllocTracker>,
    ) -> Self {
        Self {
            ptr,
            len,
            backing,
            tracker,
            in_flight: Default::default(),
        }
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

    /// Where the bytes came from.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Marks the arena as read by a gather until the guard drops; `Drop` waits for it.
    pub(crate) fn begin_use(&self) -> Use {
        InFlight::begin(&self.in_flight)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        self.in_flight.wait_idle();
        let raw = self.ptr.as_ptr();
        match self.backing {
            Backing::Heap => {
                // The layout was valid at allocation, with these same values.
                if let Ok(layout) = Layout::from_size_align(self.len.max(1), ARENA_ALIGN) {
                    // SAFETY: ptr came from alloc_zeroed with this same layout and is freed once,
                    // here.
                    unsafe { dealloc(raw, layout) };
                }
            }
            Backing::HugeTlb | Backing::TransparentHuge | Backing::Mmap => {
                // SAFETY: ptr/len came from map_anonymous and are unmapped once, here.
                unsafe { crate::mmap::unmap(raw, self.len) };
            }
            Backing::CudaPinned => {
                // SAFETY: ptr came from cuMemHostAlloc and is freed once, here.
                unsafe { crate::cuda::free_pinned(raw) };
            }
        }
        self.tracker.release(self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_enforced_and_returned() {
        let t = Arc::new(AllocTracker::with_capacity(8192));
        let a = Arena::host(6000, t.clone()).unwrap();
        let err = Arena::host(4096, t.clone()).unwrap_err();
        assert!(matches!(
            err,
            TransferError::Exhausted {
                requested: 4096,
                live: 6000,
                ..
            }
        ));
        assert!(err.to_string().contains("exhausted"));
        assert_eq!(
            t.snapshot(),
            AllocStats {
                arenas: 1,
                bytes: 6000
            }
        );
        drop(a);
        assert_eq!(t.snapshot(), AllocStats::default());
        let b = Arena::host(8192, t.clone()).unwrap();
        drop(b);
    }

    #[test]
    fn hugepage_arena_is_zeroed_writable_and_freed() {
        let t = Arc::new(AllocTracker::default());
        let len = 3 << 20;
        let a = Arena::hugepage(len, t.clone()).unwrap();
        assert_eq!(a.as_ptr() as usize % ARENA_ALIGN, 0);
        assert_ne!(a.backing(), Backing::Heap);
        // Whole 2 MiB pages, so that transparent hugepages can back all of it.
        assert_eq!(a.as_ptr() as usize % crate::mmap::HUGE_PAGE, 0);
        // SAFETY: the arena owns len bytes and nothing else touches them in this test.
        let bytes = unsafe { std::slice::from_raw_parts_mut(a.as_mut_ptr(), len) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes[len - 1] = 7;
        assert_eq!(
            t.snapshot(),
            AllocStats {
                arenas: 1,
                bytes: len as u64
            }
        );
        drop(a);
        assert_eq!(t.snapshot(), AllocStats::default());
        let small = Arena::hugepage(4096, t.clone()).unwrap();
        assert_eq!(small.backing(), Backing::Heap);
    }
}
