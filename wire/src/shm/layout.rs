//! The byte layout of a region, shared by the daemon and every client.
//!
//! A region is one file under /dev/shm:
//!
//! ```text
//! [Header 1024 B][submission slots][completion slots][error messages][payload arena]
//! ```
//!
//! Everything in it is either an atomic (the header, the ring slots, the error messages) or
//! plain bytes (the arena). There are no pointers and no `usize`: offsets are `u64` from the
//! start of the file, so the two processes may map it at different addresses.

use std::sync::atomic::{AtomicU32, AtomicU64};

use bytemuck::{Pod, Zeroable};

/// "KVDEXSHM", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"KVDEXSHM");
/// Protocol version: bumped on any incompatible change of the layout or of the request bodies
/// it carries, so that a client and a daemon of different versions fail at attach with a
/// message naming both versions instead of misreading fields. 2: the retrieve body's `SCALE`
/// flag ([`crate::decode`]; version 1 sent scale 0 for "default").
pub const VERSION: u64 = 2;
/// Bytes of the header (a multiple of the cache-line pair size).
pub const HEADER_BYTES: u64 = 1024;
/// u64 words in one ring slot (one 64-byte cache line).
pub const SLOT_WORDS: usize = 8;
/// Bytes of one ring slot.
pub const SLOT_BYTES: u64 = (SLOT_WORDS * 8) as u64;
/// u64 words in one error-message slot.
pub const ERR_WORDS: usize = 32;
/// Bytes of one error message slot (messages are truncated to this).
pub const ERR_BYTES: usize = ERR_WORDS * 8;
/// Ring slots when the caller does not say.
pub const DEFAULT_RING_SLOTS: u64 = 64;
/// Largest ring accepted by [`crate::shm::Region::open`].
pub const MAX_RING_SLOTS: u64 = 1 << 16;
/// Offsets of the sections are multiples of this (a page, so the arena is page-aligned).
pub const SECTION_ALIGN: u64 = 4096;
/// Offsets and lengths of payloads in the arena are multiples of this, so bodies can be viewed
/// as u32/f32/u64 without unaligned reads.
pub const PAYLOAD_ALIGN: u64 = 8;

/// One ring slot as it lives in shared memory: eight atomically accessed words.
pub type SlotWords = [AtomicU64; SLOT_WORDS];
/// One error-message slot as it lives in shared memory.
pub type ErrWords = [AtomicU64; ERR_WORDS];

/// A value alone on its own pair of cache lines (128 bytes, against adjacent-line prefetch), so
/// that the producer's index and the consumer's index never share a line.
#[repr(C, align(128))]
#[derive(Default)]
pub struct Line<T>(pub T);

/// Attach states, in [`Attach::state`].
pub mod attach_state {
    /// Nobody has presented a token yet.
    pub const EMPTY: u64 = 0;
    /// The client wrote its token and pid and waits for the daemon's verdict.
    pub const REQUESTED: u64 = 1;
    /// The token matched; the daemon serves requests.
    pub const ACCEPTED: u64 = 2;
    /// The token did not match; the client may try again.
    pub const REJECTED: u64 = 3;
    /// The client let go of the region; the daemon stops serving it.
    pub const DETACHED: u64 = 4;
}

/// The attach slot: written by the client, judged by the daemon.
#[repr(C)]
#[derive(Default)]
pub struct Attach {
    /// One of [`attach_state`].
    pub state: AtomicU64,
    /// The 16-byte session token, as two little-endian words.
    pub token: [AtomicU64; 2],
    /// The attaching client's pid; the daemon watches it with a pidfd.
    pub client_pid: AtomicU64,
    /// Non-zero once the daemon has stopped serving the region (a [`close_reason`]).
    pub closed: AtomicU64,
}

/// Why the daemon closed a region, in [`Attach::closed`].
pub mod close_reason {
    /// The daemon stopped the worker (session dropped or daemon shutting down).
    pub const STOPPED: u64 = 1;
    /// The client broke the protocol (for example a corrupted ring index).
    pub const PROTOCOL: u64 = 2;
    /// The client went away.
    pub const CLIENT_GONE: u64 = 3;
    /// The worker hit an internal error.
    pub const INTERNAL: u64 = 4;
}

