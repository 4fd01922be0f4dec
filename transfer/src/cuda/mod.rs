//! The CUDA backend: pinned arenas from `cuMemHostAlloc`, destinations in the engine's GPU
//! memory opened from CUDA IPC handles, and double-buffered asynchronous gathers on a stream.
//! cudarc loads the driver at run time, so nothing here is needed to build or run without one.

mod dest;
mod driver;
mod kernel;
mod staging;

use std::ffi::{c_char, c_void};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::sys;

pub(crate) use driver::free_pinned as free_pinned_raw;
pub use driver::probe_driver_library;
use driver::{check, no_panic, Handle};
pub use kernel::DMA_BYTES;
pub use staging::{CHUNK_BYTES, DIRECT_BYTES};

use crate::arena::AllocTracker;
use crate::dest::{DestStats, Registry};
use crate::host::{HostEngine, HostPtr};
use crate::inflight::Use;
use crate::tickets::Tickets;
use crate::{
    check_runs, AllocStats, Arena, Backing, DestId, DeviceLink, IpcEventHandle, IpcMemHandle, Run,
    Ticket, TransferError,
};
use dest::Dest;
use kernel::GatherKernel;
use staging::Staging;

/// The primary context of the device in use, made current before freeing pinned memory on
/// whatever thread drops an arena.
static PRIMARY: OnceLock<Handle<sys::CUctx_st>> = OnceLock::new();

/// Frees a pinned arena's memory (its `Drop` calls this).
///
/// # Safety
/// `ptr` must come from `cuMemHostAlloc` and be freed once.
pub(crate) unsafe fn free_pinned(ptr: *mut u8) {
    if let Some(ctx) = PRIMARY.get() {
        // SAFETY: the primary context is retained for the life of the process.
        unsafe { sys::cuCtxSetCurrent(ctx.0) };
    }
    // SAFETY: forwarded contract.
    unsafe { free_pinned_raw(ptr) }
}

/// What a finished gather releases: it is handed to the stream as a host callback, which runs
/// once every copy before it has completed.
struct Done {
    tickets: Arc<Tickets>,
    ticket: Ticket,
    _src: Use,
    _dst: Use,
}

unsafe extern "C" fn on_gather_done(arg: *mut c_void) {
    // SAFETY: arg is the Box<Done> leaked by `gather_device`, handed to exactly one callback.
    let done = unsafe { Box::from_raw(arg.cast::<Done>()) };
    done.tickets.complete(done.ticket);
}

/// [`DeviceLink`] over one CUDA device.
pub struct CudaLink {
    ctx: Handle<sys::CUctx_st>,
    device_name: String,
    stream: Handle<sys::CUstream_st>,
    staging: Mutex<Staging>,
    /// The device gather kernel, used for pinned sources; `None` if it failed to load (then
    /// pinned sources are packed through `staging` too). Locked after `staging`.
    kernel: Option<Mutex<GatherKernel>>,
    tracker: Arc<AllocTracker>,
    dests: Registry<(Dest, u64)>,
    tickets: Arc<Tickets>,
    host: HostEngine,
    pool: Arc<rayon::ThreadPool>,
}

impl CudaLink {
    /// Opens device `ordinal`: probes for the driver library first, so a machine without CUDA
    /// gets an error, never a panic.
    pub fn new(ordinal: i32) -> Result<Self, TransferError> {
        probe_driver_library().map_err(|reason| TransferError::Cuda {
            call: "dlopen",
            reason,
        })?;
        no_panic("driver start-up", || Self::open(ordinal))
    }

