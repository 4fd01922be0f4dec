//! One host gather shared between the submitting thread and the pool: the runs are cut into
//! chunks that whoever is free claims with an atomic counter. The caller copies too, so a
//! gather never waits for a pool thread to wake (on a loaded machine a wake-up can cost
//! milliseconds); pool threads that do wake take chunks off its hands. The gather completes
//! when the last claimed chunk is copied, by whichever thread copied it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::copy::{copy_runs_prefetch, copy_runs_streaming, STREAM_MIN_BATCH_BYTES};
use crate::inflight::Use;
use crate::tickets::Tickets;
use crate::{Run, Ticket};

use super::HostPtr;

/// Bytes per chunk: big enough to amortise the claim, small enough to balance two threads.
pub(crate) const CHUNK_BYTES: u64 = 512 << 10;

/// A gather in progress.
pub(crate) struct Job {
    /// The runs, with long ones cut into pieces of at most `CHUNK_BYTES`.
    runs: Vec<Run>,
    runs_per_chunk: usize,
    chunks: usize,
    /// Large batch: chunks are written with streaming stores.
    stream: bool,
    next: AtomicUsize,
    remaining: AtomicUsize,
    src: HostPtr,
    dst: HostPtr,
    ticket: Ticket,
    tickets: Arc<Tickets>,
    /// The arena's and the destination's in-flight uses, dropped by the last finisher.
    uses: Mutex<Option<(Use, Use)>>,
    /// Where the run buffer goes back for reuse.
    spare: Arc<Mutex<Vec<Vec<Run>>>>,
}

impl Job {
    /// Prepares a job over `runs`, copying them (split) into a recycled buffer.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        runs: &[Run],
        total_bytes: u64,
        src: HostPtr,
        dst: HostPtr,
        ticket: Ticket,
        tickets: Arc<Tickets>,
        uses: (Use, Use),
        spare: Arc<Mutex<Vec<Vec<Run>>>>,
    ) -> Arc<Self> {
        let mut owned = spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        owned.clear();
        for r in runs {
            let mut off = 0;
            while off < r.len {
                let len = (r.len - off).min(CHUNK_BYTES);
                owned.push(Run {
                    src_offset: r.src_offset + off,
                    dst_offset: r.dst_offset + off,
                    len,
                });
                off += len;
            }
        }
        let avg = (total_bytes / owned.len().max(1) as u64).max(1);
        let runs_per_chunk = (CHUNK_BYTES / avg).max(1) as usize;
        let chunks = owned.len().div_ceil(runs_per_chunk);
        Arc::new(Self {
            runs: owned,
            runs_per_chunk,
            chunks,
            stream: total_bytes >= STREAM_MIN_BATCH_BYTES,
            next: AtomicUsize::new(0),
            remaining: AtomicUsize::new(chunks),
            src,
            dst,
            ticket,
            tickets,
            uses: Mutex::new(Some(uses)),
            spare,
        })
    }

    /// Claims and copies chunks until none is left unclaimed. Returns true if this call
    /// finished the job (copied its last chunk).
    pub(crate) fn work(&self) -> bool {
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return false;
            }
            let start = c * self.runs_per_chunk;
            let end = (start + self.runs_per_chunk).min(self.runs.len());
            let (src, dst, runs) = (self.src.get(), self.dst.get(), &self.runs[start..end]);
            // The uses held in `self.uses` keep both buffers alive until the last chunk is
            // done; the streaming loop fences its stores before the counter below publishes it.
            // SAFETY: runs were checked (check_runs) with disjoint ascending destinations, so
            // chunks write disjoint bytes of live buffers (above).
            unsafe {
                if self.stream {
                    copy_runs_streaming(src, dst, runs)
                } else {
                    copy_runs_prefetch(src, dst, runs)
                }
            };
            if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.finish();
                return true;
            }
        }
    }

    fn finish(&self) {
        drop(
            self.uses
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        self.tickets.complete(self.ticket);
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let runs = std::mem::take(&mut self.runs);
        self.spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(runs);
    }
}
