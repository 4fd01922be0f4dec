//! CUDA-link destinations: device memory allocated here (tests, benchmarks), engine memory
//! opened from CUDA IPC handles, and their release. Split from `mod.rs` so that the link's
//! gather path reads in one sitting.

use std::ffi::c_char;

use cudarc::driver::sys;

use super::driver::{check, Handle};
use super::CudaLink;
use crate::host::HostPtr;
use crate::{check_runs, DestId, IpcEventHandle, IpcMemHandle, Run, TransferError};

/// Where a CUDA-link destination lives.
#[derive(Clone, Copy, Debug)]
pub(super) enum Dest {
    /// Host memory: gathered by CPU copies, as on the host link.
    Host(HostPtr),
    /// GPU memory: opened from an IPC handle (`ipc`), or allocated here (`cuMemAlloc`), with
    /// the engine's IPC event to record after each gather, if it sent one.
    Device {
        /// Where gathers write: `base` plus the engine's offset into its allocation.
        ptr: sys::CUdeviceptr,
        /// The allocation's start, which `cuIpcCloseMemHandle` / `cuMemFree` take.
        base: sys::CUdeviceptr,
        ipc: bool,
        event: Option<Handle<sys::CUevent_st>>,
    },
}

impl CudaLink {
    /// Allocates `bytes` of device memory as a destination owned by this link (freed on
    /// unregister). The engine's buffers come through [`crate::DeviceLink::register_ipc`]; this one
    /// serves tests and benchmarks, which have no engine process.
    pub fn alloc_device(&self, bytes: usize) -> Result<DestId, TransferError> {
        self.make_current()?;
        let mut ptr = 0;
        // SAFETY: out-pointer to a local, context current.
        check("cuMemAlloc", unsafe {
            sys::cuMemAlloc_v2(&mut ptr, bytes.max(1))
        })?;
        let dest = Dest::Device {
            ptr,
            base: ptr,
            ipc: false,
            event: None,
        };
        Ok(self.dests.insert((dest, bytes as u64), bytes as u64))
    }

    /// Copies `out.len()` bytes at `offset` of a device destination back to the host, after
    /// every gather submitted so far: how tests check what landed.
    pub fn read_device(
        &self,
        dest: DestId,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), TransferError> {
        let check_len = [Run {
            src_offset: 0,
            dst_offset: offset,
            len: out.len() as u64,
        }];
        let ((kind, len), _, _use) = self.dests.begin_gather(dest)?;
        let Dest::Device { ptr, .. } = kind else {
            return Err(TransferError::InvalidArgument(
                "read_device of a host destination".into(),
            ));
        };
        if out.is_empty() {
            return Ok(());
        }
        check_runs(&check_len, out.len() as u64, len)?;
        self.make_current()?;
        // SAFETY: live stream; then a bounded device-to-host copy into `out`.
        unsafe {
            check(
                "cuStreamSynchronize",
                sys::cuStreamSynchronize(self.stream.0),
            )?;
            let rc = sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), ptr + offset, out.len());
            check("cuMemcpyDtoH", rc)
        }
    }

    /// Opens an engine's allocation from its IPC handle as a destination; see
    /// [`crate::DeviceLink::register_ipc`].
    pub(super) fn open_ipc(
        &self,
        mem: &IpcMemHandle,
        offset: usize,
        len: usize,
        event: Option<&IpcEventHandle>,
    ) -> Result<DestId, TransferError> {
        if !(offset as u64).is_multiple_of(crate::RUN_ALIGN) {
            return Err(TransferError::Misaligned(format!(
                "IPC destination offset {offset} is not a multiple of {}",
                crate::RUN_ALIGN
            )));
        }
        self.make_current()?;
        let handle = sys::CUipcMemHandle {
            reserved: mem.0.map(|b| b as c_char),
        };
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        let mut base = 0;
        // SAFETY: out-pointer to a local; the handle is plain bytes the driver validates.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(&mut base, handle, flags)
        })?;
        let close = |e: TransferError| {
            // SAFETY: opened just above, closed once, on this error path only.
            unsafe { sys::cuIpcCloseMemHandle(base) };
            Err(e)
        };
        let (mut start, mut size) = (0, 0);
        // SAFETY: out-pointers to locals; `base` is a live mapping.
        let rc = unsafe { sys::cuMemGetAddressRange_v2(&mut start, &mut size, base) };
        if let Err(e) = check("cuMemGetAddressRange", rc) {
            return close(e);
        }
        // Bytes from the opened pointer to the end of the engine's allocation.
        let avail = (start + size as u64).saturating_sub(base);
        if offset as u128 + len as u128 > avail as u128 {
            return close(TransferError::OutOfRange(format!(
                "IPC destination of {len} bytes at offset {offset} runs past its allocation \
                 of {avail} bytes"
            )));
        }
        let ev = match event {
            None => None,
            Some(h) => {
                let mut ev = std::ptr::null_mut();
                let handle = sys::CUipcEventHandle {
                    reserved: h.0.map(|b| b as c_char),
                };
                // SAFETY: out-pointer to a local.
                let rc = unsafe { sys::cuIpcOpenEventHandle(&mut ev, handle) };
                if let Err(e) = check("cuIpcOpenEventHandle", rc) {
                    return close(e);
                }
                Some(Handle(ev))
            }
        };
        let dest = Dest::Device {
            ptr: base + offset as u64,
            base,
            ipc: true,
            event: ev,
        };
        Ok(self.dests.insert((dest, len as u64), len as u64))
    }

    pub(super) fn release(&self, dest: Dest) {
        let Dest::Device {
            base, ipc, event, ..
        } = dest
        else {
            return;
        };
        if self.make_current().is_err() {
            return;
        }
        // SAFETY: the registry handed this destination out once; its gathers have finished
        // (their uses ended, so their stream callbacks ran), and it is released once here.
        let (call, rc) = unsafe {
            if let Some(ev) = event {
                sys::cuEventDestroy_v2(ev.0);
            }
            if ipc {
                ("cuIpcCloseMemHandle", sys::cuIpcCloseMemHandle(base))
            } else {
                ("cuMemFree", sys::cuMemFree_v2(base))
            }
        };
        if let Err(e) = check(call, rc) {
            tracing::error!("releasing a destination: {e}");
        }
    }
}
