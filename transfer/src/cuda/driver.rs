//! Finding the CUDA driver without panicking, and the thin checked wrappers the backend uses.
//!
//! cudarc's dynamic loading panics when `libcuda` is missing (or lacks a symbol), so the
//! library is probed with `dlopen` first, and the first driver calls run under
//! `catch_unwind`.

use std::ffi::{c_void, CStr};

use cudarc::driver::sys;

use crate::TransferError;

/// The driver's library names, most specific first (driver-only machines ship only `.so.1`).
const LIBCUDA: [&CStr; 2] = [c"libcuda.so.1", c"libcuda.so"];

/// Checks that a CUDA driver library can be loaded, without going through cudarc.
pub fn probe_driver_library() -> Result<(), String> {
    for name in LIBCUDA {
        // SAFETY: dlopen with a valid C string; the handle is closed right away, and libcuda's
        // initialisers have no effect beyond the process's own state.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            // SAFETY: handle came from dlopen above and is closed once.
            unsafe { libc::dlclose(handle) };
            return Ok(());
        }
    }
    Err("no CUDA driver library (libcuda.so.1) on this machine".into())
}

/// Runs driver calls that may panic inside cudarc (missing library or symbol) as an error.
pub(crate) fn no_panic<T>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, TransferError>,
) -> Result<T, TransferError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let reason = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic in the CUDA loader".into());
        Err(TransferError::Cuda { call: what, reason })
    })
}

/// Turns a driver status into a result naming the call.
pub(crate) fn check(call: &'static str, rc: sys::CUresult) -> Result<(), TransferError> {
    if rc == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(TransferError::Cuda {
            call,
            reason: format!("{rc:?}"),
        })
    }
}

/// A driver object pointer (context, stream, event) that may cross threads: the driver API is
/// thread-safe for these handles.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Handle<T>(pub(crate) *mut T);
// SAFETY: CUDA driver handles are usable from any thread with the context current.
unsafe impl<T> Send for Handle<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Handle<T> {}

/// Frees a pinned arena's memory (its `Drop` calls this).
///
/// # Safety
/// `ptr` must come from `cuMemHostAlloc` and be freed once.
pub(crate) unsafe fn free_pinned(ptr: *mut u8) {
    // SAFETY: per the contract. A pinned arena exists only if the driver loaded.
    let rc = unsafe { sys::cuMemFreeHost(ptr.cast::<c_void>()) };
    if let Err(e) = check("cuMemFreeHost", rc) {
        tracing::error!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_never_panics_and_driver_errors_are_named() {
        // Either answer is fine; what matters is that asking cannot crash the daemon.
        let present = probe_driver_library();
        eprintln!("CUDA driver library: {present:?}");
        let e = check("cuInit", sys::CUresult::CUDA_ERROR_NO_DEVICE).unwrap_err();
        assert!(
            e.to_string()
                .contains("cuInit failed: CUDA_ERROR_NO_DEVICE"),
            "{e}"
        );
        let e = no_panic("cuInit", || -> Result<(), TransferError> {
            panic!("no libcuda")
        });
        assert!(e.unwrap_err().to_string().contains("no libcuda"));
    }
}