/// The region header. Identity fields are written once by the daemon before the path is handed
/// out; the rest are the rings' indices and the two futex words.
#[repr(C)]
#[derive(Default)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// [`VERSION`].
    pub version: AtomicU64,
    /// Size of the whole file.
    pub total_bytes: AtomicU64,
    /// Slots per ring (a power of two).
    pub ring_slots: AtomicU64,
    /// Offset of the submission ring's slots.
    pub sq_offset: AtomicU64,
    /// Offset of the completion ring's slots.
    pub cq_offset: AtomicU64,
    /// Offset of the error-message slots (one per completion slot).
    pub err_offset: AtomicU64,
    /// Offset of the payload arena.
    pub arena_offset: AtomicU64,
    /// Bytes of the payload arena.
    pub arena_bytes: AtomicU64,
    /// The daemon's pid, so a client notices a daemon that died.
    pub daemon_pid: AtomicU64,
    /// Session shape, written by the worker: layers, q_heads, kv_heads, head_dim, dtype code.
    pub shape: [AtomicU64; 5],
    /// Room for identity fields of later versions.
    pub reserved: AtomicU64,
    /// The attach slot.
    pub attach: Line<Attach>,
    /// Submission ring: next index the client will write (client-owned).
    pub sq_head: Line<AtomicU64>,
    /// Submission ring: next index the daemon will read (daemon-owned).
    pub sq_tail: Line<AtomicU64>,
    /// Completion ring: next index the daemon will write (daemon-owned).
    pub cq_head: Line<AtomicU64>,
    /// Completion ring: next index the client will read (client-owned).
    pub cq_tail: Line<AtomicU64>,
    /// Futex word: 1 while the daemon's worker is parked (or about to park).
    pub daemon_sleeping: Line<AtomicU32>,
    /// Futex word: 1 while the client is parked (or about to park).
    pub client_sleeping: Line<AtomicU32>,
}

/// One submission or completion, copied in and out of a ring slot whole.
///
/// In a submission, `code` is the [`crate::proto::Opcode`], `in_*` locate the request body and
/// `out_*` the space the daemon may write its response into. In a completion, `code` is the
/// [`crate::proto::Status`], `out_len` the bytes of response written at `out_offset`, and
/// `aux` the length of the error message (in the error slot with the completion's index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Descriptor {
    /// Chosen by the client, strictly increasing; echoed in the completion.
    pub request_id: u64,
    /// Opcode (submission) or status (completion).
    pub code: u32,
    /// Completion: error message length. Submission: zero.
    pub aux: u32,
    /// Request body offset in the arena.
    pub in_offset: u64,
    /// Request body length.
    pub in_len: u64,
    /// Response space offset in the arena.
    pub out_offset: u64,
    /// Response space length (submission) or bytes written (completion).
    pub out_len: u64,
    /// Zero (reserved).
    pub reserved: [u64; 2],
}

const _: () = assert!(std::mem::size_of::<Line<AtomicU64>>() == 128);
const _: () = assert!(std::mem::size_of::<Line<Attach>>() == 128);
const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES as usize);
const _: () = assert!(std::mem::align_of::<Header>() == 128);
const _: () = assert!(std::mem::size_of::<Descriptor>() == SLOT_BYTES as usize);
const _: () = assert!(std::mem::size_of::<SlotWords>() == SLOT_BYTES as usize);
const _: () = assert!(std::mem::size_of::<ErrWords>() == ERR_BYTES);

impl Descriptor {
    /// The descriptor as the eight words a slot stores.
    pub fn to_words(&self) -> [u64; SLOT_WORDS] {
        bytemuck::cast(*self)
    }
    /// The descriptor stored as `words`.
    pub fn from_words(words: [u64; SLOT_WORDS]) -> Self {
        bytemuck::cast(words)
    }
}

/// Where each section lives, computed by the daemon and re-validated by a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Size of the file.
    pub total_bytes: u64,
    /// Slots per ring.
    pub ring_slots: u64,
    /// Submission slots.
    pub sq_offset: u64,
    /// Completion slots.
    pub cq_offset: u64,
    /// Error-message slots.
    pub err_offset: u64,
    /// Payload arena.
    pub arena_offset: u64,
    /// Payload arena length.
    pub arena_bytes: u64,
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

