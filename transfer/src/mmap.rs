//! Anonymous mappings with hugepages when the machine has them.

use std::ptr::NonNull;

use crate::arena::Backing;
use crate::TransferError;

/// The x86-64 and aarch64 (4 KiB granule) huge page: 2 MiB.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` zeroed bytes: `MAP_HUGETLB` when reserved hugepages exist, else an anonymous
/// mapping advised `MADV_HUGEPAGE` (transparent hugepages), else a plain mapping.
pub(crate) fn map_anonymous(len: usize) -> Result<(NonNull<u8>, Backing), TransferError> {
    let rounded = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: an anonymous mapping at a kernel-chosen address touches no existing memory.
    let huge = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            rounded,
            prot,
            flags | libc::MAP_HUGETLB,
            -1,
            0,
        )
    };
    if huge != libc::MAP_FAILED {
        if let Some(p) = NonNull::new(huge.cast::<u8>()) {
            return Ok((p, Backing::HugeTlb));
        }
    }
    let raw = map_aligned(rounded, prot, flags).ok_or_else(|| TransferError::Alloc {
        bytes: len,
        reason: std::io::Error::last_os_error().to_string(),
    })?;
    let Some(ptr) = NonNull::new(raw.cast::<u8>()) else {
        return Err(TransferError::Alloc {
            bytes: len,
            reason: "mmap returned null".into(),
        });
    };
    // SAFETY: [raw, raw + rounded) is the mapping just made; advice changes no contents.
    let advised = unsafe { libc::madvise(raw, rounded, libc::MADV_HUGEPAGE) } == 0;
    Ok((
        ptr,
        if advised {
            Backing::TransparentHuge
        } else {
            Backing::Mmap
        },
    ))
}

/// Maps `rounded` bytes (a multiple of [`HUGE_PAGE`]) starting on a [`HUGE_PAGE`] boundary,
/// so that transparent hugepages can back all of it: the kernel only puts a 2 MiB page on an
/// aligned 2 MiB stretch, and a plain `mmap` is only page-aligned (a 4 MiB arena would get one
/// hugepage, not two). Maps `HUGE_PAGE` more, then unmaps the unaligned head and the tail, so
/// exactly `[start, start + rounded)` stays mapped. `None` when `mmap` fails (see `errno`).
fn map_aligned(rounded: usize, prot: i32, flags: i32) -> Option<*mut libc::c_void> {
    let over = rounded.checked_add(HUGE_PAGE)?;
    // SAFETY: an anonymous mapping at a kernel-chosen address touches no existing memory.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), over, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let head = (raw as usize).next_multiple_of(HUGE_PAGE) - raw as usize;
    let tail = over - head - rounded;
    // SAFETY: `[raw, raw + head)` and `[raw + head + rounded, raw + over)` lie inside the
    // mapping just made and nothing uses them; munmap of a zero length is skipped.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap(raw.cast::<u8>().add(head + rounded).cast(), tail);
        }
        Some(raw.cast::<u8>().add(head).cast())
    }
}

/// Unmaps what [`map_anonymous`] mapped.
///
/// # Safety
/// `ptr` and `len` must be a pair returned by / passed to [`map_anonymous`], unmapped once.
pub(crate) unsafe fn unmap(ptr: *mut u8, len: usize) {
    let rounded = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    // SAFETY: per the contract, this is exactly one live mapping of `rounded` bytes.
    let rc = unsafe { libc::munmap(ptr.cast(), rounded) };
    if rc != 0 {
        tracing::error!(len, "munmap failed: {}", std::io::Error::last_os_error());
    }
}
