//! The double-buffered host-to-device gather: runs are packed into one pinned staging chunk
//! while the previous chunk's asynchronous copy is in flight on the stream.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::driver::{check, Handle};
use crate::copy::{copy_runs_parallel, copy_runs_prefetch};
use crate::{Arena, Backing, Run, TransferError};

/// Bytes per staging chunk. At ~50 GB/s a chunk's copy takes ~80 us: long enough to hide the
/// per-copy launch cost, short enough that packing the next chunk overlaps it well.
pub const CHUNK_BYTES: u64 = 4 << 20;
/// Runs at least this long, read from a pinned arena, are copied by DMA straight from the
/// arena: staging them would only add a CPU copy.
pub const DIRECT_BYTES: u64 = 64 << 10;
/// Chunks at least this full are packed by the thread pool.
const PARALLEL_PACK_BYTES: u64 = 1 << 20;

/// Two pinned chunks, an event per chunk marking when its last copy finished, and reusable
/// plans (no allocation per gather once warm).
pub(crate) struct Staging {
    bufs: [Handle<u8>; 2],
    events: [Handle<sys::CUevent_st>; 2],
    cur: usize,
    fill: u64,
    /// Pieces of the current chunk: source offset in the arena, destination = chunk offset.
    plan: Vec<Run>,
    /// Copies of the current chunk: source = chunk offset, destination = device offset.
    segs: Vec<Run>,
}

impl Staging {
    /// Allocates both chunks and events; the context must be current.
    pub(crate) fn new() -> Result<Self, TransferError> {
        let mut bufs = [Handle(std::ptr::null_mut()); 2];
        let mut events = [Handle(std::ptr::null_mut()); 2];
        let mut me_err = None;
        for i in 0..2 {
            let mut p: *mut c_void = std::ptr::null_mut();
            // SAFETY: out-pointer to a local; the context is current (caller's contract).
            let rc = unsafe { sys::cuMemHostAlloc(&mut p, CHUNK_BYTES as usize, 0) };
            if let Err(e) = check("cuMemHostAlloc", rc) {
                me_err = Some(e);
                break;
            }
            bufs[i] = Handle(p.cast());
            let mut ev = std::ptr::null_mut();
            let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
            // SAFETY: out-pointer to a local.
            let rc = unsafe { sys::cuEventCreate(&mut ev, flags) };
            if let Err(e) = check("cuEventCreate", rc) {
                me_err = Some(e);
                break;
            }
            events[i] = Handle(ev);
        }
        let me = Self {
            bufs,
            events,
            cur: 0,
            fill: 0,
            plan: Vec::new(),
            segs: Vec::new(),
        };
        match me_err {
            None => Ok(me),
            Some(e) => Err(e), // `me` drops here and frees what was made.
        }
    }

    /// Issues the copies of every run onto `stream`, packing small runs through the chunks.
    ///
    /// # Safety
    /// The runs must have been checked against `src` and a device buffer at `dst` (with
    /// [`crate::check_runs`]); the context must be current; `src` must stay alive until the
    /// stream has passed these copies.
    pub(crate) unsafe fn gather(
        &mut self,
        stream: Handle<sys::CUstream_st>,
        pool: Option<&rayon::ThreadPool>,
        src: &Arena,
        runs: &[Run],
        dst: sys::CUdeviceptr,
    ) -> Result<(), TransferError> {
        let pinned = src.backing() == Backing::CudaPinned;
        self.fill = 0;
        self.plan.clear();
        self.segs.clear();
        for r in runs {
            if pinned && r.len >= DIRECT_BYTES {
                // SAFETY: the caller's contract; order on the stream is kept.
                unsafe { self.flush(stream, pool, src, dst)? };
                // SAFETY: the run lies inside the pinned arena and the device buffer.
                let rc = unsafe {
                    sys::cuMemcpyHtoDAsync_v2(
                        dst + r.dst_offset,
                        src.as_ptr().add(r.src_offset as usize).cast(),
                        r.len as usize,
                        stream.0,
                    )
                };
                check("cuMemcpyHtoDAsync", rc)?;
                continue;
            }
            let mut off = 0;
            while off < r.len {
                if self.fill == CHUNK_BYTES {
                    // SAFETY: as above.
                    unsafe { self.flush(stream, pool, src, dst)? };
                }
                let n = (r.len - off).min(CHUNK_BYTES - self.fill);
                let (fill, dev) = (self.fill, r.dst_offset + off);
                self.plan.push(Run {
                    src_offset: r.src_offset + off,
                    dst_offset: fill,
                    len: n,
                });
                match self.segs.last_mut() {
                    Some(s) if s.dst_offset + s.len == dev && s.src_offset + s.len == fill => {
                        s.len += n
                    }
                    _ => self.segs.push(Run {
                        src_offset: fill,
                        dst_offset: dev,
                        len: n,
                    }),
                }
                self.fill += n;
                off += n;
            }
        }
        // SAFETY: as above.
        unsafe { self.flush(stream, pool, src, dst) }
    }

    /// Packs the current chunk (after its previous copy finished) and issues its copies.
    ///
    /// # Safety
    /// As [`Staging::gather`].
    unsafe fn flush(
        &mut self,
        stream: Handle<sys::CUstream_st>,
        pool: Option<&rayon::ThreadPool>,
        src: &Arena,
        dst: sys::CUdeviceptr,
    ) -> Result<(), TransferError> {
        if self.fill == 0 {
            return Ok(());
        }
        let (buf, ev) = (self.bufs[self.cur], self.events[self.cur]);
        // The copy issued from this chunk two flushes ago must be done before it is rewritten.
        // SAFETY: ev is a live event (an unrecorded one completes at once).
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(ev.0)
        })?;
        match pool {
            // SAFETY: plan pieces lie inside the arena (checked runs) and inside the chunk
            // (fill <= CHUNK_BYTES), with disjoint ascending chunk offsets; the chunk is ours.
            Some(p) if self.fill >= PARALLEL_PACK_BYTES => unsafe {
                copy_runs_parallel(p, src.as_ptr(), buf.0, &self.plan, self.fill)
            },
            // SAFETY: as above.
            _ => unsafe { copy_runs_prefetch(src.as_ptr(), buf.0, &self.plan) },
        }
        for s in &self.segs {
            // SAFETY: the segment lies in the packed chunk and the device buffer; the chunk is
            // not rewritten before the event recorded below completes.
            let rc = unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    dst + s.dst_offset,
                    buf.0.add(s.src_offset as usize).cast(),
                    s.len as usize,
                    stream.0,
                )
            };
            check("cuMemcpyHtoDAsync", rc)?;
        }
        // SAFETY: live event and stream.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(ev.0, stream.0)
        })?;
        self.cur ^= 1;
        self.fill = 0;
        self.plan.clear();
        self.segs.clear();
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for ev in self.events {
            if !ev.0.is_null() {
                // SAFETY: created by cuEventCreate, destroyed once; waits for its copy first.
                unsafe {
                    sys::cuEventSynchronize(ev.0);
                    sys::cuEventDestroy_v2(ev.0);
                }
            }
        }
        for buf in self.bufs {
            if !buf.0.is_null() {
                // SAFETY: allocated by cuMemHostAlloc, freed once, after its copies (above).
                unsafe { sys::cuMemFreeHost(buf.0.cast()) };
            }
        }
    }
}