impl Geometry {
    /// Lays out a region with `ring_slots` slots per ring and an arena of at least
    /// `arena_bytes` (rounded up to a page). `None` if the numbers overflow or are invalid.
    pub fn new(ring_slots: u64, arena_bytes: u64) -> Option<Self> {
        if !ring_slots.is_power_of_two() || ring_slots > MAX_RING_SLOTS || arena_bytes == 0 {
            return None;
        }
        let sq_offset = align_up(HEADER_BYTES, SECTION_ALIGN)?;
        let cq_offset = align_up(sq_offset + ring_slots * SLOT_BYTES, SECTION_ALIGN)?;
        let err_offset = align_up(cq_offset + ring_slots * SLOT_BYTES, SECTION_ALIGN)?;
        let arena_offset = align_up(err_offset + ring_slots * ERR_BYTES as u64, SECTION_ALIGN)?;
        let arena_bytes = align_up(arena_bytes, SECTION_ALIGN)?;
        let total_bytes = arena_offset.checked_add(arena_bytes)?;
        Some(Self {
            total_bytes,
            ring_slots,
            sq_offset,
            cq_offset,
            err_offset,
            arena_offset,
            arena_bytes,
        })
    }

    /// Reads the geometry a header claims and accepts it only if it is exactly what
    /// [`Geometry::new`] computes for the same ring and arena sizes and matches the file size.
    pub fn from_header(h: &Header, file_len: u64) -> Result<Self, String> {
        use std::sync::atomic::Ordering::Relaxed;
        let claimed = Self {
            total_bytes: h.total_bytes.load(Relaxed),
            ring_slots: h.ring_slots.load(Relaxed),
            sq_offset: h.sq_offset.load(Relaxed),
            cq_offset: h.cq_offset.load(Relaxed),
            err_offset: h.err_offset.load(Relaxed),
            arena_offset: h.arena_offset.load(Relaxed),
            arena_bytes: h.arena_bytes.load(Relaxed),
        };
        let expected = Self::new(claimed.ring_slots, claimed.arena_bytes).ok_or_else(|| {
            format!(
                "header has invalid sizes: ring_slots {} arena_bytes {}",
                claimed.ring_slots, claimed.arena_bytes
            )
        })?;
        if claimed != expected {
            return Err(format!(
                "header geometry {claimed:?} is inconsistent (expected {expected:?})"
            ));
        }
        if claimed.total_bytes != file_len {
            return Err(format!(
                "header says the region has {} bytes, the file has {file_len}",
                claimed.total_bytes
            ));
        }
        Ok(claimed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_words_round_trip() {
        let d = Descriptor {
            request_id: 7,
            code: 3,
            aux: 1,
            in_offset: 8,
            in_len: 16,
            out_offset: 64,
            out_len: 99,
            reserved: [0; 2],
        };
        assert_eq!(Descriptor::from_words(d.to_words()), d);
    }

    #[test]
    fn geometry_is_page_aligned_and_rejects_bad_sizes() {
        let g = Geometry::new(64, 1000).unwrap();
        assert_eq!(g.arena_bytes, 4096);
        for off in [g.sq_offset, g.cq_offset, g.err_offset, g.arena_offset] {
            assert_eq!(off % SECTION_ALIGN, 0);
        }
        assert!(
            g.sq_offset < g.cq_offset
                && g.cq_offset < g.err_offset
                && g.err_offset < g.arena_offset
        );
        assert_eq!(g.total_bytes, g.arena_offset + g.arena_bytes);
        assert!(Geometry::new(63, 1000).is_none());
        assert!(Geometry::new(64, 0).is_none());
        assert!(Geometry::new(1 << 20, 1).is_none());
        assert!(Geometry::new(64, u64::MAX).is_none());
    }

    #[test]
    fn from_header_checks_consistency_and_file_size() {
        let g = Geometry::new(8, 8192).unwrap();
        let h = Header::default();
        use std::sync::atomic::Ordering::Relaxed;
        h.total_bytes.store(g.total_bytes, Relaxed);
        h.ring_slots.store(g.ring_slots, Relaxed);
        h.sq_offset.store(g.sq_offset, Relaxed);
        h.cq_offset.store(g.cq_offset, Relaxed);
        h.err_offset.store(g.err_offset, Relaxed);
        h.arena_offset.store(g.arena_offset, Relaxed);
        h.arena_bytes.store(g.arena_bytes, Relaxed);
        assert_eq!(Geometry::from_header(&h, g.total_bytes).unwrap(), g);
        assert!(Geometry::from_header(&h, g.total_bytes + 1).is_err());
        h.arena_offset.store(g.arena_offset - 4096, Relaxed);
        assert!(Geometry::from_header(&h, g.total_bytes).is_err());
    }
}
