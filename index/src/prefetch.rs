//! Software prefetch: ask the CPU to start loading cache lines that a loop will read soon.
//!
//! A graph search scores a few dozen key rows scattered over a context of hundreds of MiB; each
//! row misses every cache, and a row scored right after its load costs a full memory latency.
//! Issuing the loads for all rows of a batch first, then scoring them, overlaps those misses
//! (hnswlib and faiss do the same). A prefetch is only a hint: it never faults, reads nothing
//! the program can observe, and is harmless when the line is already cached.

/// Bytes of one cache line on every x86_64 CPU kvdex targets.
pub const CACHE_LINE: usize = 64;

/// Hints that the `len` bytes starting at `ptr` will be read soon (into all cache levels).
///
/// Any address is allowed, even one outside every mapping: a prefetch never faults. No-op on
/// targets other than x86_64.
#[inline(always)]
pub fn prefetch_bytes(ptr: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // Every line the range touches, also when `ptr` is not line-aligned.
        let skew = ptr as usize % CACHE_LINE;
        let (ptr, len) = (ptr.wrapping_sub(skew), len + skew);
        let mut off = 0;
        while off < len {
            // SAFETY: `prefetcht0` is an SSE instruction (part of the x86_64 baseline) that only
            // hints the cache; it does not dereference the address architecturally and cannot
            // fault, so any pointer value is sound. `wrapping_add` avoids pointer-overflow UB.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    ptr.wrapping_add(off).cast::<i8>(),
                )
            };
            off += CACHE_LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ptr, len);
    }
}

/// Hints that the elements of `slice` will be read soon.
#[inline(always)]
pub fn prefetch_slice<T>(slice: &[T]) {
    prefetch_bytes(slice.as_ptr().cast(), std::mem::size_of_val(slice));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_leaves_data_unchanged_and_never_faults() {
        let v: Vec<u32> = (0..4096).collect();
        prefetch_slice(&v);
        prefetch_slice(&v[100..200]);
        prefetch_slice::<u32>(&[]);
        // Addresses outside any mapping are fine for a hint.
        prefetch_bytes(std::ptr::null(), 256);
        prefetch_bytes(usize::MAX as *const u8, 128);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    }
}
