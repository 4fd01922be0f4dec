//! The device gather: a kernel reads the runs straight out of the mapped pinned arena and
//! writes them into device memory, with no CPU packing and no staging copy.
//!
//! Why: on an H100 (PCIe Gen5) packing rows into staging and copying the chunk reached 11% of
//! pinned host-to-device bandwidth for 256-byte rows and 32% for 64 KiB runs (each 64 KiB run
//! its own DMA). The kernel reached 51% and 93% (BENCHMARKS.md, issue 4). Runs of at least
//! [`DMA_BYTES`] still go by DMA: they reach 95% that way and leave the SMs to the engine.
//!
//! The kernel is PTX (`gather_runs.ptx`), JIT-compiled by the driver when the link opens, so
//! building kvdex needs no CUDA toolkit. `KVDEX_GATHER_PTX=<file>` loads another PTX instead
//! (to try a kernel built with nvcc from `scripts/gpu/gather_kernel.cu`).

use std::ffi::{c_void, CString};

use cudarc::driver::sys;

use super::driver::{check, Handle};
use crate::{Arena, Run, TransferError};

/// Runs at least this long go by DMA from the arena rather than through the kernel.
pub const DMA_BYTES: u64 = 2 << 20;
/// Longer runs are cut into pieces of this size, one warp each: a warp alone reads host
/// memory at well under 1 GB/s (latency-bound), so long runs need many warps.
const PIECE_BYTES: u64 = 16 << 10;
/// Run descriptors per launch buffer (24 bytes each: 1.5 MiB per buffer).
const DESC_CAP: usize = 1 << 16;
/// Threads per block: 8 warps.
const BLOCK_THREADS: u32 = 256;
/// Blocks per SM at most: the kernel loops over runs, so more blocks only add scheduling.
const BLOCKS_PER_SM: u32 = 16;

const PTX: &str = include_str!("gather_runs.ptx");
const ENTRY: &std::ffi::CStr = c"kvdex_gather_runs";

/// The loaded kernel, and two descriptor buffers in mapped pinned memory, used in turn: the
/// CPU fills one while a kernel may still read the other (an event per buffer says when it is
/// free again). Nothing is allocated per gather.
pub(crate) struct GatherKernel {
    module: Handle<sys::CUmod_st>,
    func: Handle<sys::CUfunc_st>,
    descs: [Handle<Run>; 2],
    /// The buffers' device addresses, looked up once.
    descs_dev: [sys::CUdeviceptr; 2],
    events: [Handle<sys::CUevent_st>; 2],
    cur: usize,
    filled: usize,
    max_blocks: u32,
}

impl GatherKernel {
    /// Loads the kernel on `dev` (whose context must be current) and allocates its buffers.
    pub(crate) fn new(dev: sys::CUdevice) -> Result<Self, TransferError> {
        let ptx = match std::env::var_os("KVDEX_GATHER_PTX") {
            Some(path) => std::fs::read_to_string(&path).map_err(|e| TransferError::Cuda {
                call: "KVDEX_GATHER_PTX",
                reason: format!("{}: {e}", path.to_string_lossy()),
            })?,
            None => PTX.to_string(),
        };
        let ptx = CString::new(ptx).map_err(|_| TransferError::Cuda {
            call: "cuModuleLoadData",
            reason: "PTX holds a NUL byte".into(),
        })?;
        let mut me = Self {
            module: Handle(std::ptr::null_mut()),
            func: Handle(std::ptr::null_mut()),
            descs: [Handle(std::ptr::null_mut()); 2],
            descs_dev: [0; 2],
            events: [Handle(std::ptr::null_mut()); 2],
            cur: 0,
            filled: 0,
            max_blocks: 0,
        };
        // SAFETY: out-pointers to fields of `me`, which frees whatever was made if a later
        // call fails (Drop skips null handles); the context is current (caller's contract).
        unsafe {
            check(
                "cuModuleLoadData",
                sys::cuModuleLoadData(&mut me.module.0, ptx.as_ptr().cast()),
            )?;
            check(
                "cuModuleGetFunction",
                sys::cuModuleGetFunction(&mut me.func.0, me.module.0, ENTRY.as_ptr()),
            )?;
            let mut sms = 0;
            let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
            check(
                "cuDeviceGetAttribute",
                sys::cuDeviceGetAttribute(&mut sms, attr, dev),
            )?;
            me.max_blocks = (sms.max(1) as u32) * BLOCKS_PER_SM;
            for i in 0..2 {
                let mut p: *mut c_void = std::ptr::null_mut();
                let bytes = DESC_CAP * std::mem::size_of::<Run>();
                check(
                    "cuMemHostAlloc",
                    sys::cuMemHostAlloc(&mut p, bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP),
                )?;
                me.descs[i] = Handle(p.cast());
                check(
                    "cuMemHostGetDevicePointer",
                    sys::cuMemHostGetDevicePointer_v2(&mut me.descs_dev[i], p, 0),
                )?;
                let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
                check(
                    "cuEventCreate",
                    sys::cuEventCreate(&mut me.events[i].0, flags),
                )?;
            }
        }
        Ok(me)
    }

