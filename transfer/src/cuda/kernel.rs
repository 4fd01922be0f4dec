//! The device gather: a kernel reads the runs straight out of the mapped pinned arena and
//! writes them into device memory, with no CPU packing and no staging copy.
//!
//! Why: on an H100 (PCIe Gen5) packing rows into staging and copying the chunk reached 11% of
//! pinned host-to-device bandwidth for 256-byte rows and 32% for 64 KiB runs (each 64 KiB run
//! its own DMA). The kernel reached 51% and 93% (docs/design/0009-device-gather-kernel.md).
//! Runs of at least [`DMA_BYTES`] still go by DMA: they reach 95% that way and leave the SMs
//! to the engine.
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
/// Run descriptors per buffer (24 bytes each: 1.5 MiB per buffer).
const DESC_CAP: usize = 1 << 16;
/// A gather launches the kernel over its first this many descriptors as soon as they are
/// written, then over twice as many each time, up to [`MAX_LAUNCH_DESCS`]: the GPU moves rows
/// while the CPU writes the next descriptors. Why: writing them all before one launch left the
/// GPU idle for that time; on an H100, 256-byte rows reached 32% of pinned H2D through
/// kvdex against 53% for the same kernel timed alone on the GPU
/// (docs/design/0010-pipelined-gather-launches.md).
const FIRST_LAUNCH_DESCS: usize = 1024;
/// The most descriptors per launch: each launch ends with a tail where the SMs drain, so a
/// few long launches beat many short ones once the pipeline is running.
const MAX_LAUNCH_DESCS: usize = 16384;
/// Threads per block: 8 warps.
const BLOCK_THREADS: u32 = 256;
/// Blocks per SM at most: the kernel loops over runs, so more blocks only add scheduling.
const BLOCKS_PER_SM: u32 = 16;

const PTX: &str = include_str!("gather_runs.ptx");
const ENTRY: &std::ffi::CStr = c"kvdex_gather_runs";

/// The loaded kernel, and two descriptor buffers in mapped pinned memory, used in turn: the
/// CPU fills one while kernels may still read the other (an event per buffer, recorded after
/// each launch over it, says when it is free again). Within a buffer, launches cover
/// consecutive ranges of descriptors. Nothing is allocated per gather.
pub(crate) struct GatherKernel {
    module: Handle<sys::CUmod_st>,
    func: Handle<sys::CUfunc_st>,
    descs: [Handle<Run>; 2],
    /// The buffers' device addresses, looked up once.
    descs_dev: [sys::CUdeviceptr; 2],
    events: [Handle<sys::CUevent_st>; 2],
    cur: usize,
    /// Descriptors written into the current buffer.
    filled: usize,
    /// Of those, the ones a launch already covers.
    launched: usize,
    /// Launch once this many descriptors wait (grows from `first_launch` to `max_launch`).
    batch: usize,
    /// [`FIRST_LAUNCH_DESCS`] and [`MAX_LAUNCH_DESCS`], unless `KVDEX_GATHER_LAUNCH_DESCS`
    /// sets both (so that a benchmark can compare launch sizes in one run; 65536 launches once
    /// per buffer, as before the pipelining).
    first_launch: usize,
    max_launch: usize,
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
        let fixed = std::env::var("KVDEX_GATHER_LAUNCH_DESCS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(|n| n.clamp(1, DESC_CAP));
        let mut me = Self {
            module: Handle(std::ptr::null_mut()),
            func: Handle(std::ptr::null_mut()),
            descs: [Handle(std::ptr::null_mut()); 2],
            descs_dev: [0; 2],
            events: [Handle(std::ptr::null_mut()); 2],
            cur: 0,
            filled: 0,
            launched: 0,
            batch: FIRST_LAUNCH_DESCS,
            first_launch: fixed.unwrap_or(FIRST_LAUNCH_DESCS),
            max_launch: fixed.unwrap_or(MAX_LAUNCH_DESCS),
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
        // Descriptors a failed gather wrote but never launched are dropped, not sent with
        // this one's.
        self.filled = self.launched;
        self.batch = self.first_launch;
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
                    self.switch_buffer();
                }
                if self.filled == 0 {
                    // The kernels that last read this buffer must be done before it is
                    // rewritten.
                    // SAFETY: a live event (an unrecorded one completes at once).
                    check("cuEventSynchronize", unsafe {
                        sys::cuEventSynchronize(self.events[self.cur].0)
                    })?;
                }
                // SAFETY: filled < DESC_CAP, inside the buffer; no launch covers this slot
                // (launches cover `..launched <= filled`, and the buffer's earlier kernels
                // finished: above).
                unsafe {
                    self.descs[self.cur].0.add(self.filled).write(Run {
                        src_offset: r.src_offset + off,
                        dst_offset: r.dst_offset + off,
                        len,
                    })
                };
                self.filled += 1;
                off += len;
                if self.filled - self.launched >= self.batch {
                    // SAFETY: as above.
                    unsafe { self.launch(stream, src_dev, dst)? };
                    self.batch = (self.batch * 2).min(self.max_launch);
                }
            }
        }
        // SAFETY: as above.
        unsafe { self.launch(stream, src_dev, dst)? };
        // The next gather starts on the other buffer, so it need not wait for this one's
        // kernels before writing its first descriptors.
        self.switch_buffer();
        Ok(())
    }

    /// Moves on to the other descriptor buffer (which is waited for before its first write).
    fn switch_buffer(&mut self) {
        self.cur ^= 1;
        self.filled = 0;
        self.launched = 0;
    }

    /// Launches the kernel over the current buffer's descriptors written since its last launch,
    /// and records the buffer's event after it.
    ///
    /// # Safety
    /// As [`GatherKernel::gather`].
    unsafe fn launch(
        &mut self,
        stream: Handle<sys::CUstream_st>,
        src_dev: sys::CUdeviceptr,
        dst: sys::CUdeviceptr,
    ) -> Result<(), TransferError> {
        let n = self.filled - self.launched;
        if n == 0 {
            return Ok(());
        }
        let mut descs_dev =
            self.descs_dev[self.cur] + (self.launched * std::mem::size_of::<Run>()) as u64;
        let (mut arena, mut out, mut n_runs) = (src_dev, dst, n as u64);
        let mut params = [
            (&mut arena as *mut u64).cast::<c_void>(),
            (&mut out as *mut u64).cast::<c_void>(),
            (&mut descs_dev as *mut u64).cast::<c_void>(),
            (&mut n_runs as *mut u64).cast::<c_void>(),
        ];
        let warps_per_block = (BLOCK_THREADS / 32) as usize;
        let blocks = n.div_ceil(warps_per_block).min(self.max_blocks as usize) as u32;
        // SAFETY: four parameters matching the kernel's four u64s, read at launch; the
        // descriptors [launched, filled) are written and stay untouched until the buffer's
        // event completes; the buffers are valid per the contract; the event is ours.
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
        self.launched = self.filled;
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