    fn open(ordinal: i32) -> Result<Self, TransferError> {
        // SAFETY: cuInit takes no pointers; the library is known to load.
        check("cuInit", unsafe { sys::cuInit(0) })?;
        let mut dev = 0;
        // SAFETY: out-pointer to a local.
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut dev, ordinal)
        })?;
        let mut name = [0 as c_char; 256];
        // SAFETY: the buffer holds 256 chars, as passed.
        check("cuDeviceGetName", unsafe {
            sys::cuDeviceGetName(name.as_mut_ptr(), 256, dev)
        })?;
        // SAFETY: the driver wrote a NUL-terminated string within the buffer.
        let device_name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into();
        let mut ctx = std::ptr::null_mut();
        // SAFETY: out-pointer to a local. The primary context stays retained for the process's
        // life: pinned arenas may outlive the link, and freeing them needs it.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
        })?;
        let _ = PRIMARY.set(Handle(ctx));
        // SAFETY: a retained context.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })?;
        let mut stream = std::ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: out-pointer to a local, context current.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut stream, flags)
        })?;
        let staging = Staging::new()?;
        let kernel = match GatherKernel::new(dev) {
            Ok(k) => Some(Mutex::new(k)),
            Err(e) => {
                tracing::warn!("CUDA gather kernel unavailable, packing through staging: {e}");
                None
            }
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kvdex-pack-{i}"))
            .build()
            .map_err(|e| TransferError::Alloc {
                bytes: 0,
                reason: e.to_string(),
            })?;
        let tickets = Arc::new(Tickets::new());
        Ok(Self {
            ctx: Handle(ctx),
            device_name,
            stream: Handle(stream),
            staging: Mutex::new(staging),
            kernel,
            tracker: Arc::new(AllocTracker::default()),
            dests: Registry::new(),
            host: HostEngine::new(
                threads,
                crate::host::HostConfig::default().parallel_min_bytes,
                tickets.clone(),
            ),
            tickets,
            pool: Arc::new(pool),
        })
    }

    /// The device's name, as the driver reports it (for logs and benchmark reports).
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// How gathers from pinned arenas reach the device: `"kernel"` (the device gather kernel
    /// reads mapped pinned memory) or `"staging"` (packed by the CPU, then copied), for logs
    /// and benchmark reports.
    pub fn gather_path(&self) -> &'static str {
        if self.kernel.is_some() {
            "kernel"
        } else {
            "staging"
        }
    }

    fn make_current(&self) -> Result<(), TransferError> {
        // SAFETY: the context is retained for the process's life.
        check("cuCtxSetCurrent", unsafe {
            sys::cuCtxSetCurrent(self.ctx.0)
        })
    }

    /// Submits the device gather; see [`DeviceLink::gather`].
    fn gather_device(
        &self,
        src: &Arena,
        runs: &[Run],
        ptr: sys::CUdeviceptr,
        len: u64,
        event: Option<Handle<sys::CUevent_st>>,
        dest_use: Use,
    ) -> Result<Ticket, TransferError> {
        check_runs(runs, src.len() as u64, len)?;
        self.make_current()?;
        let ticket = self.tickets.submit(false)?;
        let submitted = (|| {
            let mut staging = self.staging.lock().unwrap_or_else(PoisonError::into_inner);
            match &self.kernel {
                Some(kernel) if src.backing() == Backing::CudaPinned => {
                    let mut kernel = kernel.lock().unwrap_or_else(PoisonError::into_inner);
                    // `ptr` is 16-byte aligned (cuMemAlloc, or an IPC offset checked at
                    // registration); pinned arenas are mapped (DEVICEMAP).
                    // SAFETY: runs checked against both buffers (16-byte multiples); context
                    // current; the arena lives until the callback below drops its use.
                    unsafe { kernel.gather(self.stream, src, runs, ptr)? }
                }
                // SAFETY: runs were checked against both buffers; the context is current; the
                // arena stays alive until the callback below drops its use.
                _ => unsafe { staging.gather(self.stream, Some(&self.pool), src, runs, ptr)? },
            }
            if let Some(ev) = event {
                // SAFETY: an opened IPC event and our stream.
                check("cuEventRecord", unsafe {
                    sys::cuEventRecord(ev.0, self.stream.0)
                })?;
            }
            let done = Box::new(Done {
                tickets: self.tickets.clone(),
                ticket,
                _src: src.begin_use(),
                _dst: dest_use,
            });
            let arg = Box::into_raw(done).cast::<c_void>();
            // SAFETY: the callback takes ownership of `arg` exactly once when it runs.
            let rc = unsafe { sys::cuLaunchHostFunc(self.stream.0, Some(on_gather_done), arg) };
            if let Err(e) = check("cuLaunchHostFunc", rc) {
                // SAFETY: the launch failed, so no callback owns `arg`: reclaim it.
                drop(unsafe { Box::from_raw(arg.cast::<Done>()) });
                return Err(e);
            }
            Ok(())
        })();
        if let Err(e) = submitted {
            // Let issued copies finish before the caller may free anything, then forget the
            // ticket; the destination may hold part of the batch.
            // SAFETY: live stream.
            unsafe { sys::cuStreamSynchronize(self.stream.0) };
            self.tickets.cancel(ticket);
            return Err(e);
        }
        Ok(ticket)
    }
}

