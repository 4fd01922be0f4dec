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
    // SAFETY: as above.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), rounded, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(TransferError::Alloc {
            bytes: len,
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
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