    /// Issues the gather of `runs` from `src` (a mapped pinned arena) into device memory at
    /// `dst` on `stream`: kernel launches for short runs, DMA for long ones, in run order.
    ///
    /// # Safety
    /// The runs must have been checked against `src` and the device buffer at `dst` (with
    /// [`crate::check_runs`], so offsets and lengths are multiples of 16 and in bounds, and
    /// `dst` must be 16-byte aligned); `src` must be mapped pinned memory (`cuMemHostAlloc`
    /// with `DEVICEMAP`) that stays alive until the stream has passed these copies; the
    /// context must be current.
    pub(crate) unsafe fn gather(
        &mut self,
        stream: Handle<sys::CUstream_st>,
        src: &Arena,
        runs: &[Run],
        dst: sys::CUdeviceptr,
    ) -> Result<(), TransferError> {
        let mut src_dev = 0;
        // SAFETY: src is mapped pinned memory (contract); out-pointer to a local.
        check("cuMemHostGetDevicePointer", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut src_dev, src.as_ptr().cast_mut().cast(), 0)
        })?;
        self.filled = 0;
        for r in runs {
            if r.len >= DMA_BYTES {
                // SAFETY: the caller's contract; the launch keeps stream order.
                unsafe { self.launch(stream, src_dev, dst)? };
                // SAFETY: the run lies inside the pinned arena and the device buffer.
                check("cuMemcpyHtoDAsync", unsafe {
                    sys::cuMemcpyHtoDAsync_v2(
                        dst + r.dst_offset,
                        src.as_ptr().add(r.src_offset as usize).cast(),
                        r.len as usize,
                        stream.0,
                    )
                })?;
                continue;
            }
            let mut off = 0;
            while off < r.len {
                let len = (r.len - off).min(PIECE_BYTES);
                if self.filled == DESC_CAP {
                    // SAFETY: as above.
                    unsafe { self.launch(stream, src_dev, dst)? };
                }
                if self.filled == 0 {
                    // The kernel that last read this buffer must be done before it is rewritten.
                    // SAFETY: a live event (an unrecorded one completes at once).
                    check("cuEventSynchronize", unsafe {
                        sys::cuEventSynchronize(self.events[self.cur].0)
                    })?;
                }
                // SAFETY: filled < DESC_CAP, inside the buffer; no kernel reads it (above).
                unsafe {
                    self.descs[self.cur].0.add(self.filled).write(Run {
                        src_offset: r.src_offset + off,
                        dst_offset: r.dst_offset + off,
                        len,
                    })
                };
                self.filled += 1;
                off += len;
            }
        }
        // SAFETY: as above.
        unsafe { self.launch(stream, src_dev, dst) }
    }

    /// Launches the kernel over the filled descriptors of the current buffer, then switches
    /// buffers.
    ///
    /// # Safety
    /// As [`GatherKernel::gather`].
    unsafe fn launch(
        &mut self,
        stream: Handle<sys::CUstream_st>,
        src_dev: sys::CUdeviceptr,
        dst: sys::CUdeviceptr,
    ) -> Result<(), TransferError> {
        if self.filled == 0 {
            return Ok(());
        }
        let mut descs_dev = self.descs_dev[self.cur];
        let (mut arena, mut out, mut n) = (src_dev, dst, self.filled as u64);
        let mut params = [
            (&mut arena as *mut u64).cast::<c_void>(),
            (&mut out as *mut u64).cast::<c_void>(),
            (&mut descs_dev as *mut u64).cast::<c_void>(),
            (&mut n as *mut u64).cast::<c_void>(),
        ];
        let warps_per_block = (BLOCK_THREADS / 32) as usize;
        let blocks = self
            .filled
            .div_ceil(warps_per_block)
            .min(self.max_blocks as usize) as u32;
        // SAFETY: four parameters matching the kernel's four u64s, read at launch; the
        // descriptors and buffers are valid per the contract; the event is ours.
        unsafe {
            check(
                "cuLaunchKernel",
                sys::cuLaunchKernel(
                    self.func.0,
                    blocks,
                    1,
                    1,
                    BLOCK_THREADS,
                    1,
                    1,
                    0,
                    stream.0,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
            )?;
            check(
                "cuEventRecord",
                sys::cuEventRecord(self.events[self.cur].0, stream.0),
            )?;
        }
        self.cur ^= 1;
        self.filled = 0;
        Ok(())
    }
}

impl Drop for GatherKernel {
    fn drop(&mut self) {
        // SAFETY: each handle was made once in `new` (null if not) and is released once here,
        // after the kernels that used it (their events) have finished.
        unsafe {
            for ev in self.events {
                if !ev.0.is_null() {
                    sys::cuEventSynchronize(ev.0);
                    sys::cuEventDestroy_v2(ev.0);
                }
            }
            for d in self.descs {
                if !d.0.is_null() {
                    sys::cuMemFreeHost(d.0.cast());
                }
            }
            if !self.module.0.is_null() {
                sys::cuModuleUnload(self.module.0);
            }
        }
    }
}