impl Drop for CudaLink {
    fn drop(&mut self) {
        // The staging and kernel buffers are freed after this, on this thread.
        let _ = self.make_current();
        for (dest, _) in self.dests.drain() {
            self.release(dest);
        }
        // SAFETY: every gather has drained (above); the stream is destroyed once.
        unsafe {
            sys::cuStreamSynchronize(self.stream.0);
            sys::cuStreamDestroy_v2(self.stream.0);
        }
    }
}

impl DeviceLink for CudaLink {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc_arena(&self, bytes: usize) -> Result<Arena, TransferError> {
        self.tracker.reserve(bytes)?;
        let pinned = self.make_current().and_then(|()| {
            let mut p: *mut c_void = std::ptr::null_mut();
            let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
            // SAFETY: out-pointer to a local, context current.
            check("cuMemHostAlloc", unsafe {
                sys::cuMemHostAlloc(&mut p, bytes.max(1), flags)
            })?;
            NonNull::new(p.cast::<u8>()).ok_or_else(|| TransferError::Alloc {
                bytes,
                reason: "cuMemHostAlloc returned null".into(),
            })
        });
        match pinned {
            Ok(ptr) => {
                // SAFETY: `bytes` fresh bytes at ptr, ours alone.
                unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, bytes) };
                // SAFETY: zeroed, page-aligned pinned memory, reserved in the tracker above.
                Ok(unsafe {
                    Arena::from_raw(ptr, bytes, Backing::CudaPinned, self.tracker.clone())
                })
            }
            Err(e) => {
                self.tracker.release(bytes);
                Err(e)
            }
        }
    }

    fn stats(&self) -> AllocStats {
        self.tracker.snapshot()
    }

    fn dest_stats(&self) -> DestStats {
        self.dests.stats()
    }

    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<DestId, TransferError> {
        if ptr.is_null() {
            return Err(TransferError::InvalidArgument(
                "destination pointer is null".into(),
            ));
        }
        Ok(self
            .dests
            .insert((Dest::Host(HostPtr(ptr)), len as u64), len as u64))
    }

    fn register_ipc(
        &self,
        mem: &IpcMemHandle,
        offset: usize,
        len: usize,
        event: Option<&IpcEventHandle>,
    ) -> Result<DestId, TransferError> {
        self.open_ipc(mem, offset, len, event)
    }

    fn unregister(&self, dest: DestId) -> Result<(), TransferError> {
        let (kind, _) = self.dests.remove(dest)?;
        self.release(kind);
        Ok(())
    }

    fn gather(&self, src: &Arena, runs: &[Run], dst: DestId) -> Result<Ticket, TransferError> {
        let ((kind, len), _, dest_use) = self.dests.begin_gather(dst)?;
        match kind {
            Dest::Host(ptr) => self.host.gather(src, runs, ptr, len, dest_use),
            Dest::Device { ptr, event, .. } => {
                self.gather_device(src, runs, ptr, len, event, dest_use)
            }
        }
    }

    fn poll(&self, ticket: Ticket) -> Result<bool, TransferError> {
        self.tickets.poll(ticket)
    }

    fn wait(&self, ticket: Ticket) -> Result<(), TransferError> {
        self.tickets.wait(ticket)
    }
}
